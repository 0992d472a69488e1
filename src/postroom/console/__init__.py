"""The web console: server-rendered pages on ``[admin] listen``, beside the admin API.

Every page is a client of the admin API: it calls the same JSON routes as the command
line does (in-process, over ASGI, with the API's token), so the console and the commands
can never disagree. What the console adds is its own: login with an admin account
(``postroom users add ADDRESS --admin``), a server-side session behind an HttpOnly,
SameSite=Strict cookie, a CSRF token on every form, login throttling, and the pages.

The JavaScript (``static/console.js``) only refreshes parts of a page (charts, the event
tail, a running doctor) and asks before destructive actions; every page works without it.

- ``auth``: sessions and their store, login throttling, CSRF and login tokens, redirects
- ``format``: the templates' filters (times, ages, sizes)
- ``pages``: the :class:`~.pages.Console` and its page handlers
- ``charts``: the dashboard's SVG charts
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from ..events import EventLog
from .auth import Session, Throttle, safe_next
from .pages import Console

__all__ = ["Console", "Session", "Throttle", "build", "safe_next"]


def build(api: Starlette, token: str, events: EventLog) -> Starlette:
    """The console's application: its pages, calling ``api`` (the admin API's app)."""
    console = Console(api, token, events)

    async def not_found(request: Request, exc: Exception) -> Response:
        if request.url.path.startswith(("/api/", "/metrics")):
            # every path the API does not take comes here, a wrong method included
            if any(isinstance(r, Route) and r.matches(request.scope)[0] == Match.PARTIAL
                   for r in api.routes):
                return JSONResponse({"error": f"{request.method} is not allowed on "
                                              f"{request.url.path}"}, status_code=405)
            return JSONResponse({"error": f"no API route {request.method} "
                                          f"{request.url.path}"}, status_code=404)
        s = console.session(request)
        return console.render(request, "error.html", {
            "title": "Not found", "message": f"There is no page {request.url.path}."},
            status=404, session=s)
    return Starlette(routes=console.routes(), exception_handlers={404: not_found})
