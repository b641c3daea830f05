"""`fusion serve`: the HTTP server."""

from __future__ import annotations

import argparse
import os

from engine.cli.common import EXIT_OK
from engine.cli.extras import require
from engine.config import Settings


def cmd_serve(args: argparse.Namespace) -> int:
    require("serve", "server", "models")
    import uvicorn

    # The app factory reads its settings from the environment, so the flags go there;
    # uvicorn imports the factory by path and engine/ never imports server/.
    for name in ("host", "port", "data_dir", "log_format", "log_level", "workflows_dir"):
        value = getattr(args, name, None)
        if value is not None:
            os.environ[f"FUSION_{name.upper()}"] = str(value)
    settings = Settings.load()
    uvicorn.run(
        "server.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_config=None,
        # The app writes one line per request itself (server/request_id.py).
        access_log=False,
        # The client address is the peer's: the app reads X-Forwarded-For itself, only
        # from the trusted_proxies setting (server/ratelimit.py); uvicorn's own handling
        # would trust any local process by default.
        proxy_headers=False,
        # Without a bound, shutdown waits for every in-flight request, however long; past
        # it uvicorn cancels them, which cancels their runs.
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the HTTP server")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--data-dir")
    p.add_argument("--workflows-dir")
    p.add_argument("--log-format", choices=["console", "json"])
    p.add_argument("--log-level")
    p.set_defaults(func=cmd_serve)
