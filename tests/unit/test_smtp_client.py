"""The SMTP client's pure parts: reply parsing and preparing message data for the wire."""

from __future__ import annotations

import pytest

from postroom.model import Reply
from postroom.smtp.client import ProtocolError, ReplyReader, prepare_data


@pytest.mark.parametrize("data, expected", [
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b".leading\r\n", b"..leading\r\n.\r\n"),
    (b"x\r\n.\r\ny\r\n", b"x\r\n..\r\ny\r\n.\r\n"),
    (b"no final newline", b"no final newline\r\n.\r\n"),
    (b"", b".\r\n"),
    # a bare LF or CR is never passed on: each becomes CRLF
    (b"a\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"a\rb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"a\n.\nMAIL FROM:<x>\r\n", b"a\r\n..\r\nMAIL FROM:<x>\r\n.\r\n"),
])
def test_prepare_data_dot_stuffs_and_sends_only_crlf(data: bytes, expected: bytes) -> None:
    out = prepare_data(data)
    assert out == expected
    assert out.count(b"\n") == out.count(b"\r\n") == out.count(b"\r")


def test_reply_reader_joins_multiline_replies_and_reads_enhanced_codes() -> None:
    r = ReplyReader()
    assert r.feed(b"250-mx.far.test\r\n250-PIPELI") == []
    replies = r.feed(b"NING\r\n250 SIZE 1000\r\n550 5.7.1 <b@x>: Relay access denied\r\n")
    assert replies == [Reply(250, "", "mx.far.test\nPIPELINING\nSIZE 1000"),
                       Reply(550, "5.7.1", "<b@x>: Relay access denied")]


def test_reply_reader_ignores_an_enhanced_code_of_the_wrong_class() -> None:
    [reply] = ReplyReader().feed(b"550 2.0.0 confused\r\n")
    assert reply.code == 550 and reply.enhanced == ""


@pytest.mark.parametrize("garbage", [b"hello\r\n", b"25\r\n", b"250x\r\n",
                                     b"250-a\r\n251 b\r\n", b"2" * 5000])
def test_reply_reader_refuses_what_is_not_smtp(garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        ReplyReader().feed(garbage)
