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
import contextlib
import hmac
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import queueops
from .config import ConfigError, parse_duration
from .events import EventLog, connect_events, find_messages, query_events, timeline
from .metrics import Metrics
from .model import ComponentError
from .spool import SqliteSpool, load_body

__all__ = ["AdminBackend", "AdminServer", "make_app"]

log = logging.getLogger("postroom.admin")


class AdminBackend(Protocol):
    spool: SqliteSpool
    metrics: Metrics
    events: EventLog

    async def set_logging(self, category: str, level: str, peer: str = "",
                          domain: str = "") -> dict[str, Any]: ...
    async def submit_local(self, sender: str, recipients: list[str], data: bytes,
                           user: str) -> dict[str, Any]: ...
    def status(self) -> list[dict[str, Any]]: ...
    async def component(self, name: str, action: str) -> dict[str, Any]: ...
    async def reload(self) -> dict[str, Any]: ...
    def retry_now(self) -> None: ...


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _filters(q: dict[str, Any]) -> queueops.Filters:
    held = q.get("held")
    ids = q.get("ids") or ()
    if isinstance(ids, str):
        ids = tuple(i for i in ids.split(",") if i)
    return queueops.Filters(
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


def make_app(backend: AdminBackend, token: str) -> Starlette:
    spool = backend.spool
    loop_read = asyncio.get_running_loop

    async def read(fn: Callable[[Any], Any]) -> Any:
        return await loop_read().run_in_executor(None, spool.read, fn)

    def guarded(handler: Callable[[Request], Awaitable[Response]]
                ) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "missing or wrong token (Authorization: Bearer <the "
                                   "content of <data_dir>/admin.token>)")
            try:
                return await handler(request)
            except (queueops.QueueError, ComponentError, ConfigError, ValueError) as exc:
                return _error(400, str(exc))
        return run

    async def status(request: Request) -> Response:
        return JSONResponse({"components": backend.status()})

    async def component(request: Request) -> Response:
        return JSONResponse(await backend.component(request.path_params["name"],
                                                    request.path_params["action"]))

    async def reload(request: Request) -> Response:
        return JSONResponse(await backend.reload())

    async def queues(request: Request) -> Response:
        now = time.time()
        return JSONResponse({"queues": await read(lambda c: queueops.summary(c, now))})

    async def queue_list(request: Request) -> Response:
        now = time.time()
        name = request.path_params["queue"]
        f = _filters(dict(request.query_params))
        limit = int(request.query_params.get("limit", "1000"))
        return JSONResponse(await read(lambda c: queueops.list_queue(c, name, f, now, limit)))

    async def message(request: Request) -> Response:
        mid = request.path_params["id"]

        def q(c: Any) -> dict[str, Any]:
            return queueops.show(c, mid, load_body(c, mid, spool.bodies))
        return JSONResponse(await read(q))

    async def reasons(request: Request) -> Response:
        now = time.time()
        return JSONResponse({"reasons": await read(lambda c: queueops.reasons(c, now))})

    async def action(request: Request) -> Response:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("send a JSON object")
        name = str(body.get("action", ""))
        if name not in queueops.ACTIONS:
            raise ValueError(f"unknown action {name!r}: use one of {', '.join(queueops.ACTIONS)}")
        f = _filters(body)
        if f.empty:
            raise ValueError("name messages by id, or give filters (or a reason) with all")
        if not f.ids and not body.get("all"):
            raise ValueError("filters select many messages: confirm with all (--all)")
        now = time.time()
        user = str(body.get("who") or "the administrator")[:100]

        def job(c: Any) -> dict[str, Any]:
            rids = queueops.select_ids(c, f, now)
            return queueops.act(c, name, rids, now, user)
        result = await spool.run(job)
        if name in ("retry", "release"):
            backend.retry_now()
        log.info("queue %s by %s: %d recipients of %d messages", name, user,
                 result["recipients"], result["messages"])
        backend.events.emit(3007, f"queue {name} by {user}: {result['recipients']} recipients "
                            f"of {result['messages']} messages", action=name)
        done = "returned to the sender" if name == "bounce" else "deleted (no report)"
        for mid, address in result.pop("finished"):
            backend.events.emit(3004, f"<{address}> {done} by {user}", queue_id=mid,
                                rcpt=address, domain=address.rpartition("@")[2])
        return JSONResponse(result)

    async def logging_get(request: Request) -> Response:
        return JSONResponse(backend.events.levels.as_json())

    async def logging_set(request: Request) -> Response:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("send a JSON object")
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
            qid = item["queue_id"]
            def queued(c: Any, qid: str = qid) -> list[tuple[str, str, str]]:
                return list(c.execute(
                    "SELECT address, state, last_reply FROM recipients WHERE message = ? AND "
                    "state IN ('conversion', 'delivery')", (qid,)).fetchall())
            waiting = await read(queued)
            item["queued"] = [{"address": a, "state": st, "last_reply": r}
                              for a, st, r in waiting]
            item["state"] = _final_state(item["events"], bool(waiting))
        return JSONResponse({"messages": found})

    async def submit(request: Request) -> Response:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("send a JSON object")
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

    routes = [
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
        Route("/metrics", guarded(metrics)),
    ]
    return Starlette(routes=routes)


class _Uvicorn(uvicorn.Server):
    # The server's own loop owns SIGTERM/SIGINT; uvicorn must not replace the handlers.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AdminServer:
    """uvicorn serving :func:`make_app` on an already bound socket."""

    def __init__(self, app: Starlette, sock: socket.socket) -> None:
        self.sock = sock
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self.server = _Uvicorn(config)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.server.should_exit = False
        self.task = asyncio.get_running_loop().create_task(
            self.server.serve(sockets=[self.sock]), name="admin")

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await self.task
        self.task = None
