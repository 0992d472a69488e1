"""Several SMTP front-end processes on the same listeners: mail from all of them
reaches the queue manager, and the front ends never outlive the main process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ServerProcess


def _children(sp: ServerProcess, expected: int) -> list[int]:
    """The front ends forked by the main process, by the pids they log once started
    (the sockets listen before the fork, so wait for them). Not by looking for children
    with the main process's command line: the helper that makes the first start's
    certificate (python -m postroom.tls) has it too, between its fork and its exec."""
    assert sp.proc is not None
    deadline = time.monotonic() + 15
    found: list[int] = []
    while time.monotonic() < deadline:
        text = sp.log.read_text(errors="replace") if sp.log.exists() else ""
        found = list(dict.fromkeys(
            int(pid) for pid in re.findall(r"postroom front end started \(pid (\d+), ", text)))
        if len(found) >= expected:
            break
        time.sleep(0.05)
    for pid in found:                               # and each is the main process's child
        assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] \
            == str(sp.proc.pid)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _send_many(sp: ServerProcess, threads: int, each: int,
               after: Callable[[str], None] | None = None) -> list[str]:
    """``threads`` senders of ``each`` messages; ``after(id)`` runs once each is accepted."""
    accepted: list[str] = []

    def sender(t: int) -> None:
        for i in range(each):
            uid = f"p{t}-{i}"
            with sp.smtp() as s:              # a new connection per message, as smtp-source
                s.sendmail("s@example.test", ["alice@example.test"],
                           f"Subject: {uid}\r\nX-Test-Id: {uid}\r\n\r\n{uid}\r\n".encode())
            accepted.append(uid)
            if after is not None:
                after(uid)

    workers = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    return accepted


def _ids_in(bodies: list[bytes]) -> set[str]:
    found: set[str] = set()
    for body in bodies:
        for line in body.split(b"\n"):
            if line.startswith(b"X-Test-Id: "):
                found.add(line[11:].decode())
    return found


def _ids(sp: ServerProcess, count: int) -> set[str]:
    return _ids_in(sp.wait_messages("alice@example.test", count, timeout=30))


def test_two_front_ends_share_the_listener_and_every_message_is_delivered(  # type: ignore[no-untyped-def]
        server_factory) -> None:
    sp: ServerProcess = server_factory("[smtp]\nprocesses = 2")
    assert sp.proc is not None
    front_ends = _children(sp, 1)
    assert len(front_ends) == 1 and _alive(front_ends[0])
    accepted = _send_many(sp, 8, 15)
    assert len(accepted) == 120
    assert _ids(sp, 120) == set(accepted)
    # the front end can take and deliver all 120 before the main process has loaded
    sp.wait_log("postroom main started")
    log = sp.log_text()
    assert "postroom front end started" in log
    # queue ids stay unique across processes (each 250 names one)
    queued = [line.split("queue_id=")[1].split()[0] for line in log.splitlines()
              if " queued queue_id=" in line]
    assert len(queued) == len(set(queued)) == 120
    # every process's counters add up (each writes its own file, named by its pid)
    metrics = json.loads(sp.cli("stats", "--json").stdout)["metrics"]
    received = sum(s["value"] for s in metrics["postroom_messages_received_total"])
    assert received == 120
    files = {int(f.stem.rsplit("_", 1)[1]) for f in (sp.data / "metrics").glob("*.db")}
    assert files <= {sp.proc.pid, *front_ends} and len(files) == 2


def test_sigterm_stops_every_process(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory("[smtp]\nprocesses = 3")
    assert sp.proc is not None
    front_ends = _children(sp, 2)
    assert len(front_ends) == 2
    assert sp.stop(signal.SIGTERM) == 0
    assert not any(_alive(pid) for pid in front_ends)


def test_kill_9_of_the_main_process_takes_the_front_ends_with_it_and_loses_nothing(  # type: ignore[no-untyped-def]
        server_factory) -> None:
    sp: ServerProcess = server_factory("[smtp]\nprocesses = 2")
    assert sp.proc is not None
    front_ends = _children(sp, 1)
    assert len(front_ends) == 1
    accepted = _send_many(sp, 4, 10)
    sp.kill9()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in front_ends) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in front_ends)      # nobody holds the port
    sp.start()                                              # binds the same ports again
    assert _ids(sp, 40) == set(accepted)
    assert os.path.exists(sp.data / "spool.sqlite3")


def test_sigterm_the_moment_the_port_opens_still_stops_cleanly(server_factory) -> None:  # type: ignore[no-untyped-def]
    # the port listens before the event loop installs its handlers; a signal in that
    # window must mean a clean stop (exit 0), not death by the default action
    for _ in range(3):
        sp: ServerProcess = server_factory("[smtp]\nprocesses = 2")
        assert sp.stop(signal.SIGTERM) == 0


def test_the_harness_chooses_new_ports_when_one_was_taken(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # the harness's own retry: a port chosen free can be taken before the server binds it
    sp = ServerProcess(tmp_path / "srv")
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", sp.admin_port))
    squatter.listen(1)
    first = sp.admin_port
    try:
        sp.start()
        assert sp.admin_port != first
        assert "Address already in use" in sp.log.read_text()
    finally:
        sp.stop()
        squatter.close()


def test_every_process_delivers_local_mail_before_its_250(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Local delivery at intake: the copy is in the Maildir when the client has its 250,
    whichever process took the message, and the queue never held it."""
    sp: ServerProcess = server_factory("[smtp]\nprocesses = 2")
    assert sp.proc is not None
    front_ends = _children(sp, 1)
    missing: list[str] = []

    def look(uid: str) -> None:                 # at once, no waiting
        if uid not in _ids_in(sp.messages("alice@example.test")):
            missing.append(uid)

    assert len(_send_many(sp, 4, 10, after=look)) == 40
    assert missing == []
    assert len(sp.messages("alice@example.test")) == 40
    # each file is named by the process that wrote it (P<pid>): the two that serve SMTP
    writers = {int(p.name.split("P")[1].split("Q")[0])
               for p in sp.maildir("alice@example.test").iterdir()}
    assert writers <= {sp.proc.pid, *front_ends}
    log = sp.log_text()
    delivered = [line for line in log.splitlines() if "status=delivered" in line]
    assert len(delivered) == 40
    assert all(" postroom.delivery " in line for line in delivered)     # not the qmgr's
    assert all(q["recipients"] == 0 for q in sp.queue().values())


def test_with_local_delivery_stopped_every_process_queues_local_mail(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory("[smtp]\nprocesses = 2")
    assert sp.proc is not None
    _children(sp, 1)
    sp.cli("stop", "local-delivery")      # returns once every front end has applied it
    accepted = _send_many(sp, 4, 5)
    assert len(accepted) == 20
    assert sp.messages("alice@example.test") == []
    assert sp.queue()["inbound-delivery"]["recipients"] == 20
    sp.cli("start", "local-delivery")
    assert _ids(sp, 20) == set(accepted)
