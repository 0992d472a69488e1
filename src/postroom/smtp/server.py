"""The SMTP server: an asyncio adapter around the sans-I/O core.

One :class:`Session` per connection. It feeds bytes to :class:`ServerProtocol`, answers
the events that need a decision (policy for MAIL and RCPT, the spool for a finished
message, the user store for AUTH), and writes replies in batches, so a pipelining
client gets all its replies in one write.

Receiving ends at "queued": this module never imports delivery or the queue manager.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import logging
import os
import secrets
import ssl
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from .. import replies
from ..body import BodyWriter
from ..config import Config
from ..conversion import CRLF_PARAM, FOLDER_PARAM
from ..events import EventLog
from ..intake import EarlyConversion, Intake, Submission
from ..metrics import Metrics
from ..model import Reply, SmtpError
from ..policy import (
    NO_ROUTE,
    RELAY_DENIED,
    IPAddress,
    RelaySettings,
    SessionSnapshot,
    check_mail,
    check_rcpt,
    peer_address,
    trusted_network,
)
from ..spool import (
    NewMessage,
    Spool,
    StorageFull,
    StorageUnavailable,
    is_disk_full,
    new_queue_id,
)
from .protocol import (
    NEED_DATA,
    AuthCredentials,
    Capabilities,
    Closed,
    MailFrom,
    MessageReceived,
    Phase,
    RcptTo,
    ServerProtocol,
    StartTls,
)

if TYPE_CHECKING:       # imported at the first message to verify (dkimpy, PyNaCl, the PSL)
    from ..dns import Resolver
    from ..mailauth.verify import Verification, Verifier

__all__ = ["AuthThrottle", "ServerState", "Session", "make_verifier",
           "reply_for_exception"]

log = logging.getLogger("postroom.smtp")

READ_PAUSE = 256 * 1024
PROGRESS_BYTES = 64 * 1024      # message data that counts as progress against data_timeout
_session_ids = itertools.count(secrets.randbits(32))
_NO_PEER = ipaddress.ip_address("0.0.0.0")     # a session's until connection_made


def verifying(config: Config) -> bool:
    v = config.verify
    return v.enabled and not (v.spf == v.dkim == v.dmarc == v.arc == "none")


def make_verifier(config: Config, executor: Executor | None = None,
                  resolver: Resolver | None = None) -> Verifier | None:
    """The inbound verifier for ``[verify]``, or None when verification is off."""
    v = config.verify
    if not verifying(config):
        return None
    from ..dns import Resolver
    from ..mailauth.verify import Verifier, VerifySettings
    settings = VerifySettings(v.authserv_id or config.hostname, v.spf, v.dkim, v.dmarc, v.arc,
                              v.dns_timeout, v.on_temperror, v.dkim_max_size)
    return Verifier(resolver or Resolver(config.nameservers, timeout=v.dns_timeout), settings,
                    executor)


def _reseed_session_ids() -> None:
    global _session_ids
    _session_ids = itertools.count(secrets.randbits(32))


os.register_at_fork(after_in_child=_reseed_session_ids)


def reply_for_exception(exc: BaseException, session_id: str) -> Reply:
    """The one translation point: any exception becomes a reply, never its text."""
    if isinstance(exc, SmtpError):
        return exc.reply
    if isinstance(exc, StorageFull):
        log.error("session=%s storage full: %s", session_id, exc)
        return replies.STORAGE_FULL
    if isinstance(exc, StorageUnavailable):
        log.error("session=%s the spool is unreachable: %s", session_id, exc)
        return replies.SPOOL_UNAVAILABLE
    reference = f"{session_id}-{secrets.token_hex(3)}"
    log.error("session=%s unexpected error, reference %s", session_id, reference, exc_info=exc)
    return replies.internal_error(reference)


def _patch_head(big: BodyWriter, head: bytes) -> None:
    """Write a same-length change of a big message's first bytes into its file, durably."""
    with open(big.path, "r+b") as f:
        f.write(head)
        f.flush()
        os.fsync(f.fileno())


