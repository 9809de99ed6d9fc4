"""`/ui`: the dashboard, a static single page (the `dashboard` package) that talks to `/v1` like any other client.

Nothing here touches the database or checks a key: the page carries no data of its own, and every call
it makes goes through the public API with the key the user typed into it.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from dashboard import STATIC_DIR


router = APIRouter(include_in_schema=False)


class DashboardFiles(StaticFiles):
    """Static files that a browser re-checks on every load (ETag → 304), so an upgraded server never runs
    against yesterday's cached script."""

    def file_response(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - StaticFiles' own signature
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


@router.api_route("/", methods=["GET", "HEAD"])
def root() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.api_route("/ui", methods=["GET", "HEAD"])
def ui_without_slash() -> RedirectResponse:
    # Relative URLs in index.html (the scripts, the stylesheet) resolve only under the trailing slash.
    return RedirectResponse("/ui/")


def mount(app: FastAPI) -> None:
    """Serve the dashboard at `/ui/` and send `/` there."""
    app.include_router(router)
    app.mount("/ui", DashboardFiles(directory=STATIC_DIR, html=True), name="ui")
