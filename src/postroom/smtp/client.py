"""The SMTP client: a sans-I/O reply reader and an asyncio client built on it.

:class:`ReplyReader` turns bytes from a server into :class:`~postroom.model.Reply`
values (multi-line aware, limits enforced). :class:`Client` speaks to one server over
one connection: greeting, EHLO (HELO as fallback), STARTTLS, AUTH PLAIN/LOGIN, and
mail transactions, pipelined when the server offers PIPELINING (RFC 2920). Every
exchange goes into a :class:`Transcript`, with AUTH secrets redacted.

With ``lmtp=True`` the same client speaks LMTP (RFC 2033) to a mail store: LHLO instead
of EHLO (there is no HELO to fall back to), over TCP or a Unix socket
(:meth:`Client.connect_unix`), and after the final dot one reply for each recipient the
server accepted, in RCPT order (§4.2), kept per recipient in
:attr:`Transaction.data_rcpts`.

Invariants: every line sent ends in CRLF; message data is sent with CRLF line ends only
(a bare CR or LF is never passed on) and dot-stuffed; a transaction's result is one
reply per recipient.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import re
import ssl
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..model import Reply

__all__ = ["Client", "HopError", "ReplyReader", "Transaction", "Transcript", "prepare_data",
           "wire_chunks"]

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 200
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


class ProtocolError(Exception):
    """The server sent something that is not an SMTP reply."""


class ReplyReader:
    """Bytes in, complete replies out (sans-I/O)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code = 0

    def feed(self, data: bytes) -> list[Reply]:
        buf = self._buf
        buf += data
        out: list[Reply] = []
        start = 0
        try:
            while (nl := buf.find(b"\n", start)) >= 0:
                raw = bytes(buf[start:nl])
                start = nl + 1
                if not self._lines and (seen := _SEEN.get(raw)) is not None:
                    out.append(seen)
                    continue
                single = not self._lines
                reply = self._line(raw.rstrip(b"\r").decode("utf-8", "replace"))
                if reply is not None:
                    out.append(reply)
                    if single:                  # its key is this one line
                        if len(_SEEN) >= 64:
                            _SEEN.clear()
                        _SEEN[raw] = reply
        finally:
            del buf[:start]
        if len(buf) > MAX_REPLY_LINE:
            raise ProtocolError("reply line too long")
        return out

    def _line(self, line: str) -> Reply | None:
        """One line; the reply once it is complete."""
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
            raise ProtocolError(f"not an SMTP reply: {line[:80]!r}")
        code = int(line[:3])
        if self._lines and code != self._code:
            raise ProtocolError("multi-line reply changed its code")
        self._code = code
        self._lines.append(line[4:])
        if len(self._lines) > MAX_REPLY_LINES:
            raise ProtocolError("reply has too many lines")
        if len(line) == 3 or line[3] == " ":
            lines, self._lines = self._lines, []
            return _reply(code, lines)
        return None

    @property
    def pending(self) -> bool:
        return bool(self._buf) or bool(self._lines)


# Replies are values, and a server says the same few again and again ("250 2.1.5 Ok",
# "354 End data..."): a single-line reply seen lately is not parsed again (W2's relay:
# four replies a message). Cleared when full; a plain dict, whose single operations
# the GIL keeps whole whichever thread parses.
_SEEN: dict[bytes, Reply] = {}


def _reply(code: int, lines: list[str]) -> Reply:
    enhanced = ""
    m = _ENHANCED.match(lines[0]) if lines else None
    if m and m.group(1) == str(code)[0] and 200 <= code <= 599:
        enhanced = m.group(0).strip()
        lines = [ln[found.end():] if (found := _ENHANCED.match(ln)) else ln for ln in lines]
    if not 200 <= code <= 599:
        code = 554 if code >= 500 or code < 200 else code
    return Reply(code, enhanced, "\n".join(lines))


