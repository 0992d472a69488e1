"""Several nodes, one queue: Postroom servers sharing a spool in a real PostgreSQL.

The PostgreSQL server is the session's (``postgres_server``, started by the tests from
Debian's package); each test gets a database of its own.
"""

from __future__ import annotations

import collections
import json
import smtplib
import socket
import threading
import time
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from typing import Any

import pytest

from tests.conftest import ServerProcess, wait_until
from tests.integration.peers import Sink, sink


class Tarpit:
    """A next hop that accepts connections and never says a word: a delivery to it
    hangs (holding its claims) until the command timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(100)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)

    def close(self) -> None:
        self._stop = True
        self.thread.join(timeout=2)
        for c in self.conns:
            c.close()
        self.sock.close()


def node(server_factory: Any, url: str, name: str, next_hop: int, **kw: Any) -> ServerProcess:
    return server_factory(f"""
        [spool]
        url = "{url}"
        lease_seconds = 30
        [node]
        name = "{name}"
        [[route]]
        match = "*"
        via = "smarthost"
        host = "127.0.0.1:{next_hop}"
        tls = "none"
        """, **kw)


def send(sp: ServerProcess, i: int, rcpt: str = "bob@far.test") -> tuple[int, str]:
    """One message; (the reply code after DATA, its Message-ID)."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "alice@example.test", rcpt, f"n{i}"
    msg["Message-ID"] = f"<scale-{i}-{time.monotonic_ns()}@client.test>"
    msg.set_content(f"message {i}\n")
    try:
        with sp.smtp() as s:
            s.ehlo()
            s.mail("alice@example.test")
            s.rcpt(rcpt)
            code, _ = s.data(msg.as_bytes(policy=policy.SMTP))
    except (smtplib.SMTPException, OSError):
        code = 0
    return code, str(msg["Message-ID"])


def ids(s: Sink) -> collections.Counter[str]:
    return collections.Counter(str(m["Message-ID"]) for m in s.messages())


@pytest.fixture
def database(postgres_server: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    name = "scale_" + request.node.name.lower().replace("[", "_").replace("]", "")[:40]
    postgres_server.create_db(name)
    yield postgres_server.url(name)


def test_a_dead_nodes_claimed_mail_is_delivered_by_the_other_after_its_leases(
        server_factory: Any, database: str) -> None:
    """Node A claims deferred-then-due mail and hangs on a silent next hop; kill -9.
    Node B, pointed at a working next hop, may not touch that mail while A's leases
    last, and delivers all of it once they expire: nothing lost, duplicates counted."""
    tarpit = Tarpit()
    try:
        with sink() as out:
            a = node(server_factory, database, "node-a", tarpit.port)
            accepted = [send(a, i) for i in range(6)]
            assert all(code == 250 for code, _ in accepted), accepted
            # A holds every recipient: its deliveries hang in the tarpit
            def claimed_by_a() -> int:
                held = 0
                for mid in queued_ids(a):
                    shown = json.loads(a.cli("queue", "show", mid, "--json").stdout)
                    held += sum(r.get("claimed_by") == "node-a" for r in shown["recipients"])
                return held
            assert wait_until(lambda: claimed_by_a() == 6, 20), a.log_text()
            status = json.loads(a.cli("status", "--json").stdout)
            assert [n["name"] for n in status["nodes"]] == ["node-a"]
            assert status["nodes"][0]["claims"] == 6
            # A's counters reach the database with its heartbeats
            assert wait_until(lambda: counted(a, "postroom_messages_received_total") == 6, 15)
            a.kill9()
            killed = time.monotonic()
            b = node(server_factory, database, "node-b", out.port)
            # B sees A and its claims, and leaves them alone while they last
            def names() -> set[str]:                     # B's first heartbeat
                return {n["name"] for n in json.loads(b.cli("status", "--json").stdout)["nodes"]}
            assert wait_until(lambda: names() == {"node-a", "node-b"}, 10), names()
            time.sleep(max(0.0, 10 - (time.monotonic() - killed)))
            assert out.messages() == [], "node B took mail that node A still held"
            # after the 30 s leases, B delivers everything
            assert wait_until(lambda: len(ids(out)) == 6, 60), b.log_text()
            got = ids(out)
            assert set(got) == {mid for _, mid in accepted}          # nothing lost
            duplicates = sum(n - 1 for n in got.values())
            assert duplicates == 0, f"duplicates: {duplicates}"      # A never reached DATA
            assert wait_until(lambda: queued_ids(b) == [], 10)
            # the counters are shared: B adds up A's last published ones and its own
            assert wait_until(
                lambda: counted(b, "postroom_recipients_delivered_total") == 6, 15)
            assert counted(b, "postroom_messages_received_total") == 6     # all A's
            assert "node-a" in b.cli("stats", "--all-nodes").stdout
    finally:
        tarpit.close()


def counted(sp: ServerProcess, name: str) -> float:
    """``name`` added up over every node's published counters (stats --all-nodes)."""
    data = json.loads(sp.cli("stats", "--all-nodes", "--json").stdout)
    return sum(s["value"] for s in data["metrics"].get(name, ()))


def queued_ids(sp: ServerProcess) -> list[str]:
    out = json.loads(sp.cli("queue", "list", "outbound-delivery", "--json").stdout)
    return [m["id"] for m in out["messages"]]


def test_postgresql_stopped_mid_load_loses_no_accepted_message(
        server_factory: Any, database: str, postgres_server: Any) -> None:
    """Stop PostgreSQL while a client sends: new mail gets 451 4.3.0 meanwhile, the node
    resumes by itself, and every message answered 250 is delivered."""
    with sink() as out:
        a = node(server_factory, database, "node-a", out.port)
        results: list[tuple[int, str]] = []
        stop = threading.Event()

        def sender() -> None:
            i = 0
            while not stop.is_set() and i < 400:
                results.append(send(a, i))
                i += 1
                time.sleep(0.01)
        t = threading.Thread(target=sender)
        t.start()
        try:
            assert wait_until(lambda: sum(c == 250 for c, _ in results) >= 20, 30)
            postgres_server.stop()
            assert wait_until(lambda: any(c == 451 for c, _ in results[-5:]), 20), results[-5:]
            # the operations commands say what is wrong; the counters still serve
            down = a.cli("queue", check=False)
            assert down.returncode != 0
            assert "spool's database cannot be reached" in down.stderr + down.stdout
            assert "postroom_spool_up 0" in a.cli("stats").stdout
            time.sleep(1)
            postgres_server.start()
            before = len(results)
            assert wait_until(lambda: any(c == 250 for c, _ in results[before:]), 30), \
                a.log_text()[-3000:]
        finally:
            stop.set()
            t.join(timeout=60)
        accepted = {mid for code, mid in results if code == 250}
        refused = [code for code, _ in results if code != 250]
        assert refused and set(refused) <= {451, 0}, collections.Counter(refused)
        assert wait_until(lambda: accepted <= set(ids(out)), 60), \
            f"lost: {sorted(accepted - set(ids(out)))[:5]}"
        assert "5003" in a.cli("events", "--json").stdout            # said why
