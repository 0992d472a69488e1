"""The web console in a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright; no browser is ever downloaded), against a running server.

With POSTROOM_SCREENSHOTS=DIR set, the tests also save a screenshot of each page there
(scripts/console-shots.sh makes docs/console/ that way).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import playwright.sync_api as playwright_api  # the test extras install it
import pytest

from tests.conftest import ServerProcess, closed_port, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root in a container: no sandbox; and nothing that talks to the outside.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ADMIN, ADMIN_PW = "admin@example.test", "correct horse battery"
SHOTS = os.environ.get("POSTROOM_SCREENSHOTS", "")
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose smart host for far.test is down (a closed port), with an admin."""
    sp = ServerProcess(tmp_path_factory.mktemp("console"), f"""
        [delivery]
        retry = ["1h"]
        [[route]]
        match = "*"
        via = "mx"
        [[route]]
        match = "far.test"
        via = "smarthost"
        host = "127.0.0.1:{closed_port()}"
        tls = "none"
        """)
    sp.cli("users", "add", ADMIN, "--admin", "--password-stdin", input=ADMIN_PW + "\n")
    sp.add_user("alice@example.test")
    sp.add_user("bob@example.test")
    sp.start()
    yield sp
    sp.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (scripts/test.sh installs it)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Console:
    """One browser context (its own cookies) on the console, with the page's errors."""

    def __init__(self, browser: Any, sp: ServerProcess, viewport: dict[str, int]) -> None:
        self.base = f"http://127.0.0.1:{sp.admin_port}"
        self.context = browser.new_context(viewport=viewport)
        self.context.set_default_timeout(15000)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        # script errors, CSP violations, and any resource the page failed to load (the
        # documents themselves may answer 4xx on purpose: a refused login is a 401)
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                     and not m.text.startswith("Failed to load resource") else None)
        self.page.on("response", lambda r: self.errors.append(f"{r.status} {r.url}")
                     if r.status >= 400 and r.request.resource_type != "document" else None)
        self.page.on("requestfailed", lambda r: self.errors.append(f"failed: {r.url}"))
        self.page.on("dialog", lambda d: d.accept())

    def goto(self, path: str) -> Any:
        return self.page.goto(self.base + path)

    def login(self, address: str = ADMIN, password: str = ADMIN_PW, path: str = "/") -> None:
        self.goto(path)
        self.page.fill("#address", address)
        self.page.fill("#password", password)
        self.submit("form.stack button[type=submit]")

    def shot(self, name: str, full_page: bool = True) -> None:
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=full_page)

    def submit(self, target: Any) -> None:
        """Click a button that posts a form, and wait for the page that answers."""
        locator = self.page.locator(target) if isinstance(target, str) else target
        with self.page.expect_navigation():
            locator.click()

    def flash(self) -> str:
        return str(self.page.locator(".flash").all_inner_texts())

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def ui(browser: Any, console: ServerProcess) -> Iterator[Console]:
    c = Console(browser, console, DESKTOP)
    c.login()
    c.page.wait_for_url(c.base + "/")
    yield c
    c.close()


def send(sp: ServerProcess, rcpt: str, subject: str) -> str:
    with sp.smtp() as s:
        s.ehlo()
        s.mail("alice@example.test")
        assert s.rcpt(rcpt)[0] == 250
        code, text = s.data(f"Subject: {subject}\r\nFrom: alice@example.test\r\n"
                            f"Message-ID: <{subject}@example.test>\r\n\r\nbody\r\n".encode())
    assert code == 250, text
    return text.decode().split("queued as ")[1].split()[0]


def cli_json(sp: ServerProcess, *args: str) -> Any:
    return json.loads(sp.cli(*args, "--json").stdout)


