"""Outbound delivery: take messages for one destination to the next hop over SMTP.

A destination is a route plus, for MX routes, the recipient domain. The agent
resolves the next hop (MX records by preference, or the smart host's addresses),
connects to each address in turn until one greets with 220, then sends every message
of the batch over that one connection. It returns one :class:`~postroom.model.DeliveryResult` per
recipient: delivered, transient or permanent, with the remote reply, the step, the
server's name and IP, and the transcript of the attempt.

Policy per route:
- TLS ``opportunistic``: STARTTLS when offered, without verifying the certificate (as
  Postfix's ``may``); a failed handshake is retried once in plaintext on a new
  connection. ``required``: STARTTLS must be offered and succeed, and the certificate
  is verified unless ``tls_verify = false``. ``none``: never.
- AUTH (smart hosts with ``username``): never sent in clear unless the route says
  ``tls = "none"``.
- A message needing SMTPUTF8 to a server without it fails with 5.6.7; a message over
  the server's SIZE fails with 5.3.4, both without being sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..config import DeliveryConfig, Route
from ..dns import MxResult, Resolver
from ..model import DeliveryResult, Reply
from ..smtp.client import Client, HopError, Transaction, Transcript, wire_chunks
from . import Destination, OutboundMessage, OutboundRecipient

__all__ = ["SmtpDeliveryAgent"]

log = logging.getLogger("postroom.delivery")


def _status(reply: Reply | None, default: str) -> str:
    if reply is not None and reply.enhanced:
        return reply.enhanced
    if reply is not None:
        return f"{str(reply.code)[0]}.0.0"
    return default


def _passed_on(params: Mapping[str, str], keys: tuple[str, ...]) -> str:
    """The DSN parameters (RFC 3461) the sender gave, for a next hop that offers DSN."""
    return "".join(f" {k}={params[k]}" for k in keys if k in params)


def needs_smtputf8(message: OutboundMessage) -> bool:
    return "SMTPUTF8" in message.mail_params or not message.sender.isascii() or any(
        not r.address.isascii() for r in message.recipients)


def mail_parameters(client: Client, message: OutboundMessage) -> str:
    """MAIL FROM's SIZE, BODY and SMTPUTF8, as far as the server offers them (SMTP and
    LMTP alike; DSN's are SMTP's own)."""
    params = ""
    if client.offers("SIZE"):
        params += f" SIZE={len(message.data)}"
    if message.mail_params.get("BODY", "").upper() == "8BITMIME" and client.offers("8BITMIME"):
        params += " BODY=8BITMIME"
    if needs_smtputf8(message):
        params += " SMTPUTF8"
    return params


# route, our EHLO name, the server's name (a certificate verified for one MX name is
# never reused for another at the same address), its address and port
_Key = tuple[Route, str, str, str, int]


@dataclass(slots=True)
class _Idle:
    """A connection between two batches (the connection cache)."""

    client: Client
    timer: asyncio.TimerHandle
    opened: float                     # loop time
    messages: int                     # sent on it so far


class SmtpDeliveryAgent:
    # The connection cache (Postfix's smtp_connection_cache_on_demand): a connection
    # whose batch went well waits IDLE seconds for the next batch to the same server,
    # over the same route, instead of QUIT; it is closed after REUSE_TIME seconds of
    # use in all (Postfix: smtp_connection_cache_time_limit 2s,
    # smtp_connection_reuse_time_limit 300s).
    IDLE = 2.0
    REUSE_TIME = 300.0

    def __init__(self, resolver: Resolver, hostname: str, config: DeliveryConfig) -> None:
        self.resolver = resolver
        self.hostname = hostname
        self.config = config
        self._may = ssl.create_default_context()
        self._may.check_hostname = False
        self._may.verify_mode = ssl.CERT_NONE
        self._verify = ssl.create_default_context()
        self._noverify = self._may
        self._idle: dict[_Key, list[_Idle]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    # --- the connection cache -------------------------------------------------------
    def _take(self, key: _Key) -> _Idle | None:
        """The most recently used idle connection for ``key`` that the server has not
        closed meanwhile, or None."""
        idle = self._idle.get(key)
        while idle:
            entry = idle.pop()
            entry.timer.cancel()
            if not idle:
                del self._idle[key]
            if entry.client.usable():
                return entry
            entry.client.close()
        return None

    def _park(self, key: _Key, client: Client, opened: float, messages: int) -> None:
        """Keep ``client`` for the next batch, or end it (QUIT) when it has served its
        time, or when as many connections already wait as one destination may have."""
        loop = asyncio.get_running_loop()
        idle = self._idle.setdefault(key, [])
        if loop.time() - opened >= self.REUSE_TIME or not client.usable() or \
                len(idle) >= self.config.max_connections_per_destination:
            if not idle:
                del self._idle[key]
            self._quit(client)
            return
        entry = _Idle(client, loop.call_later(self.IDLE, self._expire, key, client), opened,
                      messages)
        idle.append(entry)

    def _expire(self, key: _Key, client: Client) -> None:
        idle = self._idle.get(key, [])
        for entry in idle:
            if entry.client is client:
                idle.remove(entry)
                break
        if not idle:
            self._idle.pop(key, None)
        self._quit(client)

    def _quit(self, client: Client) -> None:
        task = asyncio.get_running_loop().create_task(client.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every idle connection (at shutdown)."""
        for idle in list(self._idle.values()):
            for entry in idle:
                entry.timer.cancel()
                self._quit(entry.client)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # --- next hop ------------------------------------------------------------------
    async def _hosts(self, dest: Destination) -> list[tuple[str, str, int]] | DeliveryResult:
        """(name, ip, port) to try in order, or a result that applies to every recipient."""
        route = dest.route
        if route.via == "smarthost":
            try:
                ipaddress.ip_address(route.host)
                return [(route.host, route.host, route.port)]
            except ValueError:
                pass
            found = await self.resolver.addresses(route.host)
            if not isinstance(found, tuple):
                # the smart host's own name: our configuration, so retried, never bounced
                return self._dns_failure(dest, f"the smart host name {route.host} of route "
                                         f"{route.match} does not resolve: {found.describe()}",
                                         "4.4.3", False)
            return [(route.host, ip, route.port) for ip in found]
        mx: MxResult = await self.resolver.mx(dest.domain)
        if mx.null_mx:
            return self._dns_failure(dest, f"{dest.domain} publishes a null MX (RFC 7505): "
                                     "it accepts no mail", "5.1.10", True)
        if mx.error is not None:
            return self._dns_failure(dest, mx.error.describe(), mx.error.enhanced,
                                     mx.error.permanent)
        hosts = [(h.name, ip, self.config.mx_port) for h in mx.hosts for ip in h.addresses]
        if not hosts:
            problems = "; ".join(h.error.describe() for h in mx.hosts if h.error) or \
                "no addresses"
            return self._dns_failure(dest, f"no MX host of {dest.domain} has an address: "
                                     f"{problems}", "4.4.3", False)
        return hosts

    def _dns_failure(self, dest: Destination, text: str, status: str, permanent: bool
                     ) -> DeliveryResult:
        code = 550 if permanent else 451
        return DeliveryResult(0, False, not permanent, Reply(code, status, text), "dns",
                              status, hop=dest.describe(), hop_failure=not permanent)

    # --- delivery ------------------------------------------------------------------
    async def deliver(self, dest: Destination, messages: Sequence[OutboundMessage]
                      ) -> list[DeliveryResult]:
        hosts = await self._hosts(dest)
        if isinstance(hosts, DeliveryResult):
            return [dataclasses.replace(hosts, recipient=r.id)
                    for m in messages for r in m.recipients]
        pending = list(messages)
        results: list[DeliveryResult] = []
        failures: list[str] = []
        last_error: HopError | None = None
        last_host: tuple[str, str] | None = None
        transcript = Transcript()
        for name, ip, port in hosts:
            if not pending:
                break
            transcript.end_connection()
            key = (dest.route, self.hostname, name, ip, port)
            reused = self._take(key)
            if reused is None:
                transcript.note(f"trying {name} [{ip}]:{port}")
            plaintext_retry = False
            while True:
                if reused is not None:
                    client, opened, sent = reused.client, reused.opened, reused.messages
                    client.transcript = transcript
                    transcript.note(f"reusing the connection to {name} [{ip}]:{port} "
                                    f"({sent} messages sent on it before)")
                    answered = client.replies
                else:
                    client = Client(helo_name=self.hostname,
                                    command_timeout=self.config.command_timeout,
                                    transcript=transcript)
                    opened, sent = asyncio.get_running_loop().time(), 0
                try:
                    if reused is None:
                        await self._open(client, dest.route, ip, port, name, plaintext_retry)
                except HopError as exc:
                    client.close()
                    if exc.step == "STARTTLS" and dest.route.tls == "opportunistic" \
                            and not plaintext_retry:
                        plaintext_retry = True
                        transcript.note("TLS failed; retrying in plaintext (opportunistic)")
                        continue
                    last_error, last_host = exc, (name, ip)
                    failures.append(f"{name} [{ip}]: {exc.detail}")
                    if exc.step in ("AUTH", "STARTTLS") and dest.route.via == "smarthost":
                        # a configuration problem, the same at every address of the host
                        return [self._hop_result(exc, name, ip, dest, transcript, m, r)
                                for m in pending for r in m.recipients] + results
                    break
                before = len(pending)
                try:
                    await self._send_all(client, pending, results, dest, name, ip, transcript)
                except HopError as exc:
                    client.close()
                    if reused is not None and client.replies == answered:
                        # the server ended the idle connection just as it was reused:
                        # nothing was sent that it took; a new connection, same host
                        transcript.end_connection()
                        transcript.note(f"the reused connection failed at once ({exc.detail}); "
                                        "opening a new one")
                        reused = None
                        transcript.note(f"trying {name} [{ip}]:{port}")
                        continue
                    # the message in flight at the failure gets it; the rest try the next host
                    last_error, last_host = exc, (name, ip)
                    failures.append(f"{name} [{ip}]: {exc.detail}")
                    if pending:
                        m = pending.pop(0)
                        results.extend(self._hop_result(exc, name, ip, dest, transcript, m, r,
                                                        hop_failure=False)
                                       for r in m.recipients)
                    break
                self._park(key, client, opened, sent + before - len(pending))
                break
        if pending:
            assert last_error is not None and last_host is not None
            summary = "; ".join(failures[-5:])
            for m in pending:
                for r in m.recipients:
                    res = self._hop_result(last_error, last_host[0], last_host[1], dest,
                                           transcript, m, r)
                    if len(failures) > 1:
                        res = dataclasses.replace(res, reply=dataclasses.replace(
                            res.reply, text=f"{res.reply.text} (all next hops failed: "
                            f"{summary})"))
                    results.append(res)
        return results

    async def _open(self, client: Client, route: Route, ip: str, port: int, name: str,
                    plaintext: bool) -> None:
        await client.connect(ip, port, self.config.connect_timeout)
        await client.ehlo()
        want_tls = route.tls != "none" and not plaintext
        if want_tls and client.offers("STARTTLS"):
            if route.tls == "required":
                ctx = self._verify if route.tls_verify else self._noverify
            else:
                ctx = self._may
            await client.starttls(ctx, name if route.tls == "required" else None)
        elif route.tls == "required":
            raise HopError("STARTTLS", f"{client.peer} does not offer STARTTLS, and the "
                           f"route {route.match} requires TLS", transient=True)
        if route.username:
            if not client.tls and route.tls != "none":
                raise HopError("AUTH", f"{client.peer} offers no TLS; not sending the "
                               f"password for {route.username} in clear (set tls = \"none\" "
                               "on the route to allow it)", transient=True)
            await client.auth(route.username, route.password)

    async def _send_all(self, client: Client, pending: list[OutboundMessage],
                        results: list[DeliveryResult], dest: Destination, name: str, ip: str,
                        transcript: Transcript) -> None:
        """Every pending message over this connection, pipelined one into the next
        (:meth:`Client.send_each`). A message leaves ``pending`` when its results are in
        ``results``, so on a HopError ``pending[0]`` is the one in flight."""
        dsn = client.offers("DSN")
        items = []
        for message in list(pending):
            refusal = self._refusal(client, message, name, ip)
            if refusal is not None:
                transcript.start_message()
                results.extend(self._result(r, False, False, refusal, "MAIL", name, ip, dest,
                                            transcript) for r in message.recipients)
                pending.remove(message)
                continue
            items.append((message.sender, self._mail_params(client, message, dsn),
                          [(r.address, self._rcpt_params(r, dsn)) for r in message.recipients],
                          wire_chunks(message.data.chunks())))
        async for _, tx in client.send_each(items):
            message = pending.pop(0)
            results.extend(self._outcome(message, tx, dsn, name, ip, dest, transcript))

    @staticmethod
    def _refusal(client: Client, message: OutboundMessage, name: str, ip: str) -> Reply | None:
        """Why this server cannot take the message, known before sending it."""
        size = client.size_limit
        if needs_smtputf8(message) and not client.offers("SMTPUTF8"):
            return Reply(554, "5.6.7", f"{name} [{ip}] does not support SMTPUTF8, which this "
                         "message needs")
        if size is not None and len(message.data) > size:
            return Reply(552, "5.3.4", f"message size {len(message.data)} exceeds the size "
                         f"limit {size} of {name} [{ip}]")
        return None

    @staticmethod
    def _mail_params(client: Client, message: OutboundMessage, dsn: bool) -> str:
        return mail_parameters(client, message) + (
            _passed_on(message.mail_params, ("RET", "ENVID")) if dsn else "")

    @staticmethod
    def _rcpt_params(r: OutboundRecipient, dsn: bool) -> str:
        return _passed_on(r.params, ("NOTIFY", "ORCPT")) if dsn else ""

    def _outcome(self, message: OutboundMessage, tx: Transaction, dsn: bool, name: str,
                 ip: str, dest: Destination, transcript: Transcript) -> list[DeliveryResult]:
        out = []
        for r, rcpt_reply in zip(message.recipients, tx.rcpts, strict=True):
            if not tx.mail.is_positive:
                reply, step = tx.mail, "MAIL"
            elif not rcpt_reply.is_positive:
                reply, step = rcpt_reply, "RCPT"
            elif tx.data is None:
                out.append(self._result(r, False, True,
                                        Reply(451, "4.5.0", "the server accepted no "
                                              "recipient, so DATA was not sent"), "DATA",
                                        name, ip, dest, transcript))
                continue
            else:
                reply, step = tx.data, "DATA"
            ok = reply.is_positive and step == "DATA"
            out.append(self._result(r, ok, reply.is_transient, reply, step, name, ip, dest,
                                    transcript, dsn_capable=dsn))
        for r, res in zip(message.recipients, out, strict=True):
            # a delivery is logged once, as recorded (status=delivered, with its relay);
            # a refusal also here, with the step that met it
            if not res.ok:
                log.info("queue_id=%s to=<%s> relay=%s[%s] status=%s step=%s (%s)",
                         message.queue_id, r.address, name, ip,
                         "deferred" if res.transient else "bounced", res.step, res.reply)
        return out

    @staticmethod
    def _result(r: OutboundRecipient, ok: bool, transient: bool, reply: Reply, step: str,
                name: str, ip: str, dest: Destination, transcript: Transcript,
                dsn_capable: bool = False) -> DeliveryResult:
        return DeliveryResult(r.id, ok, transient and not ok, reply, step,
                              _status(reply, "2.0.0" if ok else "5.0.0"), dest.describe(),
                              name, ip, transcript.text(), dsn_capable=dsn_capable)

    def _hop_result(self, exc: HopError, name: str, ip: str, dest: Destination,
                    transcript: Transcript, message: OutboundMessage, r: OutboundRecipient,
                    hop_failure: bool = True) -> DeliveryResult:
        if exc.reply is not None:
            reply = exc.reply
            status = _status(exc.reply, "4.4.0")
        else:
            status = {"connect": "4.4.1", "greeting": "4.4.2", "STARTTLS": "4.7.5",
                      "AUTH": "4.7.0"}.get(exc.step, "4.4.2")
            reply = Reply(451, status, exc.detail)
        if exc.transient and status.startswith("5."):
            status = "4" + status[1:]          # a deferral reports a transient status
        return DeliveryResult(r.id, False, exc.transient, reply, exc.step, status,
                              dest.describe(), name, ip, transcript.text(),
                              hop_failure=hop_failure and exc.transient)
