"""Turns every failure into OpenAI's error envelope `{"error": {message, type, param, code}}`.

The table of errors lives in api/core/errors.py; this module only registers handlers: service errors,
request validation (reported as 400 with the offending field as `param`), unknown routes and methods, the
database being unreachable (503 with Retry-After, which clients retry), and anything unexpected (500,
logged here, never shown to the client). It also keeps the OpenAPI document truthful about them: no 422.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api.core.errors import (
    InternalError,
    InvalidParameter,
    InvalidRequest,
    MethodNotAllowed,
    MissingParameter,
    NotFound,
    ServiceError,
    ServiceUnavailable,
)

logger = logging.getLogger(__name__)

# Where FastAPI found a bad value; not part of the field path a client knows.
_LOCATION_PREFIXES = {"body", "query", "path", "header", "cookie"}
# Pydantic names the member of a union it tried (`stop: str | list[str]` fails at ("stop", "str") and at
# ("stop", "list[str]", 0)); the client's field is the union itself, so the path stops there.
_UNION_MEMBER_NAMES = {"str", "int", "float", "bool", "bytes", "dict", "list", "none", "any"}


def _is_union_member(part: str) -> bool:
    return part in _UNION_MEMBER_NAMES or "[" in part or "-" in part or part[:1].isupper()


def _field_path(location: list[str]) -> str | None:
    if location and location[0] in _LOCATION_PREFIXES:
        location = location[1:]
    for i, part in enumerate(location):
        if i and _is_union_member(part):
            location = location[:i]
            break
    return ".".join(location) or None


def error_response(error: ServiceError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.envelope(), status_code=error.status, headers={**error.headers, **(headers or {})})


async def handle_service_error(_request: Request, exc: ServiceError) -> JSONResponse:
    return error_response(exc)


def validation_error(exc: RequestValidationError) -> ServiceError:
    """The first problem, as a 400 naming its field path (`hyperparameters.n_epochs`, `limit`)."""
    first = exc.errors()[0] if exc.errors() else {}
    param = _field_path([str(part) for part in first.get("loc", ())])
    kind = first.get("type", "")
    if kind == "json_invalid":
        return InvalidRequest("We could not parse the JSON body of your request. It should be a JSON object.")
    if kind == "missing":
        if param is None:
            return MissingParameter("The request body is missing.")
        return MissingParameter(f"Missing required parameter: '{param}'.", param=param)
    message = first.get("msg", "Invalid value")
    return InvalidParameter(f"Invalid value for '{param}': {message}." if param else f"{message}.", param=param)


async def handle_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(exc))


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's own Allow names only the first route that
    matched the path, and GET and POST on /v1/files are two routes; asking each route whether it would
    take the request with each method uses nothing but the routing protocol."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]


async def handle_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own 404 (no such route) and 405, plus any HTTPException a library raises."""
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        error: ServiceError = NotFound(f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"Method {request.method} is not allowed for {request.url.path}.")
        headers["Allow"] = ", ".join(sorted(_allowed_methods(request)))
    else:
        # FastAPI's own 400s (a body it cannot parse, a broken multipart stream) and any library's
        # HTTPException: a strict client still gets a string code, never null.
        error = ServiceError(str(exc.detail))
        error.status = exc.status_code
        error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        error.code = "invalid_request" if exc.status_code < 500 else "internal_error"
    return error_response(error, headers)


async def handle_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(InternalError("The server had an error while processing your request."))


async def handle_database_error(request: Request, exc: Exception) -> JSONResponse:
    """A lost or refused connection (the database restarting, a network cut, a full pool) is transient:
    503 with Retry-After. A value the database refuses (PostgreSQL's text type takes no NUL character, a
    number out of its column's range) came from the request: 400. Any other database error is a bug: 500."""
    if isinstance(exc, (OperationalError, PoolTimeout)) or getattr(exc, "connection_invalidated", False):
        logger.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc.__class__.__name__)
        return error_response(ServiceUnavailable("The database is temporarily unavailable. Please retry shortly."))
    if isinstance(exc, DataError):
        # Logged: a value of our own making that the database refused would be a bug to look at.
        logger.warning("database refused a value on %s %s: %s", request.method, request.url.path, exc.orig)
        return error_response(InvalidRequest(
            "A value in the request cannot be used: it holds a NUL character, or is too long or too large."
        ))
    return await handle_unexpected_error(request, exc)


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, handle_service_error)
    app.add_exception_handler(DBAPIError, handle_database_error)
    app.add_exception_handler(PoolTimeout, handle_database_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(Exception, handle_unexpected_error)
    _document_no_422(app)


def _document_no_422(app: FastAPI) -> None:
    """FastAPI documents a 422 `{"detail": [...]}` on every operation with parameters; this API answers a
    bad request 400 in the error envelope instead (handle_validation_error), so the schema says so and
    client generators do not expect a shape that never comes."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    if isinstance(operation, dict):
                        operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
