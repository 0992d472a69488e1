"""ARC sealing (RFC 8617) of mail that this server forwards to another domain.

When an alias sends mail that came from outside on to a non-local address, the next
hop can no longer trust SPF (we are now the sender) and may find DKIM broken. The seal
records what this server saw at the MX: ARC-Authentication-Results (a copy of our own
Authentication-Results, found by our authserv-id, the hostname), ARC-Message-Signature
and ARC-Seal, made by dkimpy's ``arc_sign`` with the RSA key of the alias's domain (or
of the hostname's domain). ARC signs with rsa-sha256 only.

No Authentication-Results of ours on the message: no seal (there is nothing to attest).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import dkim

from .keys import dkimpy_private
from .sign import Signer

__all__ = ["Sealer"]

log = logging.getLogger("postroom.mailauth")


@dataclass
class Sealer:
    signer: Signer            # the [[dkim]] keys
    authserv_id: str          # this server's hostname, as in its Authentication-Results

    def seal(self, message: bytes, domains: list[str], now: float) -> bytes:
        """The ARC set to put on top of ``message`` (CRLF line ends), with the RSA key of
        the first of ``domains`` (or a parent) that has one; b"" when none has, or when
        the message carries no Authentication-Results of ours."""
        for domain in [*domains, self.authserv_id]:
            keys = [k for k in self.signer.keys_for(domain) if k.algorithm == "rsa-sha256"]
            if keys:
                break
        else:
            return b""
        k = keys[0]
        try:
            fields = dkim.arc_sign(message, k.selector.encode(), k.domain.encode(),
                                   dkimpy_private(k.key), self.authserv_id.encode(),
                                   timestamp=int(now))
        except dkim.DKIMException as exc:
            log.warning("no ARC seal: %s", exc)
            return b""
        return b"".join(fields)