# --- login ---------------------------------------------------------------------------
def test_pages_need_a_login_and_the_session_cookie_is_httponly_and_samesite(
        browser: Any, console: ServerProcess) -> None:
    c = Console(browser, console, DESKTOP)
    try:
        c.goto("/queues")
        assert c.page.url == c.base + "/login?next=/queues"
        c.shot("login")
        # a wrong password, then a mailbox that is not an admin: both refused alike
        c.page.fill("#address", ADMIN)
        c.page.fill("#password", "wrong")
        c.submit("form.stack button[type=submit]")
        assert "Wrong address or password" in c.page.inner_text("#login-error")
        c.page.fill("#address", "alice@example.test")
        c.page.fill("#password", "s3cret")
        c.submit("form.stack button[type=submit]")
        assert "Wrong address or password" in c.page.inner_text("#login-error")
        assert not [k for k in c.context.cookies() if k["name"] == "postroom_console"]
        c.page.fill("#address", ADMIN)
        c.page.fill("#password", ADMIN_PW)
        c.submit("form.stack button[type=submit]")
        c.page.wait_for_url(c.base + "/queues")       # back where it was going
        cookie = next(k for k in c.context.cookies() if k["name"] == "postroom_console")
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
        assert c.page.evaluate("document.cookie") == ""   # out of the page's reach
        # logging out ends the session on the server, not only in the browser
        c.submit("form.logout button")
        c.page.wait_for_url(c.base + "/login")
        c.context.add_cookies([{"name": cookie["name"], "value": cookie["value"],
                                "url": c.base}])          # the old cookie, put back
        c.goto("/")
        assert c.page.url.startswith(c.base + "/login")
        assert c.errors == []
    finally:
        c.close()
    events = cli_json(console, "events", "--category", "smtp_interface")["events"]
    assert len([e for e in events if e["id"] == 4006]) >= 2       # each failure recorded
    assert not any(ADMIN_PW in e["text"] or "s3cret" in e["text"] or "wrong\"" in e["text"]
                   for e in events)                               # never a password


def _http(port: int, method: str, path: str, source: str, body: str = "",
          headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30,
                                      source_address=(source, 0))
    conn.request(method, path, body=body, headers=headers or {})
    return conn.getresponse()


