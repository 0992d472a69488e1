"""SMTP dialogs as data: every ``NNN-*.txt`` here is replayed against a real server.

File format (one directive per line; blank lines are ignored):

``# source: 127.0.0.66``
    the client's address (default 127.0.0.1, which is in trusted_networks)
``# port: mx`` or ``# port: submission``
    the listener to connect to (default mx)
``# delivers: alice@example.test 1``
    after the dialog, exactly this many new messages reach that Maildir (repeatable;
    ``0`` waits a moment and checks that nothing arrived)
``# message-has: alice@example.test Subject: hello`` / ``# message-lacks: ...``
    a message the dialog delivered to that address has / none has a line that is
    exactly this text (lines of the Maildir file, LF ends)
``# anything else``
    a comment
``C: text``
    sent by the client with CRLF appended. Escapes make hostile bytes expressible:
    ``{CR}`` ``{LF}`` ``{CRLF}`` ``{NUL}`` ``{TAB}`` ``{SP}`` ``{LBRACE}`` ``{RBRACE}``,
    ``{xHH}`` for one byte in hex, ``{c*N}`` for the character c repeated N times, and
    ``{NOCRLF}`` at the end to send the line without the CRLF. Client lines are sent at
    once, so several ``C:`` lines before the ``S:`` lines are a pipelined group.
``S: 250 2.0.0 Ok: queued as``
    the next reply: its code, then optionally a prefix of the text of its first line
``S+ STARTTLS`` / ``S- AUTH``
    some / no line of the reply just read has a text starting with this
``S: (closed)``
    the server has closed the connection
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import RawClient, ServerProcess

HERE = Path(__file__).resolve().parent
DIALOGS = sorted(HERE.glob("[0-9][0-9][0-9]-*.txt"))

_NAMED = {"CR": b"\r", "LF": b"\n", "CRLF": b"\r\n", "NUL": b"\x00", "TAB": b"\t", "SP": b" ",
          "LBRACE": b"{", "RBRACE": b"}"}
_ESCAPE = re.compile(r"\{([A-Z]+|x[0-9A-Fa-f]{2}|.\*\d+)\}")
_HEADER = re.compile(r"#\s*(source|port|delivers|message-has|message-lacks)\s*:\s*(.*?)\s*\Z")


@dataclass(frozen=True)
class Step:
    kind: str           # "send" | "reply" | "has" | "lacks" | "closed"
    data: bytes = b""   # send
    code: int = 0       # reply
    text: str = ""      # reply: prefix of the first line's text; has/lacks: line prefix
    line: int = 0       # line number in the file, for messages


@dataclass
class Dialog:
    name: str
    source: str = "127.0.0.1"
    port: str = "mx"
    delivers: dict[str, int] = field(default_factory=dict)
    lines: list[tuple[str, str, bool]] = field(default_factory=list)   # address, line, present
    steps: list[Step] = field(default_factory=list)


def client_bytes(text: str) -> bytes:
    """A ``C:`` line's payload as wire bytes, CRLF appended unless it ends in {NOCRLF}."""
    eol = b"\r\n"
    if text.endswith("{NOCRLF}"):
        text, eol = text[: -len("{NOCRLF}")], b""
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        out += text[pos:m.start()].encode("utf-8")
        token = m.group(1)
        if token in _NAMED:
            out += _NAMED[token]
        elif re.fullmatch(r"x[0-9A-Fa-f]{2}", token):
            out.append(int(token[1:], 16))
        elif re.fullmatch(r".\*\d+", token):
            out += token[0].encode("utf-8") * int(token[2:])
        else:
            raise ValueError(f"unknown escape {{{token}}}")
        pos = m.end()
    rest = text[pos:]
    if "{" in rest or "}" in rest:
        raise ValueError(f"stray brace in {text!r}: use {{LBRACE}} / {{RBRACE}}")
    out += rest.encode("utf-8")
    return bytes(out) + eol


