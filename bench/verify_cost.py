#!/usr/bin/env python3
"""The CPU cost of inbound verification per message (issue 14's W1 with verification on).

Verifies N messages signed by dkimpy (RSA-2048), from an address that SPF passes, with a
DMARC record, against a real dnsmasq, through the same Verifier the MX listener uses.
The resolver's cache is warm after the first message, as it is for a sender that sends
more than once a TTL. Prints CPU milliseconds per message (process time, all threads).

    PYTHONPATH=src unshare -n sh -c 'ip link set lo up && python3 bench/verify_cost.py 500'

Not yet a workload of ``bench/run suite``: a W1v there (smtp-source from an untrusted
address with signed messages) is still to do.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postroom.dns import Resolver  # noqa: E402
from postroom.mailauth.verify import Verifier, VerifySettings  # noqa: E402
from tests.integration.dnsmasq import run_dnsmasq  # noqa: E402
from tests.integration.test_verification import RECORDS, message, signed  # noqa: E402


async def run(port: int, n: int) -> None:
    verifier = Verifier(Resolver([f"127.0.0.1:{port}"]), VerifySettings("mx.example.test"))
    body = b"x" * 3000 + b"\r\n"
    msg = signed(message() + body)
    first = await verifier.verify(msg, ip="127.0.0.66", helo="client.far.test",
                                  sender="a@far.test")
    assert first.summary() == "spf=pass dkim=pass dmarc=pass arc=none", first.summary()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        await verifier.verify(msg, ip="127.0.0.66", helo="client.far.test", sender="a@far.test")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{n} messages of {len(msg)} bytes: {cpu / n * 1000:.2f} ms CPU, "
          f"{wall / n * 1000:.2f} ms wall per message (warm cache)")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    with run_dnsmasq(RECORDS) as port:
        asyncio.run(run(port, n))


if __name__ == "__main__":
    main()
