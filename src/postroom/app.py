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
import contextlib
import ctypes
import errno
import gc
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Collection, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import __version__
from .address import AddressError, parse_path
from .config import Config, ConfigError, ensure_token, load
from .events import EventLog, Levels
from .intake import Stamping, Submission
from .metrics import Metrics
from .model import ComponentError
from .observability import attach_loop
from .policy import RelaySettings, SessionSnapshot, check_rcpt, peer_address, trusted_network
from .smtp.server import ServerState, Session
from .spool import Filters, Spool, open_spool
from .store import MaildirStore
from .tls import ensure_self_signed, server_context
from .users import UserStore

# The queue side (delivery agents, DNS, the queue manager, the imap component) is
# imported by the main process only, in Postroom.start: the front ends are forked
# before, and every module imported before the fork is resident in each of them too.
if TYPE_CHECKING:
    from .imap import ImapService
    from .mailauth.sign import Signer

__all__ = ["COMPONENTS", "BoundListener", "Postroom", "bind_listeners", "bind_admin",
           "catch_stop_signals", "fork_front_ends", "tls_files", "tune_gc", "tune_malloc"]

COMPONENTS = ("smtp", "submission", "conversion", "queue-manager", "local-delivery",
              "outbound-delivery", "admin")
QUEUE_COMPONENTS = ("conversion", "queue-manager", "local-delivery", "outbound-delivery")
LISTENER_COMPONENTS = {"smtp": ("mx",), "submission": ("submission", "submissions")}
# changing these needs a restart: they are bound or forked at start
RESTART_KEYS = (("smtp.listen", lambda c: c.smtp.listen),
                ("smtp.submission", lambda c: c.smtp.submission),
                ("smtp.submissions", lambda c: c.smtp.submissions),
                ("smtp.processes", lambda c: c.smtp.processes),
                ("data_dir", lambda c: c.data_dir),
                ("tls", lambda c: (c.tls.cert_file, c.tls.key_file)),
                ("admin.listen", lambda c: c.admin.listen),
                ("dns.nameservers", lambda c: c.nameservers),
                ("spool", lambda c: c.spool),
                ("node.name", lambda c: c.node),
                ("imap", lambda c: c.imap))

T = TypeVar("T")
log = logging.getLogger("postroom.app")


@dataclass(frozen=True)
class BoundListener:
    kind: str            # "mx" | "submission" | "submissions" | "admin"
    host: str
    port: int

    def describe(self) -> str:
        what = {"mx": "SMTP (MX)", "submission": "submission (STARTTLS + AUTH)",
                "submissions": "submissions (implicit TLS + AUTH)",
                "admin": "admin API and web console (HTTP)",
                "imap": "IMAP (STARTTLS; Dovecot)", "imaps": "IMAPS (implicit TLS; Dovecot)"
                }[self.kind]
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


def bind_admin(config: Config) -> socket.socket | None:
    """The admin API's listening socket (bound before any fork, like the others)."""
    if config.admin.listen is None:
        return None
    host, port = config.admin.listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def tls_files(config: Config) -> tuple[Path, Path]:
    if config.tls.cert_file and config.tls.key_file:
        return config.tls.cert_file, config.tls.key_file
    return ensure_self_signed(config.data_dir / "tls", config.hostname)


BALANCE_PERIOD = 0.1       # seconds between the main process's accept decisions


def should_pause(accepting: bool, share: float, busiest: float) -> bool:
    """Whether the main process should not take SMTP connections for the next period:
    ``share`` is its CPU use in the last one (1.0: a whole core), ``busiest`` its
    busiest front end's, negative when none is alive. It stops while clearly the
    busier one, and starts again once it is the lighter one."""
    if busiest < 0:
        return False
    if accepting:
        return share > 0.2 and share > 1.5 * busiest
    return share > busiest


def converting(stopped: Collection[str]) -> bool:
    """Whether intake converts recipients itself: not while an administrator has stopped
    conversion or the whole queue manager (then mail waits in the conversion queues)."""
    return not {"conversion", "queue-manager"} & set(stopped)


