"""Submission from the command line's ``sendmail``: a message handed to the server as
a local user's."""

from __future__ import annotations

import base64
import binascii

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .common import AdminBackend, Context, Endpoint, json_body


def routes(backend: AdminBackend, ctx: Context) -> list[Endpoint]:
    async def submit(request: Request) -> Response:
        body = await json_body(request)
        try:
            data = base64.b64decode(str(body.get("data", "")), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("data must be base64") from None
        rcpts = body.get("recipients") or []
        if not isinstance(rcpts, list):
            raise ValueError("recipients must be a list")
        return JSONResponse(await backend.submit_local(
            str(body.get("sender", "")), [str(r) for r in rcpts], data,
            str(body.get("user") or "unknown")[:64]))

    return [Endpoint("/api/submit", submit, ["POST"])]
