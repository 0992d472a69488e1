"""``probe`` (telnet to port 25): talk to one SMTP server the way delivery would, and say
what it would do."""

from __future__ import annotations

import ssl
import time
from typing import Any

from ..dns import DnsError, Resolver
from ..smtp.client import Client, HopError, Transcript

__all__ = ["PROBE_VERDICTS", "probe"]

PROBE_VERDICTS = ("accepts", "relay-denied", "auth-required", "auth-failed", "tls-failed",
                  "unreachable", "refused")


def _cert_info(der: bytes | None) -> dict[str, Any]:
    if not der:
        return {}
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.isoformat()}


async def probe(host: str, port: int, *, resolver: Resolver, helo: str,
                sender: str | None = None, rcpt: str | None = None, starttls: bool = False,
                username: str | None = None, password: str | None = None,
                send: bool = False, timeout: float = 15.0,
                source: str | None = None) -> dict[str, Any]:
    """Talk to one SMTP server the way delivery would, and say what it would do.

    Never sends DATA unless ``send``; ends with RSET and QUIT. The verdict is one of
    :data:`PROBE_VERDICTS`; ``reply`` quotes the answer it rests on.
    """
    transcript = Transcript()
    out: dict[str, Any] = {"host": host, "port": port, "verdict": "", "reply": None}
    addresses = await resolver.addresses(host)
    if isinstance(addresses, DnsError):
        out.update(verdict="unreachable", reply=addresses.describe(), addresses=[],
                   transcript="")
        return out
    out["addresses"] = list(addresses)
    client: Client | None = None
    verdict, reply = "", ""
    try:
        for ip in addresses:
            client = Client(helo_name=helo, command_timeout=timeout, transcript=transcript)
            started = time.monotonic()
            try:
                banner = await client.connect(ip, port, timeout, source)
            except HopError as exc:
                out.setdefault("attempts", []).append(f"{ip}: {exc.detail}")
                client = None
                continue
            out.update(ip=ip, connect_ms=round((time.monotonic() - started) * 1000, 1),
                       banner=str(banner))
            local = client.writer.get_extra_info("sockname") if client.writer else None
            if local:                          # the address this host sends from (SPF's)
                out["source"] = str(local[0])
            break
        if client is None:
            out.update(verdict="unreachable",
                       reply="; ".join(out.get("attempts", [])) or "no address")
            return out
        ehlo = await client.ehlo()
        out["ehlo"] = str(ehlo)
        out["extensions"] = sorted(client.extensions)
        if starttls:
            if not client.offers("STARTTLS"):
                verdict, reply = "tls-failed", f"{host} does not offer STARTTLS"
                return out
            verified, why = True, ""
            try:
                await client.starttls(ssl.create_default_context(), host)
            except HopError as exc:
                verified, why = False, exc.detail
                client.close()
                # once more without checking the certificate, to see the rest
                client = Client(helo_name=helo, command_timeout=timeout, transcript=transcript)
                transcript.note("-- again without certificate verification")
                await client.connect(out["ip"], port, timeout)
                await client.ehlo()
                loose = ssl.create_default_context()
                loose.check_hostname = False
                loose.verify_mode = ssl.CERT_NONE
                try:
                    await client.starttls(loose, None)
                except HopError as exc2:
                    verdict, reply = "tls-failed", exc2.detail
                    return out
            assert client.writer is not None
            obj = client.writer.get_extra_info("ssl_object")
            out["tls"] = {"protocol": obj.version() if obj else None,
                          "cipher": obj.cipher()[0] if obj else None,
                          "verified": verified, "verify_error": why or None,
                          **_cert_info(obj.getpeercert(binary_form=True) if obj else None)}
            await client.ehlo()
            out["extensions_after_tls"] = sorted(client.extensions)
        auth_line = client.extensions.get("AUTH", "")
        out["auth_mechanisms"] = auth_line.split() if auth_line else []
        if username is not None:
            try:
                out["auth"] = str(await client.auth(username, password or ""))
            except HopError as exc:
                verdict, reply = "auth-failed", str(exc.reply or exc.detail)
                return out
        if sender is None and rcpt is None:
            verdict, reply = "accepts", str(ehlo)
            return out
        mail = await client.command(f"MAIL FROM:<{sender or ''}>", "MAIL")
        out["mail"] = str(mail)
        if not mail.is_positive:
            verdict, reply = _refusal(mail), str(mail)
            return out
        if rcpt is not None:
            answer = await client.command(f"RCPT TO:<{rcpt}>", "RCPT")
            out["rcpt"] = str(answer)
            if not answer.is_positive:
                verdict, reply = _refusal(answer), str(answer)
                return out
            if send:
                tx = await client.command("DATA", "DATA")
                if tx.code == 354:
                    message = (f"Subject: postroom probe\r\nFrom: <{sender or ''}>\r\n"
                               f"To: <{rcpt}>\r\n\r\nA test message sent by postroom probe."
                               "\r\n.").replace("\r\n.\r\n", "\r\n..\r\n")
                    tx = await client.command(message, "DATA", "<test message>")
                out["data"] = str(tx)
                if not tx.is_positive:
                    verdict, reply = _refusal(tx), str(tx)
                    return out
            verdict, reply = "accepts", str(answer)
        else:
            verdict, reply = "accepts", str(mail)
        return out
    except HopError as exc:
        verdict = "tls-failed" if exc.step == "STARTTLS" else (
            "unreachable" if exc.reply is None else _refusal(exc.reply))
        reply = str(exc.reply) if exc.reply is not None else exc.detail
        return out
    finally:
        if not out["verdict"]:
            out["verdict"], out["reply"] = verdict, reply
        if client is not None:
            try:
                if client.writer is not None and not client.writer.is_closing():
                    await client.reset()
            finally:
                await client.quit()
        out["transcript"] = transcript.text()


def _refusal(reply: Any) -> str:
    text = str(reply).lower()
    if reply.code == 530 or reply.enhanced == "5.7.0" or "authentication required" in text:
        return "auth-required"
    if reply.enhanced == "5.7.1" or "relay" in text:
        return "relay-denied"
    return "refused"

