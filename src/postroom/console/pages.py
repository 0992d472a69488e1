"""The console's pages: the :class:`Console`, whose handlers each call the admin API and
render a template, behind the login and CSRF checks of ``auth``."""

from __future__ import annotations

import logging
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..events import CATALOGUE, CATEGORIES, LEVELS, SEVERITIES, EventLog
from ..spool import ACTIONS, QUEUES
from ..users import UserError, mailbox_key
from . import charts
from .auth import (
    COOKIE,
    LOGIN_COOKIE,
    Session,
    SessionStore,
    Throttle,
    csrf_ok,
    login_token,
    login_token_ok,
    safe_next,
)
from .format import FILTERS, age

__all__ = ["ApiError", "Console"]

log = logging.getLogger("postroom.console")
HERE = Path(__file__).parent
COMPONENT_ACTIONS = ("start", "stop", "restart")
DOCTOR_STEPS = ("services", "address space", "logging", "queues", "test message", "dns",
                "probe", "alternative route", "configuration", "store", "sender auth")
# what each component is, for the dashboard
COMPONENT_HELP = {
    "smtp": "the MX listener: mail from the Internet",
    "submission": "the submission listeners: mail from your users",
    "conversion": "checks and routes each accepted recipient",
    "queue-manager": "schedules deliveries and retries",
    "local-delivery": "writes to the Maildirs",
    "outbound-delivery": "sends to remote servers and smart hosts",
    "admin": "this console and the admin API",
    "imap": "Dovecot: users read their mail over IMAP",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.data = data if isinstance(data, dict) else {}




def _seg(value: str) -> str:
    """One path segment of an admin API URL: never a way to another route."""
    if value in ("", ".", ".."):
        raise ApiError(404, f"no such item {value!r}")
    return urllib.parse.quote(value, safe="@")


def _problems(problems: dict[str, str]) -> dict[str, Any]:
    """The validation problems by where the routing form shows them."""
    fields: dict[str, list[tuple[str, str]]] = {"trusted_networks": [], "local_domains": []}
    other = []
    for key, message in problems.items():
        if key.startswith("relay."):
            fields["trusted_networks"].append((key, message))
        elif key.startswith("domains."):
            fields["local_domains"].append((key, message))
        elif not key.startswith("route["):
            other.append((key, message))
    return {"problems": problems, "field_errors": fields, "other_problems": other}


class Console:
    """The pages, each a client of the admin API (in-process, over ASGI, with its token)."""

    def __init__(self, api: Starlette, token: str, events: EventLog) -> None:
        self.events = events
        self.api = httpx.AsyncClient(transport=httpx.ASGITransport(app=api),
                                     base_url="http://postroom-admin", timeout=120,
                                     headers={"Authorization": f"Bearer {token}"})
        self.sessions = SessionStore()
        self.throttle = Throttle()
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        env = self.templates.env
        env.filters.update(FILTERS)
        env.globals.update(QUEUES=QUEUES, ACTIONS=ACTIONS, LEVELS=LEVELS,
                           CATEGORIES=CATEGORIES, SEVERITIES=SEVERITIES,
                           CATALOGUE=CATALOGUE, COMPONENT_HELP=COMPONENT_HELP)

    # --- the admin API --------------------------------------------------------------
    async def call(self, method: str, path: str, body: Any = None,
                   params: dict[str, Any] | None = None) -> Any:
        if params:
            params = {k: v for k, v in params.items() if v not in (None, "")}
        r = await self.api.request(method, path, json=body, params=params)
        try:
            data = r.json()
        except ValueError:
            data = {"error": r.text}
        if r.status_code >= 400:
            raise ApiError(r.status_code, str(data.get("error") or r.status_code), data)
        return data

    # --- sessions -------------------------------------------------------------------
    def session(self, request: Request) -> Session | None:
        return self.sessions.get(request)

    CHECK_EVERY = 5.0

    async def _still_admin(self, s: Session) -> bool:
        """Whether the session's account still exists and is an admin (asked at most
        every CHECK_EVERY seconds; removing or demoting an account ends its sessions)."""
        now = time.time()
        if now - s.checked < self.CHECK_EVERY:
            return True
        admins = (await self.call("GET", "/api/users", params={"admin": "1"}))["users"]
        if any(u["address"] == s.user for u in admins):
            s.checked = now
            return True
        return False

    # --- rendering ------------------------------------------------------------------
    def render(self, request: Request, name: str, context: dict[str, Any],
               status: int = 200, session: Session | None = None) -> Response:
        flash = []
        if session is not None:
            flash, session.flash = session.flash, []
        ctx = {"session": session, "flash": flash, "path": request.url.path, **context}
        response = self.templates.TemplateResponse(request, name, ctx, status_code=status)
        response.headers.update(SECURITY_HEADERS)
        return response

    def page(self, handler: Callable[[Request, Session], Awaitable[Response]]
             ) -> Callable[[Request], Awaitable[Response]]:
        """A page or an action that needs a logged-in admin (and, to change anything, the
        session's CSRF token)."""
        async def run(request: Request) -> Response:
            s = self.session(request)
            fragment = request.url.path.startswith("/fragments/")
            if s is None:
                if request.method == "GET" and not fragment:
                    target = request.url.path + (f"?{request.url.query}" if request.url.query
                                                 else "")
                    return RedirectResponse("/login?next=" + urllib.parse.quote(target), 303)
                return self._plain(401, "Your session has ended: log in again.")
            if not await self._still_admin(s):
                self.sessions.end_user(s.user)
                if request.method == "GET" and not fragment:
                    return RedirectResponse("/login", 303)
                return self._plain(401, "Your account is no longer an admin account.")
            if request.method == "POST":
                form = await request.form()
                given = str(form.get("csrf") or request.headers.get("x-csrf-token") or "")
                if not csrf_ok(request, s, given):
                    log.warning("console: %s refused for %s: missing or wrong CSRF token",
                                request.url.path, s.user)
                    return self._plain(403, "Refused: this request did not come from a "
                                            "console page (missing or wrong CSRF token). "
                                            "Reload the page and try again.")
                request.state.form = form
            try:
                response = await handler(request, s)
            except ApiError as exc:
                if request.method == "POST":      # back to the page the form was on
                    s.flash.append(("error", str(exc)))
                    referer = urllib.parse.urlsplit(request.headers.get("referer", ""))
                    back = str(request.state.form.get("back") or "") or (
                        referer.path + (f"?{referer.query}" if referer.query else "")
                        if referer.netloc == request.headers.get("host") else "")
                    return RedirectResponse(safe_next(back), 303)
                return self.render(request, "error.html", {"title": "Error",
                                                           "message": str(exc)},
                                   status=exc.status if exc.status < 500 else 502, session=s)
            response.headers.update(SECURITY_HEADERS)
            return response
        return run

    @staticmethod
    def _plain(status: int, text: str) -> Response:
        r = PlainTextResponse(text, status_code=status)
        r.headers.update(SECURITY_HEADERS)
        return r

    @staticmethod
    def _back(form: FormData, default: str) -> RedirectResponse:
        return RedirectResponse(safe_next(str(form.get("back") or default)), 303)

    # --- login and logout -----------------------------------------------------------
    async def login_page(self, request: Request, error: str = "", status: int = 200,
                         address: str = "", next_: str = "") -> Response:
        if request.method == "GET" and self.session(request) is not None:
            return RedirectResponse(safe_next(request.query_params.get("next")), 303)
        try:
            admins = (await self.call("GET", "/api/users", params={"admin": "1"}))["users"]
        except ApiError:
            admins = [None]              # unknown: do not claim there is none
        nonce = secrets.token_urlsafe(16)
        response = self.render(request, "login.html", {
            "title": "Log in", "error": error, "nonce": nonce, "address": address,
            "no_admin": not admins,
            "next": safe_next(next_ or request.query_params.get("next"))}, status=status)
        login_token(response, nonce, secure=request.url.scheme == "https")
        return response

    async def login(self, request: Request) -> Response:
        form = await request.form()
        address = str(form.get("address") or "").strip()
        password = str(form.get("password") or "")
        if not login_token_ok(request, str(form.get("nonce") or "")):
            return self._plain(403, "Refused: this login did not come from the console's "
                                    "login page (missing or wrong CSRF token). Reload it "
                                    "and try again.")
        peer = request.client.host if request.client else "?"
        keys = [f"ip:{peer}"]
        now = time.time()
        shown = repr(address[:100]) + ("…" if len(address) > 100 else "")   # for the log
        wait = self.throttle.wait(keys, now)
        if wait > 0:
            if self.throttle.note_refusal(keys, now):      # once per address and window
                self.events.emit(4006, f"console logins from [{peer}] refused for "
                                       f"{int(wait)}s: too many failed logins (the last for "
                                       f"{shown})", peer=peer)
            response = await self.login_page(
                request, f"Too many failed logins from your address. "
                         f"Try again in {age(wait)}.", 429, address, str(form.get("next") or ""))
            response.headers["Retry-After"] = str(int(wait) + 1)
            return response
        # Counted as a failure before the (slow) check, so that logins sent all at once
        # cannot each pass the throttle; forgiven if it succeeds.
        self.throttle.fail(keys, now)
        result = await self.call("POST", "/api/users/verify",
                                 {"address": address[:320], "password": password})
        if not (result["ok"] and result["admin"]):
            why = "not an admin account" if result["ok"] else "wrong address or password"
            self.events.emit(4006, f"console login for {shown} from [{peer}] failed: {why}",
                             peer=peer)
            return await self.login_page(
                request, "Wrong address or password, or not an admin account.", 401, address,
                str(form.get("next") or ""))
        self.throttle.succeed(keys)
        self.events.emit(4007, f"{result['address']} logged in to the console from [{peer}]",
                         peer=peer)
        response = RedirectResponse(safe_next(str(form.get("next") or "/")), 303)
        self.sessions.start(result["address"], response, secure=request.url.scheme == "https")
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(self, request: Request, s: Session) -> Response:
        self.sessions.end(request)
        self.events.emit(4007, f"{s.user} logged out of the console")
        response = RedirectResponse("/login", 303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # --- dashboard and components ---------------------------------------------------
    async def dashboard(self, request: Request, s: Session) -> Response:
        status = await self.call("GET", "/api/status")
        return self.render(request, "dashboard.html", {
            "title": "Dashboard", "components": status["components"],
            "node": status.get("node", ""), "nodes": status.get("nodes", []),
            **await self._dashboard_live()}, session=s)

    async def _dashboard_live(self) -> dict[str, Any]:
        queues = (await self.call("GET", "/api/queues"))["queues"]
        history = await self.call("GET", "/api/stats/history")
        return {"queues": queues, "charts": charts.render_all(history)}

    async def dashboard_fragment(self, request: Request, s: Session) -> Response:
        return self.render(request, "_dashboard_live.html", await self._dashboard_live(),
                           session=s)

    async def component(self, request: Request, s: Session) -> Response:
        name, action = request.path_params["name"], request.path_params["action"]
        if action not in COMPONENT_ACTIONS or name not in COMPONENT_HELP:
            return self._plain(404, "no such component or action")
        result = await self.call("POST", f"/api/components/{_seg(name)}/{action}")
        s.flash.append(("ok", f"{name}: {action} done, now {result.get('state', '?')}"))
        return self._back(request.state.form, "/")

    # --- queues ---------------------------------------------------------------------
    async def queues(self, request: Request, s: Session) -> Response:
        summary = (await self.call("GET", "/api/queues"))["queues"]
        reasons = (await self.call("GET", "/api/queues/reasons"))["reasons"]
        return self.render(request, "queues.html", {"title": "Queues", "queues": summary,
                                                    "reasons": reasons}, session=s)

    FILTERS = ("domain", "sender", "rcpt", "older_than", "held", "reason")

    async def queue(self, request: Request, s: Session) -> Response:
        name = request.path_params["queue"]
        if name not in QUEUES:
            raise ApiError(404, f"no queue {name!r}: the queues are {', '.join(QUEUES)}")
        filters = {k: request.query_params.get(k, "") for k in self.FILTERS}
        listing = await self.call("GET", f"/api/queues/{name}", params={**filters,
                                                                        "limit": "500"})
        return self.render(request, "queue.html", {
            "title": f"Queue {name}", "queue": name, "filters": filters,
            "listing": listing, "back": str(request.url.path) + (
                f"?{request.url.query}" if request.url.query else "")}, session=s)

    async def message(self, request: Request, s: Session) -> Response:
        mid = request.path_params["id"]
        try:
            m = await self.call("GET", f"/api/messages/{_seg(mid)}")
        except ApiError as exc:
            if exc.status != 400:
                raise
            return self.render(request, "message.html", {"title": f"Message {mid}",
                                                         "mid": mid, "gone": str(exc)},
                               status=404, session=s)
        return self.render(request, "message.html", {"title": f"Message {mid}", "mid": mid,
                                                     "m": m}, session=s)

    async def queue_action(self, request: Request, s: Session) -> Response:
        form = request.state.form
        action = str(form.get("action") or "")
        body: dict[str, Any] = {"action": action, "who": f"{s.user} (console)"}
        ids = [str(i) for i in form.getlist("ids") if i]
        if ids:
            body["ids"] = ids
        elif form.get("all"):
            body["all"] = True
            for k in self.FILTERS + ("queue",):
                if form.get(k):
                    body[k] = str(form.get(k))
        else:
            s.flash.append(("error", "Select at least one message (or use the button that "
                                     "acts on every message the filters match)."))
            return self._back(form, "/queues")
        result = await self.call("POST", "/api/queues/actions", body)
        s.flash.append(("ok", f"{action}: {result['recipients']} recipients of "
                              f"{result['messages']} messages"))
        return self._back(form, "/queues")

    # --- tracking and events ----------------------------------------------------------
    TRACK_BY = {"id": "queue id", "message_id": "Message-ID", "sender": "sender",
                "rcpt": "recipient"}

    async def track(self, request: Request, s: Session) -> Response:
        q = request.query_params.get("q", "").strip()
        by = request.query_params.get("by", "id")
        by = by if by in self.TRACK_BY else "id"
        since = request.query_params.get("since", "7d")
        found = None
        if q:
            found = (await self.call("GET", "/api/trace",
                                     params={by: q, "since": since}))["messages"]
        return self.render(request, "track.html", {
            "title": "Message tracking", "q": q, "by": by, "since": since,
            "track_by": self.TRACK_BY, "found": found}, session=s)

    async def events_page(self, request: Request, s: Session) -> Response:
        """The page, or (as /fragments/events) only its table, for the live tail."""
        f = {k: request.query_params.get(k, "") for k in ("severity", "category",
                                                          "queue_id", "since")}
        found = (await self.call("GET", "/api/events", params={**f, "limit": "200"}))["events"]
        name = "_events.html" if request.url.path.startswith("/fragments/") else "events.html"
        return self.render(request, name, {
            "title": "Events", "filters": f, "events": list(reversed(found)),
            "query": request.url.query}, session=s)

    # --- diagnostic logging -----------------------------------------------------------
    async def logging_page(self, request: Request, s: Session) -> Response:
        levels = await self.call("GET", "/api/logging")
        return self.render(request, "logging.html", {"title": "Diagnostic logging",
                                                     "levels": levels}, session=s)

    async def logging_set(self, request: Request, s: Session) -> Response:
        form = request.state.form
        category, level = str(form.get("category") or ""), str(form.get("level") or "")
        await self.call("POST", "/api/logging", {
            "category": category, "level": level, "peer": str(form.get("peer") or ""),
            "domain": str(form.get("domain") or "")})
        s.flash.append(("ok", f"{category}: {level}, in effect now"))
        return self._back(form, "/logging")

    # --- doctor -----------------------------------------------------------------------
    async def doctor_page(self, request: Request, s: Session) -> Response:
        return self.render(request, "doctor.html", {"title": "Doctor", "run": None,
                                                    "steps": DOCTOR_STEPS}, session=s)

    async def doctor_start(self, request: Request, s: Session) -> Response:
        form = request.state.form
        run = await self.call("POST", "/api/doctor", {
            "to": str(form.get("to") or "").strip(), "from": str(form.get("from") or "").strip(),
            "client_ip": str(form.get("client_ip") or "").strip() or "127.0.0.1",
            "auth": str(form.get("auth") or "").strip(),
            "send_test": bool(form.get("send_test")), "who": f"{s.user} (console)"})
        return RedirectResponse(f"/doctor/{run['id']}", 303)

    async def doctor_run(self, request: Request, s: Session) -> Response:
        run = await self.call("GET", f"/api/doctor/{_seg(request.path_params['id'])}")
        name = "_doctor_run.html" if request.url.path.startswith("/fragments/") else "doctor.html"
        return self.render(request, name, {"title": "Doctor", "run": run,
                                           "steps": DOCTOR_STEPS}, session=s)

    # --- domains: the records to publish ------------------------------------------------
    async def domains_page(self, request: Request, s: Session) -> Response:
        listing = await self.call("GET", "/api/domains")
        return self.render(request, "domains.html", {"title": "Domains",
                                                     "domains": listing["domains"]}, session=s)

    async def domain_page(self, request: Request, s: Session) -> Response:
        domain = request.path_params["domain"]
        check = await self.call("GET", f"/api/domains/{_seg(domain)}/records")
        return self.render(request, "domain.html", {"title": domain, "check": check},
                           session=s)

    # --- address spaces and relay settings ----------------------------------------------
    def _routing_page(self, request: Request, s: Session, view: dict[str, Any],
                      problems: dict[str, str] | None = None, error: str = "",
                      status: int = 200) -> Response:
        return self.render(request, "routing.html", {
            "title": "Address spaces and relay", "view": view, "error": error,
            **_problems(problems or {})}, status=status, session=s)

    async def routing(self, request: Request, s: Session) -> Response:
        return self._routing_page(request, s, await self.call("GET", "/api/config/routing"))

    async def routing_save(self, request: Request, s: Session) -> Response:
        form = request.state.form
        routes = []
        try:
            count = max(0, min(int(str(form.get("route_count") or "0")), 200))
        except ValueError:
            count = 0
        for i in range(count):
            if form.get(f"route-{i}-remove") or not str(form.get(f"route-{i}-match") or "").strip() \
                    and i == count - 1:
                continue          # removed, or the blank "add a route" row left empty
            routes.append({k: str(form.get(f"route-{i}-{k}") or "") for k in (
                "match", "via", "host", "path", "tls", "username", "password_file", "cost",
                "index")}
                | {"tls_verify": bool(form.get(f"route-{i}-tls_verify"))})
        lines = {k: [x.strip() for x in str(form.get(k) or "").splitlines() if x.strip()]
                 for k in ("trusted_networks", "local_domains")}
        check_only = form.get("do") == "check"
        body = {"routes": routes, **lines, "version": str(form.get("version") or ""),
                "check_only": check_only, "who": f"{s.user} (console)"}
        # the form as sent, to show again after a check or a refusal
        view = {"source": str(form.get("source") or ""), "version": body["version"],
                "routes": routes, **lines}
        try:
            result = await self.call("POST", "/api/config/routing", body)
        except ApiError as exc:
            if exc.status not in (400, 409):
                raise
            problems = {p["key"]: p["message"] for p in exc.data.get("problems", [])}
            return self._routing_page(
                request, s, view | {"warnings": []}, problems,
                str(exc) if exc.status == 409 or not problems else
                "Nothing was written: fix the fields marked below.", exc.status)
        warn = "; ".join(result["warnings"])
        if check_only:
            s.flash.append(("ok", "Valid: nothing written yet." + (f" Warning: {warn}"
                                                                   if warn else "")))
            return self._routing_page(request, s, view | {"warnings": result["warnings"]})
        needs = result["reload"].get("needs_restart") or []
        s.flash.append(("ok", f"Saved to {result['written']} (the previous version is "
                              f"{result['backup']}) and reloaded."
                        + (f" Needs a restart: {', '.join(needs)}." if needs else "")
                        + (f" Warning: {warn}" if warn else "")))
        return RedirectResponse("/routing", 303)

    # --- mailboxes --------------------------------------------------------------------
    async def mailboxes(self, request: Request, s: Session) -> Response:
        data = await self.call("GET", "/api/users")
        return self.render(request, "mailboxes.html", {"title": "Mailboxes", **data},
                           session=s)

    async def mailbox_action(self, request: Request, s: Session) -> Response:
        form = request.state.form
        action = request.path_params["action"]
        address = str(form.get("address") or "").strip()
        who = f"{s.user} (console)"
        if action != "add":
            try:
                address = mailbox_key(address)
            except UserError as exc:
                s.flash.append(("error", str(exc)))
                return RedirectResponse("/mailboxes", 303)
        if action == "add":
            r = await self.call("POST", "/api/users", {
                "address": address, "password": str(form.get("password") or ""),
                "admin": bool(form.get("admin")), "who": who})
            s.flash.append(("ok", f"Added {r['added']} (Maildir {r['maildir']})."))
            if r.get("warning"):
                s.flash.append(("error", r["warning"]))
        elif action == "remove":
            if address == s.user:
                s.flash.append(("error", "You cannot remove the account you are logged in "
                                         "with."))
                return RedirectResponse("/mailboxes", 303)
            r = await self.call("POST", f"/api/users/{_seg(address)}/remove", {"who": who})
            self.sessions.end_user(r["removed"])
            s.flash.append(("ok", f"Removed {r['removed']} (its Maildir is kept)."))
        elif action == "password":
            r = await self.call("POST", f"/api/users/{_seg(address)}/password",
                                {"password": str(form.get("password") or ""), "who": who})
            self.sessions.end_user(r["changed"], keep=s)    # others logged in as it: out
            s.flash.append(("ok", f"New password set for {r['changed']}."))
        else:
            return self._plain(404, "no such action")
        return RedirectResponse("/mailboxes", 303)

    def routes(self) -> list[Route | Mount]:
        p = self.page
        return [
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", p(self.logout), methods=["POST"]),
            Route("/", p(self.dashboard)),
            Route("/fragments/dashboard", p(self.dashboard_fragment)),
            Route("/components/{name}/{action}", p(self.component), methods=["POST"]),
            Route("/queues", p(self.queues)),
            Route("/queues/actions", p(self.queue_action), methods=["POST"]),
            Route("/queues/{queue}", p(self.queue)),
            Route("/messages/{id}", p(self.message)),
            Route("/track", p(self.track)),
            Route("/events", p(self.events_page)),
            Route("/fragments/events", p(self.events_page)),
            Route("/logging", p(self.logging_page)),
            Route("/logging", p(self.logging_set), methods=["POST"]),
            Route("/doctor", p(self.doctor_page)),
            Route("/doctor", p(self.doctor_start), methods=["POST"]),
            Route("/doctor/{id}", p(self.doctor_run)),
            Route("/fragments/doctor/{id}", p(self.doctor_run)),
            Route("/domains", p(self.domains_page)),
            Route("/domains/{domain}", p(self.domain_page)),
            Route("/routing", p(self.routing)),
            Route("/routing", p(self.routing_save), methods=["POST"]),
            Route("/mailboxes", p(self.mailboxes)),
            Route("/mailboxes/{action}", p(self.mailbox_action), methods=["POST"]),
            Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
        ]
