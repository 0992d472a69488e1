"""The command line as a new user meets it: first run, check, users, queue, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.conftest import RawClient, ServerProcess, free_port, wait_port


def run(args: list[str], cwd: Path, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "postroom.cli", *args], cwd=cwd, input=input,
                          capture_output=True, text=True, timeout=60)


def test_first_serve_writes_a_commented_config_and_prints_the_next_step(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "postroom.cli", "serve", "--domain",
                             "Example.ORG"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_port(2525)
        config_text = (tmp_path / "postroom.toml").read_text()
        cfg = tomllib.loads(config_text)
        assert cfg["domains"]["local"] == ["localhost", "example.org"]
        assert cfg["smtp"]["listen"] == ["127.0.0.1:2525"]
        assert cfg["smtp"]["submission"] == ["127.0.0.1:2587"]
        assert config_text.count("\n#") >= 20          # every key explained
        c = RawClient(2525)
        code, greeting = c.reply()
        assert code == 220 and "ESMTP Postroom" in greeting
        c.cmd("QUIT")
        c.close()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "127.0.0.1:2525" in out and "127.0.0.1:2587" in out
    assert "postroom users add alice@localhost" in out
    assert (tmp_path / "postroom-data" / "tls" / "cert.pem").is_file()
    assert oct((tmp_path / "postroom-data" / "tls" / "key.pem").stat().st_mode & 0o777) == "0o600"
    assert "Traceback" not in err


def test_sigterm_stops_the_server_cleanly(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory()
    c = RawClient(sp.mx_port)
    assert c.reply()[0] == 220
    assert sp.stop(signal.SIGTERM) == 0
    code, text = c.reply()          # the idle session is told, not just dropped
    assert code == 421 and "4.3.2" in text
    assert "Traceback" not in sp.log_text()


def test_users_added_while_running_receive_mail_without_restart(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory(users=())
    with sp.smtp() as s:
        s.ehlo()
        s.mail("x@far.example")
        assert s.rcpt("dora@example.test")[0] == 550
    sp.add_user("dora@example.test")
    with sp.smtp() as s:
        s.sendmail("x@far.example", ["dora@example.test"], b"Subject: hi\r\n\r\nhi\r\n")
    assert len(sp.wait_messages("dora@example.test", 1)) == 1
    listed = json.loads(sp.cli("users", "list", "--json").stdout)
    assert [u["address"] for u in listed["users"]] == ["dora@example.test"]
    sp.cli("users", "passwd", "dora@example.test", "--password-stdin", input="n3w\n")
    sp.cli("users", "remove", "dora@example.test")
    with sp.smtp() as s:
        s.ehlo()
        s.mail("x@far.example")
        assert s.rcpt("dora@example.test")[0] == 550


def test_passwords_are_stored_as_argon2_hashes(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory(users=("erin@example.test",), start=False)
    raw = (sp.data / "users.sqlite3").read_bytes()
    assert b"s3cret" not in raw and b"$argon2id$" in raw
    assert oct((sp.data / "users.sqlite3").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("address, message", [
    ("not-an-address", "not a valid address"),
    ("../etc@example.test", "not a valid address"),
    ('"a/b"@example.test', "mailbox name"),
])
def test_users_add_refuses_unsafe_addresses(tmp_path: Path, address: str, message: str) -> None:
    cp = run(["users", "add", address, "--password-stdin"], tmp_path, input="pw\n")
    assert cp.returncode == 1 and message in cp.stderr


def test_users_add_twice_is_an_error(tmp_path: Path) -> None:
    assert run(["users", "add", "a@localhost", "--password-stdin"], tmp_path, "pw\n").returncode == 0
    cp = run(["users", "add", "A@LOCALHOST", "--password-stdin"], tmp_path, "pw\n")
    assert cp.returncode == 1 and "already exists" in cp.stderr


def test_check_names_every_bad_key_and_exits_1(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[smtp]\nlisten = ["nowhere"]\nmax_recipients = "ten"\nlistn = []\n'
                   '[relay]\ntrusted_networks = ["300.1.1.1/8"]\n')
    cp = run(["check", "-c", str(cfg)], tmp_path)
    assert cp.returncode == 1
    for key in ("smtp.listen", "smtp.max_recipients", "smtp.listn", "relay.trusted_networks[0]"):
        assert key in cp.stderr
    assert "Traceback" not in cp.stderr


def test_check_reports_toml_syntax_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[smtp\n")
    cp = run(["check", "-c", str(cfg)], tmp_path)
    assert cp.returncode == 1 and "(syntax)" in cp.stderr


def test_check_warns_loudly_about_an_open_relay_and_a_missing_postmaster(tmp_path: Path) -> None:
    cfg = tmp_path / "open.toml"
    cfg.write_text('[domains]\nlocal = ["example.test"]\n'
                   '[relay]\ntrusted_networks = ["0.0.0.0/0"]\n')
    cp = run(["check", "-c", str(cfg)], tmp_path)
    assert cp.returncode == 0
    assert "OPEN RELAY" in cp.stderr and "0.0.0.0/0" in cp.stderr
    assert "example.test has no postmaster" in cp.stderr


def test_serve_refuses_an_invalid_config_with_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[smtp]\nmax_message_size = -1\n')
    cp = run(["serve", "-c", str(cfg)], tmp_path)
    assert cp.returncode == 1 and "smtp.max_message_size" in cp.stderr


def test_serve_reports_a_busy_port_without_a_traceback(tmp_path: Path) -> None:
    import socket
    port = free_port()
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        busy.bind(("127.0.0.1", port))
        busy.listen()
        cfg = tmp_path / "p.toml"
        cfg.write_text(f'[smtp]\nlisten = ["127.0.0.1:{port}"]\nsubmission = []\n')
        cp = run(["serve", "-c", str(cfg)], tmp_path)
    assert cp.returncode == 1 and "cannot start" in cp.stderr
    assert "Traceback" not in cp.stderr


def test_queue_json_names_the_four_queues_with_counts_and_age(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory()
    with sp.smtp() as s:
        s.sendmail("alice@example.test", ["carol@remote.example", "dan@remote.example"],
                   b"Subject: out\r\n\r\nout\r\n")
    time.sleep(0.5)
    out = json.loads(sp.cli("queue", "--json").stdout)
    names = [q["name"] for q in out["queues"]]
    assert names == ["inbound-conversion", "inbound-delivery", "outbound-conversion",
                     "outbound-delivery"]
    od = out["queues"][3]
    assert od["messages"] == 1 and od["recipients"] == 2
    assert 0 <= od["oldest_age_seconds"] < 60
    text = sp.cli("queue").stdout
    assert "outbound-delivery" in text.splitlines()[4]


def test_queue_without_a_running_server_says_so_and_touches_nothing(tmp_path: Path) -> None:
    cp = run(["queue", "--json"], tmp_path)
    assert cp.returncode == 1
    assert "has the server been started" in cp.stderr and "Traceback" not in cp.stderr
    assert cp.stdout == ""
    assert not os.path.exists(tmp_path / "postroom-data" / "spool.sqlite3")


# --- stop and start without a component, as 'postfix stop' and 'postfix start' ---------
def test_stop_without_a_component_stops_the_whole_server_cleanly_and_keeps_the_queue(
        server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory("[smtp]\nprocesses = 2")
    with sp.smtp() as s:             # outbound, and the DNS is dead: it waits in the queue
        s.sendmail("alice@example.test", ["carol@far.example"], b"Subject: kept\r\n\r\nx\r\n")
    idle = RawClient(sp.mx_port)
    assert idle.reply()[0] == 220
    assert sp.proc is not None
    pid = sp.proc.pid
    children = [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                               text=True).stdout.split()]
    assert children, "processes = 2 forks a front end"
    lines = sp.cli("stop").stdout.splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == (f"stopping Postroom (pid {pid}): no new connections, open sessions "
                        "are told 421 4.3.2, queued mail stays queued")
    assert lines[1].startswith(f"Postroom stopped (pid {pid}, after ")
    # the command returned once the server was gone: it exited, cleanly, with its front end
    assert sp.proc.poll() == 0
    assert not any(os.path.exists(f"/proc/{child}") for child in children)
    code, text = idle.reply()          # the open session was told, not just dropped
    assert code == 421 and "4.3.2" in text
    idle.close()
    log = sp.log_text()
    assert "stopping at the admin API's request (postroom stop)" in log
    assert "postroom stopped" in log and "Traceback" not in log
    # started again: the message is still queued, and the event log says who stopped it
    sp.start()
    assert sp.queue()["outbound-delivery"]["messages"] == 1
    events = sp.cli("events", "--json").stdout
    assert f"Postroom (pid {pid}) is stopping at the admin API's request" in events
    got = json.loads(sp.cli("stop", "--json").stdout)
    assert got["stopping"] is True and got["stopped"] is True and got["pid"] != pid
    assert sp.proc.wait(timeout=5) == 0


def test_stop_when_the_server_is_not_running_says_so(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory()
    sp.stop()
    cp = sp.cli("stop", check=False)
    assert cp.returncode == 1 and cp.stdout == ""
    assert "cannot reach the admin API" in cp.stderr and "Traceback" not in cp.stderr


def test_start_without_a_component_says_how_to_start_the_server(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory(start=False)
    cp = sp.cli("start", check=False)
    assert cp.returncode == 1 and cp.stdout == ""
    assert f"postroom serve -c {sp.config}" in cp.stderr and "Traceback" not in cp.stderr
    sp.start()
    cp = sp.cli("start", check=False)
    assert cp.returncode == 1
    assert "already running" in cp.stderr and "postroom start COMPONENT" in cp.stderr
    assert sp.proc is not None and sp.proc.poll() is None       # and it was left alone
    assert sp.cli("stop", "outbound-delivery").stdout.strip() == "outbound-delivery: stopped"
    assert sp.cli("start", "outbound-delivery").stdout.strip() == "outbound-delivery: running"


def test_restart_still_needs_a_component(tmp_path: Path) -> None:
    cp = run(["restart"], tmp_path)
    assert cp.returncode == 2 and "component" in cp.stderr
