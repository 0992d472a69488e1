#!/usr/bin/env python3
"""Fuzz inbound verification's parsers: SPF records and macros, DMARC records,
DKIM-Signature tag lists, and Authentication-Results / header reading.

The first byte chooses the parser; the rest is the input. Invariants (any violation
raises and is a finding):

- ``spf.parse_record`` raises nothing but ``SpfError``; ``spf.expand_macros`` nothing but
  ``SpfError``, and its result has no ``%{``;
- ``dmarc.parse_record`` raises nothing but ``DmarcError``, and a record it returns has
  p and sp in none/quarantine/reject and pct in 0-100;
- the DKIM tag-list reader and the key-name check never raise; a key name is at most
  253 octets;
- ``authres.header_fields``, ``authserv_id``, ``from_domains`` and
  ``neutralise_forged`` never raise, and the rename keeps the length.

Run:  fuzz/run 60   or   python3 fuzz/fuzz_mailauth.py --hypothesis 60
"""

from __future__ import annotations

import sys
from pathlib import Path

import harness  # noqa: E402 - fuzz/ is this script's own folder on sys.path

ROOT = harness.ROOT
sys.path.insert(0, str(ROOT / "src"))

try:
    import atheris
except ImportError:
    atheris = None

if atheris is not None and not {"--hypothesis", "--prepare", "--replay"} & set(sys.argv):
    atheris.enabled_hooks.add("RegEx")
    atheris.enabled_hooks.add("str")
    with atheris.instrument_imports(include=["postroom"]):
        from postroom.mailauth import authres, dmarc, spf, verify
else:
    from postroom.mailauth import authres, dmarc, spf, verify


class Violation(AssertionError):
    """An invariant of a parser does not hold."""


def check_one(which: int, data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    kind = which % 5
    try:
        if kind == 0:
            try:
                spf.parse_record("v=spf1 " + text)
            except spf.SpfError:
                pass
        elif kind == 1:
            try:
                out = spf.expand_macros(text, "192.0.2.3", "a-b@x.example", "x.example", "h.example")
            except spf.SpfError:
                pass
            else:
                if "%{" in out:
                    raise Violation(f"unexpanded macro in {out!r}")
        elif kind == 2:
            try:
                rec = dmarc.parse_record("v=DMARC1;" + text)
            except dmarc.DmarcError:
                pass
            else:
                if rec.p not in ("none", "quarantine", "reject") or rec.sp not in (
                        "none", "quarantine", "reject") or not 0 <= rec.pct <= 100:
                    raise Violation(f"bad record {rec!r} from {text!r}")
        elif kind == 3:
            tags = verify._tags(data)
            if tags is not None:
                name = verify._key_name(tags)
                if name is not None and len(name) > 253:
                    raise Violation(f"key name too long: {name!r}")
        else:
            fields = authres.header_fields(data)
            authres.from_domains(fields)
            for _, value, _ in fields:
                authres.authserv_id(value)
            head = bytearray(data)
            authres.neutralise_forged(head, "mx.example.org")
            if len(head) != len(data):
                raise Violation("the rename changed the length")
    except Violation:
        raise
    except Exception as exc:
        raise Violation(f"parser {kind} raised {exc!r} for {data!r}") from exc


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the name atheris expects
    check_one(data[0] if data else 0, data[1:])


SEEDS = [
    (0, b"ip4:192.0.2.0/24 include:_spf.example.com a/24//64 mx:%{d} -all"),
    (0, b"redirect=_spf.%{d2} exp=explain.%{ir}.%{d}"),
    (1, b"%{ir}.%{v}._spf.%{d2}%{lr-}%{S}%%%_%-"),
    (2, b" p=reject; sp=quarantine; pct=50; adkim=s; aspf=r; rua=mailto:a@b.example"),
    (3, b"v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=sel; h=from:to; bh=AAAA; b=AAAA"),
    (4, b"Authentication-Results: mx.example.org; dkim=pass\r\nFrom: A <a@b.example>\r\n\r\nx"),
]
TOKENS = ["v=spf1", "include:", "redirect=", "%{", "}", "ip4:", "ip6:", "/", "//", "-all",
          "v=DMARC1", ";", "p=", "sp=", "pct=", "d=", "s=", "h=", "b=", "=", "\r\n", " ",
          "Authentication-Results:", "From:", "(", ")", "\"", "@"]


def seed_bytes() -> list[bytes]:
    return [bytes([k]) + s for k, s in SEEDS]


def hypothesis_strategy():  # type: ignore[no-untyped-def]
    from hypothesis import strategies as st
    piece = st.one_of(st.sampled_from(TOKENS), st.text(max_size=8))
    text = st.builds(lambda parts: "".join(parts).encode("utf-8", "replace"),
                     st.lists(piece, max_size=20))
    return st.tuples(st.integers(0, 4), st.one_of(text, st.binary(max_size=200)))


def run_fallback(seconds: float, corpus: Path | None, crashes: Path) -> int:
    return harness.run_fallback(
        "mailauth", seconds, corpus, crashes, test_one_input=TestOneInput,
        strategy=hypothesis_strategy(), check=lambda args: check_one(*args),
        dump=lambda args: bytes([args[0]]) + args[1], max_examples=3000)


def main(argv: list[str]) -> int:
    return harness.main(argv, name="mailauth", atheris=atheris, test_one_input=TestOneInput,
                        seeds=seed_bytes, tokens=[t.encode() for t in TOKENS],
                        fallback=run_fallback)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
