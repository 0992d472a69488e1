"""The notices owed to senders (RFC 3464): failure, delay and success reports.

Built from what the spool kept of each recipient's last result, outside the spool's
writer (a big original is a file read), as a new message from the null sender to the
original sender. The queue manager decides when; the spool records that it was sent.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from .body import Body
from .bounce import RecipientReport, build_report
from .conversion import xtext_decode
from .intake import direction_of
from .spool import NewMessage, NewRecipient, NoticeOwed, new_queue_id

__all__ = ["build_notice"]


def build_notice(kind: str, items: Sequence[NoticeOwed], body: Body, *, hostname: str,
                 now: float, max_return_size: int, local_domains: Collection[str]
                 ) -> NewMessage:
    """The ``kind`` notice for ``items`` (recipients of one message)."""
    first = items[0]
    reports = []
    for it in items:
        detail = it.detail
        orcpt = xtext_decode(it.params.get("ORCPT", "").partition(";")[2])
        reports.append(RecipientReport(
            final_recipient=it.address,
            original_recipient=orcpt or None,
            action={"failure": "failed", "delay": "delayed"}.get(
                kind, "relayed" if detail.get("remote_host") else "delivered"),
            status=detail.get("status") or ("2.0.0" if kind == "success" else "5.0.0"),
            diagnostic=it.last_reply, remote_host=detail.get("remote_host"),
            remote_ip=detail.get("remote_ip"), step=detail.get("step", ""),
            hop=detail.get("hop", ""), last_attempt=detail.get("last_attempt"),
            will_retry_until=detail.get("will_retry_until")))
    mparams = first.mail_params
    report = build_report(
        kind=kind, reporting_mta=hostname, original_sender=first.sender,
        original=body.head(max_return_size + 1), original_size=body.size,
        arrival=first.received, recipients=reports, ret=mparams.get("RET"),
        envid=xtext_decode(mparams["ENVID"]) if "ENVID" in mparams else None,
        max_return_size=max_return_size, now=now,
        message_id=f"<{new_queue_id()}.{kind}@{hostname}>",
        boundary=f"{new_queue_id()}/{hostname}")
    to = _lower_domain(first.sender)
    return NewMessage(
        new_queue_id(), "", {}, {"peer": "127.0.0.1", "helo": hostname, "listener": "internal",
                                 "notice": kind, "about": first.message},
        report, (NewRecipient(to, direction_of(to.rpartition("@")[2], local_domains), {}),))


def _lower_domain(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}" if domain else address