@functools.lru_cache(maxsize=64)
def _shown(reply: Reply) -> tuple[str, ...]:
    """A reply's lines as a transcript shows them (the same few replies, again and again)."""
    return tuple(f"S: {line}" for line in reply.render().decode("utf-8", "replace").splitlines())


@dataclass
class Transcript:
    """What was said on one connection, line by line (``C:``/``S:``), secrets redacted.

    A connection that carries several messages keeps its opening (every host tried, the
    greeting, EHLO, STARTTLS, AUTH) and the exchange of the message in flight only
    (:meth:`start_message`): each message's result carries the opening and its own
    exchange, not every message before it on the connection (50 messages made the last
    one's about 20 KB, copied into each recipient's row)."""

    lines: list[str] = field(default_factory=list)
    limit: int = 400
    current: list[str] | None = None       # the message in flight, after the opening
    earlier: int = 0                       # messages before it on this connection
    upcoming: list[str] | None = None      # the next message's commands, pipelined

    def client(self, text: str) -> None:
        if self.upcoming is not None:
            self._add(f"C: {text}", self.upcoming)
        else:
            self._add(f"C: {text}")

    def server(self, reply: Reply) -> None:
        for line in _shown(reply):
            self._add(line)

    def note(self, text: str) -> None:
        self._add(f"-- {text}")

    def start_message(self) -> None:
        if self.current is not None:
            self.earlier += 1
        self.current, self.upcoming = (self.upcoming or []), None

    def next_message(self) -> None:
        """The next message's commands go out before the reply that ends this one
        (pipelining): they belong to the next message, the reply still to this one,
        until :meth:`start_message`."""
        self.upcoming = []

    def end_connection(self) -> None:
        """The connection is over: the message in flight (and commands sent for the
        next) become part of the opening that the next host's results show."""
        if self.current is not None:
            self.lines.extend(self._middle() + self.current + (self.upcoming or []))
            del self.lines[self.limit + 1:]
            self.current, self.earlier, self.upcoming = None, 0, None

    def _middle(self) -> list[str]:
        return [f"-- ({self.earlier} earlier messages on this connection)"] \
            if self.earlier else []

    def _add(self, line: str, lines: list[str] | None = None) -> None:
        if lines is None:
            lines = self.lines if self.current is None else self.current
        if len(lines) < self.limit:
            lines.append(line[:500])
        elif len(lines) == self.limit:
            lines.append("-- (transcript truncated)")

    def text(self) -> str:
        if self.current is None:
            return "\n".join(self.lines)
        return "\n".join(self.lines + self._middle() + self.current)


class HopError(Exception):
    """A failure of the connection itself, not of one recipient."""

    def __init__(self, step: str, detail: str, reply: Reply | None = None,
                 transient: bool | None = None) -> None:
        super().__init__(detail)
        self.step = step
        self.detail = detail
        self.reply = reply
        if transient is None:
            transient = reply is None or reply.code < 500
        self.transient = transient


def prepare_data(data: bytes) -> bytes:
    """Message bytes ready for the wire: CRLF only, dot-stuffed, ending with CRLF.CRLF."""
    return b"".join(wire_chunks([data]))


def wire_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """:func:`prepare_data` chunk by chunk, so that a big message is never held whole.

    A CR at a chunk's end waits for the next chunk (it may start with the LF)."""
    carry = b""
    line_start = True
    for chunk in chunks:
        if carry:
            chunk, carry = carry + chunk, b""
        if chunk.endswith(b"\r"):
            chunk, carry = chunk[:-1], b"\r"
        if not chunk:
            continue
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf:
            # a bare LF or CR is never passed on: each becomes CRLF
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if line_start and chunk.startswith(b"."):
            chunk = b"." + chunk
        chunk = chunk.replace(b"\r\n.", b"\r\n..")
        line_start = chunk.endswith(b"\r\n")
        yield chunk
    yield (b"\r\n" if carry or not line_start else b"") + b".\r\n"