class AuthThrottle:
    """Counts failed AUTH attempts per peer address within a sliding window."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def _prune(self, peer: str) -> deque[float]:
        q = self._failures[peer]
        cutoff = self.clock() - self.window
        while q and q[0] < cutoff:
            q.popleft()
        if not q:
            del self._failures[peer]
        return q

    def blocked(self, peer: str) -> bool:
        return len(self._prune(peer)) >= self.limit

    def failed(self, peer: str) -> None:
        self._failures[peer].append(self.clock())


def early_conversion(c: Config) -> EarlyConversion:
    """What intake converts itself: with ``[imap] delivery = "lmtp"`` the queue manager
    routes the local domains to Dovecot, so their recipients wait for it."""
    return EarlyConversion(c.routes, c.aliases,
                           inbound=not (c.imap.enabled and c.imap.delivery == "lmtp"))


@functools.lru_cache(maxsize=4096)
def _peer(text: str) -> tuple[IPAddress, str]:
    """The peer's address and its text, parsed once per address (ipaddress's parser
    and str(): about 4 us a connection)."""
    ip = peer_address(text)
    return ip, str(ip)


@dataclass
class ServerState:
    """What every session shares: config, decisions' inputs, counters, the spool."""

    config: Config
    spool: Spool
    mailbox_exists: Callable[[str], bool]
    verify_password: Callable[[str, str], str | None]
    tls: ssl.SSLContext | None
    executor: Executor | None = None
    connections: int = 0
    per_peer: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sessions: set[Session] = field(default_factory=set)
    shutting_down: bool = False
    clock: Callable[[], float] = time.time
    metrics: Metrics = field(default_factory=Metrics)
    events: EventLog | None = None
    # listener kinds whose component an administrator stopped: new connections get 421
    stopped: set[str] = field(default_factory=set)
    low_space_noted: float = -3600.0    # when a MAIL refused for low space was last logged
    # made from [verify] at the first message to verify, unless given (tests): a server
    # whose mail all comes from its own networks never loads the verification stack
    verifier: Verifier | None = None

    def __post_init__(self) -> None:
        c = self.config
        self.relay = RelaySettings(frozenset(c.local_domains), c.trusted_networks,
                                   frozenset(c.aliases), c.routes)
        self.throttle = AuthThrottle(c.smtp.auth_failure_limit, c.smtp.auth_failure_window)
        self.spool_away_noted = -3600.0      # event 5003, said once a minute (Session)
        self.intake = Intake(self.spool, c.hostname, self.relay.local_domains, self.metrics,
                             self.events, self.clock)
        self.intake.early = early_conversion(c)

    def apply(self, config: Config) -> None:
        """A reloaded config: new sessions use it; open sessions keep their limits."""
        self.config = config
        self.relay = RelaySettings(frozenset(config.local_domains), config.trusted_networks,
                                   frozenset(config.aliases), config.routes)
        self.intake.hostname = config.hostname
        self.intake.local_domains = self.relay.local_domains
        self.intake.early = early_conversion(config)
        self.verifier = None                 # made again, from the new [verify], when needed
        self.throttle.limit = config.smtp.auth_failure_limit
        self.throttle.window = config.smtp.auth_failure_window

    def space_left(self) -> bool:
        """Whether the data directory has [smtp] min_free_space free (a statvfs, about a
        microsecond), counting the spool's own free pages, which new mail fills first:
        after a full disk the spool file keeps its size, and without them the reserve
        could stay short for good. Unknown (the call failed) counts as yes: the commit
        will tell."""
        need = self.config.smtp.free_space_needed
        if need <= 0:
            return True
        try:
            st = os.statvfs(self.config.data_dir)
        except OSError:
            return True
        return st.f_bavail * st.f_frsize + self.spool.reusable_bytes() >= need

    def capabilities(self, listener: str) -> Capabilities:
        s = self.config.smtp
        return Capabilities(
            hostname=self.config.hostname, max_message_size=s.max_message_size,
            max_recipients=s.max_recipients, max_errors=s.max_errors,
            soft_error_limit=s.soft_error_limit, error_sleep=s.error_sleep,
            starttls=self.tls is not None and listener != "submissions",
            auth=self.tls is not None and (listener != "mx" or s.auth_on_mx),
            postmaster_domain=self.config.local_domains[0],
        )


