"""The routing page's editor: address spaces (``[[route]]``) and relay settings, read
and written through ``configedit``, then reloaded."""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import configedit
from ..config import ConfigError
from .common import AdminBackend, Context, Endpoint, _by, _error, json_body


def routes(backend: AdminBackend, ctx: Context) -> list[Endpoint]:
    routing_lock = asyncio.Lock()          # one routing change at a time

    async def routing_get(request: Request) -> Response:
        path = Path(backend.config.source)
        view = await asyncio.get_running_loop().run_in_executor(None, configedit.read, path)
        view["warnings"] = [str(w) for w in backend.config.warnings()]
        return JSONResponse(view)

    async def routing_set(request: Request) -> Response:
        body = await json_body(request)
        path = Path(backend.config.source)
        routes = body.get("routes")
        if not isinstance(routes, list) or not all(isinstance(r, dict) for r in routes):
            raise ValueError("routes must be a list of objects")

        def strings(name: str) -> list[str]:
            value = body.get(name)
            if not isinstance(value, list):
                raise ValueError(f"{name} must be a list")
            return [str(v) for v in value]
        check_only = bool(body.get("check_only"))
        loop = asyncio.get_running_loop()
        async with routing_lock:
            try:
                new, _ = await loop.run_in_executor(None, lambda: configedit.write(
                    path, routes, strings("trusted_networks"), strings("local_domains"),
                    str(body.get("version", "")), check_only=check_only))
            except configedit.EditConflict as exc:
                return _error(409, str(exc))
            except ConfigError as exc:
                return _error(400, str(exc), problems=[{"key": p.key, "message": p.message}
                                                       for p in exc.problems])
            warnings = [str(w) for w in new.warnings()]
            if check_only:
                return JSONResponse({"valid": True, "warnings": warnings, "written": None})
            backend.events.emit(1007, f"address spaces and relay settings written to {path}"
                                + _by(body))
            try:
                result = await backend.reload()
            except ConfigError as exc:       # changed under us between write and reload
                await loop.run_in_executor(None, configedit.restore, path)
                return _error(400, f"the reload refused the new file, so the previous one "
                                   f"is back: {exc}")
        return JSONResponse({"valid": True, "warnings": warnings, "written": str(path),
                             "backup": str(path.with_name(path.name + ".bak")),
                             "reload": result})

    return [
        Endpoint("/api/config/routing", routing_get),
        Endpoint("/api/config/routing", routing_set, ["POST"]),
    ]
