"""Final delivery over LMTP (RFC 2033): hand messages to a mail store such as Dovecot or
Cyrus, which files them into its users' mailboxes.

A destination is an ``lmtp`` route: ``host`` (an IP address, or a name looked up with
the system's resolver, port 24 by default) or ``path`` (a Unix socket). The agent
connects to each address in turn until one greets with 220 and accepts LHLO, then sends
every message of the batch over that one connection. LMTP answers the final dot once
per accepted recipient, so each recipient gets its own outcome: from MAIL (all of the
message's recipients), from its RCPT, or from its own reply after the data.

Policy:
- No TLS and no AUTH: LMTP is for this machine or a trusted network (the config refuses
  ``tls`` other than "none", ``username`` and ``password_file`` on lmtp routes).
- A failure to reach the store (a refused connection, a bad greeting, a refused LHLO) is
  transient for every recipient and marks the whole destination as failed
  (``hop_failure``): our own mail store being down is never the sender's problem.
- A connection that breaks after some recipients' replies to the data keeps those
  replies (they are delivered, or refused for good); the recipients whose reply never
  came are retried (a possible duplicate, never a loss).
- DSN: no RET, ENVID, NOTIFY or ORCPT is passed on. LMTP is final delivery, so this
  server keeps the duty to send the success notices it was asked for, as for its own
  Maildirs (``dsn_capable`` is never set).
- A message needing SMTPUTF8 to a store without it fails with 5.6.7; a message over the
  store's SIZE fails with 5.3.4, both without being sent (as over SMTP).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import DeliveryConfig
from ..model import DeliveryResult, Reply
from ..smtp.client import Client, HopError, Transaction, Transcript, wire_chunks
from . import Destination, OutboundMessage, OutboundRecipient
from .smtp import mail_parameters, needs_smtputf8

__all__ = ["LmtpDeliveryAgent"]

log = logging.getLogger("postroom.delivery")

# Failures to reach the store at all: always retried, whatever the reply code.
_HOP_STEPS = ("connect", "greeting", "LHLO")


def _status(reply: Reply) -> str:
    return reply.enhanced or f"{str(reply.code)[0]}.0.0"


@dataclass(frozen=True, slots=True)
class _Target:
    """One address to try: a TCP address (name, ip, port) or a Unix socket (path)."""

    name: str = ""
    ip: str = ""
    port: int = 0
    path: str = ""

    @property
    def label(self) -> str:
        """As the log and the transcript name it."""
        return f"unix:{self.path}" if self.path else f"{self.name}[{self.ip}]:{self.port}"

    @property
    def remote_host(self) -> str:
        return f"unix:{self.path}" if self.path else self.name

    @property
    def remote_ip(self) -> str | None:
        return None if self.path else self.ip


class LmtpDeliveryAgent:
    def __init__(self, hostname: str, config: DeliveryConfig) -> None:
        self.hostname = hostname
        self.config = config

    # --- next hop ------------------------------------------------------------------
    async def _targets(self, dest: Destination) -> list[_Target] | DeliveryResult:
        """The addresses to try in order, or a result that applies to every recipient."""
        route = dest.route
        if route.path:
            return [_Target(path=route.path)]
        try:
            ipaddress.ip_address(route.host)
            return [_Target(route.host, route.host, route.port)]
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(
                route.host, route.port, type=socket.SOCK_STREAM), self.config.connect_timeout)
        except (OSError, TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or exc.__class__.__name__
            # the store's name is our configuration: retried, never bounced
            text = (f"the LMTP host name {route.host} of route {route.match} does not resolve: "
                    f"{reason}")
            return DeliveryResult(0, False, True, Reply(451, "4.4.3", text), "dns", "4.4.3",
                                  hop=dest.describe(), hop_failure=True)
        ips = list(dict.fromkeys(str(info[4][0]) for info in infos))
        ips.sort(key=lambda ip: ":" in ip)            # IPv4 first, as the SMTP agent
        return [_Target(route.host, ip, route.port) for ip in ips]

    # --- delivery ------------------------------------------------------------------
    async def deliver(self, dest: Destination, messages: Sequence[OutboundMessage]
                      ) -> list[DeliveryResult]:
        targets = await self._targets(dest)
        if isinstance(targets, DeliveryResult):
            return [dataclasses.replace(targets, recipient=r.id)
                    for m in messages for r in m.recipients]
        pending = [m for m in messages if m.recipients]
        results: list[DeliveryResult] = []
        failures: list[str] = []
        last_error: HopError | None = None
        last_target: _Target | None = None
        transcript = Transcript()
        for target in targets:
            if not pending:
                break
            transcript.end_connection()
            transcript.note(f"trying {target.label}")
            client = Client(helo_name=self.hostname, command_timeout=self.config.command_timeout,
                            transcript=transcript, lmtp=True)
            try:
                if target.path:
                    await client.connect_unix(target.path, self.config.connect_timeout)
                else:
                    await client.connect(target.ip, target.port, self.config.connect_timeout)
                await client.lhlo()
            except HopError as exc:
                client.close()
                last_error, last_target = exc, target
                failures.append(f"{target.label}: {exc.detail}")
                continue
            try:
                while pending:
                    out, lost = await self._send(client, pending[0], dest, target, transcript)
                    results.extend(out)
                    pending.pop(0)
                    if lost is not None:
                        # the message's own recipients have their results; the rest of
                        # the batch tries the next address
                        raise _Lost(lost)
            except (HopError, _Lost) as exc:
                err = exc.error if isinstance(exc, _Lost) else exc
                last_error, last_target = err, target
                failures.append(f"{target.label}: {err.detail}")
                if isinstance(exc, HopError) and pending:
                    # the message in flight at the failure gets it
                    m = pending.pop(0)
                    results.extend(self._hop_result(err, target, dest, transcript, r,
                                                    hop_failure=False) for r in m.recipients)
                client.close()
                continue
            await client.quit()
        if pending:
            assert last_error is not None and last_target is not None
            summary = "; ".join(failures[-5:])
            for m in pending:
                for r in m.recipients:
                    res = self._hop_result(last_error, last_target, dest, transcript, r)
                    if len(failures) > 1:
                        res = dataclasses.replace(res, reply=dataclasses.replace(
                            res.reply, text=f"{res.reply.text} (all next hops failed: "
                            f"{summary})"))
                    results.append(res)
        return results

    async def _send(self, client: Client, message: OutboundMessage, dest: Destination,
                    target: _Target, transcript: Transcript
                    ) -> tuple[list[DeliveryResult], HopError | None]:
        """One transaction: a result per recipient, and the failure that broke the
        connection after the data (None while it is still usable)."""
        transcript.start_message()
        size = client.size_limit
        if needs_smtputf8(message) and not client.offers("SMTPUTF8"):
            reply = Reply(554, "5.6.7", f"{target.label} does not support SMTPUTF8, which "
                          "this message needs")
            return [self._result(r, reply, "MAIL", target, dest, transcript)
                    for r in message.recipients], None
        if size is not None and len(message.data) > size:
            reply = Reply(552, "5.3.4", f"message size {len(message.data)} exceeds the size "
                          f"limit {size} of {target.label}")
            return [self._result(r, reply, "MAIL", target, dest, transcript)
                    for r in message.recipients], None
        tx = await client.send(message.sender, mail_parameters(client, message),
                               [(r.address, "") for r in message.recipients],
                               wire_chunks(message.data.chunks()))
        out = [self._outcome(tx, i, r, target, dest, transcript)
               for i, r in enumerate(message.recipients)]
        for r, res in zip(message.recipients, out, strict=True):
            log.info("queue_id=%s to=<%s> relay=%s status=%s step=%s (%s)",
                     message.queue_id, r.address, target.label,
                     "sent" if res.ok else ("deferred" if res.transient else "bounced"),
                     res.step, res.reply)
        return out, tx.lost

    def _outcome(self, tx: Transaction, i: int, r: OutboundRecipient, target: _Target,
                 dest: Destination, transcript: Transcript) -> DeliveryResult:
        """Recipient ``i``'s result: MAIL's refusal, its RCPT's, or its own data reply."""
        if not tx.mail.is_positive:
            return self._result(r, tx.mail, "MAIL", target, dest, transcript)
        if not tx.rcpts[i].is_positive:
            return self._result(r, tx.rcpts[i], "RCPT", target, dest, transcript)
        if tx.data_rcpts:
            own = tx.data_rcpts[i]
            if own is not None:
                return self._result(r, own, "DATA", target, dest, transcript)
            assert tx.lost is not None
            # accepted, but its reply never came: unknown, so tried again
            return self._hop_result(tx.lost, target, dest, transcript, r, hop_failure=False)
        if tx.data is None:
            return self._result(r, Reply(451, "4.5.0", "the server accepted no recipient, so "
                                         "DATA was not sent"), "DATA", target, dest, transcript)
        # DATA itself refused (no 354): the same for every accepted recipient
        return self._result(r, tx.data, "DATA", target, dest, transcript)

    @staticmethod
    def _result(r: OutboundRecipient, reply: Reply, step: str, target: _Target,
                dest: Destination, transcript: Transcript) -> DeliveryResult:
        ok = reply.is_positive and step == "DATA"
        return DeliveryResult(r.id, ok, reply.is_transient and not ok, reply, step,
                              _status(reply), dest.describe(),
                              target.remote_host, target.remote_ip, transcript.text())

    @staticmethod
    def _hop_result(exc: HopError, target: _Target, dest: Destination, transcript: Transcript,
                    r: OutboundRecipient, hop_failure: bool = True) -> DeliveryResult:
        transient = exc.transient or exc.step in _HOP_STEPS
        if exc.reply is not None:
            reply = exc.reply
            status = _status(exc.reply)
        else:
            status = {"connect": "4.4.1", "greeting": "4.4.2"}.get(exc.step, "4.4.2")
            reply = Reply(451, status, exc.detail)
        if transient and status.startswith("5."):
            status = "4" + status[1:]          # a deferral reports a transient status
        return DeliveryResult(r.id, False, transient, reply, exc.step, status, dest.describe(),
                              target.remote_host, target.remote_ip, transcript.text(),
                              hop_failure=hop_failure and transient)


class _Lost(Exception):
    """The connection broke after some replies to a message's data (see ``Transaction``)."""

    def __init__(self, error: HopError) -> None:
        super().__init__(error.detail)
        self.error = error
