"""The queue manager signs the notices it sends to remote senders (NDRs from
MAILER-DAEMON@hostname), once, as it builds them; never those that stay here."""

from __future__ import annotations

from pathlib import Path

import dkim
from cryptography.hazmat.primitives.asymmetric import rsa

from postroom.body import Body
from postroom.config import DeliveryConfig
from postroom.delivery import Agents
from postroom.mailauth.keys import txt_record
from postroom.mailauth.sign import LoadedKey, Signer
from postroom.qmgr import QueueManager
from postroom.spool import NoticeOwed, SqliteSpool


def _owed(sender: str) -> NoticeOwed:
    return NoticeOwed(rid=1, message="M1", address="bob@far.test", params={}, state="failed",
                      last_reply="550 5.1.1 <bob@far.test>: no such user",
                      detail={"status": "5.1.1", "step": "RCPT", "remote_host": "mx.far.test"},
                      kind="failure", sender=sender, received=1_700_000_000.0, mail_params={})


def test_a_failure_notice_to_a_remote_sender_is_signed_and_one_to_a_local_sender_is_not(
        tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "spool.sqlite3")
    try:
        q = QueueManager(spool, Agents({}), local_domains=frozenset({"example.test"}),
                         aliases={}, delivery=DeliveryConfig(), hostname="mx.example.test")
        key = LoadedKey("example.test", "rsa1",
                        rsa.generate_private_key(public_exponent=65537, key_size=2048),
                        "rsa-sha256")
        q.signer = Signer([key])
        original = Body(b"From: zoe@far.test\r\nSubject: hi\r\n\r\nhello\r\n")
        remote = q._notice("failure", [_owed("zoe@far.test")], original, 1_700_000_100.0)
        local = q._notice("failure", [_owed("alice@example.test")], original, 1_700_000_100.0)
    finally:
        spool.close()
    assert remote.data.startswith(b"DKIM-Signature: ")
    assert b"d=example.test" in remote.data[:400]

    def dns(name: bytes, timeout: float = 5) -> bytes | None:
        return txt_record(key.key).encode() if name == b"rsa1._domainkey.example.test." \
            else None
    assert dkim.verify(remote.data, dnsfunc=dns)
    assert b"DKIM-Signature" not in local.data