def test_login_attempts_are_throttled(console: ServerProcess) -> None:
    # From its own loopback address, so the browser tests' address is not throttled.
    source, port = "127.0.0.77", console.admin_port

    def attempt(password: str) -> http.client.HTTPResponse:
        r = _http(port, "GET", "/login", source)
        nonce = re.search(r'name="nonce" value="([^"]+)"', r.read().decode()).group(1)  # type: ignore[union-attr]
        cookie = r.getheader("set-cookie", "").split(";")[0]
        form = urllib.parse.urlencode({"nonce": nonce, "address": "admin@example.test",
                                       "password": password, "next": "/"})
        return _http(port, "POST", "/login", source, form, {
            "Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie})
    for _ in range(5):
        assert attempt("guess").status == 401
    r = attempt(ADMIN_PW)                 # even the right password waits now
    body = r.read().decode()
    assert r.status == 429 and "Too many failed logins" in body
    assert int(r.getheader("Retry-After", "0")) > 0
    assert "postroom_console" not in (r.getheader("set-cookie") or "")


def test_no_default_password(tmp_path: Path, browser: Any) -> None:
    sp = ServerProcess(tmp_path / "fresh")
    sp.add_user("alice@example.test")                 # a mailbox, but no admin account
    sp.start()
    try:
        c = Console(browser, sp, DESKTOP)
        c.goto("/")
        text = c.page.inner_text("main")
        assert "No admin account exists yet" in text and "--admin" in text
        for password in ("", "admin", "postroom", "password"):
            c.page.fill("#address", "admin@example.test")
            c.page.fill("#password", password or "x")
            c.submit("form.stack button[type=submit]")
            assert c.page.url.startswith(c.base + "/login")
        c.close()
    finally:
        sp.stop()


# --- CSRF ----------------------------------------------------------------------------
def test_a_request_without_the_csrf_token_is_refused(ui: Console,
                                                     console: ServerProcess) -> None:
    before = cli_json(console, "logging")["categories"]["addressing"]
    req = ui.context.request                      # the browser's own cookies
    for form, headers in (
            ({"category": "addressing", "level": "maximum"}, {}),
            ({"category": "addressing", "level": "maximum", "csrf": "forged"}, {}),
            ({"category": "addressing", "level": "maximum", "csrf": "fälscht"}, {}),
    ):
        r = req.post(ui.base + "/logging", form=form, headers=headers, max_redirects=0)
        assert r.status == 403, r.status
        assert "CSRF" in r.text()
    # the right token, but from another site's page
    ui.goto("/logging")
    token = ui.page.locator("input[name=csrf]").first.get_attribute("value")
    r = req.post(ui.base + "/logging", form={"category": "addressing", "level": "maximum",
                                             "csrf": token},
                 headers={"Origin": "http://evil.example"}, max_redirects=0)
    assert r.status == 403
    r = req.post(ui.base + "/components/smtp/stop", form={}, max_redirects=0)
    assert r.status == 403
    assert cli_json(console, "logging")["categories"]["addressing"] == before
    assert next(c for c in cli_json(console, "status")["components"]
                if c["name"] == "smtp")["state"] == "running"
    # and the login form has its own token
    r = req.post(ui.base + "/login", form={"address": ADMIN, "password": ADMIN_PW},
                 max_redirects=0)
    assert r.status == 403
    r = req.post(ui.base + "/login", form={"address": ADMIN, "password": ADMIN_PW,
                                           "nonce": "näh"}, max_redirects=0)
    assert r.status == 403


# --- queues --------------------------------------------------------------------------
def test_a_held_message_is_released_and_delivered(ui: Console,
                                                  console: ServerProcess) -> None:
    console.cli("stop", "local-delivery")
    qid = send(console, "bob@example.test", "held-one")
    assert wait_until(lambda: console.queue()["inbound-delivery"]["messages"] >= 1)
    console.cli("queue", "hold", qid)
    console.cli("start", "local-delivery")
    time.sleep(0.5)
    assert console.messages("bob@example.test") == []          # held: not delivered

    ui.goto("/queues")
    card = ui.page.locator('[data-queue="inbound-delivery"]')
    assert "1 held" in card.inner_text()
    card.locator("a").click()
    row = ui.page.locator(f'tr[data-message="{qid}"]')
    assert "held" in row.inner_text()
    ui.shot("queue")
    row.locator("a").click()                                   # the message's detail
    ui.page.wait_for_url(f"{ui.base}/messages/{qid}")
    assert "bob@example.test" in ui.page.inner_text("main")
    assert "Subject: held-one" in ui.page.inner_text("pre.headers")
    ui.shot("message")
    ui.page.go_back()
    ui.page.check(f"#sel-{qid}")
    ui.submit("#selection button[value=release]")
    assert "release: 1 recipients of 1 messages" in ui.flash()
    got = console.wait_messages("bob@example.test", 1)
    assert len(got) == 1 and b"Subject: held-one" in got[0]
    # and tracking tells the story
    ui.goto(f"/track?by=id&q={qid}")
    trace = ui.page.locator(f'[data-trace="{qid}"]')
    assert wait_until(lambda: "delivered" in (ui.goto(f"/track?by=id&q={qid}") and
                                              trace.locator(".outcome").inner_text()), 10)
    assert "received" in trace.inner_text()
    ui.shot("tracking")
    # found as well by its Message-ID (typed without the brackets) and by its recipient
    ui.goto("/track")
    ui.page.select_option("#t-by", "message_id")
    ui.page.fill("#t-q", "held-one@example.test")
    ui.submit("form.filters button[type=submit]")
    assert ui.page.locator("[data-trace]").evaluate_all(
        "els => els.map(e => e.dataset.trace)") == [qid]
    ui.goto("/track?by=rcpt&q=bob@example.test")
    assert ui.page.locator(f'[data-trace="{qid}"]').count() == 1
    assert ui.errors == []


def test_reasons_and_actions_on_a_selection(ui: Console, console: ServerProcess) -> None:
    ids = [send(console, f"x{i}@far.test", f"far-{i}") for i in range(3)]
    assert wait_until(lambda: console.queue()["outbound-delivery"]["messages"] >= 3
                      and all(r["last_reply"] for m in cli_json(
                          console, "queue", "list", "outbound-delivery")["messages"]
                              for r in m["recipients"]), 20)
    ui.goto("/queues")
    reasons = ui.page.locator("#reasons-h + div table")
    assert "far.test" in reasons.inner_text() or "127.0.0.1" in reasons.inner_text()
    ui.shot("queues")
    ui.goto("/queues/outbound-delivery?rcpt=x0@far.test")
    assert ui.page.locator("tr[data-message]").count() == 1        # the filter works
    ui.goto("/queues/outbound-delivery")
    ui.page.check(f"#sel-{ids[0]}")
    ui.page.check(f"#sel-{ids[1]}")
    ui.submit("#selection button[value=hold]")
    assert "hold: 2 recipients of 2 messages" in ui.flash()
    listed = cli_json(console, "queue", "list", "outbound-delivery")["messages"]
    held = {m["id"] for m in listed if m["recipients"][0]["held"]}
    assert held >= {ids[0], ids[1]} and ids[2] not in held
    # return one to its sender with an NDR (the confirm dialog is accepted)
    def bounced() -> int:
        stats = cli_json(console, "stats")["metrics"]
        return int(sum(x["value"] for x in stats.get("postroom_recipients_bounced_total", [])))
    before = bounced()
    ui.page.check(f"#sel-{ids[2]}")
    ui.submit("#selection button[value=bounce]")
    assert "bounce: 1 recipients of 1 messages" in ui.flash()
    assert bounced() == before + 1                # counted as failed for good
    assert wait_until(lambda: any(b"x2@far.test" in m for m in
                                  console.messages("alice@example.test")), 15)
    # delete the held two
    ui.page.select_option("#f-held", "yes")
    ui.submit("form.filters button[type=submit]")
    ui.page.locator("[data-select-all]").check()
    ui.submit("#selection button[value=delete]")
    assert "delete: 2 recipients of 2 messages" in ui.flash()
    assert console.queue()["outbound-delivery"]["messages"] == 0
    assert ui.errors == []


# --- dashboard -----------------------------------------------------------------------
def test_dashboard_stops_and_starts_a_component_and_charts_the_counters(
        ui: Console, console: ServerProcess) -> None:
    send(console, "alice@example.test", "for-the-chart")
    ui.goto("/")
    row = ui.page.locator('tr[data-component="outbound-delivery"]')
    ui.submit(row.get_by_role("button", name="Stop outbound-delivery", exact=True))
    assert "outbound-delivery: stop done" in ui.flash()
    assert "stopped" in row.locator(".state").inner_text()
    assert next(c for c in cli_json(console, "status")["components"]
                if c["name"] == "outbound-delivery")["state"] in ("stopped", "stopping")
    ui.submit(row.get_by_role("button", name="Start outbound-delivery", exact=True))
    assert "running" in row.locator(".state").inner_text()
    assert next(c for c in cli_json(console, "status")["components"]
                if c["name"] == "outbound-delivery")["state"] == "running"
    # the received chart counts this hour's messages (what postroom stats counts)
    received = ui.page.locator("svg.chart-received").get_attribute("aria-label") or ""
    stats = cli_json(console, "stats")["metrics"]
    total = int(sum(s["value"] for s in stats["postroom_messages_received_total"]))
    assert total >= 1 and received.startswith(f"Received: {total} in the last hour")
    # and the live part refreshes itself: a new message shows up without a reload
    send(console, "alice@example.test", "live")
    assert wait_until(lambda: (ui.page.locator("svg.chart-received").get_attribute(
        "aria-label") or "").startswith(f"Received: {total + 1} "), 15)
    ui.shot("dashboard")
    assert ui.errors == []


# --- events, logging -----------------------------------------------------------------
def test_event_viewer_filters_and_tails_live(ui: Console, console: ServerProcess) -> None:
    ui.goto("/events")
    ui.page.select_option("#e-cat", "message_transfer")
    ui.submit("form.filters button[type=submit]")
    assert "category=message_transfer" in ui.page.url
    qid = send(console, "alice@example.test", "tail-me")
    row = ui.page.locator(f'#events-tail tr:has(a:text("{qid}"))').first
    row.wait_for(timeout=10000)                           # arrived without a reload
    assert "message_transfer" in row.inner_text()
    cats = set(ui.page.locator("#events-tail td:nth-child(4)").all_inner_texts())
    assert cats == {"message_transfer"}
    ui.shot("events", full_page=False)
    # paused, the tail stands still
    ui.page.click("[data-pause]")
    assert ui.page.get_attribute("[data-pause]", "aria-pressed") == "true"
    qid2 = send(console, "alice@example.test", "while-paused")
    time.sleep(3)
    assert ui.page.locator(f'#events-tail a:text("{qid2}")').count() == 0
    assert ui.errors == []


def test_a_log_level_changes_with_one_click_and_at_once(ui: Console,
                                                        console: ServerProcess) -> None:
    ui.goto("/logging")
    ui.submit(ui.page.get_by_role("button", name="Set smtp_protocol to maximum"))
    assert "smtp_protocol: maximum, in effect now" in ui.flash()
    assert ui.page.get_attribute('tr[data-category="smtp_protocol"] button[value=maximum]',
                                 "aria-pressed") == "true"
    assert cli_json(console, "logging")["categories"]["smtp_protocol"] == "maximum"
    qid = send(console, "alice@example.test", "logged-whole")      # at once: no restart
    protocol = console.data / "logs" / "protocol.jsonl"
    assert wait_until(lambda: protocol.exists() and qid in protocol.read_text(), 10)
    ui.shot("logging")
    ui.submit(ui.page.get_by_role("button", name="Set smtp_protocol to minimum"))
    assert cli_json(console, "logging")["categories"]["smtp_protocol"] == "minimum"
    assert ui.errors == []


# --- doctor --------------------------------------------------------------------------
def test_doctor_names_the_broken_smart_host(ui: Console, console: ServerProcess) -> None:
    ui.goto("/doctor")
    ui.page.fill("#d-to", "someone@far.test")
    ui.submit("form.filters button[type=submit]")
    ui.page.wait_for_url(re.compile(r".*/doctor/[0-9a-f]+$"))
    # the steps arrive one by one: step 7 has failed while step 8 (an MX lookup against a
    # nameserver that never answers, 5 s) is still running
    ui.page.locator('[data-step="7"].step-fail').wait_for(timeout=30000)
    assert ui.page.locator('[data-step="8"].step-pending').count() == 1
    assert ui.page.locator("#verdict").count() == 0
    verdict = ui.page.locator("#verdict")
    verdict.wait_for(timeout=60000)
    assert verdict.inner_text() == "nexthop-unreachable"
    assert "fail" in (ui.page.get_attribute('[data-step="7"]', "class") or "")
    assert "OK" in ui.page.inner_text('[data-step="1"] .mark')
    step7 = ui.page.inner_text('[data-step="7"]')
    assert "far.test" in ui.page.inner_text("main") and "127.0.0.1:" in step7
    assert "Fix:" in ui.page.inner_text(".doctor")
    # the same verdict as the command line's
    cp = console.cli("doctor", "--to", "someone@far.test", "--json", check=False)
    assert json.loads(cp.stdout)["verdict"] == "nexthop-unreachable"
    ui.shot("doctor")
    assert ui.errors == []


def test_doctor_sends_a_real_test_message_when_asked(ui: Console,
                                                      console: ServerProcess) -> None:
    before = len(console.messages("bob@example.test"))
    ui.goto("/doctor")
    ui.page.fill("#d-to", "bob@example.test")
    ui.page.check("#d-send")
    ui.submit("form.filters button[type=submit]")
    ui.page.locator("#verdict").wait_for(timeout=60000)
    assert ui.page.inner_text("#verdict") == "ok"
    assert "OK" in ui.page.inner_text('[data-step="5"] .mark')
    assert len(console.wait_messages("bob@example.test", before + 1)) == before + 1
    assert ui.errors == []


# --- routing -------------------------------------------------------------------------
def test_routing_edits_are_validated_then_saved_and_reloaded(
        ui: Console, console: ServerProcess) -> None:
    before = console.config.read_text()
    ui.goto("/routing")
    new = ui.page.locator("fieldset.route").last
    new.locator("input[name$=-match]").fill("partner.example")
    new.locator("select[name$=-via]").select_option("smarthost")
    ui.submit("button[value=save]")                      # no host: refused
    assert "Nothing was written" in ui.page.inner_text("main")
    err = ui.page.locator(".field.invalid .error").first
    assert "smarthost route needs host" in err.inner_text()
    assert console.config.read_text() == before
    ui.shot("routing-invalid")
    new = ui.page.locator("fieldset.route").nth(-2)      # kept as typed, above a new blank
    assert new.locator("input[name$=-match]").input_value() == "partner.example"
    new.locator("input[name$=-host]").fill("127.0.0.1:2526")
    new.locator("select[name$=-tls]").select_option("none")
    ui.submit("button[value=check]")                          # valid, and nothing written
    assert "Valid: nothing written yet" in ui.flash()
    assert console.config.read_text() == before
    new = ui.page.locator("fieldset.route").nth(-2)
    assert new.locator("input[name$=-host]").input_value() == "127.0.0.1:2526"
    ui.submit("button[value=save]")
    assert "and reloaded" in ui.flash()
    text = console.config.read_text()
    assert 'match = "partner.example"' in text and 'host = "127.0.0.1:2526"' in text
    assert console.config.with_name("postroom.toml.bak").read_text() == before
    explained = json.loads(console.cli("explain", "--from", "alice@example.test", "--to",
                                       "x@partner.example", "--json").stdout)
    assert [h["route"] for h in explained["next_hops"]] == ["partner.example"]
    events = cli_json(console, "events", "--since", "5m")["events"]
    assert any(e["id"] == 1007 and ADMIN in e["text"] for e in events)
    assert any(e["id"] == 1003 for e in events)              # reloaded
    ui.shot("routing")
    # remove it again
    ui.page.locator("fieldset.route", has_text="partner.example").locator(
        "input[name$=-remove]").check()
    ui.submit("button[value=save]")
    assert "partner.example" not in console.config.read_text()
    assert ui.errors == []


# --- mailboxes -----------------------------------------------------------------------
def test_mailboxes_add_reset_and_remove(ui: Console, console: ServerProcess) -> None:
    from postroom.users import UserStore
    ui.goto("/mailboxes")
    ui.page.fill("#m-address", "carol@example.test")
    ui.page.fill("#m-password", "first-pass")
    ui.submit("form.filters button[type=submit]")
    assert "Added carol@example.test" in ui.flash()
    assert (console.data / "mail" / "example.test" / "carol" / "new").is_dir()
    store = UserStore(console.data / "users.sqlite3")
    try:
        assert store.verify("carol@example.test", "first-pass")
        row = ui.page.locator('tr[data-mailbox="carol@example.test"]')
        row.locator("input[type=password]").fill("second-pass")
        ui.submit(row.get_by_role("button", name="Set"))
        assert "New password set for carol@example.test" in ui.flash()
        assert store.verify("carol@example.test", "second-pass")
        assert not store.verify("carol@example.test", "first-pass")
        ui.shot("mailboxes")
        ui.submit(ui.page.locator('tr[data-mailbox="carol@example.test"]').get_by_role(
            "button", name="Remove carol@example.test"))
        assert "Removed carol@example.test" in ui.flash()
        assert "carol@example.test" not in [u["address"] for u in cli_json(
            console, "users", "list")["users"]]
        # a bad address is refused with the reason, and nothing is added
        ui.page.fill("#m-address", "not-an-address@")
        ui.page.fill("#m-password", "x")
        ui.page.evaluate("document.querySelector('#m-address').type = 'text'")
        ui.submit("form.filters button[type=submit]")
        assert "flash-error" in ui.page.inner_html("main")
    finally:
        store.close()
    assert ui.errors == []


# --- every page, at 1280 px and at phone width ---------------------------------------
PAGES = ["/", "/queues", "/queues/outbound-delivery", "/track", "/events", "/logging",
         "/doctor", "/routing", "/mailboxes"]


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280px", "phone"])
def test_every_page_fits_and_labels_its_controls(browser: Any, console: ServerProcess,
                                                 viewport: dict[str, int]) -> None:
    c = Console(browser, console, viewport)
    try:
        c.login()
        c.page.wait_for_url(c.base + "/")
        for path in PAGES:
            response = c.goto(path)
            assert response.status == 200, path
            # nothing wider than the screen (tables scroll inside their own box)
            assert c.page.evaluate("document.documentElement.scrollWidth") <= \
                viewport["width"], path
            assert c.page.locator("h1").count() == 1, path
            unlabelled = c.page.evaluate("""() => [...document.querySelectorAll(
                'input:not([type=hidden]), select, textarea, button')].filter(el =>
                !(el.labels && el.labels.length) && !el.getAttribute('aria-label') &&
                !(el.tagName === 'BUTTON' && el.innerText.trim())).map(el => el.outerHTML)""")
            assert unlabelled == [], (path, unlabelled)
            assert response.headers["content-security-policy"].startswith("default-src 'none'")
            if viewport is PHONE and path in ("/", "/queues", "/doctor"):
                c.shot("phone-" + (path.strip("/") or "dashboard"))
            # keyboard: the skip link is the first stop and leads to the content
            c.page.keyboard.press("Tab")
            assert c.page.evaluate("document.activeElement.className") == "skip", path
        assert c.errors == []
    finally:
        c.close()


# --- what a review found ---------------------------------------------------------------
def test_logins_sent_all_at_once_are_throttled_too(console: ServerProcess) -> None:
    import concurrent.futures
    source, port = "127.0.0.78", console.admin_port
    r = _http(port, "GET", "/login", source)
    nonce = re.search(r'name="nonce" value="([^"]+)"', r.read().decode()).group(1)  # type: ignore[union-attr]
    cookie = r.getheader("set-cookie", "").split(";")[0]
    form = urllib.parse.urlencode({"nonce": nonce, "address": "x" * 5000 + "@example.test",
                                   "password": "guess", "next": "/"})

    def attempt(_: int) -> int:
        return _http(port, "POST", "/login", source, form, {
            "Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie}).status
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(attempt, range(20)))
    assert statuses.count(401) <= 5 and statuses.count(429) >= 15, statuses
    events = [e for e in cli_json(console, "events", "--since", "5m")["events"]
              if e["id"] == 4006 and e["peer"] == source]
    assert len(events) <= 6                       # one per failure, one for the refusals
    assert all(len(e["text"]) < 400 for e in events)      # the address cut short


def test_removing_an_admin_ends_its_sessions(browser: Any, console: ServerProcess) -> None:
    console.cli("users", "add", "admin2@example.test", "--admin", "--password-stdin",
                input="second admin pw\n")
    c = Console(browser, console, DESKTOP)
    try:
        c.login("admin2@example.test", "second admin pw")
        c.page.wait_for_url(c.base + "/")
        console.cli("users", "remove", "admin2@example.test")
        assert wait_until(lambda: c.goto("/queues") and "/login" in c.page.url, 10)
    finally:
        c.close()


def test_console_urls_reach_only_their_own_api_route(ui: Console,
                                                     console: ServerProcess) -> None:
    ui.goto("/")
    token = ui.page.locator("input[name=csrf]").first.get_attribute("value") or ""
    cookie = next(k for k in ui.context.cookies() if k["name"] == "postroom_console")
    headers = {"Content-Type": "application/x-www-form-urlencoded",
               "Cookie": f"postroom_console={cookie['value']}"}
    reloads = len([e for e in cli_json(console, "events")["events"] if e["id"] == 1003])
    # a raw "..": the browser would have collapsed it, a script need not
    r = _http(console.admin_port, "POST", "/components/../reload", "127.0.0.1",
              f"csrf={token}", headers)
    assert r.status == 404
    r = _http(console.admin_port, "POST", "/routing", "127.0.0.1",
              f"csrf={token}&route_count=abc&do=check", headers)
    assert r.status < 500                                    # a form, not a traceback
    time.sleep(0.5)
    assert len([e for e in cli_json(console, "events")["events"] if e["id"] == 1003]) == reloads
    assert "Traceback" not in console.log_text()


def test_the_api_keeps_its_own_answers_beside_the_console(console: ServerProcess) -> None:
    token = (console.data / "admin.token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    r = _http(console.admin_port, "POST", "/api/status", "127.0.0.1", "", auth)
    assert r.status == 405 and "not allowed" in json.loads(r.read())["error"]
    r = _http(console.admin_port, "GET", "/api/nothing-here", "127.0.0.1", "", auth)
    assert r.status == 404 and r.getheader("content-type") == "application/json"
    r = _http(console.admin_port, "GET", "/api/status", "127.0.0.1")      # no token
    assert r.status == 401
    r = _http(console.admin_port, "GET", "/", "127.0.0.1")                # the console
    assert r.status == 303 and r.getheader("location") == "/login?next=/"


def test_a_wrong_address_in_the_console_is_a_page_that_says_so(ui: Console) -> None:
    for path, status in (("/queues/reasons", 404), ("/queues/nope", 404),
                         ("/messages/NOSUCHID", 404), ("/doctor/ffff", 404),
                         ("/events?since=soon", 400), ("/no/such/page", 404)):
        response = ui.goto(path)
        assert response.status == status, path
        assert ui.page.locator(".flash-error, .flash").count() >= 1, path
    assert ui.errors == []
