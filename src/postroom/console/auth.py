"""Who may use the console: login throttling, sessions behind an HttpOnly, SameSite=Strict
cookie, the CSRF token of every form, the login page's own token, and safe redirects."""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

__all__ = ["COOKIE", "LOGIN_COOKIE", "Session", "SessionStore", "Throttle", "csrf_ok",
           "login_token", "login_token_ok", "safe_next", "same_origin"]

COOKIE = "postroom_console"
LOGIN_COOKIE = "postroom_login"


@dataclass
class Session:
    user: str
    csrf: str
    created: float
    seen: float
    flash: list[tuple[str, str]] = field(default_factory=list)
    checked: float = 0.0          # when the account was last seen to be an admin


class Throttle:
    """Failed logins per client address: after LIMIT failures within WINDOW seconds,
    logins from that address are refused, even with the right password, until the oldest
    failure leaves the window. Per address, as Dovecot's auth penalty and Postfix's anvil
    count: a lock per account would let anyone lock the administrator out."""

    LIMIT = 5
    WINDOW = 900.0

    def __init__(self) -> None:
        self.failures: dict[str, collections.deque[float]] = {}
        self.refused: dict[str, float] = {}

    def _recent(self, key: str, now: float) -> collections.deque[float]:
        q = self.failures.setdefault(key, collections.deque())
        while q and q[0] <= now - self.WINDOW:
            q.popleft()
        return q

    def wait(self, keys: list[str], now: float) -> float:
        """Seconds until a login may be tried again (0: now)."""
        longest = 0.0
        for key in keys:
            q = self._recent(key, now)
            if len(q) >= self.LIMIT:
                longest = max(longest, q[len(q) - self.LIMIT] + self.WINDOW - now)
        return longest

    def fail(self, keys: list[str], now: float) -> None:
        for key in keys:
            self._recent(key, now).append(now)
        if len(self.failures) > 10000:           # forget keys with nothing recent
            for key in [k for k, q in self.failures.items() if not q or q[-1] <= now - self.WINDOW]:
                del self.failures[key]
            for key in [k for k, t in self.refused.items() if t <= now - self.WINDOW]:
                del self.refused[key]

    def succeed(self, keys: list[str]) -> None:
        for key in keys:
            self.failures.pop(key, None)
            self.refused.pop(key, None)

    def note_refusal(self, keys: list[str], now: float) -> bool:
        """True the first time a refusal is noted for these keys within the window (so
        that a flood of refused logins is one event, not one each)."""
        fresh = [k for k in keys if k not in self.refused
                 or now - self.refused[k] > self.WINDOW]
        for k in fresh:
            self.refused[k] = now
        return bool(fresh)


class SessionStore:
    """The logged-in sessions, by a hash of their cookie (the cookie itself is kept by the
    browser only)."""

    IDLE = 3600.0            # an hour without a request ends a session
    MAX = 12 * 3600.0        # and twelve hours in all

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}

    @staticmethod
    def _key(cookie: str) -> str:
        return hashlib.sha256(cookie.encode()).hexdigest()

    def _expired(self, s: Session, now: float) -> bool:
        return now - s.seen > self.IDLE or now - s.created > self.MAX

    def get(self, request: Request) -> Session | None:
        """The request's session, if it has a live one (which counts as its use)."""
        cookie = request.cookies.get(COOKIE, "")
        if not cookie:
            return None
        key = self._key(cookie)
        s = self.sessions.get(key)
        now = time.time()
        if s is None or self._expired(s, now):
            self.sessions.pop(key, None)
            return None
        s.seen = now
        return s

    def start(self, user: str, response: Response, secure: bool) -> None:
        """A new session for ``user``, its cookie set on ``response``."""
        now = time.time()
        for k in [k for k, s in self.sessions.items() if self._expired(s, now)]:
            del self.sessions[k]
        cookie = secrets.token_urlsafe(32)
        self.sessions[self._key(cookie)] = Session(user, secrets.token_urlsafe(24), now, now)
        response.set_cookie(COOKIE, cookie, httponly=True, samesite="strict", secure=secure,
                            path="/")

    def end(self, request: Request) -> None:
        """Ends the request's session (logout)."""
        self.sessions.pop(self._key(request.cookies.get(COOKIE, "")), None)

    def end_user(self, user: str, keep: Session | None = None) -> None:
        """Ends every session of ``user`` (but ``keep``)."""
        for k in [k for k, s in self.sessions.items() if s.user == user and s is not keep]:
            del self.sessions[k]


def same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:           # not sent: the CSRF token alone decides
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def csrf_ok(request: Request, s: Session, given: str) -> bool:
    """Whether a form (or fetch) sent the session's CSRF token, from a console page."""
    return bool(given) and hmac.compare_digest(given.encode(), s.csrf.encode()) and \
        same_origin(request)


def login_token(response: Response, nonce: str, secure: bool) -> None:
    """The login form's token (there is no session yet): ``nonce`` is in the form, and in
    a cookie only the login page gets."""
    response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict",
                        secure=secure, path="/login", max_age=3600)


def login_token_ok(request: Request, given: str) -> bool:
    """Whether a login was sent from the console's login page: the form's token matches
    its cookie."""
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    return bool(nonce) and hmac.compare_digest(nonce.encode(), given.encode()) and \
        same_origin(request)


def safe_next(value: str | None) -> str:
    """Only a path on this console, never another site (an open redirect)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value
