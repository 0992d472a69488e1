"""Doctor's verdict logic, table-driven: never ``ok`` while a step fails, the cause before
its symptoms, and every verdict against a failed step 5 (the test message); how a failed
test message is read (refused after DATA, for sender authentication or not); and the
small SPF evaluator, against a fake resolver."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from postroom.config import Config
from postroom.diagnostics.doctor import VERDICTS, Context, _refusal_of_test_message, name_verdict
from postroom.diagnostics.senderauth import evaluate
from postroom.dns import DnsError, DnsErrorKind

STEP_NAMES = ("services", "address space", "logging", "queues", "test message", "dns",
              "probe", "alternative route", "configuration", "store", "sender auth")
# the step that gives each verdict (doctor's own functions set them so)
VERDICT_STEP = {
    "service-down": 1, "client-relay-denied": 2, "no-route": 2, "queue-stuck": 4,
    "nexthop-auth-policy": 5, "nexthop-refused-message": 5, "test-message-failed": 5,
    "dns-nxdomain": 6, "dns-no-address": 6, "dns-failure": 6, "null-mx": 6,
    "nexthop-relay-denied": 7, "nexthop-auth-required": 7, "nexthop-auth-failed": 7,
    "nexthop-unreachable": 7, "nexthop-tls-failed": 7, "open-relay": 9,
    "store-failed": 10, "sender-auth-missing": 11,
}
STEP5_VERDICTS = ("nexthop-auth-policy", "nexthop-refused-message", "test-message-failed")


def steps(failing: dict[int, str], fail_without_verdict: tuple[int, ...] = ()
          ) -> list[dict[str, Any]]:
    out = []
    for n, name in enumerate(STEP_NAMES, start=1):
        verdict = failing.get(n, "")
        status = "fail" if verdict or n in fail_without_verdict else "ok"
        out.append({"step": n, "name": name, "status": status, "finding": "",
                    "detail": None, "fix": "", "verdict": verdict})
    return out


def test_every_verdict_is_given_by_a_step_or_is_the_default() -> None:
    assert set(VERDICTS) == {*VERDICT_STEP, "ok", "step-failed"}


def test_the_reported_bug_a_refusal_after_data_is_never_ok() -> None:
    # step 5 FAIL (550 5.7.26 after DATA), step 7 ok, step 8 skip: was "ok"
    assert name_verdict(steps({5: "nexthop-auth-policy"})) == "nexthop-auth-policy"
    assert name_verdict(steps({5: "nexthop-refused-message"})) == "nexthop-refused-message"


def test_no_failing_step_is_ok_and_a_failing_step_without_a_cause_is_not() -> None:
    assert name_verdict(steps({})) == "ok"
    for n in range(1, 12):
        assert name_verdict(steps({}, fail_without_verdict=(n,))) == "step-failed"


# every verdict, alone and against each kind of failed step 5: the probe's and earlier
# steps' causes win over the test message (it failed because of them); the test
# message's own refusal wins over later symptoms (a stuck queue, missing records)
CAUSES_BEFORE_STEP5 = {v for v, n in VERDICT_STEP.items() if n in (1, 2, 6, 7)}


@pytest.mark.parametrize("verdict", sorted(v for v in VERDICT_STEP if v not in STEP5_VERDICTS))
@pytest.mark.parametrize("step5", (*STEP5_VERDICTS, ""))
def test_every_verdict_against_a_failed_step_5(verdict: str, step5: str) -> None:
    failing = {VERDICT_STEP[verdict]: verdict}
    assert name_verdict(steps(failing)) == verdict          # alone
    if step5:
        failing[5] = step5
    got = name_verdict(steps(failing, fail_without_verdict=(5,)))
    if not step5 or verdict in CAUSES_BEFORE_STEP5:
        assert got == verdict
    else:
        assert got == step5
    assert got != "ok"


@pytest.mark.parametrize("step5", STEP5_VERDICTS)
def test_a_failed_test_message_alone_names_its_refusal(step5: str) -> None:
    assert name_verdict(steps({5: step5})) == step5


def _ctx(sender: str = "alice@example.test") -> Context:
    async def fetch(path: str) -> Any:
        raise OSError("not used")
    return Context(Config("mx.example.test", Path("/nonexistent")), None,  # type: ignore[arg-type]
                   lambda _: False, fetch, sender,
                   "bob@far.test", "127.0.0.1", None, 3600.0, None, 30.0)


HOP = "smart host 127.0.0.20:2525 (route *)"


@pytest.mark.parametrize("text, verdict, words", [
    (f"<bob@far.test> failed at DATA via {HOP}: 550 5.7.26 Unauthenticated email from "
     "example.test is not accepted due to domain's DMARC policy", "nexthop-auth-policy",
     ("_dmarc.example.test", "postroom doctor --from alice@example.test", "Step 11")),
    (f"<bob@far.test> failed at DATA via {HOP}: 550 5.7.515 Access denied, sending domain "
     "example.test does not meet the required authentication level.", "nexthop-auth-policy",
     ("DMARC policy of example.test",)),
    (f"<bob@far.test> failed at DATA via {HOP}: 550 5.7.1 SPF check failed",
     "nexthop-auth-policy", ("SPF record (a TXT record at example.test)",)),
    (f"<bob@far.test> failed at DATA via {HOP}: 554 5.7.1 Message refused by policy",
     "nexthop-refused-message", ("127.0.0.20",)),
    (f"<bob@far.test> failed at DATA via {HOP}: 552 5.3.4 Message size exceeds fixed limit",
     "nexthop-refused-message", ("larger than",)),
    ("<bob@far.test> failed at RCPT via MX of far.test (route *): 550 5.1.1 <bob@far.test>: "
     "User unknown", "test-message-failed", ("does not exist",)),
])
def test_a_failed_test_message_is_read_from_its_event(text: str, verdict: str,
                                                      words: tuple[str, ...]) -> None:
    got, fix = _refusal_of_test_message(_ctx(), text)
    assert got == verdict
    for word in words:
        assert word in fix, (word, fix)


# --- the SPF evaluator --------------------------------------------------------------
class FakeResolver:
    """TXT, A, AAAA and MX answers from a dict; anything else NXDOMAIN."""

    def __init__(self, records: dict[tuple[str, str], list[str]],
                 broken: tuple[str, ...] = ()) -> None:
        self.records, self.broken, self.asked = records, broken, 0

    async def query(self, name: str, rdtype: str) -> list[str] | DnsError:
        self.asked += 1
        if name in self.broken:
            return DnsError(DnsErrorKind.TIMEOUT, name, "no answer")
        found = self.records.get((name, rdtype))
        return list(found) if found else DnsError(DnsErrorKind.NXDOMAIN, name, "")

    async def txt(self, name: str) -> list[str] | DnsError:
        """TXT strings joined, as dns.Resolver.txt gives them."""
        found = await self.query(name, "TXT")
        if isinstance(found, DnsError):
            return found
        return ["".join(part.strip('"') for part in t.split('" "')) for t in found]


ZONE = {
    ("ex.test", "TXT"): ['"v=spf1 ip4:192.0.2.0/24 include:relay.test -all"'],
    ("relay.test", "TXT"): ['"v=spf1 a mx ~all"'],
    ("relay.test", "A"): ["198.51.100.7"],
    ("relay.test", "MX"): ["10 mx.relay.test."],
    ("mx.relay.test", "A"): ["203.0.113.9"],
    ("six.test", "TXT"): ['"v=spf1 ip6:2001:db8::/32 redirect=ex.test"'],
    ("two.test", "TXT"): ['"v=spf1 -all"', '"v=spf1 +all"'],
    ("loop.test", "TXT"): ['"v=spf1 include:loop.test -all"'],
    ("macro.test", "TXT"): ['"v=spf1 exists:%{i}.spf.test -all"'],
    ("split.test", "TXT"): ['"v=spf1 ip4:192.0.2.1" " -all"'],
    ("void.test", "TXT"): ['"v=spf1 a:n1.test a:n2.test a:n3.test -all"'],
    ("slow.test", "TXT"): ['"v=spf1 include:broken.test -all"'],
}


@pytest.mark.parametrize("domain, ip, result", [
    ("ex.test", "192.0.2.77", "pass"),               # ip4 with a prefix
    ("ex.test", "198.51.100.7", "pass"),             # include: -> a
    ("ex.test", "203.0.113.9", "pass"),              # include: -> mx
    ("ex.test", "203.0.113.10", "fail"),             # include gives softfail: no match; -all
    ("relay.test", "203.0.113.10", "softfail"),
    ("six.test", "2001:db8::25", "pass"),
    ("six.test", "192.0.2.5", "pass"),               # redirect=
    ("six.test", "10.0.0.1", "fail"),
    ("none.test", "192.0.2.1", "none"),
    ("two.test", "192.0.2.1", "permerror"),          # two SPF records
    ("loop.test", "192.0.2.1", "permerror"),         # more than ten lookups
    ("macro.test", "192.0.2.1", "fail"),             # exists:%{i}.spf.test: no such name
    ("split.test", "192.0.2.1", "pass"),             # one record in two strings
    ("void.test", "192.0.2.1", "permerror"),         # three void lookups
    ("slow.test", "192.0.2.1", "temperror"),
])
def test_the_spf_evaluator(domain: str, ip: str, result: str) -> None:
    resolver = FakeResolver(ZONE, broken=("broken.test",))
    answer = asyncio.run(evaluate(resolver, domain, ip))  # type: ignore[arg-type]
    assert answer.result == result, answer
    assert answer.lookups <= 11
