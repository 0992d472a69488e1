"""The SMTP server protocol as a sans-I/O state machine: bytes in, events and replies out.

The core owns everything that is pure protocol: line framing and limits, command
syntax, command sequencing, EHLO capabilities, SASL framing for PLAIN and LOGIN,
DATA framing with dot-unstuffing, size limits and the checks that stop smuggling. It
never decides policy, never touches a socket, never awaits.

Use::

    core.receive(data)                 # bytes from the socket
    while (ev := core.next_event()) is not NEED_DATA:
        ...                            # decide; for events that need an answer:
        core.respond(reply)            # the answer, or an AUTH challenge
    transport.write(core.take_output())

Events that need an answer (``MailFrom``, ``RcptTo``, ``MessageReceived``,
``AuthCredentials``, ``StartTls``) must get exactly one ``respond`` before the next
``next_event``. Every other reply the core makes itself.

Invariants:
- Only ``CRLF.CRLF`` ends DATA. A message with a bare CR or LF, a NUL or a line over
  1000 octets is read to its real end and then refused whole, so nothing inside it
  can become a second, smuggled message.
- After STARTTLS any bytes already buffered are discarded and the session returns to
  its pre-EHLO state (RFC 3207 §4.2).
- Error limits, as Postfix's smtpd_soft_error_limit and smtpd_hard_error_limit: every
  reply with code 400 or more is an error (except ``452 4.5.3``, flow control), counted
  since the session last queued a message. Each error reply past ``soft_error_limit``
  is to be written ``error_sleep`` seconds after the output before it
  (:meth:`ServerProtocol.take_paced`); the error that reaches ``max_errors`` is followed
  by ``421 4.7.0`` and the close. The core never waits itself: the adapter waits before
  writing each such reply, so the client sees them one by one, as from Postfix.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from enum import Enum

from .. import replies
from ..address import AddressError, parse_path
from ..model import Address, Envelope, Reply

__all__ = [
    "AuthCredentials", "Capabilities", "Closed", "MailFrom", "MessageReceived", "NEED_DATA",
    "RcptTo", "ServerProtocol", "StartTls", "Phase",
]

COMMAND_LINE_LIMIT = 512          # RFC 5321 4.5.3.1.4, CRLF included
ENVELOPE_LINE_LIMIT = 512 + 500   # RFC 3461 §5: ORCPT/ENVID may add up to 500
AUTH_LINE_LIMIT = 12288           # RFC 4954 §4
TEXT_LINE_LIMIT = 1000            # RFC 5321 4.5.3.1.6, CRLF included
JUNK_COMMAND_LIMIT = 100          # NOOP/RSET/VRFY/HELP between messages


class Phase(Enum):
    COMMAND = "command"
    DATA = "data"
    AUTH = "auth"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Capabilities:
    hostname: str
    max_message_size: int = 26214400
    max_recipients: int = 100
    max_errors: int = 20              # the hard limit: 421 and close ([smtp] max_errors)
    soft_error_limit: int = 10        # past this many errors, each error reply waits ...
    error_sleep: float = 1.0          # ... this many seconds (take_paced)
    starttls: bool = False            # a TLS context is available for STARTTLS
    auth: bool = False                # AUTH is offered on this listener (only once TLS is on)
    postmaster_domain: str = "localhost"


# --- events ------------------------------------------------------------------------
class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(slots=True)
class MailFrom:
    sender: Address
    params: dict[str, str]


@dataclass(slots=True)
class RcptTo:
    recipient: Address
    params: dict[str, str]


@dataclass(slots=True)
class MessageReceived:
    """The end of a message's data. ``data`` is the part not already taken with
    :meth:`ServerProtocol.take_body` (un-dot-stuffed, CRLF line ends, ends with CRLF or is
    empty); ``serial`` numbers the DATA command the parts belong to."""
    data: bytes
    envelope: Envelope
    serial: int = 0
    size: int = 0               # of the whole message, taken parts included


@dataclass(slots=True)
class AuthCredentials:
    mechanism: str
    username: str
    password: str = field(repr=False)


@dataclass(slots=True)
class StartTls:
    pass


@dataclass(slots=True)
class Closed:
    """The core has sent its last reply (QUIT or too many errors); close the transport."""

    reason: str


Event = MailFrom | RcptTo | MessageReceived | AuthCredentials | StartTls | Closed | _NeedData

_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([^= \x00-\x1f\x7f]+))?\Z")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}
# a line of 999 or more characters; anchored at line starts so the scan stays linear
# and allocates nothing (a split of a 20 MB body would copy it)


def _has_long_line(lines: bytes, limit: int = TEXT_LINE_LIMIT) -> bool:
    """Whether complete CRLF lines (no bare CR or LF) hold one longer than ``limit``
    octets with its CRLF. Such a line is a run of at least ``limit`` octets without LF
    (its CR included), and any such run covers a whole aligned block of half that size:
    only blocks without LF are looked at closely. Several GB/s, where a regular
    expression anchored at every line managed about 120 MB/s."""
    run = limit
    step = run // 2
    find = lines.find
    end = len(lines)
    for k in range(0, end - step + 1, step):
        if find(b"\n", k, k + step) == -1:
            start = lines.rfind(b"\n", 0, k) + 1
            stop = find(b"\n", k)
            if (end if stop == -1 else stop) - start >= run:
                return True
    return False


class ServerProtocol:
    """One SMTP server session, from greeting to close."""

    def __init__(self, caps: Capabilities, *, tls_active: bool = False) -> None:
        self.caps = caps
        self.tls_active = tls_active
        self.phase = Phase.COMMAND
        self.helo: str | None = None
        self.esmtp = False
        self.auth_user: str | None = None
        self.envelope = Envelope()
        self.errors = 0                        # error replies in this session
        self.errors_without_mail = 0           # the same since a message was last queued
        self._delay = 0.0                      # the waits of output already taken
        self._in = bytearray()
        self._out: list[bytes] = []
        self._waits: list[tuple[int, float]] = []   # (index in _out, seconds before it)
        self._pending: Event | None = None
        self._closing: Closed | None = None        # a close decided inside respond()
        self._junk_commands = 0
        self._discarding_line = False
        self._body: list[bytes] = []           # message data not yet taken by the caller
        self._body_serial = 0                  # which DATA command the parts belong to
        self._body_size = 0
        self._body_problem: Reply | None = None
        self._skipping_line = False            # inside an over-long line of message data
        self._auth_mech = ""
        self._auth_step = 0
        self._auth_username = ""

    # --- plumbing ------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        if self.phase is not Phase.CLOSED:
            self._in += data

    def take_output(self) -> bytes:
        """Everything said so far, in one piece; the waits it owes are then
        :meth:`take_delay`'s."""
        out = b"".join(self._out)
        self._out.clear()
        self._delay += sum(wait for _, wait in self._waits)
        self._waits.clear()
        return out

    def take_delay(self) -> float:
        """Seconds to wait before writing the output taken with :meth:`take_output`:
        ``error_sleep`` for each error reply in it past ``soft_error_limit``."""
        delay, self._delay = self._delay, 0.0
        return delay

    def take_paced(self) -> list[tuple[float, bytes]]:
        """Everything said so far, in parts, each with the seconds to wait before
        writing it: the first part is due now, and each error reply past
        ``soft_error_limit`` starts a part that waits ``error_sleep`` (Postfix's
        smtpd_error_sleep_time). The caller waits without holding up other sessions;
        the core has already moved on."""
        parts: list[tuple[float, bytes]] = []
        start, wait = 0, self.take_delay()
        for index, seconds in self._waits:
            if index > start:
                parts.append((wait, b"".join(self._out[start:index])))
                start, wait = index, 0.0
            wait += seconds
        if start < len(self._out) or wait:
            parts.append((wait, b"".join(self._out[start:])))
        self._out.clear()
        self._waits.clear()
        return parts

    @property
    def buffered(self) -> int:
        return len(self._in)

    @property
    def in_transaction(self) -> bool:
        return self.envelope.sender is not None

    def greet(self) -> None:
        self._send(replies.greeting(self.caps.hostname))

    def close_with(self, reply: Reply) -> None:
        """Send a final reply (timeout, shutdown) and stop processing input. The
        server's own verdict: it is not counted as the client's error, nor delayed."""
        self._out.append(reply.render())
        self.phase = Phase.CLOSED

    def _send(self, reply: Reply) -> None:
        # 452 4.5.3 is flow control (RFC 5321 4.5.3.1.10), not a client error
        if reply.code >= 400 and reply is not replies.TOO_MANY_RECIPIENTS:
            self.errors += 1
            self.errors_without_mail += 1
            if self.errors_without_mail > self.caps.soft_error_limit and \
                    self.caps.error_sleep > 0:
                self._waits.append((len(self._out), self.caps.error_sleep))
        self._out.append(reply.render())

    def _error(self, reply: Reply) -> Closed | None:
        """Send an error reply; at the hard limit, say 421 and close."""
        self._send(reply)
        if self.errors_without_mail >= self.caps.max_errors:
            # the server's own verdict, not another client error: not counted, not delayed
            self._out.append(replies.TOO_MANY_ERRORS.render())
            self.phase = Phase.CLOSED
            return Closed("too many errors")
        return None

    # --- answers from the caller ---------------------------------------------------
    def respond(self, reply: Reply) -> None:
        ev = self._pending
        if ev is None:
            raise RuntimeError("respond() without a pending event")
        if reply.code == 334 and isinstance(ev, AuthCredentials):
            raise RuntimeError("AUTH challenges are made by the core")
        self._pending = None
        if isinstance(ev, MailFrom):
            if reply.is_positive:
                self.envelope.sender = ev.sender
                self.envelope.mail_params = ev.params
        elif isinstance(ev, RcptTo):
            if reply.is_positive:
                self.envelope.recipients.append((ev.recipient, ev.params))
        elif isinstance(ev, MessageReceived):
            self.envelope = Envelope()
            self._junk_commands = 0
            if reply.is_positive:   # Postfix's limits count errors "without delivering mail"
                self.errors_without_mail = 0
        elif isinstance(ev, AuthCredentials):
            if reply.code == 235:
                self.auth_user = ev.username
        elif isinstance(ev, StartTls):
            pass
        if reply.code == 421:
            self._send(reply)
            self.phase = Phase.CLOSED
            self._closing = Closed(f"the caller answered {reply.code}")
            return
        if reply.code >= 400:
            self._closing = self._error(reply)
        else:
            self._send(reply)

    def tls_started(self) -> None:
        """The transport is now TLS: forget everything said in plaintext (RFC 3207 §4.2).

        The plaintext input was dropped when STARTTLS was read, and the adapter reads
        nothing more until the handshake; what is buffered now came over TLS (a client
        may send EHLO with its last handshake message) and is kept.
        """
        self.tls_active = True
        self.helo = None
        self.esmtp = False
        self.envelope = Envelope()

    # --- the state machine ---------------------------------------------------------
    def next_event(self) -> Event:
        if self._pending is not None:
            raise RuntimeError(f"{self._pending!r} has not been answered")
        if self._closing is not None:
            closing, self._closing = self._closing, None
            return closing
        while self.phase is not Phase.CLOSED:
            if self.phase is Phase.DATA:
                ev = self._data_event()
            else:
                ev = self._line_event()
            if ev is NEED_DATA:
                return NEED_DATA
            if ev is not None:
                if not isinstance(ev, Closed):
                    self._pending = ev
                return ev
        return NEED_DATA

    def _read_line(self, limit: int) -> bytes | None | Reply:
        """One line without its CRLF; None when incomplete; a Reply on a framing error.

        ``limit`` counts the CRLF. An over-long line is answered once and then dropped
        up to its LF, however many reads that takes.
        """
        buf = self._in
        if self._discarding_line:
            nl = buf.find(b"\n")
            if nl < 0:
                buf.clear()
                return None
            del buf[: nl + 1]
            self._discarding_line = False
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) >= limit:
                buf.clear()
                self._discarding_line = True
                return replies.LINE_TOO_LONG
            return None
        raw = bytes(buf[:nl])
        del buf[: nl + 1]
        if nl + 1 > limit:
            return replies.LINE_TOO_LONG
        if not raw.endswith(b"\r") or b"\r" in raw[:-1]:
            return replies.BARE_LINE_ENDING_IN_COMMAND
        return raw[:-1]

    def _line_event(self) -> Event | None:
        # framing allows the longest line any command may have (AUTH with an initial
        # response, RFC 4954 §4); each verb's own limit is checked below
        line = self._read_line(AUTH_LINE_LIMIT)
        if line is None:
            return NEED_DATA
        if isinstance(line, Reply) or b"\x00" in line:
            self.phase = Phase.COMMAND
            return self._error(line if isinstance(line, Reply) else replies.NUL_IN_COMMAND)
        if self.phase is Phase.AUTH:
            return self._auth_line(line)
        verb_bytes = line[:5].upper()
        limit = AUTH_LINE_LIMIT if verb_bytes == b"AUTH " else ENVELOPE_LINE_LIMIT \
            if verb_bytes[:4] in (b"MAIL", b"RCPT") else COMMAND_LINE_LIMIT
        if len(line) + 2 > limit:
            return self._error(replies.LINE_TOO_LONG)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(replies.EIGHT_BIT_IN_COMMAND)
        verb, _, arg = text.partition(" ")
        handler = _COMMANDS.get(verb.upper())
        if handler is None:
            return self._error(replies.UNKNOWN_COMMAND)
        return handler(self, arg)

    # --- commands ------------------------------------------------------------------
    def _cmd_helo(self, arg: str, extended: bool) -> Event | None:
        name = arg.strip()
        if not name or " " in name:
            return self._error(replies.SYNTAX_HELO)
        self.helo = name
        self.esmtp = extended
        self.envelope = Envelope()
        host = self.caps.hostname
        if not extended:
            self._send(replies.helo(host))
            return None
        self._send(replies.ehlo(
            host, self.caps.max_message_size,
            starttls=self.caps.starttls and not self.tls_active,
            auth=self.caps.auth and self.tls_active))
        return None

    def _cmd_ehlo(self, arg: str) -> Event | None:
        return self._cmd_helo(arg, True)

    def _cmd_helo_plain(self, arg: str) -> Event | None:
        return self._cmd_helo(arg, False)

    def _params(self, text: str, allowed: set[str]) -> dict[str, str] | Reply:
        params: dict[str, str] = {}
        for item in text.split():
            m = _PARAM.match(item)
            if not m:
                return replies.BAD_PARAMETER_VALUE
            key = m.group(1).upper()
            if key not in allowed or key in params:
                return replies.UNKNOWN_PARAMETER
            params[key] = m.group(2) if m.group(2) is not None else ""
        return params

    def _split_path(self, arg: str, prefix: str) -> tuple[str, str] | None:
        if arg[: len(prefix)].upper() != prefix:
            return None
        rest = arg[len(prefix):].lstrip(" ")
        if not rest.startswith("<"):
            return None
        # the path ends at the first '>' outside a quoted string
        quoted = False
        i = 1
        while i < len(rest):
            c = rest[i]
            if c == "\\" and quoted:
                i += 2
                continue
            if c == '"':
                quoted = not quoted
            elif c == ">" and not quoted:
                break
            i += 1
        else:
            return None
        path, tail = rest[: i + 1], rest[i + 1:]
        if tail and not tail.startswith(" "):
            return None
        return path, tail.strip(" ")

    def _cmd_mail(self, arg: str) -> Event | None:
        if self.helo is None:
            return self._error(replies.NEED_HELO)
        if self.in_transaction:
            return self._error(replies.NESTED_MAIL)
        split = self._split_path(arg, "FROM:")
        if split is None:
            return self._error(replies.SYNTAX_MAIL)
        path, ptext = split
        allowed = {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"} if self.esmtp else set()
        params = self._params(ptext, allowed)
        if isinstance(params, Reply):
            return self._error(params)
        if "SIZE" in params:
            size = params["SIZE"]
            if not (size.isascii() and size.isdigit()) or len(size) > 20:
                return self._error(replies.BAD_PARAMETER_VALUE)
            if int(params["SIZE"]) > self.caps.max_message_size:
                return self._error(replies.message_too_big(self.caps.max_message_size))
        if params.get("BODY", "7BIT").upper() not in ("7BIT", "8BITMIME"):
            return self._error(replies.BAD_PARAMETER_VALUE)
        if "SMTPUTF8" in params and params["SMTPUTF8"]:
            return self._error(replies.BAD_PARAMETER_VALUE)
        if "RET" in params and params["RET"].upper() not in ("FULL", "HDRS"):
            return self._error(replies.BAD_PARAMETER_VALUE)
        if "ENVID" in params and (not _XTEXT.match(params["ENVID"]) or len(params["ENVID"]) > 100):
            return self._error(replies.BAD_PARAMETER_VALUE)
        utf8 = "SMTPUTF8" in params
        if not path.isascii() and not utf8:
            return self._error(replies.NEEDS_SMTPUTF8)
        try:
            sender = parse_path(path, allow_null=True, utf8=utf8)
        except AddressError:
            return self._error(replies.BAD_SENDER_SYNTAX)
        return MailFrom(sender, params)

    def _cmd_rcpt(self, arg: str) -> Event | None:
        if self.helo is None:
            return self._error(replies.NEED_HELO)
        if not self.in_transaction:
            return self._error(replies.NEED_MAIL)
        split = self._split_path(arg, "TO:")
        if split is None:
            return self._error(replies.SYNTAX_RCPT)
        path, ptext = split
        params = self._params(ptext, {"NOTIFY", "ORCPT"} if self.esmtp else set())
        if isinstance(params, Reply):
            return self._error(params)
        if "NOTIFY" in params:
            values = set(params["NOTIFY"].upper().split(","))
            if not (values == {"NEVER"} or (values and values <= _NOTIFY)):
                return self._error(replies.BAD_DSN_NOTIFY)
        if "ORCPT" in params:
            kind, _, value = params["ORCPT"].partition(";")
            if not kind or not value or not _XTEXT.match(value):
                return self._error(replies.BAD_PARAMETER_VALUE)
        if len(self.envelope.recipients) >= self.caps.max_recipients:
            return self._error(replies.TOO_MANY_RECIPIENTS)
        utf8 = "SMTPUTF8" in self.envelope.mail_params
        if not path.isascii() and not utf8:
            return self._error(replies.NEEDS_SMTPUTF8)
        if path.lower() == "<postmaster>":
            return RcptTo(Address("postmaster", self.caps.postmaster_domain), params)
        try:
            rcpt = parse_path(path, allow_null=False, utf8=utf8)
        except AddressError:
            return self._error(replies.BAD_ADDRESS_SYNTAX)
        return RcptTo(rcpt, params)

    def _cmd_data(self, arg: str) -> Event | None:
        if arg:
            return self._error(replies.SYNTAX_NO_ARGUMENTS)
        if self.helo is None:
            return self._error(replies.NEED_HELO)
        if not self.in_transaction:
            return self._error(replies.NEED_MAIL)
        if not self.envelope.recipients:
            return self._error(replies.NEED_RCPT)
        self._send(replies.START_MAIL_INPUT)
        self.phase = Phase.DATA
        self._body = []
        self._body_serial += 1
        self._body_size = 0
        self._body_problem = None
        self._skipping_line = False
        return None

    def _junk(self) -> Closed | None:
        """NOOP, RSET, VRFY, HELP: past a limit without mail, the session is only
        holding a connection open (Postfix's smtpd_junk_command_limit)."""
        self._junk_commands += 1
        if self._junk_commands > JUNK_COMMAND_LIMIT:
            self._send(replies.TOO_MANY_COMMANDS)
            self.phase = Phase.CLOSED
            return Closed("too many commands without mail")
        return None

    def _cmd_rset(self, arg: str) -> Event | None:
        if (closed := self._junk()) is not None:
            return closed
        if arg:
            return self._error(replies.SYNTAX_NO_ARGUMENTS)
        self.envelope = Envelope()
        self._send(replies.RESET_OK)
        return None

    def _cmd_noop(self, arg: str) -> Event | None:
        if (closed := self._junk()) is not None:
            return closed
        self._send(replies.OK)
        return None

    def _cmd_quit(self, arg: str) -> Event | None:
        self._send(replies.closing(self.caps.hostname))
        self.phase = Phase.CLOSED
        return Closed("QUIT")

    def _cmd_vrfy(self, arg: str) -> Event | None:
        if (closed := self._junk()) is not None:
            return closed
        if not arg.strip():
            return self._error(replies.SYNTAX_VRFY)
        self._send(replies.VRFY_CANNOT)
        return None

    def _cmd_help(self, arg: str) -> Event | None:
        if (closed := self._junk()) is not None:
            return closed
        self._send(replies.HELP)
        return None

    def _cmd_not_implemented(self, arg: str) -> Event | None:
        return self._error(replies.NOT_IMPLEMENTED)

    def _cmd_starttls(self, arg: str) -> Event | None:
        if arg:
            return self._error(replies.SYNTAX_NO_ARGUMENTS)
        if self.tls_active:
            return self._error(replies.ALREADY_TLS)
        if not self.caps.starttls:
            return self._error(replies.TLS_NOT_AVAILABLE)
        if self.helo is None:
            return self._error(replies.NEED_HELO)
        # Anything pipelined after STARTTLS was sent in plaintext: drop it (RFC 3207).
        self._in.clear()
        return StartTls()

    def _cmd_auth(self, arg: str) -> Event | None:
        if not self.caps.auth:
            return self._error(replies.AUTH_NOT_AVAILABLE)
        if not self.tls_active:
            return self._error(replies.AUTH_NEEDS_TLS)
        if self.helo is None or not self.esmtp:
            return self._error(replies.NEED_HELO)
        if self.auth_user is not None:
            return self._error(replies.ALREADY_AUTHENTICATED)
        if self.in_transaction:
            return self._error(replies.AUTH_IN_TRANSACTION)
        parts = arg.split()
        if not parts or len(parts) > 2:
            return self._error(replies.SYNTAX_AUTH)
        mech = parts[0].upper()
        if mech not in ("PLAIN", "LOGIN"):
            return self._error(replies.AUTH_MECHANISM_UNKNOWN)
        self._auth_mech = mech
        self._auth_step = 0
        self._auth_username = ""
        if len(parts) == 2:
            return self._auth_line(parts[1].encode("ascii", "replace"))
        self.phase = Phase.AUTH
        self._send(replies.auth_challenge("" if mech == "PLAIN" else "VXNlcm5hbWU6"))
        return None

    def _auth_line(self, line: bytes) -> Event | None:
        self.phase = Phase.COMMAND
        if line == b"*":
            return self._error(replies.AUTH_CANCELLED)
        try:
            decoded = base64.b64decode(line, validate=True) if line != b"=" else b""
            text = decoded.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return self._error(replies.BAD_BASE64)
        if self._auth_mech == "PLAIN":
            fields = text.split("\x00")
            if len(fields) != 3 or not fields[1]:
                return self._error(replies.AUTH_FAILED)
            authzid, authcid, password = fields
            if authzid and authzid.lower() != authcid.lower():
                return self._error(replies.AUTH_FAILED)
            return AuthCredentials("PLAIN", authcid, password)
        # LOGIN: username, then password
        if self._auth_step == 0:
            self._auth_username = text
            self._auth_step = 1
            self.phase = Phase.AUTH
            self._send(replies.auth_challenge("UGFzc3dvcmQ6"))
            return None
        return AuthCredentials("LOGIN", self._auth_username, text)

    # --- DATA ----------------------------------------------------------------------
    def take_body(self) -> tuple[int, list[bytes]]:
        """The message data decoded so far and not yet taken, with its DATA serial.

        A caller that takes the parts as they come (to write them to a file) holds no
        more than one read of a big message in memory; one that never calls this gets
        the whole message in :class:`MessageReceived`.
        """
        parts, self._body = self._body, []
        return self._body_serial, parts

    def _data_event(self) -> Event | None:
        """Decode the complete lines buffered so far: find the final dot, remove the
        transparency dots (RFC 5321 4.5.2) and check each line. The caller may take the
        decoded parts at any time; at most one partial line stays behind."""
        buf = self._in
        if self._skipping_line:
            cut = buf.find(b"\r\n")
            if cut < 0:
                del buf[:-1]                   # keep a CR that may start the line end
                return NEED_DATA
            del buf[: cut + 2]
            self._skipping_line = False
        if buf.startswith(b".\r\n"):
            end, final = 0, True
        else:
            found = buf.find(b"\r\n.\r\n")
            final = found >= 0
            last = buf.rfind(b"\r\n")
            end = found + 2 if final else (last + 2 if last >= 0 else 0)
        if end > 0:
            with memoryview(buf) as view:          # one copy, not a slice and a copy
                self._data_lines(bytes(view[:end]))
            del buf[:end]
        if final:
            del buf[:3]
            return self._data_end()
        if len(buf) > TEXT_LINE_LIMIT:
            # a line this long without its CRLF is too long even with a transparency dot
            self._data_problem(replies.DATA_LINE_TOO_LONG)
            self._skipping_line = True
            del buf[:-1]
        return NEED_DATA

    def _data_lines(self, lines: bytes) -> None:
        """Complete lines of message data, each ending in CRLF."""
        if self._body_problem is not None:
            return
        crlf = lines.count(b"\r\n")
        if lines.count(b"\n") != crlf or lines.count(b"\r") != crlf:
            return self._data_problem(replies.BARE_LINE_ENDING_IN_DATA)
        if b"\x00" in lines:
            return self._data_problem(replies.NUL_IN_DATA)
        if lines.startswith(b"."):
            lines = lines[1:]
        if b"\r\n." in lines:
            lines = lines.replace(b"\r\n.", b"\r\n")
        # checked after unstuffing: the transparency dot is not part of the line
        # (RFC 5321 4.5.3.1.6) nor of the message size
        if len(lines) > TEXT_LINE_LIMIT - 2 and _has_long_line(lines):
            return self._data_problem(replies.DATA_LINE_TOO_LONG)
        self._body_size += len(lines)
        if self._body_size > self.caps.max_message_size:
            return self._data_problem(replies.message_too_big(self.caps.max_message_size))
        self._body.append(lines)

    def _data_problem(self, reply: Reply) -> None:
        """The message is refused: keep reading to its end, but hold none of it."""
        if self._body_problem is None:
            self._body_problem = reply
        self._body = []

    def _data_end(self) -> Event | None:
        self.phase = Phase.COMMAND
        envelope = self.envelope
        problem, self._body_problem = self._body_problem, None
        if problem is not None:
            self.envelope = Envelope()
            return self._error(problem)
        parts, self._body = self._body, []
        return MessageReceived(b"".join(parts), envelope, self._body_serial, self._body_size)


_COMMANDS = {
    "EHLO": ServerProtocol._cmd_ehlo,
    "HELO": ServerProtocol._cmd_helo_plain,
    "MAIL": ServerProtocol._cmd_mail,
    "RCPT": ServerProtocol._cmd_rcpt,
    "DATA": ServerProtocol._cmd_data,
    "RSET": ServerProtocol._cmd_rset,
    "NOOP": ServerProtocol._cmd_noop,
    "QUIT": ServerProtocol._cmd_quit,
    "VRFY": ServerProtocol._cmd_vrfy,
    "HELP": ServerProtocol._cmd_help,
    "EXPN": ServerProtocol._cmd_not_implemented,
    "BDAT": ServerProtocol._cmd_not_implemented,
    "ETRN": ServerProtocol._cmd_not_implemented,
    "TURN": ServerProtocol._cmd_not_implemented,
    "STARTTLS": ServerProtocol._cmd_starttls,
    "AUTH": ServerProtocol._cmd_auth,
}
