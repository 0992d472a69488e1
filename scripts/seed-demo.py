#!/usr/bin/env python3
"""The seed case of docs/troubleshooting.md, for real: a Postroom whose smart host (a
private Postfix) refuses to relay for it. Run inside a loopback-only namespace, as root:
    unshare -n sh -c 'ip link set lo up; python3 scripts/seed-demo.py'
"""
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.integration.peers import postfix
from tests.conftest import free_port, wait_port
work = Path(tempfile.mkdtemp(prefix="seed-"))
mx, sub, adm = free_port(), free_port(), free_port()
def cfg(route):
    (work / "postroom.toml").write_text(textwrap.dedent(f"""\
        hostname = "mail.example.test"
        data_dir = "data"
        [smtp]
        listen = ["127.0.0.1:{mx}"]
        submission = ["127.0.0.1:{sub}"]
        [domains]
        local = ["example.test"]
        [dns]
        nameservers = ["127.0.0.1:9"]
        [admin]
        listen = "127.0.0.1:{adm}"
        """) + route)
def run(*args, stdin=None):
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"$ postroom {shown}")
    cp = subprocess.run([sys.executable, "-m", "postroom.cli", *args], cwd=work, capture_output=True, text=True, input=stdin)
    print((cp.stdout + cp.stderr).rstrip()); print()
with postfix(work / "isp", "127.0.0.20", """
        mynetworks = 127.0.0.99/32
        smtpd_relay_restrictions = permit_mynetworks permit_sasl_authenticated reject_unauth_destination
        """) as isp:
    cfg(f'[[route]]\nmatch = "*"\nvia = "smarthost"\nhost = "{isp.address}:{isp.port}"\ntls = "none"\n')
    srv = subprocess.Popen([sys.executable, "-m", "postroom.cli", "serve", "-q"], cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(mx); time.sleep(1)
    print(f"# ISP smart host: Postfix at {isp.address}:{isp.port}")
    run("explain", "--from", "user@example.test", "--to", "bob@far.example", "--client-ip", "192.0.2.50")
    run("doctor", "--to", "bob@far.example", "--client-ip", "192.0.2.50")
    run("doctor", "--to", "bob@far.example")
    run("probe", f"{isp.address}:{isp.port}", "--from", "postmaster@example.test", "--to", "bob@far.example")
    srv.terminate(); srv.wait()
