"""The components: their state, stop/start/restart, and reload."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .common import AdminBackend, Context, Endpoint


def routes(backend: AdminBackend, ctx: Context) -> list[Endpoint]:
    async def status(request: Request) -> Response:
        return JSONResponse({"components": backend.status(), "node": backend.config.node,
                             "nodes": await backend.spool.nodes(time.time())})

    async def component(request: Request) -> Response:
        return JSONResponse(await backend.component(request.path_params["name"],
                                                    request.path_params["action"]))

    async def reload(request: Request) -> Response:
        return JSONResponse(await backend.reload())

    return [
        Endpoint("/api/status", status),
        Endpoint("/api/components/{name}/{action}", component, ["POST"]),
        Endpoint("/api/reload", reload, ["POST"]),
    ]
