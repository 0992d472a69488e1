"""The admin API: JSON over HTTP on ``[admin] listen``, and ``/metrics``.

Every request needs ``Authorization: Bearer <token>``; the token is the content of
``<data_dir>/admin.token`` (mode 0600, made on first start). The command line reads the
file and calls this API: it is the only way into a running server's spool.

Served by uvicorn inside the server's own event loop (Starlette routes), in the main
process only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import hmac
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Protocol

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import configedit
from .config import Config, ConfigError, parse_duration
from .events import EventLog, connect_events, find_messages, query_events, timeline
from .metrics import Metrics
from .model import ComponentError
from .spool import ACTIONS, Filters, Spool, views
from .spool.views import QueueError
from .users import UserError, UserStore, add_mailbox, mailbox_key

__all__ = ["AdminBackend", "AdminServer", "make_app"]

log = logging.getLogger("postroom.admin")


class AdminBackend(Protocol):
    spool: Spool
    metrics: Metrics
    events: EventLog
    users: UserStore
    config: Config

    async def set_logging(self, category: str, level: str, peer: str = "",
                          domain: str = "") -> dict[str, Any]: ...
    async def submit_local(self, sender: str, recipients: list[str], data: bytes,
                           user: str) -> dict[str, Any]: ...
    def status(self) -> list[dict[str, Any]]: ...
    async def component(self, name: str, action: str) -> dict[str, Any]: ...
    async def reload(self) -> dict[str, Any]: ...
    def retry_now(self) -> None: ...


def _error(status: int, message: str, **more: Any) -> JSONResponse:
    return JSONResponse({"error": message, **more}, status_code=status)


# The counters the console charts, summed over their labels.
HISTORY_SERIES = {"received": "postroom_messages_received_total",
                  "delivered": "postroom_recipients_delivered_total",
                  "deferred": "postroom_recipients_deferred_total",
                  "bounced": "postroom_recipients_bounced_total",
                  "relay_refusals": "postroom_relay_refusals_total"}
HISTORY_EVERY = 10.0          # seconds between samples
HISTORY_MINUTES = 60


class History:
    """Samples of the charted counters, every HISTORY_EVERY seconds for the last hour,
    kept in memory (a restart starts a new hour)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.samples: collections.deque[tuple[float, dict[str, float]]] = collections.deque(
            maxlen=int(HISTORY_MINUTES * 60 / HISTORY_EVERY) + 12)

    def totals(self) -> dict[str, float]:
        snap = self.metrics.snapshot()
        return {k: sum(s["value"] for s in snap.get(name, ()))
                for k, name in HISTORY_SERIES.items()}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(Exception):     # a sample missed is a gap, not an error
                self.samples.append((time.time(), await loop.run_in_executor(None, self.totals)))
            await asyncio.sleep(HISTORY_EVERY)

    def per_minute(self, now: float, current: dict[str, float] | None = None
                   ) -> dict[str, Any]:
        """Counts per minute for the last hour; None where the server was not running.
        ``current`` (the totals now) makes the last minute exact."""
        first_minute = int(now // 60) - HISTORY_MINUTES + 1
        series: dict[str, list[float | None]] = {
            k: [None] * HISTORY_MINUTES for k in HISTORY_SERIES}
        prev: dict[str, float] | None = None
        samples = list(self.samples) + ([(now, current)] if current is not None else [])
        for t, values in samples:
            i = int(t // 60) - first_minute
            if prev is not None and 0 <= i < HISTORY_MINUTES:
                for k, v in values.items():
                    delta = v - prev[k]
                    series[k][i] = (series[k][i] or 0) + (delta if delta >= 0 else v)
            elif prev is None and 0 <= i < HISTORY_MINUTES:
                for k in series:
                    series[k][i] = series[k][i] or 0
            prev = values
        started = samples[0][0] if samples else now
        for k in series:         # minutes since the first sample with nothing counted are 0
            for i in range(HISTORY_MINUTES):
                if series[k][i] is None and (first_minute + i) * 60 + 60 > started:
                    series[k][i] = 0
        return {"start": first_minute * 60, "minute": 60, "series": series,
                "totals": prev or {k: 0.0 for k in HISTORY_SERIES}}


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


def _filters(q: dict[str, Any]) -> Filters:
    held = q.get("held")
    ids = q.get("ids") or ()
    if isinstance(ids, str):
        ids = tuple(i for i in ids.split(",") if i)
    return Filters(
        domain=str(q.get("domain") or ""), sender=str(q.get("sender") or ""),
        rcpt=str(q.get("rcpt") or ""),
        older_than=parse_duration(q["older_than"]) if q.get("older_than") else 0.0,
        held=None if held in (None, "") else str(held).lower() in ("1", "true", "yes"),
        reason=str(q.get("reason") or ""), queue=str(q.get("queue") or ""),
        ids=tuple(str(i) for i in ids))


def _final_state(events: list[dict[str, Any]], waiting: bool) -> str:
    """One word for where a traced message stands."""
    if waiting:
        return "queued"
    kinds = {e["id"] for e in events}
    if not kinds:
        return "unknown (no events: logged before this server kept them, or expired)"
    if 3004 in kinds and 3002 in kinds:
        return "partly delivered, partly failed"
    if 3004 in kinds:
        return "failed"
    if 3002 in kinds:
        return "delivered"
    return "finished"


class _Lazy:
    """An ASGI app built at its first request."""

    def __init__(self, build: Callable[[], ASGIApp]) -> None:
        self.build = build
        self.app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is None:
            self.app = self.build()
        await self.app(scope, receive, send)


def make_app(backend: AdminBackend, token: str,
             console: Callable[[Starlette], ASGIApp] | None = None) -> Starlette:
    """The API's routes; ``console(app)``, when given, makes the app that serves every
    other path (built at the first request for one: the web stack it imports costs
    the server's main process about 6 MB, which it need not carry until then)."""
    spool = backend.spool
    loop_read = asyncio.get_running_loop

    def guarded(handler: Callable[[Request], Awaitable[Response]]
                ) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "missing or wrong token (Authorization: Bearer <the "
                                   "content of <data_dir>/admin.token>)")
            try:
                return await handler(request)
            except (QueueError, ComponentError, ConfigError, UserError,
                    ValueError) as exc:
                return _error(400, str(exc))
        return run

    async def json_body(request: Request) -> dict[str, Any]:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("send a JSON object")
        return body

    async def status(request: Request) -> Response:
        return JSONResponse({"components": backend.status()})

    async def component(request: Request) -> Response:
        return JSONResponse(await backend.component(request.path_params["name"],
                                                    request.path_params["action"]))

    async def reload(request: Request) -> Response:
        return JSONResponse(await backend.reload())

    async def queues(request: Request) -> Response:
        now = time.time()
        summary = await loop_read().run_in_executor(None, views.summary, spool, now)
        return JSONResponse({"queues": summary})

    async def queue_list(request: Request) -> Response:
        now = time.time()
        name = request.path_params["queue"]
        f = _filters(dict(request.query_params))
        limit = int(request.query_params.get("limit", "1000"))
        return JSONResponse(await views.list_queue(spool, name, f, now, limit))

    async def message(request: Request) -> Response:
        return JSONResponse(await views.show(spool, request.path_params["id"]))

    async def reasons(request: Request) -> Response:
        now = time.time()
        return JSONResponse({"reasons": await views.reasons(spool, now)})

    async def action(request: Request) -> Response:
        body = await json_body(request)
        name = str(body.get("action", ""))
        if name not in ACTIONS:
            raise ValueError(f"unknown action {name!r}: use one of {', '.join(ACTIONS)}")
        f = _filters(body)
        if f.empty:
            raise ValueError("name messages by id, or give filters (or a reason) with all")
        if not f.ids and not body.get("all"):
            raise ValueError("filters select many messages: confirm with all (--all)")
        now = time.time()
        user = str(body.get("who") or "the administrator")[:100]
        result = await views.act(spool, name, f, now, user)
        if name in ("retry", "release"):
            backend.retry_now()
        log.info("queue %s by %s: %d recipients of %d messages", name, user,
                 result["recipients"], result["messages"])
        backend.events.emit(3007, f"queue {name} by {user}: {result['recipients']} recipients "
                            f"of {result['messages']} messages", action=name)
        done = "returned to the sender" if name == "bounce" else "deleted (no report)"
        for mid, address, direction in result.pop("finished"):
            backend.events.emit(3004, f"<{address}> {done} by {user}", queue_id=mid,
                                rcpt=address, domain=address.rpartition("@")[2])
            if name == "bounce":         # failed for good, as the queue manager counts it
                backend.metrics.bounced.labels(direction).inc()
        return JSONResponse(result)

    async def logging_get(request: Request) -> Response:
        return JSONResponse(backend.events.levels.as_json())

    async def logging_set(request: Request) -> Response:
        body = await json_body(request)
        return JSONResponse(await backend.set_logging(
            str(body.get("category", "")), str(body.get("level", "")),
            peer=str(body.get("peer") or ""), domain=str(body.get("domain") or "")))

    def events_read(fn: Callable[[Any], Any]) -> Any:
        conn = connect_events(backend.events.path)
        try:
            return fn(conn)
        finally:
            conn.close()

    async def events(request: Request) -> Response:
        q = request.query_params
        since = time.time() - parse_duration(q["since"]) if q.get("since") else None
        after = int(q.get("after", "0") or 0)
        limit = min(int(q.get("limit", "200") or 200), 10000)

        def read_events(c: Any) -> list[dict[str, Any]]:
            return query_events(c, since=since, severity=q.get("severity", ""),
                                category=q.get("category", ""),
                                queue_id=q.get("queue_id", ""), after_id=after, limit=limit,
                                newest=not after and since is None)
        return JSONResponse({"events": await loop_read().run_in_executor(
            None, events_read, read_events)})

    async def trace(request: Request) -> Response:
        q = request.query_params
        since = time.time() - parse_duration(q["since"]) if q.get("since") else None

        def read_trace(c: Any) -> list[dict[str, Any]]:
            ids = [q["id"]] if q.get("id") else find_messages(
                c, message_id=q.get("message_id", ""), sender=q.get("sender", ""),
                rcpt=q.get("rcpt", ""), since=since)
            return [{"queue_id": i, "events": timeline(c, i)} for i in ids]
        found = await loop_read().run_in_executor(None, events_read, read_trace)
        for item in found:
            waiting = await spool.recipients(Filters(ids=(item["queue_id"],)), time.time())
            item["queued"] = [{"address": r.address, "state": r.state,
                               "last_reply": r.last_reply} for r in waiting]
            item["state"] = _final_state(item["events"], bool(waiting))
        return JSONResponse({"messages": found})

    async def submit(request: Request) -> Response:
        body = await json_body(request)
        try:
            data = base64.b64decode(str(body.get("data", "")), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("data must be base64") from None
        rcpts = body.get("recipients") or []
        if not isinstance(rcpts, list):
            raise ValueError("recipients must be a list")
        return JSONResponse(await backend.submit_local(
            str(body.get("sender", "")), [str(r) for r in rcpts], data,
            str(body.get("user") or "unknown")[:64]))

    async def stats(request: Request) -> Response:
        return JSONResponse({"metrics": backend.metrics.snapshot()})

    async def metrics(request: Request) -> Response:
        data = await loop_read().run_in_executor(None, generate_latest,
                                                 backend.metrics.exposition)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    # --- the counters' last hour (the console's charts) -------------------------------
    history = History(backend.metrics)

    async def stats_history(request: Request) -> Response:
        current = await loop_read().run_in_executor(None, history.totals)
        return JSONResponse(history.per_minute(time.time(), current))

    # --- mailboxes and admin accounts ---------------------------------------------------
    login_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="login")
    routing_lock = asyncio.Lock()          # one routing change at a time

    async def users_list(request: Request) -> Response:
        admins_only = request.query_params.get("admin") in ("1", "true", "yes")
        found = await loop_read().run_in_executor(None, backend.users.list, admins_only)
        return JSONResponse({"users": [{"address": u.address, "created": u.created,
                                        "admin": u.admin} for u in found],
                             "local_domains": list(backend.config.local_domains)})

    async def user_add(request: Request) -> Response:
        body = await json_body(request)
        config = backend.config
        key, maildir, warning = await loop_read().run_in_executor(
            None, lambda: add_mailbox(backend.users, config, str(body.get("address", "")),
                                      str(body.get("password", "")),
                                      admin=bool(body.get("admin"))))
        backend.events.emit(1008, f"mailbox {key} added" + (" (admin)" if body.get("admin")
                                                            else "") + _by(body))
        return JSONResponse({"added": key, "maildir": str(maildir), "warning": warning})

    async def user_remove(request: Request) -> Response:
        body = await json_body(request)
        store = backend.users

        def remove(address: str) -> str:
            admins = [u.address for u in store.list(admins_only=True)]
            if admins == [mailbox_key(address)]:
                raise UserError(f"{admins[0]} is the last admin account: add another "
                                "(--admin) before removing it, or nobody could log in to "
                                "the console")
            return store.remove(address)
        key = await loop_read().run_in_executor(None, remove, request.path_params["address"])
        backend.events.emit(1008, f"mailbox {key} removed (its Maildir is kept)" + _by(body))
        return JSONResponse({"removed": key})

    async def user_password(request: Request) -> Response:
        body = await json_body(request)
        key = await loop_read().run_in_executor(
            None, backend.users.set_password, request.path_params["address"],
            str(body.get("password", "")))
        backend.events.emit(1008, f"password of {key} reset" + _by(body))
        return JSONResponse({"changed": key})

    async def user_verify(request: Request) -> Response:
        """For the console's login: is this an admin account with this password?"""
        body = await json_body(request)
        store = backend.users
        # on a pool of its own: a flood of logins (argon2, about 20 ms each) must not
        # hold up the threads that serve the API's reads
        key = await loop_read().run_in_executor(login_pool, store.verify,
                                                str(body.get("address", "")),
                                                str(body.get("password", "")))
        admins = await loop_read().run_in_executor(None, store.list, True)
        admin = key is not None and any(u.address == key for u in admins)
        return JSONResponse({"ok": key is not None, "address": key, "admin": admin})

    # --- address spaces and relay settings ----------------------------------------------
    async def routing_get(request: Request) -> Response:
        path = Path(backend.config.source)
        view = await loop_read().run_in_executor(None, configedit.read, path)
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
        async with routing_lock:
            try:
                new, _ = await loop_read().run_in_executor(None, lambda: configedit.write(
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
                await loop_read().run_in_executor(None, configedit.restore, path)
                return _error(400, f"the reload refused the new file, so the previous one "
                                   f"is back: {exc}")
        return JSONResponse({"valid": True, "warnings": warnings, "written": str(path),
                             "backup": str(path.with_name(path.name + ".bak")),
                             "reload": result})

    # --- doctor, run by the server (the console watches its steps arrive) ---------------
    doctor_runs = DoctorRuns()

    clients: list[Any] = []

    async def self_call(method: str, path: str, body: Any = None) -> Any:
        """This API, called in-process as any client would call it."""
        if not clients:          # httpx only when doctor runs: the server need not carry it
            import httpx
            clients.append(httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://postroom-admin",
                timeout=120, headers={"Authorization": f"Bearer {token}"}))
        r = await clients[0].request(method, path, json=body)
        data = r.json()
        if r.status_code >= 400:
            raise OSError(data.get("error") or f"the admin API answered {r.status_code}")
        return data

    async def doctor_start(request: Request) -> Response:
        body = await json_body(request)
        from . import diagnostics
        from .dns import Resolver
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

    routes: list[Route | Mount] = [
        Route("/api/status", guarded(status)),
        Route("/api/components/{name}/{action}", guarded(component), methods=["POST"]),
        Route("/api/reload", guarded(reload), methods=["POST"]),
        Route("/api/queues", guarded(queues)),
        Route("/api/queues/reasons", guarded(reasons)),
        Route("/api/queues/actions", guarded(action), methods=["POST"]),
        Route("/api/queues/{queue}", guarded(queue_list)),
        Route("/api/messages/{id}", guarded(message)),
        Route("/api/stats", guarded(stats)),
        Route("/api/logging", guarded(logging_get)),
        Route("/api/logging", guarded(logging_set), methods=["POST"]),
        Route("/api/events", guarded(events)),
        Route("/api/trace", guarded(trace)),
        Route("/api/submit", guarded(submit), methods=["POST"]),
        Route("/api/stats/history", guarded(stats_history)),
        Route("/api/users", guarded(users_list)),
        Route("/api/users", guarded(user_add), methods=["POST"]),
        Route("/api/users/verify", guarded(user_verify), methods=["POST"]),
        Route("/api/users/{address}/remove", guarded(user_remove), methods=["POST"]),
        Route("/api/users/{address}/password", guarded(user_password), methods=["POST"]),
        Route("/api/config/routing", guarded(routing_get)),
        Route("/api/config/routing", guarded(routing_set), methods=["POST"]),
        Route("/api/doctor", guarded(doctor_start), methods=["POST"]),
        Route("/api/doctor/{id}", guarded(doctor_get)),
        Route("/metrics", guarded(metrics)),
    ]
    if console is not None:           # every other path: the web console's pages
        routes.append(Mount("", app=_Lazy(lambda: console(app))))
    app = Starlette(routes=routes)
    app.state.background = [history.run]
    return app


def _by(body: dict[str, Any]) -> str:
    who = str(body.get("who") or "")[:100]
    return f" by {who}" if who else ""


class _Uvicorn(uvicorn.Server):
    # The server's own loop owns SIGTERM/SIGINT; uvicorn must not replace the handlers.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AdminServer:
    """uvicorn serving :func:`make_app` on an already bound socket."""

    def __init__(self, app: Starlette, sock: socket.socket) -> None:
        self.sock = sock
        self.app = app
        self.background: list[asyncio.Task[None]] = []
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self.server = _Uvicorn(config)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.server.should_exit = False
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self.server.serve(sockets=[self.sock]), name="admin")
        self.background = [loop.create_task(fn(), name="admin-background")
                           for fn in getattr(self.app.state, "background", ())]

    async def stop(self) -> None:
        if self.task is None:
            return
        for t in self.background:
            t.cancel()
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await self.task
        self.task = None
