"""The dashboard: a static single page (`static/`: ES modules, CSS, vendored uPlot) that talks to `/v1` like
any other client. The API serves it at `/ui` (api/routes/ui.py); nothing here runs on the server.
"""

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