def parse_dialog(text: str, name: str = "<string>") -> Dialog:
    dialog = Dialog(name)
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\n")
        where = f"{name}:{number}"
        if not line.strip():
            continue
        if line.startswith("#"):
            m = _HEADER.match(line)
            if m is None:
                continue
            key, value = m.groups()
            if key == "source":
                dialog.source = value
            elif key == "port":
                if value not in ("mx", "submission"):
                    raise ValueError(f"{where}: port must be mx or submission")
                dialog.port = value
            elif key == "delivers":
                address, _, count = value.partition(" ")
                dialog.delivers[address] = int(count.strip() or "1")
            else:
                address, _, content = value.partition(" ")
                dialog.lines.append((address, content, key == "message-has"))
            continue
        tag, payload = line[:2], line[3:] if len(line) > 2 else ""
        if line[2:3] not in ("", " "):
            raise ValueError(f"{where}: expected 'C: ', 'S: ', 'S+ ' or 'S- ', got {line!r}")
        if tag == "C:":
            dialog.steps.append(Step("send", data=client_bytes(payload), line=number))
        elif tag == "S:" and payload == "(closed)":
            dialog.steps.append(Step("closed", line=number))
        elif tag == "S:":
            m = re.fullmatch(r"(\d{3})(?: (.*))?", payload)
            if m is None:
                raise ValueError(f"{where}: a reply starts with a three-digit code: {line!r}")
            dialog.steps.append(Step("reply", code=int(m.group(1)), text=m.group(2) or "",
                                     line=number))
        elif tag in ("S+", "S-"):
            dialog.steps.append(Step("has" if tag == "S+" else "lacks", text=payload,
                                     line=number))
        else:
            raise ValueError(f"{where}: unknown directive {line!r}")
    return dialog


def run_dialog(dialog: Dialog, server: ServerProcess) -> list[str]:
    """Replay the dialog; returns the transcript. Fails at the first unexpected reply."""
    port = server.mx_port if dialog.port == "mx" else server.sub_port
    before = {addr: _names(server, addr) for addr in dialog.delivers}
    transcript: list[str] = []
    client = RawClient(port, source=dialog.source)
    last: list[str] = []

    def fail(step: Step, why: str) -> None:
        pytest.fail(f"{dialog.name}:{step.line}: {why}\n--- transcript ---\n"
                    + "\n".join(transcript), pytrace=False)

    try:
        for step in dialog.steps:
            if step.kind == "send":
                transcript.append(f"C: {step.data!r}")
                client.send(step.data)
            elif step.kind == "reply":
                try:
                    code, text = client.reply()
                except (ConnectionError, OSError) as exc:
                    fail(step, f"expected {step.code} {step.text}, but {exc}")
                    raise
                last = text.split("\n")
                transcript.extend(f"S: {t}" for t in last)
                first = last[0][4:]
                if code != step.code or not first.startswith(step.text):
                    fail(step, f"expected {step.code} {step.text!r}..., got {last[0]!r}")
            elif step.kind in ("has", "lacks"):
                found = any(t[4:].startswith(step.text) for t in last)
                if found != (step.kind == "has"):
                    fail(step, f"reply {'lacks' if step.kind == 'has' else 'has'} a line "
                               f"starting {step.text!r}: {last!r}")
            elif step.kind == "closed":
                if not client.closed():
                    fail(step, "expected the server to close the connection")
                transcript.append("S: (closed)")
    finally:
        client.close()

    new: dict[str, list[bytes]] = {}
    for addr, count in dialog.delivers.items():
        if count:
            server.wait_messages(addr, len(before[addr]) + count)
        else:
            time.sleep(1.0)
        fresh = sorted(_names(server, addr) - before[addr])
        new[addr] = [(server.maildir(addr) / name).read_bytes() for name in fresh]
        got = len(fresh)
        assert got == count, f"{dialog.name}: {addr} got {got} new messages, expected {count}"
    for addr, content, present in dialog.lines:
        assert addr in new, f"{dialog.name}: message-has/lacks needs '# delivers: {addr} N'"
        found = any(content.encode() in m.split(b"\n") for m in new[addr])
        assert found is present, (f"{dialog.name}: a new message to {addr} "
                                  f"{'lacks' if present else 'has'} the line {content!r}:\n"
                                  + "\n---\n".join(m.decode(errors="replace") for m in new[addr]))
    return transcript


