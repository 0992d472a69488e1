"""Doctor runs started through the API (the console's): the server runs the steps and
keeps the last runs, whose steps appear as each one completes."""

from __future__ import annotations

import asyncio
import base64
import collections
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..config import parse_duration
from .common import AdminBackend, Context, Endpoint, _error, json_body, log


class DoctorRuns:
    """Doctor runs started through the API: their steps appear as each one completes."""

    KEEP = 20

    def __init__(self) -> None:
        self.runs: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, request: dict[str, Any],
              work: Callable[[Callable[[dict[str, Any]], None]],
                             Coroutine[Any, Any, dict[str, Any]]]) -> dict[str, Any]:
        run: dict[str, Any] = {"id": secrets.token_hex(6), "started": time.time(),
                               "request": request, "done": False, "steps": [],
                               "verdict": None, "error": None}
        self.runs[run["id"]] = run
        while len(self.runs) > self.KEEP:
            self.runs.popitem(last=False)

        async def go() -> None:
            try:
                result = await work(run["steps"].append)
                run["steps"][:] = result["steps"]
                run["verdict"] = result["verdict"]
            except Exception as exc:          # shown to the administrator, with its kind
                log.exception("doctor run %s failed", run["id"])
                run["error"] = f"{exc.__class__.__name__}: {exc}"
            finally:
                run["done"] = True
                run["finished"] = time.time()
        task = asyncio.get_running_loop().create_task(go(), name="doctor")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return run


def routes(backend: AdminBackend, ctx: Context) -> list[Endpoint]:
    doctor_runs = DoctorRuns()
    clients: list[Any] = []

    async def self_call(method: str, path: str, body: Any = None) -> Any:
        """This API, called in-process as any client would call it."""
        if not clients:          # httpx only when doctor runs: the server need not carry it
            import httpx
            assert ctx.app is not None, "the app is built before it serves"
            clients.append(httpx.AsyncClient(
                transport=httpx.ASGITransport(app=ctx.app), base_url="http://postroom-admin",
                timeout=120, headers={"Authorization": f"Bearer {ctx.token}"}))
        r = await clients[0].request(method, path, json=body)
        data = r.json()
        if r.status_code >= 400:
            raise OSError(data.get("error") or f"the admin API answered {r.status_code}")
        return data

    async def doctor_start(request: Request) -> Response:
        body = await json_body(request)
        from .. import diagnostics
        from ..dns import Resolver
        config = backend.config
        rcpt = str(body.get("to") or "") or None
        sender = str(body.get("from") or "") or None
        client_ip = str(body.get("client_ip") or "127.0.0.1")
        auth_user = str(body.get("auth") or "") or None
        stuck_after = parse_duration(body.get("stuck_after") or "1h")
        send_test = bool(body.get("send_test"))
        who = str(body.get("who") or "the administrator")[:100]

        async def fetch(path: str) -> Any:
            return await self_call("GET", path)

        async def submit(s: str, r: str, data: bytes) -> Any:
            try:
                return await self_call("POST", "/api/submit", {
                    "sender": s, "recipients": [r], "user": who,
                    "data": base64.b64encode(data).decode()})
            except OSError as exc:
                raise ValueError(str(exc)) from None

        async def work(progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
            return await diagnostics.doctor(
                config, Resolver(config.nameservers), backend.users.exists, fetch,
                rcpt=rcpt, sender=sender, client_ip=client_ip, auth_user=auth_user,
                stuck_after=stuck_after, submit=submit if send_test else None,
                progress=progress)
        run = doctor_runs.start({"to": rcpt, "from": sender, "client_ip": client_ip,
                                 "auth": auth_user, "send_test": send_test}, work)
        return JSONResponse(run, status_code=202)

    async def doctor_get(request: Request) -> Response:
        run = doctor_runs.runs.get(request.path_params["id"])
        if run is None:
            return _error(404, "no such doctor run (only the last 20 are kept)")
        return JSONResponse(run)

    return [
        Endpoint("/api/doctor", doctor_start, ["POST"]),
        Endpoint("/api/doctor/{id}", doctor_get),
    ]
