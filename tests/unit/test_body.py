"""Streaming helpers: chunked results equal the whole-message ones however the bytes
are split, and a session's writer spills to a file and cleans up after itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom import body as body_module
from postroom import files
from postroom.body import Body, BodyWriter, strip_cr, to_lf
from postroom.smtp.client import prepare_data, wire_chunks

LINEISH = st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"x" * 5]),
                   max_size=40).map(b"".join)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


@given(LINEISH, st.lists(st.integers(min_value=0, max_value=1000), max_size=6))
def test_wire_chunks_equal_prepare_data_however_split(data: bytes, cuts: list[int]) -> None:
    assert b"".join(wire_chunks(_split(data, cuts))) == prepare_data(data)


@given(LINEISH, st.lists(st.integers(min_value=0, max_value=1000), max_size=6))
def test_to_lf_equals_a_whole_replace_however_split(data: bytes, cuts: list[int]) -> None:
    assert b"".join(to_lf(_split(data, cuts))) == data.replace(b"\r\n", b"\n")


CLEAN = st.lists(st.sampled_from([b"a", b".", b"\r\n", b"..", b"x" * 5]),
                 max_size=40).map(b"".join)


@given(CLEAN, st.lists(st.integers(min_value=0, max_value=1000), max_size=6))
def test_strip_cr_equals_to_lf_for_crlf_clean_data_however_split(data: bytes,
                                                                  cuts: list[int]) -> None:
    """What a big message marked CRLF-clean gets: the same bytes as to_lf."""
    assert b"".join(strip_cr(_split(data, cuts))) == b"".join(to_lf(_split(data, cuts)))


def test_a_big_file_starts_its_writeback_as_it_grows(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    kicks: list[tuple[int, int]] = []
    monkeypatch.setattr(files, "start_writeback",
                        lambda fd, offset, length: kicks.append((offset, length)))
    w = BodyWriter(tmp_path, 1, "q1")
    mb = 1024 * 1024
    w.write([b"x" * mb] * 9)
    w.finish()
    # every 4 MB, each call covering what the last one did not (the fsync does the rest)
    assert kicks == [(0, 4 * mb), (4 * mb, 4 * mb)]
    assert (tmp_path / "q1").stat().st_size == 9 * mb


def test_body_reads_prefix_then_file_in_chunks(tmp_path: Path) -> None:
    (tmp_path / "q1").write_bytes(b"B" * 10)
    b = Body(b"Received: x\r\n", tmp_path / "q1", 10)
    assert b.size == len(b) == 23
    assert b.read() == b"Received: x\r\n" + b"B" * 10
    assert list(b.chunks(4))[1:] == [b"BBBB", b"BBBB", b"BB"]
    assert b.head(15) == b"Received: x\r\nBB"
    assert Body(b"small").head(3) == b"sma"


def test_writer_keeps_small_messages_in_memory(tmp_path: Path) -> None:
    w = BodyWriter(tmp_path / "bodies", 1, "Q1")
    w.write([b"Subject: s\r\n\r\n", b"hi\r\n"])
    assert w.inline() == b"Subject: s\r\n\r\nhi\r\n"
    w.finish()
    assert not (tmp_path / "bodies").exists()


def test_writer_spills_past_the_limit_and_discard_removes_the_file(
        tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(body_module, "SPILL_AT", 10)
    w = BodyWriter(tmp_path / "bodies", 1, "Q1")
    w.write([b"Subject: s\r\n", b"\r\n"])
    w.write([b"more\r\n"])
    assert w.inline() is None and w.size == 20
    assert bytes(w.head) == b"Subject: s\r\n\r\nmore\r\n"
    w.finish()
    assert (tmp_path / "bodies" / "Q1").read_bytes() == b"Subject: s\r\n\r\nmore\r\n"
    w.discard()
    assert not (tmp_path / "bodies" / "Q1").exists()


def test_writer_remembers_a_write_error_until_finish(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(body_module, "SPILL_AT", 1)
    blocker = tmp_path / "bodies"
    blocker.write_text("a file where the folder should be")
    w = BodyWriter(blocker, 1, "Q1")
    w.write([b"abc\r\n", b"def\r\n"])           # no exception while the data arrives
    assert w.error is not None and w.size == 10
    try:
        w.finish()
    except OSError:
        pass
    else:
        raise AssertionError("finish() must raise the remembered error")
    w.discard()
