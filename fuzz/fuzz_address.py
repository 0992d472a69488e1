#!/usr/bin/env python3
"""Fuzz the envelope path parser: postroom.address.parse_path and routing_hazard.

The first byte chooses ``utf8`` and ``allow_null``, whether the text is wrapped in ``<>``
and how the rest is turned into a str (UTF-8 with replacement, or atheris' arbitrary
code points). Invariants (any violation raises and is a finding):

- ``parse_path`` raises nothing but ``AddressError``; ``routing_hazard`` raises nothing;
- a parsed address round-trips: ``parse_path("<" + str(address) + ">")`` with the same
  flags gives an address with the same ``key`` and the same ``routing_hazard``;
- the null path comes only from ``<>`` with ``allow_null``; without ``utf8`` the address
  is ASCII; the domain is lower case; the local part fits in 64 octets.

Strings never contain lone surrogates unless POSTROOM_FUZZ_SURROGATES=1: the SMTP core
decodes command lines as strict UTF-8, so it cannot hand one to the parser, and with them
the fuzzer stops at once on a known finding (a UnicodeEncodeError, see fuzz/README.md).

Run:  fuzz/run 60   or   python3 fuzz/fuzz_address.py -max_total_time=60 fuzz/corpus/address
      python3 fuzz/fuzz_address.py --hypothesis 60   |   --replay CRASH_FILE...
"""

from __future__ import annotations

import os
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
    # comparison feedback from regular expressions and str methods, and coverage of the
    # IDNA codec the parser leans on
    atheris.enabled_hooks.add("RegEx")
    atheris.enabled_hooks.add("str")
    with atheris.instrument_imports(include=["postroom", "encodings.idna", "stringprep"]):
        import encodings.idna  # noqa: F401
        import stringprep  # noqa: F401

        from postroom.address import AddressError, parse_path, routing_hazard
else:
    from postroom.address import AddressError, parse_path, routing_hazard

SURROGATES = os.environ.get("POSTROOM_FUZZ_SURROGATES") == "1"


class Violation(AssertionError):
    """An invariant of the parser does not hold."""


def text_of(data: bytes) -> tuple[str, bool, bool]:
    flags = data[0] if data else 0
    rest = data[1:]
    if flags & 4:
        if atheris is not None:
            fdp = atheris.FuzzedDataProvider(rest)
            text = fdp.ConsumeUnicode(len(rest)) if SURROGATES else \
                fdp.ConsumeUnicodeNoSurrogates(len(rest))
        else:
            text = rest.decode("utf-16-le", "surrogatepass" if SURROGATES else "replace")
    else:
        text = rest.decode("utf-8", "replace")
    if flags & 8:
        text = f"<{text}>"
    return text, bool(flags & 1), bool(flags & 2)


def check_one(text: str, utf8: bool, allow_null: bool) -> None:
    try:
        address = parse_path(text, allow_null=allow_null, utf8=utf8)
    except AddressError:
        return
    except Exception as exc:
        raise Violation(f"parse_path({text!r}, utf8={utf8}) raised {exc!r}") from exc
    hazard = routing_hazard(address)
    if address.is_null:
        if not (allow_null and text == "<>"):
            raise Violation(f"null address from {text!r} (allow_null={allow_null})")
        return
    if not utf8 and not str(address).isascii():
        raise Violation(f"non-ASCII address {address!r} without utf8")
    if address.domain != address.domain.lower():
        raise Violation(f"domain not lower case: {address!r}")
    if len(address.local.encode("utf-8")) > 64:
        raise Violation(f"local part over 64 octets: {address!r}")
    again_text = f"<{address}>"
    try:
        again = parse_path(again_text, allow_null=allow_null, utf8=utf8)
    except AddressError as exc:
        raise Violation(f"{text!r} parsed as {address!r}, but {again_text!r} does not "
                        f"parse back: {exc}") from exc
    if again.key != address.key:
        raise Violation(f"round trip changes the key: {address.key!r} -> {again.key!r}")
    if routing_hazard(again) != hazard:
        raise Violation(f"round trip changes the hazard of {address!r}")


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the name atheris expects
    check_one(*text_of(data))


# --- seeds, dictionary, fallback -------------------------------------------------------
SEEDS = [
    "<alice@example.test>", "<>", "<\"quoted local\"@example.test>", "<\"a\\\"b\"@x.example>",
    "<user%other@example.test>", "<other!user@example.test>", "<\"u@v\"@example.test>",
    "<user@[192.0.2.1]>", "<user@[IPv6:2001:db8::1]>", "<user@example.test.>",
    "<@relay.example:user@example.test>", "<jörg@bücher.example>", "<ålice@xn--bcher-kva.test>",
    "<a@example\u3002test>", "<a@EXAMPLE.TEST>", "<x@" + "a" * 63 + ".test>",
    "<" + "l" * 64 + "@example.test>", "<a.b.c@d-e.f>", "<a@\u0130\u0130.test>",
    "<postmaster>", "<a@b>", "<.a@b>", "<a..b@c>", "<a@-b.c>", "<\"\"@x.y>",
    # at the 256-octet path limit and one under it, where any change of length matters
    "<" + "l" * 64 + "@" + "a" * 60 + "." + "b" * 60 + "." + "c" * 32 + "." + "d" * 36 + ">",
    "<" + "l" * 64 + "@" + "a" * 60 + "." + "b" * 60 + "." + "c" * 32 + "." + "d" * 35 + ">",
    "<" + "\u00e9" * 32 + "@" + "\u00fc" * 30 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 8 + ">",
]
TOKENS = ["<", ">", "@", "\"", "\\", ".", "..", "[", "]", "IPv6:", "%", "!", ":", ",@",
          "xn--", "-", "\u3002", "\uff0e", "\u0130", "\u00df", "\u212a", "\u00ad", "\u200b",
          "\ufb01", "\u0345", "example.test", "postmaster", " ", "\t", "\x00", "\x7f"]


def seed_bytes() -> list[bytes]:
    out = []
    for s in SEEDS:
        out.append(b"\x01" + s.encode())
        out.append(b"\x00" + s.encode())
        out.append(b"\x0b" + s[1:-1].encode())
    return out


def hypothesis_strategy():  # type: ignore[no-untyped-def]
    from hypothesis import strategies as st
    piece = st.one_of(st.sampled_from(TOKENS), st.sampled_from(SEEDS), st.text(max_size=8))
    text = st.builds("".join, st.lists(piece, max_size=12))
    return st.tuples(text, st.booleans(), st.booleans())


def run_fallback(seconds: float, corpus: Path | None, crashes: Path) -> int:
    return harness.run_fallback(
        "address", seconds, corpus, crashes, test_one_input=TestOneInput,
        strategy=hypothesis_strategy(), check=lambda args: check_one(*args),
        dump=lambda args: repr(args).encode(), max_examples=5000)


def main(argv: list[str]) -> int:
    return harness.main(argv, name="address", atheris=atheris, test_one_input=TestOneInput,
                        seeds=seed_bytes, tokens=[t.encode() for t in TOKENS],
                        fallback=run_fallback)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
