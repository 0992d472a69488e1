"""The counters: a snapshot as JSON, the Prometheus exposition (``/metrics``), and the
last hour per minute for the console's charts."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..metrics import Metrics, add_up
from .common import AdminBackend, Context, Endpoint

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


def routes(backend: AdminBackend, ctx: Context) -> list[Endpoint]:
    history = History(backend.metrics)
    ctx.background.append(history.run)          # sampled while the API serves

    async def stats(request: Request) -> Response:
        if request.query_params.get("nodes") != "all":
            return JSONResponse({"metrics": backend.metrics.snapshot()})
        # every node's counters, as each last published them with its heartbeat
        nodes = await backend.spool.nodes(time.time())
        return JSONResponse({
            "metrics": add_up(n["info"].get("counters") or {} for n in nodes),
            "nodes": [{"name": n["name"], "seconds_since": n["seconds_since"]}
                      for n in nodes]})

    async def metrics(request: Request) -> Response:
        data = await asyncio.get_running_loop().run_in_executor(
            None, generate_latest, backend.metrics.exposition)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    async def stats_history(request: Request) -> Response:
        current = await asyncio.get_running_loop().run_in_executor(None, history.totals)
        return JSONResponse(history.per_minute(time.time(), current))

    return [
        Endpoint("/api/stats", stats),
        Endpoint("/api/stats/history", stats_history),
        Endpoint("/metrics", metrics),
    ]
