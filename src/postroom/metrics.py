"""Counters, in the Prometheus data model (prometheus-client), one registry per server.

Labels are bounded: listener kinds, directions, queue names, results, and enhanced
status codes (RFC 3463 ``class.subject.detail``; anything else counts as ``other``).
``/metrics`` on the admin API serves them in the text format, and ``postroom stats``
prints the same numbers.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .process import process_id

__all__ = ["Metrics", "add_up", "multiprocess", "status_label"]

log = logging.getLogger("postroom.metrics")

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DELIVERY = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 900, 3600, 14400, 86400)


def status_label(status: str) -> str:
    return status if _STATUS.match(status or "") else "other"


class _QueueCollector(Collector):
    """Queue lengths read from the spool when scraped (the seed article's Qlength)."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("postroom_spool_up",
                               "1 when the spool's database answered this scrape, else 0")
        try:
            queues = list(self.read())
        except Exception as exc:      # PostgreSQL away: the other metrics still serve
            log.debug("queue gauges unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        msgs = GaugeMetricFamily("postroom_queue_messages", "Messages in each queue",
                                 labels=["queue"])
        rcpts = GaugeMetricFamily("postroom_queue_recipients", "Recipients in each queue",
                                  labels=["queue"])
        for name, m, r in queues:
            msgs.add_metric([name], m)
            rcpts.add_metric([name], r)
        yield msgs
        yield rcpts


def add_up(snapshots: Iterable[dict[str, list[dict[str, Any]]]]
           ) -> dict[str, list[dict[str, Any]]]:
    """Several nodes' :meth:`Metrics.counters` as one, each sample summed by its labels."""
    sums: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for snap in snapshots:
        for name, samples in snap.items():
            by_labels = sums.setdefault(name, {})
            for s in samples:
                key = tuple(sorted((str(k), str(v)) for k, v in s["labels"].items()))
                by_labels[key] = by_labels.get(key, 0.0) + float(s["value"])
    return {name: [{"labels": dict(k), "value": v} for k, v in sorted(by_labels.items())]
            for name, by_labels in sums.items()}


def multiprocess() -> bool:
    """prometheus-client's multi-process mode: ``postroom serve`` turns it on (before
    the library is imported) when ``[smtp] processes`` is more than one."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


# In multi-process mode every update of a value asks the kernel for the process id
# (os.getpid, a system call: about 2 us each here, 3-4 % of a front end's CPU in W1 at
# ten updates a message), to notice a fork. The library is given the id kept by
# postroom.process instead (its documented ``process_identifier`` hook).
if multiprocess():
    values.ValueClass = values.MultiProcessValue(process_identifier=process_id)


class _Children:
    """prometheus-client's ``labels()`` takes a lock and rebuilds the child's key at
    every call (about 1.5 % of a process's CPU in W2, at five updates a message): the
    children are looked up in a dict first. Label values here are few and fixed
    (directions, listeners, results, status codes)."""

    _by_values: dict[tuple[Any, ...], Any]

    def labels(self: Any, *values: Any, **named: Any) -> Any:
        if named:
            return super().labels(*values, **named)   # type: ignore[misc]
        try:
            return self._by_values[values]
        except AttributeError:
            self._by_values = {}
        except KeyError:
            pass
        child = self._by_values[values] = super().labels(*values)  # type: ignore[misc]
        return child


class _Counter(_Children, Counter):
    pass


class _Gauge(_Children, Gauge):
    pass


class _Histogram(_Children, Histogram):
    pass


class Metrics:
    def __init__(self) -> None:
        # ``registry`` holds this process's metrics; ``exposition`` is what /metrics and
        # postroom stats read: the same registry, or, with several processes, the sum of
        # every process's files (MultiProcessCollector) plus the queue gauges.
        self.registry = r = CollectorRegistry()
        if multiprocess():
            self.exposition = CollectorRegistry()
            MultiProcessCollector(self.exposition)
        else:
            self.exposition = r
        self.received = _Counter("postroom_messages_received", "Messages accepted (250 after DATA)",
                                ["listener"], registry=r)
        self.delivered = _Counter("postroom_recipients_delivered",
                                 "Recipients delivered to a mailbox or relayed",
                                 ["direction"], registry=r)
        self.deferred = _Counter("postroom_recipients_deferred",
                                "Delivery attempts that failed transiently", ["direction"],
                                registry=r)
        self.bounced = _Counter("postroom_recipients_bounced",
                               "Recipients that failed for good", ["direction"], registry=r)
        self.notices = _Counter("postroom_notices_sent", "DSNs sent: failure (NDR), delay, success",
                               ["kind"], registry=r)
        self.relay_refusals = _Counter("postroom_relay_refusals",
                                      "RCPT refused because relaying is not allowed",
                                      ["listener"], registry=r)
        self.verification = _Counter("postroom_verification_results",
                                    "Inbound verification results by method and result",
                                    ["method", "result"], registry=r)
        self.verification_actions = _Counter("postroom_verification_actions",
                                            "Inbound messages quarantined, rejected or "
                                            "deferred by verification", ["action"], registry=r)
        self.stamps = _Counter("postroom_outbound_stamps",
                              "DKIM signatures and ARC seals added at intake, and messages "
                              "queued unsigned after a signing error", ["kind"], registry=r)
        self.connections = _Counter("postroom_connections", "Connections accepted",
                                   ["listener"], registry=r)
        self.connections_current = _Gauge("postroom_connections_current", "Open connections",
                                         ["listener"], registry=r, multiprocess_mode="livesum")
        self.attempts = _Counter("postroom_delivery_attempts", "Delivery attempts by result",
                                ["direction", "result", "status"], registry=r)
        self.acceptance = _Histogram("postroom_acceptance_seconds",
                                    "End of DATA to the 250 (the spool commit)",
                                    buckets=_LATENCY, registry=r)
        self.delivery = _Histogram("postroom_delivery_seconds",
                                  "Arrival to delivery of a recipient", ["direction"],
                                  buckets=_DELIVERY, registry=r)

    def watch_queues(self, read: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        self.exposition.register(_QueueCollector(read))

    def counters(self) -> dict[str, list[dict[str, Any]]]:
        """The counters only (``*_total``), as in :meth:`snapshot`: what this node
        publishes with its heartbeat, for :func:`add_up` across nodes."""
        return {k: v for k, v in self.snapshot().items() if k.endswith("_total")}

    def snapshot(self) -> dict[str, Any]:
        """Every sample as plain JSON: {metric: [{"labels": {...}, "value": v}, ...]}."""
        out: dict[str, list[dict[str, Any]]] = {}
        for family in self.exposition.collect():
            for sample in family.samples:
                if sample.name.endswith("_created") or sample.name.endswith("_bucket"):
                    continue
                out.setdefault(sample.name, []).append(
                    {"labels": dict(sample.labels), "value": sample.value})
        return out