class Session(asyncio.Protocol):
    """One SMTP connection."""

    def __init__(self, state: ServerState, listener: str, implicit_tls: bool) -> None:
        self.state = state
        self.listener = listener
        self.core = ServerProtocol(state.capabilities(listener), tls_active=implicit_tls)
        self.id = f"{next(_session_ids):08x}"
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.ip: IPAddress = _NO_PEER
        self._loop: asyncio.AbstractEventLoop | None = None
        # An async step runs (a message's commit, AUTH, TLS, an error delay): input
        # waits in the core until it ends and pumps again.
        self._busy = False
        self._done = False
        self._timer: asyncio.TimerHandle | None = None     # the command/data timeout
        self._timer_at = 0.0
        self._delay: asyncio.TimerHandle | None = None     # an error delay
        self._paced: deque[tuple[float, bytes]] = deque()  # replies still to write, waits
        self._stepping: asyncio.Task[None] | None = None   # the async step, kept alive
        self._lost = False
        self._paused = False
        self._counted = False
        self._body: BodyWriter | None = None     # the current DATA's message so far
        self._decisions: list[str] = []           # why each recipient was accepted
        self._protocol_log = False
        self._received = 0
        self._progress_at = time.monotonic()
        self._progress_bytes = 0

    # --- asyncio.Protocol ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # an asyncio.Transport, or uvloop's own, which is not a subclass
        self.transport = transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        peername = transport.get_extra_info("peername") or ("0.0.0.0", 0)
        self.ip, self.peer = _peer(peername[0])
        st = self.state
        limits = st.config.smtp
        if st.shutting_down:
            transport.write(replies.shutting_down(st.config.hostname).render())
            transport.close()
            return
        component = "smtp" if self.listener == "mx" else "submission"
        if component in st.stopped:
            log.info("session=%s refused %s: the %s component is stopped", self.id, self.peer,
                     component)
            self._event(4002, f"connection from [{self.peer}] refused: the {component} "
                        "component is stopped")
            transport.write(replies.component_stopped(st.config.hostname, component).render())
            transport.close()
            return
        if st.connections >= limits.max_connections:
            log.warning("session=%s refused %s: %d connections", self.id, self.peer,
                        st.connections)
            self._event(4002, f"connection from [{self.peer}] refused: {st.connections} "
                        "connections (max_connections)")
            transport.write(replies.TOO_MANY_CONNECTIONS.render())
            transport.close()
            return
        if st.per_peer[self.peer] >= limits.max_connections_per_peer:
            log.warning("session=%s refused %s: %d connections from this peer", self.id,
                        self.peer, st.per_peer[self.peer])
            self._event(4002, f"connection from [{self.peer}] refused: "
                        f"{st.per_peer[self.peer]} from this address "
                        "(max_connections_per_peer)")
            transport.write(replies.TOO_MANY_CONNECTIONS_FROM_PEER.render())
            transport.close()
            return
        self._counted = True
        st.metrics.connections.labels(self.listener).inc()
        st.metrics.connections_current.labels(self.listener).inc()
        st.connections += 1
        st.per_peer[self.peer] += 1
        st.sessions.add(self)
        log.info("session=%s connect from [%s]:%s listener=%s", self.id, self.peer, peername[1],
                 self.listener)
        self._event(4001, f"connection from [{self.peer}]:{peername[1]} on {self.listener}")
        ev_log = st.events
        self._protocol_log = ev_log is not None and ev_log.enabled(
            "smtp_protocol", "maximum", peer=self.peer)
        if self._protocol_log:
            self._event(6001, f"conversation with [{self.peer}] logged in logs/protocol.jsonl")
        self.core.greet()
        self._pump()

    def data_received(self, data: bytes) -> None:
        core = self.core
        if self._protocol_log and core.phase is not Phase.DATA:
            self._log_protocol("in", data)
        self._received += len(data)
        core.receive(data)
        # message data counts as progress against data_timeout every 64 KB
        if core.phase is Phase.DATA and self._received - self._progress_bytes >= PROGRESS_BYTES:
            self._progress()
        if not self._busy:
            self._pump()
        if core.buffered > READ_PAUSE and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        self._lost = True
        if not self._busy:
            self._pump()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._interrupt()
        if self._counted:
            self._counted = False
            st = self.state
            st.metrics.connections_current.labels(self.listener).dec()
            st.connections -= 1
            st.per_peer[self.peer] -= 1
            if st.per_peer[self.peer] <= 0:
                del st.per_peer[self.peer]
            st.sessions.discard(self)

    def pause_writing(self) -> None:
        if self.transport and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        pass    # reading resumes when the core asks for more input

    def shutdown(self) -> None:
        """Ask the session to end at its next wait for input."""
        self._interrupt()

    def _interrupt(self) -> None:
        """Shutdown or a lost connection: an error delay ends now; an idle session
        finishes (a message being committed finishes first)."""
        if self._delay is not None:
            self._delay.cancel()
            self._delay_over()
        elif not self._busy:
            self._pump()

    # --- the session loop ----------------------------------------------------------
    def _log_protocol(self, direction: str, data: bytes) -> None:
        """Lines of the conversation for logs/protocol.jsonl; AUTH secrets never."""
        ev_log = self.state.events
        assert ev_log is not None
        secret = direction == "in" and self.core.phase is Phase.AUTH
        for raw in data.split(b"\r\n"):
            if not raw:
                continue
            text = raw.decode("utf-8", "replace")[:1000]
            if secret:
                text = "****"
            elif direction == "in" and text[:5].upper() == "AUTH ":
                words = text.split(" ")
                text = " ".join(words[:2] + (["****"] if len(words) > 2 else []))
            ev_log.protocol(self.id, self.peer, direction, text)

    def _flush(self) -> None:
        self._write(self.core.take_output())

    def _write_paced(self) -> bool:
        """Write the core's replies that are due; one that must wait (an error reply
        past [smtp] soft_error_limit) waits on a timer, other sessions going on and this
        one reading nothing meanwhile. True while one waits. A shutdown or a lost
        connection writes the rest at once."""
        self._paced.extend(self.core.take_paced())
        while self._paced:
            wait, out = self._paced[0]
            if wait > 0 and not self._lost and not self.state.shutting_down:
                self._paced[0] = (0.0, out)
                self._busy = True
                assert self._loop is not None
                self._delay = self._loop.call_later(wait, self._delay_over)
                return True
            self._paced.popleft()
            self._write(out)
        return False

    def _write(self, out: bytes) -> None:
        if out and self._protocol_log:
            self._log_protocol("out", out)
        if out:
            self._progress()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(out)

    def _progress(self) -> None:
        self._progress_at = time.monotonic()
        self._progress_bytes = self._received

    def _snapshot(self) -> SessionSnapshot:
        return SessionSnapshot(self.ip, self.listener, self.core.tls_active,
                               self.core.auth_user)

    def _pump(self) -> None:
        """Run the core on what it has buffered until it needs more input or an async
        step, then write its replies in one batch. Called from the transport's
        callbacks and when an async step ends: no task and no wait per session."""
        if self._done:
            return
        core = self.core
        try:
            while True:
                ev = core.next_event()
                if ev is NEED_DATA:
                    if core.phase is Phase.DATA:
                        self._take_body()
                    elif self._body is not None:     # refused, or the session moved on
                        self._drop_body()
                    if self._write_paced():
                        return
                    if core.phase is Phase.CLOSED or self._lost:
                        self._finish()
                        return
                    if self.state.shutting_down:
                        core.close_with(replies.shutting_down(self.state.config.hostname))
                        continue
                    if self._paused and self.transport is not None:
                        self._paused = False
                        self.transport.resume_reading()
                    self._arm()
                    return
                if isinstance(ev, Closed):
                    (log.debug if ev.reason == "QUIT" else log.info)(
                        "session=%s closing: %s", self.id, ev.reason)
                    continue
                if isinstance(ev, MailFrom | RcptTo):
                    try:
                        self._decide(ev)
                    except Exception as exc:  # noqa: BLE001 - the translation point
                        core.respond(self._reply_for(exc))
                    continue
                self._busy = True             # a commit, AUTH or TLS: input waits
                assert self._loop is not None
                self._stepping = self._loop.create_task(self._step(ev))
                return
        except Exception:  # noqa: BLE001 - never let a session crash the server
            log.exception("session=%s crashed", self.id)
            self._finish()

    async def _step(self, ev: object) -> None:
        try:
            await self._handle(ev)
        except Exception as exc:  # noqa: BLE001 - the translation point
            self.core.respond(self._reply_for(exc))
        self._busy = False
        self._progress()
        self._pump()

    def _delay_over(self) -> None:
        self._delay = None
        self._busy = False
        self._pump()

    def _arm(self) -> None:
        """The timeout: the clock runs from the last progress (a reply sent, or 64 KB
        of message data), not from the last byte, so a peer trickling a byte at a time
        (slowloris) still times out. One timer, moved only when it would fire late."""
        limits = self.state.config.smtp
        limit = limits.data_timeout if self.core.phase is Phase.DATA else limits.command_timeout
        due = self._progress_at + limit
        if self._timer is not None:
            if self._timer_at <= due:
                return                        # fires early, then checks again
            self._timer.cancel()
        assert self._loop is not None
        self._timer_at = due
        self._timer = self._loop.call_at(due - time.monotonic() + self._loop.time(),
                                         self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self._done:
            return
        if self._busy:                        # not waiting for the client
            self._progress()
            self._arm()
            return
        limits = self.state.config.smtp
        core = self.core
        limit = limits.data_timeout if core.phase is Phase.DATA else limits.command_timeout
        if time.monotonic() - self._progress_at < limit:
            self._arm()
            return
        log.info("session=%s timeout in %s phase", self.id, core.phase.value)
        self._event(4005, f"session with [{self.peer}] timed out in the "
                    f"{core.phase.value} phase")
        core.close_with(replies.timeout(self.state.config.hostname))
        self._pump()

    def _finish(self) -> None:
        """The session is over: what is left written, the connection closed, once."""
        if self._done:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        core = self.core
        try:
            self._drop_body()
            self._flush()
        finally:
            if self.transport is not None:
                self.transport.close()
            self._event(4001, f"disconnect of [{self.peer}] after {core.errors} errors",
                        level="maximum")
            log.info("session=%s disconnect from [%s] errors=%d", self.id, self.peer,
                     core.errors)

    def _decide(self, ev: MailFrom | RcptTo) -> None:
        """MAIL and RCPT: decided at once, in the event loop (policy is pure; the
        mailbox check is a cached lookup)."""
        core = self.core
        if isinstance(ev, MailFrom):
            verdict = check_mail(self._snapshot())
            self._decisions = []
            if verdict.accept and not self.state.space_left():
                now = time.monotonic()
                if now - self.state.low_space_noted >= 60:     # said once a minute: the
                    self.state.low_space_noted = now           # disk is nearly full
                    need = self.state.config.smtp.free_space_needed
                    log.warning("session=%s mail from=<%s> refused (452 4.3.1): less than %d "
                                "bytes free in %s ([smtp] min_free_space)", self.id,
                                ev.sender, need, self.state.config.data_dir)
                    self._event(5001, f"less than {need} bytes free in the data directory "
                                "([smtp] min_free_space): MAIL is answered 452 4.3.1")
                core.respond(replies.STORAGE_FULL)
                return
            # an accepted sender is in the "queued" line; a refusal needs its own
            (log.debug if verdict.accept else log.info)(
                "session=%s mail from=<%s> %s: %s", self.id, ev.sender,
                "accepted" if verdict.accept else "refused", verdict.reason)
            core.respond(verdict.reply)
        elif isinstance(ev, RcptTo):
            verdict = check_rcpt(self._snapshot(), ev.recipient, self.state.relay,
                                 self.state.mailbox_exists)
            log.info("session=%s rcpt to=<%s> %s (%s): %s", self.id, ev.recipient,
                     "accepted" if verdict.accept else "refused", verdict.reply.code,
                     verdict.reason)
            if verdict.accept:
                self._decisions.append(f"<{ev.recipient}>: {verdict.reason}")
            elif verdict.refusal == RELAY_DENIED:
                self.state.metrics.relay_refusals.labels(self.listener).inc()
                self._event(2001, f"relaying to <{ev.recipient}> refused for [{self.peer}] "
                            f"(from <{core.envelope.sender}>): {verdict.reason}",
                            domain=ev.recipient.domain)
            elif verdict.refusal == NO_ROUTE:
                self._event(2002, f"<{ev.recipient}>: {verdict.reply}",
                            domain=ev.recipient.domain)
            else:
                self._event(2003, f"<{ev.recipient}> refused for [{self.peer}]: "
                            f"{verdict.reply}", domain=ev.recipient.domain)
            core.respond(verdict.reply)

    async def _handle(self, ev: object) -> None:
        core = self.core
        if isinstance(ev, MessageReceived):
            if self._protocol_log and self.state.events is not None:
                self.state.events.protocol(self.id, self.peer, "in",
                                           f"<message data, {ev.size} octets>")
            started = time.perf_counter()
            reply = await self._enqueue(ev)
            if reply.code == 250:
                self.state.metrics.acceptance.observe(time.perf_counter() - started)
            core.respond(reply)
        elif isinstance(ev, AuthCredentials):
            core.respond(await self._authenticate(ev))
        elif isinstance(ev, StartTls):
            await self._start_tls()
        else:
            raise TypeError(f"unexpected event {ev!r}")

    # --- message data --------------------------------------------------------------
    def _take_body(self) -> None:
        """Move the core's decoded message data into this DATA's writer (which spills
        a big message to a file), so that the session never holds it whole."""
        serial, parts = self.core.take_body()
        if not parts:
            return
        if self._body is None or self._body.serial != serial:
            self._drop_body()
            self._body = BodyWriter(self.state.spool.bodies, serial, new_queue_id())
        self._body.write(parts)

    def _drop_body(self) -> None:
        if self._body is not None:
            body, self._body = self._body, None
            try:
                body.discard()
            except OSError as exc:
                log.warning("session=%s could not remove %s: %s", self.id, body.path, exc)

    async def _message_bytes(self, ev: MessageReceived
                             ) -> tuple[str, bytes, BodyWriter | None] | Reply:
        """(queue id, the message or its first 64 KB, the writer of a big one's file)."""
        body = self._body if self._body is not None and self._body.serial == ev.serial \
            else None
        if body is None:
            self._drop_body()
            return new_queue_id(), ev.data, None
        self._body = None
        body.write([ev.data])
        inline = body.inline()
        if inline is not None:
            return body.name, inline, None
        try:
            await asyncio.get_running_loop().run_in_executor(self.state.executor, body.finish)
        except OSError as exc:
            body.discard()
            return reply_for_exception(StorageFull(str(exc)) if is_disk_full(exc) else exc,
                                       self.id)
        return body.name, bytes(body.head), body

    async def _enqueue(self, ev: MessageReceived) -> Reply:
        st = self.state
        env = ev.envelope
        assert env.sender is not None
        got = await self._message_bytes(ev)
        if isinstance(got, Reply):
            return got
        qid, data, big = got
        core = self.core
        tls, auth = core.tls_active, core.auth_user is not None
        params = env.mail_params
        checked: Verification | None = None
        if self.listener == "mx" and not auth and verifying(st.config) and self._untrusted():
            if st.verifier is None:
                st.verifier = make_verifier(st.config, st.executor)
            assert st.verifier is not None
            try:
                checked, data = await self._verify(st.verifier, qid, data, big)
            except BaseException:
                if big is not None:
                    big.discard()
                raise
            if checked.reply is not None:
                if big is not None:
                    big.discard()
                return checked.reply
            if checked.action == "quarantine":
                params = {**params, FOLDER_PARAM: "Junk"}
        if big is not None:       # its every line was checked to end in CRLF
            params = {**params, CRLF_PARAM: "1"}
        sub = Submission(
            env.sender, env.recipients, data, self.peer, core.helo, self.listener,
            ("ESMTP" if core.esmtp else "SMTP") + ("S" if tls else "") + ("A" if auth else ""),
            params, tls, core.auth_user, self.id, qid,
            big.name if big is not None else "", big.size if big is not None else 0,
            list(self._decisions), add_missing=self.listener != "mx" or auth,
            # after our Received; a big message's file stays as it came
            trace=checked.header if checked is not None else b"")
        try:
            message = await st.intake.queue(sub)
        except BaseException:
            if big is not None:
                big.discard()
            raise
        ev_log = st.events
        if ev_log is not None and ev_log.archive is not None and ev_log.enabled(
                "message_archival", "maximum", peer=self.peer):
            await self._archive(ev_log, qid, message, big)
        return replies.queued(qid)

    def _untrusted(self) -> bool:
        """The client is neither in trusted_networks (internal hosts are not verified,
        as with OpenDKIM's InternalHosts) nor authenticated."""
        return trusted_network(self.ip, self.state.relay) is None

    async def _verify(self, verifier: Verifier, qid: str, data: bytes,
                      big: BodyWriter | None) -> tuple[Verification, bytes]:
        """SPF, DKIM, DMARC and ARC for this message (mailauth.verify); the message's
        Authentication-Results fields that claim our authserv-id are renamed first
        (RFC 8601 §5). Returns the verification and the (possibly renamed) data."""
        st = self.state
        env = self.core.envelope
        ours = verifier.settings.authserv_id
        loop = asyncio.get_running_loop()
        whole: bytes | None = data
        if b"uthentication-" in data[:65536] or b"UTHENTICATION-" in data[:65536]:
            head = bytearray(data[:65536])
            from ..mailauth.authres import neutralise_forged
            if neutralise_forged(head, ours):
                if big is None:
                    data = bytes(head) + data[65536:]
                else:
                    await loop.run_in_executor(st.executor, _patch_head, big, bytes(head))
                    data = bytes(head)
                self._event(3102, f"Authentication-Results fields claiming {ours} renamed "
                            f"in {qid} (forged, RFC 8601 section 5)", queue_id=qid)
        if big is not None:
            whole = None
            if big.size <= verifier.settings.dkim_max_size:
                whole = await loop.run_in_executor(st.executor, big.path.read_bytes)
        sender = str(env.sender) if env.sender is not None and not env.sender.is_null else ""
        result = await verifier.verify(whole, ip=self.peer, helo=self.core.helo,
                                       sender=sender, head=data)
        for method, value in result.results.items():
            st.metrics.verification.labels(method, value).inc()
        if result.action != "accept":
            st.metrics.verification_actions.labels(result.action).inc()
        reply = f" ({result.reply})" if result.reply is not None else ""
        log.info("session=%s verified %s: %s action=%s%s in %.1f ms", self.id, qid,
                 result.summary(), result.action, reply, result.elapsed * 1000)
        self._event(3101, f"message {qid} from [{self.peer}] <{sender}>: {result.summary()}; "
                    f"{result.action}" + (f": {result.reason}" if result.reason else ""),
                    queue_id=qid, action=result.action, results=result.results)
        return result, data

    async def _archive(self, ev_log: EventLog, qid: str, message: NewMessage,
                       big: BodyWriter | None) -> None:
        loop = asyncio.get_running_loop()

        def copy() -> object:
            if big is None:
                return ev_log.archive_copy(qid, [message.data])
            with open(big.path, "rb") as f:
                return ev_log.archive_copy(qid, [message.data, *iter(lambda: f.read(1 << 20), b"")])
        try:
            path = await loop.run_in_executor(self.state.executor, copy)
        except OSError as exc:
            log.warning("session=%s could not archive %s: %s", self.id, qid, exc)
            return
        self._event(7001, f"copy of {qid} kept in {path}", queue_id=qid, level="maximum")

    def _reply_for(self, exc: BaseException) -> Reply:
        """:func:`reply_for_exception`; a spool that cannot be reached is also said in
        event 5003, once a minute, whatever else the queue manager is doing (waiting
        for the database, it may have nothing to fail on)."""
        if isinstance(exc, StorageUnavailable):
            st = self.state
            now = time.monotonic()
            if now - st.spool_away_noted >= 60:
                st.spool_away_noted = now
                self._event(5003, f"the spool's database cannot be reached ({exc}): new mail "
                            "is answered 451 4.3.0; the node resumes by itself when it is "
                            "back")
        return reply_for_exception(exc, self.id)

    def _event(self, kind: int, text: str, **kw: object) -> None:
        ev_log = self.state.events
        if ev_log is not None:
            ev_log.emit(kind, text, peer=self.peer, session=self.id, **kw)  # type: ignore[arg-type]

    async def _authenticate(self, ev: AuthCredentials) -> Reply:
        st = self.state
        if st.throttle.blocked(self.peer):
            self._event(4004, f"AUTH refused for [{self.peer}]: too many failures")
            log.warning("session=%s AUTH refused: too many failures from [%s]", self.id,
                        self.peer)
            return replies.AUTH_THROTTLED
        loop = asyncio.get_running_loop()
        try:
            user = await loop.run_in_executor(st.executor, st.verify_password, ev.username,
                                              ev.password)
        except Exception:  # noqa: BLE001 - the user store failed, not the client
            log.exception("session=%s AUTH could not be checked", self.id)
            return replies.AUTH_TEMPORARY_FAILURE
        if user is None:
            st.throttle.failed(self.peer)
            # the username is logged, the password never is
            self._event(4003, f"AUTH {ev.mechanism} failed for {ev.username[:100]!r} from "
                        f"[{self.peer}]")
            log.warning("session=%s AUTH %s failed for %r", self.id, ev.mechanism,
                        ev.username[:100])
            return replies.AUTH_FAILED
        log.info("session=%s AUTH %s succeeded as %s", self.id, ev.mechanism, user)
        ev.username = user
        return replies.AUTH_SUCCEEDED

    async def _start_tls(self) -> None:
        ctx = self.state.tls
        assert ctx is not None and self.transport is not None
        self.core.respond(replies.READY_FOR_TLS)
        self._flush()
        loop = asyncio.get_running_loop()
        # No await between writing 220 and start_tls: start_tls pauses reading at once,
        # so the client's handshake never reaches the plaintext protocol.
        try:
            new = await loop.start_tls(self.transport, self, ctx, server_side=True,
                                       ssl_handshake_timeout=30)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.info("session=%s TLS handshake failed: %s", self.id, exc.__class__.__name__)
            self._event(4005, f"TLS handshake with [{self.peer}] failed: "
                        f"{exc.__class__.__name__}")
            self._lost = True
            self.core.phase = Phase.CLOSED
            return
        if new is None:                       # the connection went during the handshake
            self._lost = True
            self.core.phase = Phase.CLOSED
            return
        self.transport = cast(asyncio.Transport, new)
        self.core.tls_started()
        ssl_obj = new.get_extra_info("ssl_object")
        log.info("session=%s TLS established %s %s", self.id,
                 ssl_obj.version() if ssl_obj else "?", ssl_obj.cipher()[0] if ssl_obj else "")
