"""A full disk: acceptance turns into 452 4.3.1, nothing stored is damaged, and
everything resumes once space is freed.

The server runs in a private mount namespace with its data directory on a 4 MB
tmpfs; the test reads its files through /proc/<pid>/root.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, wait_port

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare for a private tmpfs",
)


def _start_on_tmpfs(sp: ServerProcess, size: str) -> subprocess.Popen[bytes]:
    sp.data.mkdir(exist_ok=True)
    script = (f"mount -t tmpfs -o size={size} tmpfs {sp.data} && "
              f"exec {sys.executable} -m postroom.cli serve -c {sp.config}")
    out = sp.log.open("ab")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdout=out, stderr=subprocess.STDOUT, cwd=sp.workdir)
    wait_port(sp.mx_port)
    return proc


def _inside(proc: subprocess.Popen[bytes], path: Path) -> Path:
    return Path(f"/proc/{proc.pid}/root{path}")


def _take_ids(maildir: Path) -> set[str]:
    """The test ids of the messages in a Maildir folder, removing the files."""
    found = set()
    if maildir.is_dir():
        for f in maildir.iterdir():
            for line in f.read_bytes().split(b"\n"):
                if line.startswith(b"X-Test-Id: "):
                    found.add(line[11:].decode())
            f.unlink()
    return found


@pytest.mark.parametrize("lines", [3000, 16000], ids=["inline", "spilled_to_a_body_file"])
def test_full_disk_defers_acceptance_and_recovers_when_space_is_freed(
        tmp_path: Path, lines: int) -> None:
    # 16,000 lines (1.2 MB) pass body.SPILL_AT: the message goes to its own file
    # a 1 MB reserve: MAIL gets 452 4.3.1 below it, so that queued mail can still be
    # delivered and recorded (without it, the spool's own writes could take the last
    # byte, and freeing delivered mail did not always make room: CI)
    sp = ServerProcess(tmp_path / "srv", '[delivery]\nretry = ["1s"]\n'
                                         '[smtp]\nmin_free_space = 1000000')
    proc = _start_on_tmpfs(sp, "4m")
    try:
        # the user is added inside the namespace, where the data dir lives
        subprocess.run(["nsenter", "-t", str(proc.pid), "-m", sys.executable, "-m",
                        "postroom.cli", "users", "add", "alice@example.test",
                        "--password-stdin", "-c", str(sp.config)],
                       input=b"pw\n", check=True, capture_output=True, cwd=sp.workdir)
        new = _inside(proc, sp.data / "mail" / "example.test" / "alice" / "new")
        accepted: list[str] = []
        refusals: list[tuple[int, bytes]] = []
        body = ("x" * 76 + "\r\n") * lines           # 234 KB or 1.2 MB
        with smtplib.SMTP("127.0.0.1", sp.mx_port, timeout=30) as s:
            for i in range(60):
                uid = f"full-{i}"
                try:
                    s.sendmail("s@example.test", ["alice@example.test"],
                               f"Subject: {uid}\r\nX-Test-Id: {uid}\r\n\r\n{body}".encode())
                    accepted.append(uid)
                except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused) as exc:
                    # at MAIL (the reserve) or after DATA (the disk itself)
                    refusals.append((exc.smtp_code, exc.smtp_error))
                    if len(refusals) >= 3:
                        break
        assert refusals, "the 4 MB disk never filled"
        assert all(code == 452 and text.startswith(b"4.3.1") for code, text in refusals)
        assert accepted, "nothing was accepted before the disk filled"
        # free space the way an administrator would: move delivered mail away
        deadline = time.monotonic() + 60
        seen: set[str] = set()
        while time.monotonic() < deadline and not set(accepted) <= seen:
            seen |= _take_ids(new)
            time.sleep(0.2)
        assert set(accepted) <= seen, f"lost: {sorted(set(accepted) - seen)}"
        # and the server accepts again, once the free space is back above the reserve:
        # within seconds, as the spool's WAL is truncated at its next checkpoint (under
        # load it can stand above its 1 MiB limit for a moment: CI)
        deadline = time.monotonic() + 15
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", sp.mx_port, timeout=30) as s:
                    s.sendmail("s@example.test", ["alice@example.test"],
                               b"Subject: after\r\nX-Test-Id: after\r\n\r\nok\r\n")
                break
            except smtplib.SMTPSenderRefused as exc:
                if exc.smtp_code != 452 or time.monotonic() > deadline:
                    du = subprocess.run(["du", "-ab", str(_inside(proc, sp.data))],
                                        capture_output=True, text=True).stdout
                    raise AssertionError(f"still refused after the disk was freed:\n{du}") \
                        from exc
                time.sleep(0.5)
        assert "Traceback" not in sp.log_text()
        bodies = _inside(proc, sp.data / "bodies")
        deadline = time.monotonic() + 10
        while bodies.is_dir() and any(bodies.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not bodies.is_dir() or not any(bodies.iterdir()), "a refused message left a file"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
