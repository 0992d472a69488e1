"""A real dnsmasq on a free 127.0.0.1 port (UDP and TCP), as the DNS for tests.

    with run_dnsmasq(["--mx-host=far.test,mx.far.test,10",
                      "--host-record=mx.far.test,127.0.0.9"]) as port:
        resolver = Resolver([f"127.0.0.1:{port}"])

dnsmasq answers only from its own records: no upstream (``--no-resolv``), no
/etc/hosts, no config file. Everything under ``.test`` is local (NXDOMAIN for unknown
names, not REFUSED); names outside ``.test`` answer REFUSED unless the records add a
``--server``. Local records carry a TTL of ``ttl`` seconds (dnsmasq's default is 0).
It runs as root or as any other user; no ``--user`` is needed.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence

import pytest

DNSMASQ = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")

# The real root KSK-2017 DS: with --dnssec and --dnssec-check-unsigned, an upstream that
# cannot prove its zone unsigned makes dnsmasq answer SERVFAIL (see servfail_records).
ROOT_TRUST_ANCHOR = ("--trust-anchor=.,20326,8,2,"
                     "E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D")


def free_udp_tcp_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 at the time of asking."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no port free for both TCP and UDP on 127.0.0.1")


def servfail_records(upstream_port: int) -> list[str]:
    """Records for a dnsmasq that answers SERVFAIL for every name outside ``.test``.

    It forwards those names to ``upstream_port`` (a dnsmasq that answers them unsigned)
    and validates with DNSSEC against the real root trust anchor; the upstream cannot
    prove the names insecure, so validation fails and dnsmasq answers SERVFAIL.
    """
    return [f"--server=127.0.0.1#{upstream_port}", "--dnssec", "--dnssec-check-unsigned",
            ROOT_TRUST_ANCHOR]


def _ready(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def run_dnsmasq(records: Sequence[str], *, port: int | None = None,
                ttl: int = 30) -> Iterator[int]:
    """Run dnsmasq with ``records`` (extra command-line options); yield its port.

    ``port`` pins the port (to restart a server where a resolver already points);
    otherwise a free one is chosen, and chosen again if another process takes it first.
    """
    if DNSMASQ is None:
        pytest.skip("dnsmasq is not installed (apt-get install dnsmasq-base)")
    attempts = 1 if port is not None else 5
    for _ in range(attempts):
        chosen = port if port is not None else free_udp_tcp_port()
        argv = [DNSMASQ, "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                "--pid-file=", f"--port={chosen}", "--listen-address=127.0.0.1",
                "--bind-interfaces", "--local=/test/", f"--local-ttl={ttl}", *records]
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            try:
                if _ready(proc, chosen, timeout=10.0):
                    yield chosen
                    return
            finally:
                _stop(proc)
            log.seek(0)
            output = log.read().decode(errors="replace")
        if "Address already in use" not in output:
            break
    raise RuntimeError(f"dnsmasq did not start ({' '.join(argv)}):\n{output}")
