"""The imap component: Dovecot as a supervised child of the main process.

States (``postroom status``): ``starting``; ``running``; ``stopped`` (by an
administrator); ``restarting`` (it died or could not start, and is tried again after
1, 2, 4 ... up to 60 seconds; the note says why and when); ``failed`` (it cannot start
until an administrator fixes what the note says: the data directory's path, the mail
owner's access, the files; ``postroom start imap`` then tries again); ``not-installed``
(the note says what to install). Nothing else in Postroom waits for it: mail is accepted and
delivered to the Maildirs while Dovecot is down (with ``delivery = "lmtp"`` it waits in
the queue, and is retried at once when Dovecot is back).

- **Start**: the files of :mod:`.dovecot` are written, the Maildirs adopted
  (:mod:`.owner`), then ``dovecot -F -c <data_dir>/imap/dovecot.conf`` runs in its own
  session (a Ctrl-C on the terminal is Postroom's to handle), under ``setpriv
  --pdeathsig TERM`` where there is one, so that it goes when Postroom dies. It counts
  as running once its IMAP port answers. A Dovecot left running by a Postroom that was
  killed is stopped first (found by its ``master.pid`` and its config file).
- **Users**: every quarter of a second the user store's signature is compared; on a
  change the passwd-file is rewritten and Dovecot is told to reload (SIGHUP). Dovecot's
  passwd-file driver looks at the file at most once a second, so without the reload a
  login in the same second as the change could miss it.
- **Supervision**: an exit that nobody asked for is event 5004, with the exit status
  and the last errors of Dovecot's log; the next start that works is event 5005. Sixty
  seconds of running forget earlier failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..config import Config, Route
from ..users import UserStore
from . import check
from .dovecot import Installation, Layout, find_dovecot, render_config
from .owner import OwnedMaildirStore, Owner, adopt, mail_owner
from .passwd import read_passwd, write_passwd

__all__ = ["ImapService", "store_routes"]

log = logging.getLogger("postroom.imap")

BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 60.0)
HEALTHY_AFTER = 60.0
READY_TIMEOUT = 15.0
USERS_POLL = 0.25
STOP_TIMEOUT = 10.0


def store_routes(config: Config) -> tuple[Route, ...]:
    """With ``[imap] delivery = "lmtp"``: one ``lmtp`` route per local domain, to this
    Dovecot's LMTP socket, after the file's own routes (a route the administrator wrote
    for a domain comes first). Their ``index`` follows the file's."""
    imap = config.imap
    if not (imap.enabled and imap.delivery == "lmtp"):
        return ()
    socket = str(Layout(config.data_dir / "imap").lmtp_socket)
    first = len(config.routes)
    return tuple(Route(domain, "lmtp", tls="none", port=0, index=first + i, path=socket)
                 for i, domain in enumerate(config.local_domains))


def _maildirs(credentials: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for address, _ in credentials:
        local, _, domain = address.rpartition("@")
        if local and domain and "/" not in address and not local.startswith("."):
            out.append((domain, local))
    return out


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} ({-code})"
    return f"exited with status {code}"


