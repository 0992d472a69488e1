"""Diagnostics logging and the event log: the categories' levels, the events, and the
trace of one message through them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..config import parse_duration
from ..events import connect_events, find_messages, query_events, timeline
from ..spool import Filters
from .common import AdminBackend, Context, Endpoint, json_body


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


def routes(backend: AdminBackend, ctx: Context) -> list[Endpoint]:
    spool = backend.spool

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
        return JSONResponse({"events": await asyncio.get_running_loop().run_in_executor(
            None, events_read, read_events)})

    async def trace(request: Request) -> Response:
        q = request.query_params
        since = time.time() - parse_duration(q["since"]) if q.get("since") else None

        def read_trace(c: Any) -> list[dict[str, Any]]:
            ids = [q["id"]] if q.get("id") else find_messages(
                c, message_id=q.get("message_id", ""), sender=q.get("sender", ""),
                rcpt=q.get("rcpt", ""), since=since)
            return [{"queue_id": i, "events": timeline(c, i)} for i in ids]
        found = await asyncio.get_running_loop().run_in_executor(None, events_read, read_trace)
        for item in found:
            waiting = await spool.recipients(Filters(ids=(item["queue_id"],)), time.time())
            item["queued"] = [{"address": r.address, "state": r.state,
                               "last_reply": r.last_reply} for r in waiting]
            item["state"] = _final_state(item["events"], bool(waiting))
        return JSONResponse({"messages": found})

    return [
        Endpoint("/api/logging", logging_get),
        Endpoint("/api/logging", logging_set, ["POST"]),
        Endpoint("/api/events", events),
        Endpoint("/api/trace", trace),
    ]
