"""Every reply the Postroom SMTP server sends, as named constants and small builders.

``docs/replies.md`` lists these; a test checks that it names every one.
Texts never contain exception messages or secrets.
"""

from __future__ import annotations

from .model import Address, Reply

# --- connection --------------------------------------------------------------------


def greeting(hostname: str) -> Reply:
    return Reply(220, "", f"{hostname} ESMTP Postroom")


def closing(hostname: str) -> Reply:
    return Reply(221, "2.0.0", f"{hostname} closing connection")


def timeout(hostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{hostname} Error: timeout exceeded, closing connection")


def shutting_down(hostname: str) -> Reply:
    return Reply(421, "4.3.2", f"{hostname} Service shutting down, try again later")


TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_CONNECTIONS_FROM_PEER = Reply(
    421, "4.7.0", "Too many connections from your address, try again later"
)
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors in this session, closing connection")
TOO_MANY_COMMANDS = Reply(
    421, "4.7.0", "Too many NOOP/RSET/VRFY/HELP commands without mail, closing connection")

# --- generic command replies -------------------------------------------------------
def helo(hostname: str) -> Reply:
    return Reply(250, "", hostname)


def ehlo(hostname: str, max_size: int, *, starttls: bool, auth: bool) -> Reply:
    """The EHLO reply: the extensions on offer in this session's state."""
    lines = [hostname, "PIPELINING", f"SIZE {max_size}", "8BITMIME", "ENHANCEDSTATUSCODES"]
    if starttls:
        lines.append("STARTTLS")
    if auth:
        lines.append("AUTH PLAIN LOGIN")
    lines += ["SMTPUTF8", "DSN"]
    return Reply(250, "", "\n".join(lines))


OK = Reply(250, "2.0.0", "Ok")
RESET_OK = Reply(250, "2.0.0", "Ok: reset")
SENDER_OK = Reply(250, "2.1.0", "Ok: sender accepted")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok: recipient accepted")
VRFY_CANNOT = Reply(
    252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery"
)
HELP = Reply(
    214,
    "2.0.0",
    "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH\n"
    "See RFC 5321",
)
START_MAIL_INPUT = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")

# --- syntax and sequence -----------------------------------------------------------
LINE_TOO_LONG = Reply(
    500, "5.5.2", "Error: line too long (commands 512 octets, MAIL/RCPT 1012, AUTH 12288)")
BARE_LINE_ENDING_IN_COMMAND = Reply(
    500, "5.5.2", "Error: command lines must end with CRLF, not a bare LF or CR"
)
NUL_IN_COMMAND = Reply(500, "5.5.2", "Error: NUL byte in command")
EIGHT_BIT_IN_COMMAND = Reply(500, "5.5.2", "Error: 8-bit data in command is not valid UTF-8")
UNKNOWN_COMMAND = Reply(502, "5.5.1", "Error: command not recognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
SYNTAX_HELO = Reply(501, "5.5.4", "Syntax: HELO hostname / EHLO hostname")
SYNTAX_MAIL = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
SYNTAX_RCPT = Reply(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
SYNTAX_VRFY = Reply(501, "5.5.4", "Syntax: VRFY address")
SYNTAX_NO_ARGUMENTS = Reply(501, "5.5.4", "Syntax error: this command takes no arguments")
SYNTAX_AUTH = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
BAD_BASE64 = Reply(501, "5.5.2", "Error: invalid base64 data")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Error: unsupported parameter")
BAD_PARAMETER_VALUE = Reply(501, "5.5.4", "Error: invalid parameter value")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
ALREADY_TLS = Reply(503, "5.5.1", "Error: TLS is already active")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "Error: AUTH not allowed during a mail transaction")

# --- addresses ---------------------------------------------------------------------
BAD_ADDRESS_SYNTAX = Reply(501, "5.1.3", "Error: bad address syntax")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Error: bad sender address syntax")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Error: non-ASCII address requires the SMTPUTF8 parameter")


def relay_denied(address: Address | str) -> Reply:
    """The seed case's wording: the one reply for every refused relay attempt."""
    return Reply(550, "5.7.1", f"Relaying mail to <{address}> is not allowed")


def auth_rejected(why: str) -> Reply:
    """Inbound verification refused the message (SPF, DKIM, DMARC or ARC, by policy)."""
    return Reply(550, "5.7.1", f"Message rejected: {why}")


def auth_deferred(why: str) -> Reply:
    """Inbound verification could not finish (DNS) and [verify] on_temperror = "defer"."""
    return Reply(451, "4.7.0", f"Message deferred: {why}; try again later")


def unknown_user(address: Address) -> Reply:
    return Reply(550, "5.1.1", f"<{address}>: Recipient address rejected: no such mailbox here")


def no_route(domain: str) -> Reply:
    return Reply(550, "5.4.4", f"Unable to route: no address space covers {domain}")


TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required: log in with AUTH before MAIL")
BAD_DSN_NOTIFY = Reply(501, "5.5.4", "Error: invalid NOTIFY value")

# --- size and content --------------------------------------------------------------


def message_too_big(limit: int) -> Reply:
    return Reply(552, "5.3.4", f"Error: message exceeds the fixed size limit of {limit} octets")


BARE_LINE_ENDING_IN_DATA = Reply(
    550, "5.6.0", "Error: message contains a bare LF or CR; lines must end with CRLF"
)
NUL_IN_DATA = Reply(550, "5.6.0", "Error: message contains a NUL byte")
DATA_LINE_TOO_LONG = Reply(
    550, "5.6.0", "Error: message has a line longer than 998 characters (RFC 5322 2.1.1)"
)


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
SPOOL_UNAVAILABLE = Reply(451, "4.3.0", "The queue's database cannot be reached; try again "
                                        "later")


def internal_error(reference: str) -> Reply:
    return Reply(451, "4.3.0", f"Internal error, reference {reference}; try again later")


# --- AUTH --------------------------------------------------------------------------
AUTH_SUCCEEDED = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_MECHANISM_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_NOT_AVAILABLE = Reply(503, "5.5.1", "Error: authentication not enabled here")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_THROTTLED = Reply(
    454, "4.7.0", "Too many failed authentication attempts from your address, try again later"
)
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")


def auth_challenge(base64_text: str) -> Reply:
    return Reply(334, "", base64_text)


def component_stopped(hostname: str, component: str) -> Reply:
    """The greeting while an administrator has stopped this listener's component."""
    return Reply(421, "4.3.2", f"{hostname} Service not available: the {component} "
                 "component is stopped by the administrator; try again later")
