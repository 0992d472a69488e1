"""The admin API: JSON over HTTP on ``[admin] listen``, and ``/metrics``.

Every request needs ``Authorization: Bearer <token>``; the token is the content of
``<data_dir>/admin.token`` (mode 0600, made on first start). The command line reads the
file and calls this API: it is the only way into a running server's spool.

Served by uvicorn inside the server's own event loop (Starlette routes), in the main
process only. The routes are grouped by resource, one module each: ``components``,
``queues``, ``events``, ``submit``, ``stats``, ``users``, ``routing``, ``doctor``,
``domains``;
``common`` holds the guard and the helpers they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import components, doctor, domains, events, queues, routing, stats, submit, users
from .common import AdminBackend, Context, Endpoint, guarded
from .stats import HISTORY_SERIES, History

__all__ = ["HISTORY_SERIES", "AdminBackend", "AdminServer", "History", "make_app"]

# Each resource's routes, in the order they are matched.
RESOURCES: list[Callable[[AdminBackend, Context], list[Endpoint]]] = [
    components.routes, queues.routes, stats.routes, events.routes, submit.routes,
    users.routes, routing.routes, doctor.routes, domains.routes]


class _Lazy:
    """An ASGI app built at its first request."""

    def __init__(self, build: Callable[[], ASGIApp]) -> None:
        self.build = build
        self.app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is None:
            self.app = self.build()
        await self.app(scope, receive, send)


def make_app(backend: AdminBackend, token: str,
             console: Callable[[Starlette], ASGIApp] | None = None) -> Starlette:
    """The API's routes, each behind the token; ``console(app)``, when given, makes the
    app that serves every other path (built at the first request for one: the web stack
    it imports costs the server's main process about 6 MB, which it need not carry until
    then)."""
    ctx = Context(token)
    routes: list[Route | Mount] = [
        Route(e.path, guarded(e.handler, token), methods=e.methods)
        for resource in RESOURCES for e in resource(backend, ctx)]
    if console is not None:           # every other path: the web console's pages
        routes.append(Mount("", app=_Lazy(lambda: console(app))))
    app = Starlette(routes=routes)
    ctx.app = app
    app.state.background = ctx.background
    return app


class _Uvicorn(uvicorn.Server):
    # The server's own loop owns SIGTERM/SIGINT; uvicorn must not replace the handlers.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AdminServer:
    """uvicorn serving :func:`make_app` on an already bound socket."""

    def __init__(self, app: Starlette, sock: socket.socket) -> None:
        self.sock = sock
        self.app = app
        self.background: list[asyncio.Task[None]] = []
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self.server = _Uvicorn(config)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.server.should_exit = False
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self.server.serve(sockets=[self.sock]), name="admin")
        self.background = [loop.create_task(fn(), name="admin-background")
                           for fn in getattr(self.app.state, "background", ())]

    async def stop(self) -> None:
        if self.task is None:
            return
        for t in self.background:
            t.cancel()
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await self.task
        self.task = None
