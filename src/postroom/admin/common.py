"""What the admin API's route modules share: the backend they serve, the context they
are built with, the token guard, errors, and the parsing of bodies and filters."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..config import Config, ConfigError, parse_duration
from ..events import EventLog
from ..metrics import Metrics
from ..model import ComponentError
from ..spool import Filters, Spool, StorageUnavailable
from ..spool.views import QueueError
from ..users import UserError, UserStore

log = logging.getLogger("postroom.admin")

Handler = Callable[[Request], Awaitable[Response]]


class AdminBackend(Protocol):
    spool: Spool
    metrics: Metrics
    events: EventLog
    users: UserStore
    config: Config

    async def set_logging(self, category: str, level: str, peer: str = "",
                          domain: str = "") -> dict[str, Any]: ...
    async def submit_local(self, sender: str, recipients: list[str], data: bytes,
                           user: str) -> dict[str, Any]: ...
    def status(self) -> list[dict[str, Any]]: ...
    async def component(self, name: str, action: str) -> dict[str, Any]: ...
    async def reload(self) -> dict[str, Any]: ...
    def retry_now(self) -> None: ...


class Endpoint(NamedTuple):
    """One route of the API, before ``make_app`` puts the token guard in front of it.
    ``methods`` None is Starlette's default: GET (and HEAD)."""

    path: str
    handler: Handler
    methods: list[str] | None = None


@dataclass
class Context:
    """What routes need beyond the backend: the token, the app once it is built (for
    calls to itself), and the coroutines to run as tasks while it serves."""

    token: str
    app: Starlette | None = None
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)


def guarded(handler: Handler, token: str) -> Handler:
    """``handler`` behind the bearer token; the API's expected errors answer 400, and
    an unreachable spool database 503 (the command line prints the message)."""
    async def run(request: Request) -> Response:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _error(401, "missing or wrong token (Authorization: Bearer <the "
                               "content of <data_dir>/admin.token>)")
        try:
            return await handler(request)
        except (QueueError, ComponentError, ConfigError, UserError,
                ValueError) as exc:
            return _error(400, str(exc))
        except StorageUnavailable as exc:
            return _error(503, f"the spool's database cannot be reached: {exc}")
    return run


def _error(status: int, message: str, **more: Any) -> JSONResponse:
    return JSONResponse({"error": message, **more}, status_code=status)


async def json_body(request: Request) -> dict[str, Any]:
    body = await request.json()
    if not isinstance(body, dict):
        raise ValueError("send a JSON object")
    return body


def _filters(q: dict[str, Any]) -> Filters:
    held = q.get("held")
    ids = q.get("ids") or ()
    if isinstance(ids, str):
        ids = tuple(i for i in ids.split(",") if i)
    return Filters(
        domain=str(q.get("domain") or ""), sender=str(q.get("sender") or ""),
        rcpt=str(q.get("rcpt") or ""),
        older_than=parse_duration(q["older_than"]) if q.get("older_than") else 0.0,
        held=None if held in (None, "") else str(held).lower() in ("1", "true", "yes"),
        reason=str(q.get("reason") or ""), queue=str(q.get("queue") or ""),
        ids=tuple(str(i) for i in ids))


def _by(body: dict[str, Any]) -> str:
    who = str(body.get("who") or "")[:100]
    return f" by {who}" if who else ""