def delivering(stopped: Collection[str]) -> bool:
    """Whether intake delivers plain local recipients itself: not while local delivery
    (or conversion, or the queue manager) is stopped: mail then waits in the queues."""
    return converting(stopped) and "local-delivery" not in stopped


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process; None when gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)                # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3          # glibc's mallopt parameter
MMAP_THRESHOLD = 256 * 1024


def tune_malloc() -> None:
    """Give big buffers back to the kernel when they are freed.

    glibc serves allocations of at least the mmap threshold with their own mappings, but
    raises that threshold (up to 32 MB) each time such a block is freed; after one big
    message, its 1 MiB chunk buffers come from the heap and stay resident (measured: 8 MB
    more RSS per process after three 20 MB messages, and it never went back). A fixed
    threshold keeps the peak at +3 MB and returns to the idle size. Before the front ends
    are forked, which inherit it. Not glibc (musl, macOS): nothing to do."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


GC_THRESHOLD = 20_000      # allocations between young-generation collections (default 700)


def tune_gc() -> None:
    """Collect cycles less often, and never look at what start-up made.

    A message's session, intake and delivery allocate thousands of short-lived objects,
    almost none of them in cycles, so the default young-generation threshold of 700
    ran a collection every few messages for nothing. ``gc.freeze`` moves everything
    imported and built so far into a generation the collector never scans, so a forked
    front end does not copy those pages by touching them either (the ``gc`` module's
    documentation advises it before a fork). Measured on W3-like load, 3 interleaved
    pairs: 821-874 -> 871-911 messages/s, server CPU about 4 % lower; 20,000 beat 5,000
    in 2 more pairs; W6's peak RSS unchanged (91.4 MB)."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 10, 10)


def loop_name() -> str:
    """The event loop ``postroom serve`` runs: uvloop when it is installed (``pip install
    'postroom[fast]'``) unless ``POSTROOM_EVENT_LOOP=asyncio`` says otherwise."""
    if os.environ.get("POSTROOM_EVENT_LOOP", "").lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to its end on the loop :func:`loop_name` names; the log lines of
    that time are written from it, a batch at a time (observability.attach_loop)."""
    async def logged() -> T:
        attach_loop(asyncio.get_running_loop())
        try:
            return await main
        finally:
            attach_loop(None)
    if loop_name() == "uvloop":
        import uvloop
        return uvloop.run(logged())
    return asyncio.run(logged())


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


def _signer(config: Config) -> Signer | None:
    """The config's DKIM keys, loaded (a key that cannot serve: ConfigError); None
    without [[dkim]] tables, and then neither cryptography nor dkimpy is imported (about
    6 MB in every process)."""
    if not config.dkim:
        return None
    from .mailauth.sign import signer_for
    return signer_for(config)


def _stamping(config: Config, signer: Signer | None) -> Stamping | None:
    """DKIM signing and ARC sealing at intake, for this config's keys and networks."""
    if signer is None:
        return None
    from .mailauth.arcseal import Sealer
    networks = RelaySettings(frozenset(), config.trusted_networks, frozenset(), ())

    def trusted(peer: str) -> bool:
        try:
            return trusted_network(peer_address(peer), networks) is not None
        except ValueError:
            return False
    return Stamping(signer, Sealer(signer, config.hostname), trusted, config.aliases)


