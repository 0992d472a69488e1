"""The queues: summary, list, one message, the reasons mail waits, and the actions
(retry, hold, release, delete, bounce). The views are ``postroom.spool.views``."""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..spool import ACTIONS, views
from .common import AdminBackend, Context, Endpoint, _filters, json_body, log


def routes(backend: AdminBackend, ctx: Context) -> list[Endpoint]:
    spool = backend.spool

    async def queues(request: Request) -> Response:
        now = time.time()
        summary = await asyncio.get_running_loop().run_in_executor(
            None, views.summary, spool, now)
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

    # the order matters: reasons and actions before the {queue} that would match them
    return [
        Endpoint("/api/queues", queues),
        Endpoint("/api/queues/reasons", reasons),
        Endpoint("/api/queues/actions", action, ["POST"]),
        Endpoint("/api/queues/{queue}", queue_list),
        Endpoint("/api/messages/{id}", message),
    ]