def _names(server: ServerProcess, address: str) -> set[str]:
    d = server.maildir(address)
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared server of tests/conftest.py (alice and bob at example.test, the same
    aliases), with error_sleep 0.05 s: dialogs that go past soft_error_limit (010) then
    take a fraction of a second. That the wait is real is tested in
    tests/integration/test_relay_scan.py."""
    work = tmp_path_factory.mktemp("dialogs")
    sp = ServerProcess(work, """
        [smtp]
        error_sleep = "0.05s"
        [aliases]
        "postmaster@example.test" = ["alice@example.test"]
        "team@example.test" = ["alice@example.test", "bob@example.test"]
        "outside@example.test" = ["carol@remote.example"]
        """)
    sp.add_user("alice@example.test")
    sp.add_user("bob@example.test", "hunter2")
    sp.start()
    yield sp
    sp.stop()


@pytest.mark.parametrize("path", DIALOGS, ids=[p.stem for p in DIALOGS])
def test_dialog(path: Path, server: ServerProcess) -> None:
    dialog = parse_dialog(path.read_text(encoding="utf-8"), path.name)
    assert any(s.kind == "reply" for s in dialog.steps), "a dialog must expect replies"
    transcript = run_dialog(dialog, server)
    assert transcript[0].startswith("S: 220 ")


# --- the runner itself --------------------------------------------------------------------

ESCAPES = [
    ("plain_line", "NOOP", b"NOOP\r\n"),
    ("empty_line", "", b"\r\n"),
    ("bare_lf", "a{LF}.{LF}b", b"a\n.\nb\r\n"),
    ("bare_cr", "a{CR}.{CR}", b"a\r.\r\r\n"),
    ("crlf_inside", "a{CRLF}b", b"a\r\nb\r\n"),
    ("nul", "NO{NUL}OP", b"NO\x00OP\r\n"),
    ("hex_byte", "NOOP {xFF}{xfe}", b"NOOP \xff\xfe\r\n"),
    ("repetition", "{a*5}", b"aaaaa\r\n"),
    ("no_crlf", "NOOP{LF}{NOCRLF}", b"NOOP\n"),
    ("braces", "{LBRACE}x{RBRACE}", b"{x}\r\n"),
    ("utf8", "RCPT TO:<j\u00f6rg@example.test>", "RCPT TO:<j\u00f6rg@example.test>\r\n".encode()),
]


@pytest.mark.parametrize(("text", "wire"), [c[1:] for c in ESCAPES], ids=[c[0] for c in ESCAPES])
def test_client_line_escapes_become_raw_bytes(text: str, wire: bytes) -> None:
    assert client_bytes(text) == wire


@pytest.mark.parametrize("text", ["{BOGUS}", "a{b", "x}"])
def test_unknown_escapes_and_stray_braces_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        client_bytes(text)


def test_dialog_headers_and_steps_are_parsed() -> None:
    d = parse_dialog(
        "# A comment\n# source: 127.0.0.66\n# port: submission\n"
        "# delivers: alice@example.test 2\n# message-has: alice@example.test Subject: x y\n"
        "# message-lacks: alice@example.test X-Bad: 1\n\nS: 220 mx.example.test\nC: EHLO c\n"
        "S: 250\nS+ PIPELINING\nS- AUTH\nS: (closed)\n")
    assert (d.source, d.port, d.delivers) == ("127.0.0.66", "submission",
                                              {"alice@example.test": 2})
    assert d.lines == [("alice@example.test", "Subject: x y", True),
                       ("alice@example.test", "X-Bad: 1", False)]
    assert [s.kind for s in d.steps] == ["reply", "send", "reply", "has", "lacks", "closed"]
    assert d.steps[0] == Step("reply", code=220, text="mx.example.test", line=8)
    assert d.steps[1].data == b"EHLO c\r\n"


@pytest.mark.parametrize("text", ["X: hello", "S: abc", "C:NOOP", "# port: smtp"])
def test_malformed_dialog_lines_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_dialog(text)


def test_there_are_enough_dialogs() -> None:
    assert len(DIALOGS) >= 8
    numbers = [p.name[:3] for p in DIALOGS]
    assert len(set(numbers)) == len(numbers), "dialog numbers must be unique"