class Postroom:
    """One process of the server: the listeners, and in the main process the queue."""

    def __init__(self, config: Config, *, listeners: Listeners | None = None,
                 main: bool = True, wake_fd: int = -1, notify_fd: int = -1,
                 children: list[int] | None = None, started: float | None = None,
                 admin_socket: socket.socket | None = None) -> None:
        self.config = config
        self.main = main
        self._admin_socket = admin_socket
        self.admin: Any = None                # admin.AdminServer, in the main process
        self.metrics = Metrics()
        self._since: dict[str, float] = {}
        self._acks = 0
        # before any listener (or forked front end) could write a body file: files older
        # than this that no message names are a crash's leftovers
        self.started = time.time() if started is None else started
        self.listeners: list[BoundListener] = []
        self._sockets = listeners
        self._wake_fd = wake_fd            # main: read end of the front ends' pipe
        self._notify_fd = notify_fd        # front end: write end
        self.children = children or []
        self._servers: list[asyncio.Server] = []
        self._serve: list[Callable[[], Coroutine[Any, Any, asyncio.Server]]] = []
        self._balancer: asyncio.Task[None] | None = None
        self.accepting = True              # main: whether it takes SMTP connections now
        self.accept_changes = 0
        self._stopped = asyncio.Event()
        self._stop: asyncio.Event | None = None     # run_until_signalled waits on it
        self._stop_reason = "on a signal"
        self.imap: ImapService | None = None       # the imap component, when [imap] is on
        self._store_routes: tuple[Any, ...] = ()

    async def start(self) -> list[BoundListener]:
        c = self.config
        signer = _signer(c)         # a key that cannot serve stops the start (ConfigError)
        c.data_dir.mkdir(parents=True, exist_ok=True)
        cert, key = tls_files(c)
        tls = server_context(cert, key)
        self.spool: Spool = open_spool(c.data_dir, c.spool.url)
        await self.spool.start(listen=self.main)
        self.users = UserStore(c.users_path)
        self.store = MaildirStore(c.mail_dir, c.hostname)
        self.events = EventLog(c.data_dir / "events.sqlite3", Levels.from_names(c.logging.levels),
                               archive=c.data_dir / "archive",
                               archive_days=c.logging.archive_days, logs=c.data_dir / "logs",
                               rotate=self.main, retention=c.logging.retention)
        if self.main:
            from .delivery import Agents
            from .delivery.lmtp import LmtpDeliveryAgent
            from .delivery.local import LocalDeliveryAgent
            from .delivery.smtp import SmtpDeliveryAgent
            from .dns import Resolver
            from .imap import ImapService, store_routes
            from .qmgr import QueueManager
        if self.main and c.imap.enabled:
            self.imap = ImapService(c, self.users, cert, key, self.events.emit,
                                    on_back=self._store_back)
            self.store = self.imap.maildir_store()       # the mail owner's files
            self._store_routes = store_routes(c)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="auth")
        self.state = ServerState(
            config=c, spool=self.spool, mailbox_exists=self.users.exists,
            verify_password=self.users.verify, tls=tls, executor=self.executor,
            metrics=self.metrics, events=self.events)
        self.state.intake.stamping = _stamping(c, signer)
        loop = asyncio.get_running_loop()
        if self.main:
            self.resolver = Resolver(c.nameservers)
            self.agent = SmtpDeliveryAgent(self.resolver, c.hostname, c.delivery)
            self.lmtp = LmtpDeliveryAgent(c.hostname, c.delivery)
            self.local = LocalDeliveryAgent(self.store, self.users.exists, c.aliases,
                                            ThreadPoolExecutor(4, "local-delivery"))
            agents = Agents({"local": self.local, "mx": self.agent, "smarthost": self.agent,
                             "lmtp": self.lmtp})
            self.qmgr = QueueManager(
                self.spool, agents, local_domains=frozenset(c.local_domains),
                aliases=c.aliases, delivery=c.delivery, routes=c.routes + self._store_routes,
                hostname=c.hostname,
                started=self.started, metrics=self.metrics, events=self.events,
                owner=c.node, lease=c.spool.lease_seconds, node_info={
                    "pid": os.getpid(), "started": self.started, "version": __version__,
                    "hostname": c.hostname,
                    "spool": c.spool.redacted_url or "sqlite"})
            self.qmgr.signer = signer
            self.metrics.watch_queues(lambda: [(q.name, q.messages, q.recipients)
                                               for q in self.spool.summary()])
            if self._wake_fd >= 0:
                loop.add_reader(self._wake_fd, self._woken)
        elif self._notify_fd >= 0:
            self.spool.on_commit(self._notify)
        if not c.imap.enabled:
            # plain local recipients go into their Maildirs at intake (direct.py), in
            # every process; with Dovecot the Maildirs are its mail owner's
            from .delivery.local import LocalDeliveryAgent as Local
            from .direct import DirectDelivery
            from .syncer import Syncer
            if not self.main:
                self.local = Local(self.store, self.users.exists, c.aliases,
                                   ThreadPoolExecutor(4, "local-delivery"))
            self.syncer = Syncer()
            self.state.intake.deliver_here = DirectDelivery(
                self.local, self.syncer, self.metrics, self.events)
        sockets = self._sockets if self._sockets is not None else bind_listeners(c)
        # the main process with front ends serves SMTP from copies of the listening
        # sockets, so that the balancer can stop and resume its accepting
        balanced = self.main and bool(self.children)
        try:
            for kind, sock in sockets:
                implicit = kind == "submissions"

                def serve(kind: str = kind, sock: socket.socket = sock,
                          implicit: bool = implicit) -> Coroutine[Any, Any, asyncio.Server]:
                    return loop.create_server(
                        lambda: Session(self.state, kind, implicit),
                        sock=sock.dup() if balanced else sock, ssl=tls if implicit else None,
                        backlog=1024)
                self._servers.append(await serve())
                self._serve.append(serve)
                addr = sock.getsockname()
                self.listeners.append(BoundListener(kind, addr[0], addr[1]))
        except OSError:
            await self.stop()
            raise
        if balanced:
            self._balancer = loop.create_task(self._balance(), name="balance")
        if self.main:
            self.qmgr.start()
            admin_sock = self._admin_socket
            if admin_sock is None and c.admin.listen is not None and self._sockets is None:
                admin_sock = bind_admin(c)           # in-process use: bind it here
            if admin_sock is not None:
                # imported here: the front ends never load the web stack
                from .admin import AdminServer, make_app
                token = ensure_token(c.token_path)
                events = self.events

                def console(api: Any) -> Any:          # the web console, on the same port
                    from .console import build
                    return build(api, token, events)
                self.admin = AdminServer(make_app(self, token, console), admin_sock)
                self.admin.start()
                addr = admin_sock.getsockname()
                self.listeners.append(BoundListener("admin", addr[0], addr[1]))
            if self.imap is not None:
                await self.imap.start()
                if self.imap.state == "running":
                    self.listeners += [BoundListener(*b) for b in self.imap.listeners()]
        now = time.time()
        self._since = {name: now for name in COMPONENTS}
        if self.main:
            self.events.emit(1001, f"Postroom started (pid {os.getpid()}, "
                             f"processes={c.smtp.processes}, data in {c.data_dir}): "
                             + ", ".join(f"{b.kind}={b.host}:{b.port}" for b in self.listeners))
        log.info("postroom %s started (pid %d, %s loop): %s",
                 "main" if self.main else "front end", os.getpid(),
                 type(asyncio.get_running_loop()).__module__.split(".")[0],
                 ", ".join(f"{b.kind}={b.host}:{b.port}" for b in self.listeners))
        return self.listeners

    async def _balance(self) -> None:
        """Main process with front ends: stop taking SMTP connections while this process
        works clearly harder than its busiest front end, and take them again once it
        does not.

        The main process serves its share of the connections *and* runs the whole queue
        (conversion, delivery, results): in W2 it used three times a front end's CPU and
        set the pace while the front end idled. Connections it does not accept wait in
        the shared listening socket's backlog for a front end, which accepts them. CPU
        shares are read every BALANCE_PERIOD from /proc (this process's threads
        included); with no live front end, it always accepts."""
        clock = time.monotonic
        last = clock()
        mine = time.process_time()
        theirs = {pid: _cpu_seconds(pid) for pid in self.children}
        while True:
            await asyncio.sleep(BALANCE_PERIOD)
            now, cpu = clock(), time.process_time()
            span = max(now - last, 1e-3)
            share = (cpu - mine) / span
            busiest = -1.0
            for pid in self.children:
                seconds = _cpu_seconds(pid)
                if seconds is not None:
                    before = theirs.get(pid)
                    busiest = max(busiest, 0.0 if before is None else (seconds - before) / span)
                theirs[pid] = seconds
            last, mine = now, cpu
            pause = should_pause(self.accepting, share, busiest)
            if pause == self.accepting:
                await self._accept(not pause)

    async def _accept(self, on: bool) -> None:
        if on:
            self._servers = [await serve() for serve in self._serve]
        else:
            for server in self._servers:
                server.close()
        self.accepting = on
        self.accept_changes += 1

    def _woken(self) -> None:
        try:
            while data := os.read(self._wake_fd, 4096):
                self._acks += data.count(b"A")      # a front end applied control.json
        except BlockingIOError:
            pass
        self.qmgr.wake()

    def _notify(self) -> None:
        try:
            os.write(self._notify_fd, b"!")
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):   # a full pipe is awake
                raise

    # --- components (the admin API's status, stop, start, restart, reload) ----------
    def status(self) -> list[dict[str, Any]]:
        kinds = {b.kind for b in self.listeners}
        out = []
        for name in COMPONENTS:
            if name in LISTENER_COMPONENTS:
                if not kinds & set(LISTENER_COMPONENTS[name]):
                    state = "disabled"
                else:
                    state = "stopped" if name in self.state.stopped else "running"
            elif name == "admin":
                state = "running" if self.admin is not None else "disabled"
            else:
                state = "stopped" if name in self.qmgr.stopped else "running"
                if name == "outbound-delivery" and state == "stopped" and \
                        self.qmgr.outbound_in_flight:
                    state = "stopping"
            item: dict[str, Any] = {"name": name, "state": state,
                                    "since": self._since.get(name)}
            if name in ("conversion", "local-delivery", "outbound-delivery") and \
                    "queue-manager" in self.qmgr.stopped and state == "running":
                item["note"] = "idle: queue-manager is stopped"
            out.append(item)
        if self.imap is not None:
            out.append(self.imap.status())
        return out

    async def component(self, name: str, action: str) -> dict[str, Any]:
        if name == "imap":
            return await self._imap_action(action)
        if name not in COMPONENTS:
            raise ComponentError(f"no component {name!r}: the components are "
                                 f"{', '.join(COMPONENTS)}")
        if action not in ("stop", "start", "restart"):
            raise ComponentError(f"unknown action {action!r}: use stop, start or restart")
        if name == "admin":
            raise ComponentError("the admin API cannot stop itself (nothing could start it "
                                 "again); stop the whole server with 'postroom stop' (no "
                                 "component) or SIGTERM instead")
        before = next(c["state"] for c in self.status() if c["name"] == name)
        if before == "disabled":
            raise ComponentError(f"{name} has no listener in the configuration")
        stopped = self.state.stopped if name in LISTENER_COMPONENTS else self.qmgr.stopped
        if action in ("stop", "restart"):
            stopped.add(name)
        if action in ("start", "restart"):
            stopped.discard(name)
        if name in LISTENER_COMPONENTS:
            await self._tell_front_ends()
        else:
            if name in ("conversion", "queue-manager", "local-delivery"):
                self.state.intake.converting = converting(self.qmgr.stopped)
                self.state.intake.delivering = delivering(self.qmgr.stopped)
                await self._tell_front_ends()
            self.qmgr.wake()
        after = next(c for c in self.status() if c["name"] == name)
        if after["state"] != before or action == "restart":
            self._since[name] = time.time()
            after["since"] = self._since[name]
        log.warning("component %s: %s (was %s, now %s)", name, action, before, after["state"])
        self.events.emit(1005, f"{name}: {action} (was {before}, now {after['state']})")
        return after

    async def _imap_action(self, action: str) -> dict[str, Any]:
        if self.imap is None:
            raise ComponentError("imap is off: set [imap] enabled = true and restart the "
                                 "server (docs/store.md)")
        if action not in ("stop", "start", "restart"):
            raise ComponentError(f"unknown action {action!r}: use stop, start or restart")
        before = self.imap.state
        after = await self.imap.action(action)
        log.warning("component imap: %s (was %s, now %s)", action, before, after["state"])
        self.events.emit(1005, f"imap: {action} (was {before}, now {after['state']})")
        return after

    async def _store_back(self) -> None:
        """Dovecot is running again: with LMTP delivery, local mail waiting for it goes now."""
        if self._store_routes:
            from .spool.views import act
            await act(self.spool, "retry", Filters(queue="inbound-delivery", held=False),
                      time.time(), who="the imap component (Dovecot is back)")
            self.qmgr.retry_now()

    async def store_check(self) -> dict[str, Any]:
        """The store's health for doctor (``/api/store``)."""
        if self.imap is None:
            return {"enabled": False, "problems": [], "summary": "[imap] enabled is false"}
        return await self.imap.check()

    def retry_now(self) -> None:
        self.qmgr.retry_now()

    async def submit_local(self, sender: str, recipients: list[str], data: bytes,
                           user: str) -> dict[str, Any]:
        """``postroom sendmail``: a message from a program on this host, trusted like an
        authenticated submission. Raises ValueError with the reason for the caller."""
        c = self.config
        try:
            env_sender = parse_path(f"<{sender}>", allow_null=True, utf8=True)
            rcpts = [parse_path(f"<{r}>", allow_null=False, utf8=True) for r in recipients]
        except AddressError as exc:
            raise ValueError(f"bad address: {exc}") from None
        if not rcpts:
            raise ValueError("no recipients (give them as arguments, or use -t)")
        if len(data) > c.smtp.max_message_size:
            raise ValueError(f"the message is {len(data)} bytes; [smtp] max_message_size "
                             f"is {c.smtp.max_message_size}")
        who = SessionSnapshot(ipaddress.ip_address("127.0.0.1"), "submission", True,
                              f"local:{user}")
        for rcpt in rcpts:
            verdict = check_rcpt(who, rcpt, self.state.relay, self.users.exists)
            if not verdict.accept:
                raise ValueError(f"<{rcpt}>: {verdict.reply}")
        message = await self.state.intake.queue(Submission(
            env_sender, [(r, {}) for r in rcpts], data, "127.0.0.1", "localhost", "local",
            "local", auth=f"local:{user}", session="sendmail"))
        return {"queue_id": message.queue_id, "recipients": [r.address for r in message.recipients]}

    async def set_logging(self, category: str, level: str, peer: str = "",
                    domain: str = "") -> dict[str, Any]:
        """Change a category's level (or all), at once, in every process."""
        self.events.levels.set(category, level, peer=peer, domain=domain)
        scope = f" for peer {peer}" if peer else f" for domain {domain}" if domain else ""
        self.events.emit(1006, f"diagnostic logging: {category} set to {level}{scope}")
        log.warning("diagnostic logging: %s set to %s%s", category, level, scope)
        await self._tell_front_ends()
        return self.events.levels.as_json()

    def _control_path(self) -> Path:
        return self.config.data_dir / "control.json"

    async def _tell_front_ends(self) -> None:
        """Front ends read which listeners are stopped, and the logging levels, from
        control.json on SIGUSR1, and acknowledge through the wake pipe; this returns
        once every one has (or after two seconds), so that the change is in force
        everywhere when the command returns."""
        if not self.children:
            return
        target = self._acks + len(self.children)
        tmp = self._control_path().with_suffix(".tmp")
        tmp.write_text(json.dumps({"stopped": sorted(self.state.stopped),
                                   "queue_stopped": sorted(self.qmgr.stopped),
                                   "levels": self.events.levels.as_json()}))
        os.replace(tmp, self._control_path())
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        for _ in range(200):
            if self._acks >= target:
                return
            await asyncio.sleep(0.01)
        log.warning("not every front end acknowledged the change within 2 s")

    def _read_control(self) -> None:
        try:
            control = json.loads(self._control_path().read_text())
            stopped = control.get("stopped", [])
            self.state.intake.converting = converting(control.get("queue_stopped", []))
            self.state.intake.delivering = delivering(control.get("queue_stopped", []))
            if "levels" in control:
                self.events.levels = Levels.from_json(control["levels"])
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s: %s", self._control_path(), exc)
            return
        self.state.stopped.clear()
        self.state.stopped.update(n for n in stopped if n in LISTENER_COMPONENTS)
        if self._notify_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._notify_fd, b"A")

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file; an invalid one raises ConfigError and changes nothing."""
        path = Path(self.config.source)
        try:
            new = load(path)
        except ConfigError as exc:
            self.events.emit(1004, f"reload of {path} refused: {exc}")
            raise
        old = self.config
        restart = [key for key, get in RESTART_KEYS if get(old) != get(new)]
        self._apply(new)
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        self.events.emit(1003, f"configuration reloaded from {path}" + (
            f"; needs a restart to change: {', '.join(restart)}" if restart else ""))
        log.warning("configuration reloaded from %s%s", path,
                    f"; needs a restart to change: {', '.join(restart)}" if restart else "")
        return {"reloaded": str(path), "needs_restart": restart,
                "warnings": [str(w) for w in new.warnings()]}

    def _apply(self, new: Config) -> None:
        signer = _signer(new)           # ConfigError: the reload is refused, nothing changed
        self.config = new
        self.state.apply(new)
        self.state.intake.stamping = _stamping(new, signer)
        if hasattr(self, "local"):
            self.local.aliases = new.aliases
        if self.main:
            q = self.qmgr
            q.local_domains = frozenset(new.local_domains)
            q.aliases = new.aliases
            if self.imap is not None:     # [imap] itself changes only with a restart
                from .imap import store_routes
                self._store_routes = store_routes(replace(new, imap=self.imap.config.imap))
            q.routes = new.routes + self._store_routes
            q.delivery = new.delivery
            q.hostname = new.hostname
            q.signer = signer
            for agent in (self.agent, self.lmtp):
                agent.config = new.delivery
                agent.hostname = new.hostname
            q.wake()

    async def _sighup(self) -> None:
        try:
            await self.reload()
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)

    def _reload_front_end(self) -> None:
        try:
            new = load(Path(self.config.source))
        except ConfigError as exc:
            log.error("front end %d keeps its configuration: %s", os.getpid(), exc)
            return
        self._apply(new)
        log.info("front end %d reloaded its configuration", os.getpid())

    async def stop(self) -> None:
        """Stop accepting, end sessions with 421, finish the current queue round."""
        if self._balancer is not None:
            self._balancer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._balancer
        if self.admin is not None:
            await self.admin.stop()
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
        if hasattr(self, "agent"):
            await self.agent.close()             # QUIT the idle outbound connections
        if hasattr(self, "local"):
            self.local.executor.shutdown(wait=True)
        if hasattr(self, "syncer"):
            self.syncer.close()              # waits for the fsyncs in flight
        if self.imap is not None:
            await self.imap.stop()
        await self._reap_children()
        if hasattr(self, "spool"):
            await self.spool.aclose()
        if hasattr(self, "users"):
            self.users.close()
        if hasattr(self, "events"):
            self.events.close()
        if hasattr(self, "executor"):
            self.executor.shutdown(wait=False)
        log.info("postroom stopped (accepting changed %d times)", self.accept_changes)
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

    def request_stop(self, reason: str) -> None:
        """Stop the whole server as SIGTERM does ('postroom stop' through the admin API),
        once the caller has answered: the stop begins at the loop's next turn."""
        if self._stop is None or not self.main:
            raise ComponentError("this server was not started by 'postroom serve': stop it "
                                 "the way it was started")
        self._stop_reason = reason
        asyncio.get_running_loop().call_soon(self._stop.set)

    async def run_until_signalled(self, on_started: object = None) -> None:
        loop = asyncio.get_running_loop()
        stop = self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if not self.main:
            loop.add_signal_handler(signal.SIGUSR1, self._read_control)
            loop.add_signal_handler(signal.SIGHUP, self._reload_front_end)
        else:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._sighup()))
        if _stop_requested:
            stop.set()
        await self.start()
        if callable(on_started):
            on_started(self.listeners)
        await stop.wait()
        log.info("stopping %s", self._stop_reason)
        if self.main and hasattr(self, "events"):
            self.events.emit(1002, f"Postroom (pid {os.getpid()}) is stopping "
                             f"{self._stop_reason}")
        await self.stop()