@dataclass
class Transaction:
    """One message's outcome on this connection: the MAIL reply, one reply per RCPT,
    and the final DATA reply (None when DATA was not reached).

    LMTP, once the message data was sent: ``data_rcpts`` has one entry per recipient,
    in RCPT order: that recipient's own reply after the final dot, or None for a
    recipient refused at RCPT, or whose reply never came because the connection failed
    (``lost`` then holds that failure; the replies before it stand, so those
    recipients were delivered or refused for good). ``data`` is the first of those
    replies. SMTP, and LMTP before the final dot, leave ``data_rcpts`` empty: ``data``
    then applies to every accepted recipient.
    """

    mail: Reply
    rcpts: list[Reply]
    data: Reply | None
    data_step: str = "DATA"
    data_rcpts: list[Reply | None] = field(default_factory=list)
    lost: HopError | None = None


class Client:
    """One SMTP client connection (LMTP with ``lmtp=True``)."""

    def __init__(self, *, helo_name: str, command_timeout: float = 300.0,
                 transcript: Transcript | None = None, lmtp: bool = False) -> None:
        self.helo_name = helo_name
        self.timeout = command_timeout
        self.transcript = transcript or Transcript()
        self.lmtp = lmtp
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._replies = ReplyReader()
        self._queue: list[Reply] = []
        self._out: list[bytes] = []
        self.peer = ""
        # the clock of the read or drain under way (see _wait)
        self._due = 0.0                       # 0: not waiting for the server
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._expired = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False                 # a transaction was begun on this connection
        self._unsettled = False               # ...and may not have ended cleanly
        self.replies = 0                      # read so far (a 421 not counted)

    # --- plumbing ------------------------------------------------------------------
    async def connect(self, ip: str, port: int, timeout: float,
                      source: str | None = None) -> Reply:
        self.peer = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        return await self._open(asyncio.open_connection(
            ip, port, limit=1 << 20, local_addr=(source, 0) if source else None), timeout)

    async def connect_unix(self, path: str, timeout: float) -> Reply:
        """Connect to a Unix socket (an LMTP server on this machine) and read the greeting."""
        self.peer = f"unix:{path}"
        return await self._open(asyncio.open_unix_connection(path, limit=1 << 20), timeout)

    async def _open(self, opening: Coroutine[Any, Any, tuple[asyncio.StreamReader,
                                                             asyncio.StreamWriter]],
                    timeout: float) -> Reply:
        try:
            self.reader, self.writer = await asyncio.wait_for(opening, timeout)
        except TimeoutError:
            raise HopError("connect", f"connection to {self.peer} timed out after "
                           f"{timeout:g}s") from None
        except OSError as exc:
            # asyncio says "Connect call failed (...)"; the errno says what happened
            reason = os.strerror(exc.errno) if exc.errno else \
                (exc.strerror or exc.__class__.__name__)
            raise HopError("connect", f"cannot connect to {self.peer}: {reason}") from None
        greeting = await self.read_reply("greeting")
        if greeting.code != 220:
            raise HopError("greeting", f"{self.peer} greeted with {greeting}", greeting)
        return greeting

    async def read_reply(self, step: str) -> Reply:
        assert self.reader is not None
        while not self._queue:
            self._wait()
            try:
                chunk = await self.reader.read(65536)
            except OSError as exc:
                if self._expired:
                    raise self._silent(step) from None
                raise HopError(step, f"connection to {self.peer} failed during {step}: "
                               f"{exc.strerror or exc.__class__.__name__}") from None
            finally:
                self._due = 0.0
            if not chunk:
                if self._expired:
                    raise self._silent(step)
                raise HopError(step, f"{self.peer} closed the connection during {step}")
            try:
                self._queue.extend(self._replies.feed(chunk))
            except ProtocolError as exc:
                raise HopError(step, f"{self.peer} sent a malformed reply during {step}: "
                               f"{exc}") from None
        reply = self._queue.pop(0)
        self.transcript.server(reply)
        if reply.code == 421:
            # "service closing": whatever was asked, the connection is over, and the
            # failure must quote this reply rather than the closed socket after it
            raise HopError(step, f"{self.peer} closed the connection at {step}: {reply}", reply)
        self.replies += 1
        return reply

    def usable(self) -> bool:
        """Open, not timed out, and between replies: an idle connection that the server
        has closed is not (one it is closing, or said 421 on, fails at its first reply:
        see SmtpDeliveryAgent.deliver)."""
        return self.writer is not None and self.reader is not None and not self._expired \
            and not self.writer.is_closing() and not self.reader.at_eof() \
            and not self._queue and not self._replies.pending

    def write_line(self, line: str, shown: str | None = None) -> None:
        """Queue a command line; :meth:`drain` sends everything queued in one write."""
        self._out.append(line.encode("utf-8") + b"\r\n")
        self.transcript.client(shown if shown is not None else line)

    async def drain(self, step: str) -> None:
        assert self.writer is not None
        if self._out:
            self.writer.write(b"".join(self._out))
            self._out.clear()
        self._wait()
        try:
            await self.writer.drain()
        except OSError as exc:
            if not self._expired:
                raise HopError(step, f"connection to {self.peer} failed during {step}: "
                               f"{exc.strerror or exc.__class__.__name__}") from None
        finally:
            self._due = 0.0
        if self._expired:          # the abort: the drain raised, or returned without an error
            raise HopError(step, f"{self.peer} stopped reading during {step}")

    # --- the clock -----------------------------------------------------------------
    def _wait(self) -> None:
        """A read or a drain starts: the server has ``timeout`` seconds to answer or to
        take what is written. One timer per connection, moved only when it would fire
        late: a new timer per wait (``asyncio.timeout``, made and cancelled at every
        read and drain) cost about a tenth of this client's CPU a message on uvloop, a
        quarter on asyncio's own loop."""
        loop = self._loop
        if loop is None:
            # asyncio.get_running_loop() makes a getpid() system call on Python 3.11
            # (its fork check): once per connection, not at every read
            loop = self._loop = asyncio.get_running_loop()
        due = loop.time() + self.timeout
        self._due = due
        if self._timer is not None:
            if self._timer_at <= due:
                return                            # fires early, then looks again
            self._timer.cancel()
        self._timer_at = due
        self._timer = loop.call_at(due, self._check)

    def _check(self) -> None:
        """The timer: a wait that has lasted its ``timeout`` ends the connection (the
        read or drain then raises :meth:`_silent`'s HopError)."""
        self._timer = None
        if not self._due:
            return                                # not waiting; the next wait re-arms
        loop = self._loop
        assert loop is not None
        if loop.time() < self._due:               # a later wait moved the deadline
            self._timer_at = self._due
            self._timer = loop.call_at(self._due, self._check)
            return
        self._expired = True
        if self.writer is not None:
            self.writer.transport.abort()

    def _silent(self, step: str) -> HopError:
        return HopError(step, f"{self.peer} did not answer {step} within {self.timeout:g}s")

    async def command(self, line: str, step: str, shown: str | None = None) -> Reply:
        self.write_line(line, shown)
        await self.drain(step)
        return await self.read_reply(step)

    # --- the session ---------------------------------------------------------------
    async def ehlo(self) -> Reply:
        """EHLO (HELO as fallback); in LMTP mode, LHLO."""
        if self.lmtp:
            return await self.lhlo()
        reply = await self.command(f"EHLO {self.helo_name}", "EHLO")
        if reply.code == 250:
            self._extensions(reply)
            return reply
        if reply.code >= 500 or reply.code == 421:
            if reply.code == 421:
                raise HopError("EHLO", f"{self.peer} refused EHLO", reply)
            reply = await self.command(f"HELO {self.helo_name}", "HELO")
            self.extensions = {}
            if reply.code == 250:
                return reply
        raise HopError("EHLO", f"{self.peer} refused EHLO/HELO", reply)

    async def lhlo(self) -> Reply:
        """LMTP's greeting (RFC 2033 §4.1). A refusal is a HopError at step LHLO."""
        reply = await self.command(f"LHLO {self.helo_name}", "LHLO")
        if reply.code != 250:
            raise HopError("LHLO", f"{self.peer} refused LHLO", reply)
        self._extensions(reply)
        return reply

    def _extensions(self, reply: Reply) -> None:
        self.extensions = {}
        for line in reply.lines()[1:]:
            key, _, value = line.partition(" ")
            self.extensions[key.upper()] = value

    def offers(self, extension: str) -> bool:
        return extension.upper() in self.extensions

    @property
    def size_limit(self) -> int | None:
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        reply = await self.command("STARTTLS", "STARTTLS")
        if reply.code != 220:
            raise HopError("STARTTLS", f"{self.peer} refused STARTTLS", reply)
        assert self.writer is not None
        try:
            await asyncio.wait_for(self.writer.start_tls(
                context, server_hostname=server_hostname), self.timeout)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise HopError("STARTTLS", f"TLS handshake with {self.peer} failed: "
                           f"{getattr(exc, 'verify_message', '') or exc.__class__.__name__}"
                           f"{' (' + exc.reason + ')' if getattr(exc, 'reason', '') else ''}",
                           transient=True) from None
        except (OSError, TimeoutError) as exc:
            raise HopError("STARTTLS", f"TLS handshake with {self.peer} failed: "
                           f"{exc.__class__.__name__}") from None
        self.tls = True
        self._replies = ReplyReader()
        self.transcript.note("TLS established")
        await self.ehlo()

    async def auth(self, username: str, password: str) -> Reply:
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms:
            token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
            reply = await self.command(f"AUTH PLAIN {token}", "AUTH", "AUTH PLAIN <redacted>")
        elif "LOGIN" in mechanisms:
            reply = await self.command("AUTH LOGIN", "AUTH")
            if reply.code == 334:
                reply = await self.command(base64.b64encode(username.encode()).decode(), "AUTH",
                                           "<username redacted>")
            if reply.code == 334:
                reply = await self.command(base64.b64encode(password.encode()).decode(), "AUTH",
                                           "<password redacted>")
        else:
            raise HopError("AUTH", f"{self.peer} offers no AUTH mechanism we know "
                           f"(it offers: {' '.join(mechanisms) or 'none'})", transient=True)
        if reply.code != 235:
            # Deferred, not bounced, whatever the code: wrong credentials are our own
            # configuration to fix, not the sender's problem (as Postfix's
            # smtp_sasl_auth_soft_bounce).
            raise HopError("AUTH", f"{self.peer} refused our credentials for {username}", reply,
                           transient=True)
        return reply

    async def send(self, sender: str, mail_params: str, recipients: list[tuple[str, str]],
                   data: bytes | Iterable[bytes]) -> Transaction:
        """One mail transaction. ``data`` comes from :func:`prepare_data`, or is an
        iterable of :func:`wire_chunks`, sent chunk by chunk (a big message).

        With PIPELINING, MAIL, every RCPT and DATA go in one write (RFC 2920 §3.1).
        In LMTP mode the server answers the final dot once per accepted recipient: see
        :class:`Transaction` for how those replies come back.
        """
        opened = await self._open_data(sender, mail_params, recipients)
        if isinstance(opened, Transaction):
            return opened
        await self._content(data)
        return await self._final(*opened)

    async def send_each(self, items: Sequence[tuple[str, str, list[tuple[str, str]],
                                                    bytes | Iterable[bytes]]]
                        ) -> AsyncIterator[tuple[int, Transaction]]:
        """Several mail transactions on this connection, as :meth:`send` would do them
        one by one; yields (index in ``items``, its Transaction) in order, each as soon
        as its outcome is known, and starts a message of the transcript for each.

        With PIPELINING (SMTP, not LMTP), a message's data, its final dot and the next
        message's RSET, MAIL, RCPT and DATA go in one write: RFC 2920 §3.1 allows message
        content as the first "command" of a group (RSET: see :meth:`_commands`). That is
        one write and one wait for the server per message instead of two. A HopError reading a message's final
        reply belongs to that message (the one not yet yielded): the next one's commands
        were sent but, without a final dot, deliver nothing."""
        if self.lmtp or not self.offers("PIPELINING"):
            for index, (sender, params, rcpts, data) in enumerate(items):
                self.transcript.start_message()
                yield index, await self.send(sender, params, rcpts, data)
            return
        held: tuple[int, Reply, list[Reply]] | None = None
        for index, (sender, params, rcpts, data) in enumerate(items):
            if held is None:
                self.transcript.start_message()
                rset = self._commands(sender, params, rcpts)
            else:
                self.transcript.next_message()       # its command lines, not yet its replies
                rset = self._commands(sender, params, rcpts)
                yield held[0], await self._final(held[1], held[2])
                held = None
                self.transcript.start_message()
            opened = await self._pipelined_replies(len(rcpts), rset)
            if isinstance(opened, Transaction):
                yield index, opened
                continue
            await self._content(data, hold=True)
            held = (index, *opened)
        if held is not None:
            yield held[0], await self._final(held[1], held[2])

    def _commands(self, sender: str, mail_params: str, recipients: list[tuple[str, str]]
                  ) -> bool:
        """MAIL, every RCPT and DATA, queued for one write (PIPELINING); after the
        first transaction on the connection, RSET before them. Returns whether RSET
        was queued.

        The RSET goes out before the outcome of the transaction before is known (it is
        pipelined behind that one's final dot, or opens a reused connection), and a
        server may still hold a refused transaction: Postfix, after refusing a message
        at the end of data, answers the next MAIL "503 5.5.1 Error: nested MAIL
        command" unless RSET came first. RSET is valid anywhere in a pipelined group
        (RFC 2920 §3.1)."""
        rset = self._started
        if rset:
            self.write_line("RSET")
        self._started = True
        self.write_line(f"MAIL FROM:<{sender}>{mail_params}")
        for addr, params in recipients:
            self.write_line(f"RCPT TO:<{addr}>{params}")
        self.write_line("DATA")
        return rset

    async def _open_data(self, sender: str, mail_params: str,
                         recipients: list[tuple[str, str]]
                         ) -> tuple[Reply, list[Reply]] | Transaction:
        """MAIL, RCPT and DATA up to the 354: (MAIL reply, RCPT replies), or the
        Transaction of a message that goes no further."""
        if self.offers("PIPELINING"):
            rset = self._commands(sender, mail_params, recipients)
            return await self._pipelined_replies(len(recipients), rset)
        rcpt_lines = [f"RCPT TO:<{addr}>{params}" for addr, params in recipients]
        if self._unsettled:              # see _commands; here the outcome is known
            await self.reset()
        self._started = self._unsettled = True
        mail = await self.command(f"MAIL FROM:<{sender}>{mail_params}", "MAIL")
        if not mail.is_positive:
            return Transaction(mail, [mail] * len(rcpt_lines), None)
        rcpts = [await self.command(line, "RCPT") for line in rcpt_lines]
        if not any(r.is_positive for r in rcpts):
            await self.reset()
            return Transaction(mail, rcpts, None)
        data_start = await self.command("DATA", "DATA")
        return self._after_data(mail, rcpts, data_start) or await self._no_data(
            mail, rcpts, data_start)

    async def _pipelined_replies(self, count: int, rset: bool = False
                                 ) -> tuple[Reply, list[Reply]] | Transaction:
        """The replies to pipelined RSET (``rset``), MAIL, ``count`` RCPTs and DATA."""
        await self.drain("MAIL")
        if rset:
            reset = await self.read_reply("RSET")
            if not reset.is_positive:
                raise HopError("RSET", f"{self.peer} refused RSET: {reset}", reset)
        mail = await self.read_reply("MAIL")
        rcpts = [await self.read_reply("RCPT") for _ in range(count)]
        data_start = await self.read_reply("DATA")
        return self._after_data(mail, rcpts, data_start) or await self._no_data(
            mail, rcpts, data_start)

    @staticmethod
    def _after_data(mail: Reply, rcpts: list[Reply], data_start: Reply
                    ) -> tuple[Reply, list[Reply]] | None:
        """The message data may follow: MAIL accepted, a recipient accepted, 354."""
        if mail.is_positive and data_start.code == 354 and any(r.is_positive for r in rcpts):
            return mail, rcpts
        return None

    async def _no_data(self, mail: Reply, rcpts: list[Reply], data_start: Reply
                       ) -> Transaction:
        """End a transaction that sends no message data, the server left as it was."""
        if not mail.is_positive:
            if data_start.code == 354:           # a confused server: end the empty message
                await self.command(".", "DATA")
            await self.reset()
            return Transaction(mail, [mail] * len(rcpts), None)
        if data_start.code != 354:
            if any(r.is_positive for r in rcpts):
                await self.reset()
            return Transaction(mail, rcpts, data_start)
        # RFC 2920 §3.1: the server said 354 with no valid recipient; send no content
        await self.command(".", "DATA")
        await self.reset()
        return Transaction(mail, rcpts, None)

    async def _content(self, data: bytes | Iterable[bytes], hold: bool = False) -> None:
        """Queue the message data and its final dot; a big message goes out a megabyte
        at a time. The rest is written now, or with ``hold`` by the next drain."""
        sent = pending = 0
        for chunk in [data] if isinstance(data, bytes) else data:
            self._out.append(chunk)
            sent += len(chunk)
            pending += len(chunk)
            if pending >= 1 << 20:
                await self.drain("DATA")
                pending = 0
        if not hold:
            await self.drain("DATA")
        self.transcript.client(f"<message, {sent} octets>")
        self.transcript.client(".")

    async def _final(self, mail: Reply, rcpts: list[Reply]) -> Transaction:
        """The reply (LMTP: the replies) to the final dot, once what is queued is sent."""
        await self.drain("DATA")
        # RFC 5321 4.5.3.2.6: wait at least 10 minutes for the reply to the final dot
        saved, self.timeout = self.timeout, max(self.timeout, 600.0)
        try:
            if self.lmtp:
                return await self._lmtp_replies(mail, rcpts)
            reply = await self.read_reply("DATA")
        finally:
            self.timeout = saved
        self._unsettled = not reply.is_positive
        return Transaction(mail, rcpts, reply, "end of DATA")

    async def _lmtp_replies(self, mail: Reply, rcpts: list[Reply]) -> Transaction:
        """RFC 2033 §4.2: one reply after the final dot for each accepted recipient, in
        the order of their RCPT commands.

        A connection that fails before the first of them raises HopError, as in SMTP (no
        recipient is known to be delivered). One that fails later returns what came:
        those recipients have their outcome, the rest ``None`` and ``lost``."""
        per: list[Reply | None] = [None] * len(rcpts)
        lost: HopError | None = None
        first: Reply | None = None
        for i, rcpt in enumerate(rcpts):
            if not rcpt.is_positive:
                continue
            try:
                per[i] = reply = await self.read_reply("DATA")
            except HopError as exc:
                if first is None:
                    raise
                lost = exc
                break
            first = first or reply
        return Transaction(mail, rcpts, first, "end of DATA", per, lost)

    async def reset(self) -> None:
        try:
            self._unsettled = not (await self.command("RSET", "RSET")).is_positive
        except HopError:
            pass

    async def quit(self) -> None:
        if self.writer is None:
            return
        saved, self.timeout = self.timeout, min(self.timeout, 5.0)
        try:
            if not self.writer.is_closing():
                await self.command("QUIT", "QUIT")
        except HopError:
            pass
        finally:
            self.timeout = saved
        self.close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
