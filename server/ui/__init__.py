"""Fusion's web UI at /ui (docs/ui.md): server-rendered pages over the same engine calls
as the API, a small stylesheet and one script for live updates."""

from server.ui.routes import router

ROUTES = [router]
