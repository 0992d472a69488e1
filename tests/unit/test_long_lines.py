"""The message-data line-length check against the plain definition (RFC 5321 4.5.3.1.6:
a text line is at most 1000 octets with its CRLF)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from postroom.smtp.protocol import TEXT_LINE_LIMIT, _has_long_line

LENGTHS = st.one_of(st.integers(0, 120), st.integers(490, 510), st.integers(990, 1010),
                    st.integers(1990, 2010))


def too_long(lines: bytes) -> bool:
    return any(len(line) + 2 > TEXT_LINE_LIMIT for line in lines.split(b"\r\n")[:-1])


@given(st.lists(LENGTHS, min_size=1, max_size=12))
def test_agrees_with_the_definition(lengths: list[int]) -> None:
    lines = b"".join(b"x" * n + b"\r\n" for n in lengths)
    assert _has_long_line(lines) == too_long(lines)


def test_the_limit_exactly() -> None:
    assert not _has_long_line(b"a\r\n" + b"x" * (TEXT_LINE_LIMIT - 2) + b"\r\nb\r\n")
    assert _has_long_line(b"a\r\n" + b"x" * (TEXT_LINE_LIMIT - 1) + b"\r\nb\r\n")
    assert _has_long_line(b"x" * 5000 + b"\r\n")