class ImapService:
    """Dovecot as a child: started, watched, restarted, kept in step with the users."""

    def __init__(self, config: Config, users: UserStore, cert: Path, key: Path,
                 emit: Callable[[int, str], Any], *,
                 on_back: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.config = config
        self.layout = Layout(config.data_dir / "imap")
        self.users = users
        self.cert, self.key = cert, key
        self.emit = emit
        self.on_back = on_back              # Dovecot is running again after a failure
        self.install: Installation = find_dovecot()
        self.owner: Owner = mail_owner(config.mail_dir)
        self.state = "starting"
        self.note = ""
        self.fix = ""
        self.since = time.time()
        self.proc: asyncio.subprocess.Process | None = None
        self._want = True                    # the administrator's wish
        self._expected_exit = False          # we are stopping it
        self._closing = False
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._users_task: asyncio.Task[None] | None = None
        self._synced: tuple[int, ...] | None = None
        self._settle = 0.0
        self._sync_error = ""
        self._sync_lock = threading.Lock()      # the start and the watcher both write
        self._log_marks: dict[Path, int] = {}   # where Dovecot's output stood at the start
        self._back: asyncio.Task[None] | None = None

    # --- the store that Postroom's own Maildir deliveries write through ----------------
    def maildir_store(self) -> OwnedMaildirStore:
        return OwnedMaildirStore(self.config.mail_dir, self.config.hostname, self.owner)

    def listeners(self) -> list[tuple[str, str, int]]:
        """(kind, host, port) of what Dovecot listens on, for the start-up message."""
        imap = self.config.imap
        out = [("imap", *imap.listen)]
        if imap.listen_tls is not None:
            out.append(("imaps", *imap.listen_tls))
        return out

    # --- life cycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Start the supervisor, and wait for the first attempt to end (running or not)."""
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="imap")
        self._users_task = loop.create_task(self._watch_users(), name="imap-users")
        await self._until(lambda: self.state != "starting", READY_TIMEOUT + 5)

    async def stop(self) -> None:
        self._closing = True
        self._want = False
        self._wake.set()
        await self._terminate()
        for task in (self._task, self._users_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def status(self) -> dict[str, Any]:
        item: dict[str, Any] = {"name": "imap", "state": self.state, "since": self.since}
        if self.note:
            item["note"] = self.note
        if self.fix:
            item["fix"] = self.fix
        return item

    async def action(self, action: str) -> dict[str, Any]:
        if action in ("stop", "restart"):
            self._want = False
            self._wake.set()
            await self._terminate()
            await self._until(lambda: self.state == "stopped", 5)
        if action in ("start", "restart"):
            self._want = True
            self._set("starting")
            self._wake.set()
            await self._until(lambda: self.state != "starting", READY_TIMEOUT + 5)
        return self.status()

    # --- the supervisor ------------------------------------------------------------------
    def _set(self, state: str, note: str = "", fix: str = "") -> None:
        if state != self.state:
            self.since = time.time()
        self.state, self.note, self.fix = state, note, fix
        self._changed.set()

    async def _until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())

    async def _sleep(self, seconds: float | None) -> None:
        """Until ``seconds`` pass or an administrator's action wakes the supervisor (a
        wake-up since the start of this round counts)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _run(self) -> None:
        failures = 0
        down_since = 0.0
        while not self._closing:
            self._wake.clear()
            if not self._want:
                self._set("stopped")
                failures = 0
                await self._sleep(None)
                continue
            self.install = find_dovecot()
            missing = self.install.missing(self.config.imap.delivery)
            if missing:
                self._set("not-installed", f"Dovecot is not installed: {missing}", missing)
                await self._sleep(None)          # 'postroom start imap' looks again
                continue
            self._set("starting")
            reason, lasting = await self._start_once()
            if lasting:
                # a retry cannot help: say it once, and wait for 'postroom start imap'
                self.emit(5004, f"Dovecot (IMAP) cannot start: {reason}; fix it, then: "
                          "postroom start imap")
                log.error("Dovecot cannot start: %s", reason)
                self._set("failed", reason, "fix that, then: postroom start imap")
                failures = 0
                await self._sleep(None)
                continue
            if not reason:
                if failures:
                    self.emit(5005, f"Dovecot (IMAP) is running again (pid {self._pid()}), "
                              f"{time.monotonic() - down_since:.0f} s after it went down "
                              f"({failures} attempt{'s' if failures > 1 else ''})")
                    log.warning("Dovecot is running again (pid %s)", self._pid())
                    if self.on_back is not None:
                        self._back = asyncio.get_running_loop().create_task(
                            self._run_back(self.on_back), name="imap-back")
                self._set("running", f"pid {self._pid()}")
                up = time.monotonic()
                code = await self._wait_exit()
                if code is None:                     # stopped by an administrator
                    continue
                if time.monotonic() - up >= HEALTHY_AFTER:
                    failures = 0
                reason = f"it {_exit_text(code)}" + self._log_errors()
            if not failures:
                down_since = time.monotonic()
            failures += 1
            delay = BACKOFF[min(failures, len(BACKOFF)) - 1]
            text = (f"Dovecot (IMAP) is down: {reason}; restarting in {delay:.0f} s "
                    f"(attempt {failures})")
            self.emit(5004, text)
            log.error("%s", text)
            self._set("restarting", f"{reason}; next try in {delay:.0f} s",
                      f"read {self.layout.log}; postroom restart imap tries again at once")
            await self._sleep(delay)

    @staticmethod
    async def _run_back(on_back: Callable[[], Awaitable[Any]]) -> None:
        try:
            await on_back()
        except Exception:          # the store is up; a failed retry only waits longer
            log.exception("after Dovecot came back")

    def _pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def _start_once(self) -> tuple[str, bool]:
        """Prepare and start Dovecot: ("", False) once it listens, else why it did not
        and whether that lasts (the data directory, the files, the mail owner: only an
        administrator can fix those, and trying again every minute would not)."""
        layout_problem = self.layout.problem()
        if layout_problem:
            return layout_problem, True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._prepare)
        except (OSError, ValueError, LookupError) as exc:
            return f"cannot prepare its files: {exc}", True
        assert self.install.dovecot is not None
        command = [self.install.dovecot, "-F", "-c", str(self.layout.config)]
        setpriv = shutil.which("setpriv", path="/usr/bin:/bin")
        if setpriv:
            command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        self._expected_exit = False
        self._log_marks = {}
        for path in (self.layout.out, self.layout.log):
            with contextlib.suppress(OSError):
                self._log_marks[path] = path.stat().st_size
        fd = os.open(self.layout.out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(fd, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.returncode is not None:
                code = self.proc.returncode
                self.proc = None
                return f"it {_exit_text(code)} at start" + self._log_errors(), False
            if await self._listening():
                return "", False
            if time.monotonic() > deadline:
                await self._terminate()
                return (f"it did not listen on {self._where()} within {READY_TIMEOUT:.0f} s"
                        + self._log_errors(), False)
            await asyncio.sleep(0.05)

    def _where(self) -> str:
        host, port = self.config.imap.listen
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def _listening(self) -> bool:
        host, port = self.config.imap.listen
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        if self.config.imap.delivery == "lmtp":
            return self.layout.lmtp_socket.exists()
        return True

    def _prepare(self) -> None:
        """In a worker thread: Dovecot's folders and files, the Maildirs adopted."""
        layout = self.layout
        for folder in (layout.root, layout.state_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._stop_stale()
        self.owner = mail_owner(self.config.mail_dir)
        self._sync_users(force=True)
        text = render_config(self.config, layout, self.owner, self.cert, self.key)
        tmp = layout.config.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o600)
        os.replace(tmp, layout.config)
        problems = check.reach_problems(self.config.mail_dir, self.owner)
        if problems:
            raise OSError(f"{problems[0]['finding']}; fix: {problems[0]['fix']}")

    def _stop_stale(self) -> None:
        """A Dovecot on our config that a killed Postroom left behind holds our ports."""
        try:
            pid = int(self.layout.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if str(self.layout.config).encode() not in cmdline.split(b"\0"):
            return
        log.warning("stopping Dovecot %d, left running by an earlier Postroom", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    async def _wait_exit(self) -> int | None:
        """Until Dovecot exits: its status, or None when we stopped it."""
        proc = self.proc
        assert proc is not None
        code = await proc.wait()
        self.proc = None
        return None if self._expected_exit else code

    async def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        self._expected_exit = True
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("Dovecot did not stop within %.0f s; killing it", STOP_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    def _log_errors(self) -> str:
        """The last error lines Dovecot wrote since it was started (its log, or its output
        before the log was open)."""
        lines: list[str] = []
        for path in (self.layout.out, self.layout.log):
            try:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(self._log_marks.get(path, 0), f.tell() - 16384))
                    tail = f.read().decode(errors="replace").splitlines()
            except OSError:
                continue
            lines += [ln for ln in tail if "Fatal:" in ln or "Error:" in ln]
        return (": " + " | ".join(ln.strip()[-300:] for ln in lines[-2:])) if lines else ""

    # --- users ---------------------------------------------------------------------------
    def _sync_users(self, force: bool = False) -> bool:
        """Rewrite the passwd-file when the user store changed; True when it did."""
        with self._sync_lock:
            sig = self.users.signature()
            if sig == self._synced and not force:
                return False
            credentials = self.users.credentials()
            write_passwd(self.layout.passwd, credentials)
            adopt(self.config.mail_dir, self.owner, _maildirs(credentials))
            self._synced = sig
            return True

    async def _watch_users(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(USERS_POLL)
            try:
                if self.users.signature() != self._synced and self._synced is not None:
                    if await loop.run_in_executor(None, self._sync_users):
                        self._reload()
                        # 'users add' makes the Maildir after it adds the user: look again
                        self._settle = time.monotonic() + 1.0
                elif self._settle and time.monotonic() > self._settle:
                    self._settle = 0.0
                    credentials = await loop.run_in_executor(None, self.users.credentials)
                    await loop.run_in_executor(None, adopt, self.config.mail_dir, self.owner,
                                               _maildirs(credentials))
                self._sync_error = ""
            except (OSError, LookupError) as exc:
                if str(exc) != self._sync_error:
                    log.error("cannot bring Dovecot's users in step: %s", exc)
                    self._sync_error = str(exc)

    def _reload(self) -> None:
        """Dovecot reads the passwd-file afresh (new auth processes; sessions stay)."""
        if self.proc is not None and self.state == "running":
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGHUP)

    # --- doctor --------------------------------------------------------------------------
    async def check(self) -> dict[str, Any]:
        """The store's health, each problem with its fix (``postroom doctor``)."""
        loop = asyncio.get_running_loop()
        problems: list[dict[str, str]] = []
        if self.state != "running":
            problems.append(check.problem(
                "imap-down", f"Dovecot (the imap component) is {self.state}"
                + (f": {self.note}" if self.note else ""),
                self.fix or "postroom start imap"))
        credentials = await loop.run_in_executor(None, self.users.credentials)
        in_file = await loop.run_in_executor(None, read_passwd, self.layout.passwd)
        known = await self._dovecot_users() if self.state == "running" else None
        problems += check.login_problems(credentials, in_file, known, self.layout.passwd)
        problems += check.reach_problems(self.config.mail_dir, self.owner)
        maildirs, seen = await loop.run_in_executor(
            None, check.maildir_problems, self.config.mail_dir, self.owner)
        problems += maildirs
        return {"enabled": True, "state": self.state, "owner": {
                    "uid": self.owner.uid, "gid": self.owner.gid, "name": self.owner.name},
                "users": len(credentials), "entries_checked": seen,
                "dovecot_users": None if known is None else len(known),
                "problems": problems, "summary": check.summary(problems)}

    async def _dovecot_users(self) -> set[str] | None:
        """The users Dovecot itself lists, or None if doveadm cannot say."""
        if self.install.doveadm is None:
            return None
        try:
            proc = await asyncio.create_subprocess_exec(
                self.install.doveadm, "-c", str(self.layout.config), "user", "*",
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            out, _ = await asyncio.wait_for(proc.communicate(), 10)
        except (OSError, TimeoutError):
            return None
        if proc.returncode != 0:
            return None
        return {line.strip() for line in out.decode(errors="replace").splitlines()
                if line.strip()}
