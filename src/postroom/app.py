"""The composition root: builds every component from the config and runs them.

Processes: with ``[smtp] processes = N`` the main process binds the listening sockets,
then forks N-1 SMTP front ends before any thread or event loop exists. Every process
accepts on the same sockets (the kernel spreads connections) and commits to the same
SQLite spool; only the main process runs the queue manager. A front end that commits
mail writes one byte to a pipe, which wakes the main process's queue manager. Front
ends die with the main process (PR_SET_PDEATHSIG), so a ``kill -9`` of the main process
never leaves a half-server holding the ports.

Nothing imports this module except the command line and the tests.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .delivery import SmtpDeliveryAgent
from .dns import Resolver
from .qmgr import QueueManager
from .smtp.server import ServerState, Session
from .spool import SqliteSpool
from .store import MaildirStore
from .tls import ensure_self_signed, server_context
from .users import UserStore

__all__ = ["BoundListener", "Postroom", "bind_listeners", "catch_stop_signals", "fork_front_ends",
           "tls_files"]

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


Listeners = list[tuple[str, socket.socket]]


def bind_listeners(config: Config) -> Listeners:
    """Bind every listening socket of the config (before any fork)."""
    c = config.smtp
    specs = [("mx", a) for a in c.listen] + [("submission", a) for a in c.submission] + \
            [("submissions", a) for a in c.submissions]
    bound: Listeners = []
    try:
        for kind, (host, port) in specs:
            for family, _, _, _, address in socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV):
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(1024)
                sock.setblocking(False)
                bound.append((kind, sock))
                break
    except OSError:
        for _, sock in bound:
            sock.close()
        raise
    return bound


_stop_requested = False


def catch_stop_signals() -> None:
    """Remember a SIGTERM/SIGINT that arrives before the event loop takes over.

    The listeners accept connections as soon as they are bound, before the loop installs
    its own handlers; a signal in that window must stop the server cleanly, not kill it.
    """
    def remember(signum: int, frame: object) -> None:
        global _stop_requested
        _stop_requested = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, remember)


def tls_files(config: Config) -> tuple[Path, Path]:
    if config.tls.cert_file and config.tls.key_file:
        return config.tls.cert_file, config.tls.key_file
    return ensure_self_signed(config.data_dir / "tls", config.hostname)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)                # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def fork_front_ends(config: Config, listeners: Listeners, count: int,
                    run_child: Callable[[int], None]) -> tuple[list[int], int]:
    """Fork ``count`` front ends; returns (their pids, the wake pipe's read end).

    Must be called before any thread starts: a forked child has only the thread that
    forked it. ``run_child(write_fd)`` runs in each child and never returns.
    """
    if count <= 0:
        return [], -1
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    pids = []
    parent = os.getpid()
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _die_with_parent()
            if os.getppid() != parent:              # the parent died before prctl
                os._exit(1)
            try:
                run_child(write_fd)
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    return pids, read_fd


class Postroom:
    """One process of the server: the listeners, and in the main process the queue."""

    def __init__(self, config: Config, *, listeners: Listeners | None = None,
                 main: bool = True, wake_fd: int = -1, notify_fd: int = -1,
                 children: list[int] | None = None, started: float | None = None) -> None:
        self.config = config
        self.main = main
        # before any listener (or forked front end) could write a body file: files older
        # than this that no message names are a crash's leftovers
        self.started = time.time() if started is None else started
        self.listeners: list[BoundListener] = []
        self._sockets = listeners
        self._wake_fd = wake_fd            # main: read end of the front ends' pipe
        self._notify_fd = notify_fd        # front end: write end
        self.children = children or []
        self._servers: list[asyncio.Server] = []
        self._stopped = asyncio.Event()

    async def start(self) -> list[BoundListener]:
        c = self.config
        c.data_dir.mkdir(parents=True, exist_ok=True)
        cert, key = tls_files(c)
        tls = server_context(cert, key)
        self.spool = SqliteSpool(c.spool_path)
        self.users = UserStore(c.users_path)
        self.store = MaildirStore(c.mail_dir, c.hostname)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="auth")
        self.state = ServerState(
            config=c, spool=self.spool, mailbox_exists=self.users.exists,
            verify_password=self.users.verify, tls=tls, executor=self.executor)
        loop = asyncio.get_running_loop()
        if self.main:
            self.resolver = Resolver(c.nameservers)
            self.agent = SmtpDeliveryAgent(self.resolver, c.hostname, c.delivery)
            self.qmgr = QueueManager(
                self.spool, self.store, local_domains=frozenset(c.local_domains),
                aliases=c.aliases, mailbox_exists=self.users.exists, delivery=c.delivery,
                routes=c.routes, agent=self.agent, hostname=c.hostname, started=self.started)
            if self._wake_fd >= 0:
                loop.add_reader(self._wake_fd, self._woken)
        elif self._notify_fd >= 0:
            self.spool.on_commit(self._notify)
        sockets = self._sockets if self._sockets is not None else bind_listeners(c)
        try:
            for kind, sock in sockets:
                implicit = kind == "submissions"
                server = await loop.create_server(
                    lambda kind=kind, implicit=implicit: Session(self.state, kind, implicit),
                    sock=sock, ssl=tls if implicit else None, backlog=1024)
                self._servers.append(server)
                addr = sock.getsockname()
                self.listeners.append(BoundListener(kind, addr[0], addr[1]))
        except OSError:
            await self.stop()
            raise
        if self.main:
            self.qmgr.start()
        log.info("postroom %s started (pid %d): %s", "main" if self.main else "front end",
                 os.getpid(), ", ".join(f"{b.kind}={b.host}:{b.port}" for b in self.listeners))
        return self.listeners

    def _woken(self) -> None:
        try:
            while os.read(self._wake_fd, 4096):
                pass
        except BlockingIOError:
            pass
        self.qmgr.wake()

    def _notify(self) -> None:
        try:
            os.write(self._notify_fd, b"!")
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):   # a full pipe is awake
                raise

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
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if hasattr(self, "qmgr"):
            await self.qmgr.stop()
        await self._reap_children()
        if hasattr(self, "spool"):
            self.spool.close()
        if hasattr(self, "users"):
            self.users.close()
        if hasattr(self, "executor"):
            self.executor.shutdown(wait=False)
        log.info("postroom stopped")
        self._stopped.set()

    async def _reap_children(self) -> None:
        pending = set(self.children)
        for _ in range(200):
            for pid in list(pending):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    pending.discard(pid)
            if not pending:
                return
            await asyncio.sleep(0.05)
        for pid in pending:
            log.warning("front end %d did not stop; killing it", pid)
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass

    async def run_until_signalled(self, on_started: object = None) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if _stop_requested:
            stop.set()
        await self.start()
        if callable(on_started):
            on_started(self.listeners)
        await stop.wait()
        log.info("signal received, shutting down")
        await self.stop()
