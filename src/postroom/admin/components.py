"""The components: their state, stop/start/restart, reload, and stopping the whole server."""

from __future__ import annotations

import os
import time
from typing import Protocol, runtime_checkable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..model import ComponentError
from .common import AdminBackend, Context, Endpoint


@runtime_checkable
class Stoppable(Protocol):
    """A backend that can stop the whole server as SIGTERM does (``postroom serve``'s)."""

    def request_stop(self, reason: str) -> None: ...


def routes(backend: AdminBackend, ctx: Context) -> list[Endpoint]:
    async def status(request: Request) -> Response:
        return JSONResponse({"components": backend.status(), "node": backend.config.node,
                             "nodes": await backend.spool.nodes(time.time())})

    async def component(request: Request) -> Response:
        return JSONResponse(await backend.component(request.path_params["name"],
                                                    request.path_params["action"]))

    async def reload(request: Request) -> Response:
        return JSONResponse(await backend.reload())

    async def stop(request: Request) -> Response:
        """The whole server, as SIGTERM stops it: listeners closed, open sessions told
        421 4.3.2, the queue round finished, mail kept. The answer goes out first."""
        if not isinstance(backend, Stoppable):
            raise ComponentError("this server cannot be stopped through its API")
        backend.request_stop("at the admin API's request (postroom stop)")
        return JSONResponse({"stopping": True, "pid": os.getpid(),
                             "node": backend.config.node})

    return [
        Endpoint("/api/status", status),
        Endpoint("/api/components/{name}/{action}", component, ["POST"]),
        Endpoint("/api/reload", reload, ["POST"]),
        Endpoint("/api/stop", stop, ["POST"]),
    ]
