"""The composition root: builds every component from the config and runs them.

Nothing imports this module except the command line and the tests.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .config import Config
from .delivery import SmtpDeliveryAgent
from .dns import Resolver
from .qmgr import QueueManager
from .smtp.server import ServerState, Session
from .spool import SqliteSpool
from .store import MaildirStore
from .tls import ensure_self_signed, server_context
from .users import UserStore

__all__ = ["Postroom", "BoundListener"]

log = logging.getLogger("postroom.app")


@dataclass(frozen=True)
class BoundListener:
    kind: str            # "mx" | "submission" | "submissions"
    host: str
    port: int

    def describe(self) -> str:
        what = {"mx": "SMTP (MX)", "submission": "submission (STARTTLS + AUTH)",
                "submissions": "submissions (implicit TLS + AUTH)"}[self.kind]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{what:38} {host}:{self.port}"


class Postroom:
    """The running server: spool, users, store, queue manager and listeners."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.listeners: list[BoundListener] = []
        self._servers: list[asyncio.Server] = []
        self._stopped = asyncio.Event()

    async def start(self) -> list[BoundListener]:
        c = self.config
        c.data_dir.mkdir(parents=True, exist_ok=True)
        if c.tls.cert_file and c.tls.key_file:
            cert, key = c.tls.cert_file, c.tls.key_file
        else:
            cert, key = ensure_self_signed(c.data_dir / "tls", c.hostname)
        tls = server_context(cert, key)
        self.spool = SqliteSpool(c.spool_path)
        self.users = UserStore(c.users_path)
        self.store = MaildirStore(c.mail_dir, c.hostname)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="auth")
        self.state = ServerState(
            config=c, spool=self.spool, mailbox_exists=self.users.exists,
            verify_password=self.users.verify, tls=tls, executor=self.executor)
        self.resolver = Resolver(c.nameservers)
        self.agent = SmtpDeliveryAgent(self.resolver, c.hostname, c.delivery)
        self.qmgr = QueueManager(
            self.spool, self.store, local_domains=frozenset(c.local_domains), aliases=c.aliases,
            mailbox_exists=self.users.exists, delivery=c.delivery, routes=c.routes,
            agent=self.agent, hostname=c.hostname)
        loop = asyncio.get_running_loop()
        specs = [("mx", a) for a in c.smtp.listen] + \
                [("submission", a) for a in c.smtp.submission] + \
                [("submissions", a) for a in c.smtp.submissions]
        try:
            for kind, (host, port) in specs:
                implicit = kind == "submissions"
                server = await loop.create_server(
                    lambda kind=kind, implicit=implicit: Session(self.state, kind, implicit),
                    host, port, ssl=tls if implicit else None, reuse_address=True, backlog=1024)
                self._servers.append(server)
                for sock in server.sockets:
                    addr = sock.getsockname()
                    self.listeners.append(BoundListener(kind, addr[0], addr[1]))
        except OSError:
            await self.stop()
            raise
        self.qmgr.start()
        log.info("postroom started: %s", ", ".join(f"{b.kind}={b.host}:{b.port}"
                                                   for b in self.listeners))
        return self.listeners

    async def stop(self) -> None:
        """Stop accepting, end sessions with 421, finish the current queue round."""
        for server in self._servers:
            server.close()
        state = getattr(self, "state", None)
        if state is not None:
            state.shutting_down = True
            for session in list(state.sessions):
                session.shutdown()
            for _ in range(100):
                if not state.sessions:
                    break
                await asyncio.sleep(0.05)
        for server in self._servers:
            await server.wait_closed()
        if hasattr(self, "qmgr"):
            await self.qmgr.stop()
        if hasattr(self, "spool"):
            self.spool.close()
        if hasattr(self, "users"):
            self.users.close()
        if hasattr(self, "executor"):
            self.executor.shutdown(wait=False)
        log.info("postroom stopped")
        self._stopped.set()

    async def run_until_signalled(self, on_started: object = None) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        if callable(on_started):
            on_started(self.listeners)
        await stop.wait()
        log.info("signal received, shutting down")
        await self.stop()
