"""The local domains and the DNS records each needs to send mail that others accept:
SPF, DKIM per ``[[dkim]]`` key, DMARC and MX, compared with what DNS answers
(``diagnostics.senderauth``, the check doctor's step 11 runs)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .common import AdminBackend, Context, Endpoint, _error


def routes(backend: AdminBackend, ctx: Context) -> list[Endpoint]:
    async def domains(request: Request) -> Response:
        config = backend.config
        return JSONResponse({"domains": [
            {"domain": d, "dkim": [k.record_name for k in config.dkim
                                   if k.domain.lower() == d.lower()]}
            for d in config.local_domains]})

    async def records(request: Request) -> Response:
        from ..diagnostics.senderauth import outbound_route, sender_records, sending_addresses
        from ..dns import Resolver

        config = backend.config
        domain = request.path_params["domain"].lower().rstrip(".")
        if domain not in {d.lower() for d in config.local_domains}:
            return _error(404, f"{domain} is not a local domain ([domains] local)")
        resolver = Resolver(config.nameservers)
        sending = sending_addresses(config, resolver, outbound_route(config))
        return JSONResponse(await sender_records(config, resolver, domain, sending, mx=True))

    return [
        Endpoint("/api/domains", domains),
        Endpoint("/api/domains/{domain}/records", records),
    ]
