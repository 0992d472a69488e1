"""Values shared by every layer: replies, addresses, envelopes and the one error type.

Layer 0: standard library only. Nothing here performs I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "Address",
    "ComponentError",
    "DeliveryResult",
    "Envelope",
    "Reply",
    "SmtpError",
]


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: basic code, enhanced status code (RFC 3463) and text.

    Invariant: the enhanced code's class digit equals the basic code's first digit
    (2.x.x with 2yz, 4.x.x with 4yz, 5.x.x with 5yz); replies without an enhanced
    code (the greeting, 354, 334) leave it empty.
    """

    code: int
    enhanced: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if self.enhanced and self.enhanced[0] != str(self.code)[0]:
            raise ValueError(f"enhanced code {self.enhanced} does not match {self.code}")

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        """The text lines of the reply without codes, one per wire line."""
        return self.text.split("\n") if self.text else [""]

    def render(self) -> bytes:
        """The reply as it goes on the wire, multi-line aware, CRLF terminated."""
        lines = self.lines()
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        prefix = f" {self.enhanced}" if self.enhanced else ""
        return f"{self.code}{prefix} {' / '.join(self.lines())}"


class SmtpError(Exception):
    """A domain error that knows the reply it becomes on the wire."""

    def __init__(self, reply: Reply, reason: str = "") -> None:
        super().__init__(reason or str(reply))
        self.reply = reply
        self.reason = reason or reply.text


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox address as used in the envelope: ``local@domain``.

    ``local`` keeps its case (RFC 5321 §2.4: the local part may be case sensitive on
    the host that owns it); ``domain`` is lower case. The null reverse path ``<>``
    is represented by ``Address("", "")``.
    """

    local: str
    domain: str

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def key(self) -> str:
        """The lookup key: the whole address folded to lower case."""
        return f"{self.local.lower()}@{self.domain}" if not self.is_null else ""

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if not self.is_null else ""


@dataclass(slots=True)
class Envelope:
    """What an SMTP transaction collected: reverse path, parameters and recipients."""

    sender: Address | None = None
    mail_params: dict[str, str] = field(default_factory=dict)
    recipients: list[tuple[Address, dict[str, str]]] = field(default_factory=list)

    def reset(self) -> None:
        self.sender = None
        self.mail_params = {}
        self.recipients = []


class ComponentError(Exception):
    """A component action that cannot be done (unknown name, or not allowed)."""


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What happened to one recipient in one delivery attempt, whatever delivered it.

    The one shape of a result: a delivery agent makes it, the queue manager decides what
    it means for the schedule, the spool records it (``as_detail``) and the NDR reads it
    back. ``reply`` is the hop's reply, or the reply we made up for a failure of our own
    (a refused connection, a DNS error); ``status`` is the RFC 3463 code the DSN reports,
    which differs from the reply's own only where a 5xx reply is retried (a smart host's
    535: our configuration, so deferred, reported as 4.x.x).
    """

    recipient: int                   # the spool's recipient id
    ok: bool
    transient: bool
    reply: Reply
    step: str                        # connect, greeting, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA,
                                     # dns, local, LHLO, routing, ...
    status: str = ""                 # the DSN status; "" means the reply's own
    hop: str = ""                    # which hop: "local mailbox", "MX of x (route *)", ...
    remote_host: str | None = None
    remote_ip: str | None = None
    transcript: str = ""
    dsn_capable: bool = False        # the next hop took over DSN duties (RFC 3461 4.1)
    hop_failure: bool = False        # the whole destination failed, not this recipient
    stored: str = ""                 # a local copy that stands only if this is recorded

    @property
    def dsn_status(self) -> str:
        if self.status:
            return self.status
        if self.reply.enhanced:
            return self.reply.enhanced
        return f"{str(self.reply.code)[0]}.0.0"

    def as_detail(self) -> dict[str, object]:
        """The result as the spool keeps it (JSON), and as ``queue show`` reads it."""
        return {"status": self.dsn_status, "step": self.step, "remote_host": self.remote_host,
                "remote_ip": self.remote_ip, "hop": self.hop,
                "reply": [self.reply.code, self.reply.enhanced, self.reply.text],
                "transcript": self.transcript[-8000:]}
