"""Pure logic behind the console: login throttling, the counters' hour, the config editor,
redirect targets and the charts. (The pages themselves are tested in a real browser:
tests/integration/test_console.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from postroom import configedit
from postroom.admin import HISTORY_SERIES, History
from postroom.config import ConfigError, default_config_text
from postroom.console.auth import Throttle
from postroom.console.auth import safe_next as _safe_next
from postroom.console.charts import svg


def test_throttle_refuses_after_the_limit_until_the_window_passes() -> None:
    t = Throttle()
    keys = ["ip:192.0.2.1"]
    for i in range(Throttle.LIMIT - 1):
        t.fail(keys, 1000.0 + i)
        assert t.wait(keys, 1000.0 + i) == 0
    t.fail(keys, 1010.0)
    assert t.wait(keys, 1010.0) == pytest.approx(Throttle.WINDOW - 10)  # the oldest + window
    assert t.wait(["ip:192.0.2.2"], 1010.0) == 0                      # others unaffected
    assert t.wait(keys, 1000.0 + Throttle.WINDOW + 0.5) == 0          # the oldest left
    t.succeed(keys)
    assert t.failures.get("ip:192.0.2.1") is None


class FakeMetrics:
    def __init__(self) -> None:
        self.values = {name: 0.0 for name in HISTORY_SERIES.values()}

    def snapshot(self) -> dict[str, Any]:
        return {name: [{"labels": {"listener": "mx"}, "value": v / 2},
                       {"labels": {"listener": "submission"}, "value": v / 2}]
                for name, v in self.values.items()}


def test_history_counts_per_minute_and_leaves_the_time_before_start_empty() -> None:
    m = FakeMetrics()
    h = History(m)                                   # type: ignore[arg-type]
    start = 600_000.0                                 # a minute boundary
    h.samples.append((start + 5, h.totals()))         # first sample: the baseline
    m.values["postroom_messages_received_total"] = 4
    h.samples.append((start + 15, h.totals()))
    m.values["postroom_messages_received_total"] = 10
    m.values["postroom_relay_refusals_total"] = 1
    h.samples.append((start + 65, h.totals()))        # the next minute
    now = start + 70
    m.values["postroom_messages_received_total"] = 12
    out = h.per_minute(now, h.totals())
    received = out["series"]["received"]
    assert len(received) == 60
    assert received[-2:] == [4, 8]                    # 4 in the first minute, 6 + 2 now
    assert received[-3] is None                       # before the server started
    assert out["series"]["relay_refusals"][-2:] == [0, 1]
    assert out["totals"]["received"] == 12
    assert out["start"] == (int(now // 60) - 59) * 60


def test_config_editor_keeps_comments_and_changes_only_what_it_must(tmp_path: Path) -> None:
    path = tmp_path / "postroom.toml"
    path.write_text(default_config_text("mx.example.org", ["example.org"]))
    before = path.read_text()
    view = configedit.read(path)
    assert view["routes"][0]["match"] == "*" and view["local_domains"] == ["example.org"]
    routes = view["routes"] + [{"match": "Partner.Example", "via": "smarthost",
                                "host": "smtp.partner.example:587", "tls": "required",
                                "tls_verify": True, "username": "", "password_file": "",
                                "cost": "2"}]
    config, text = configedit.write(path, routes, ["127.0.0.1/32", "10.1.0.0/16"],
                                    ["example.org"], view["version"])
    assert path.read_text() == text
    assert path.with_name("postroom.toml.bak").read_text() == before
    # every comment of the original is still there, and the old route keeps its keys
    assert all(line in text for line in before.splitlines() if line.startswith("#"))
    assert 'match = "*"\nvia = "mx"' in text
    assert [r.match for r in config.routes] == ["*", "partner.example"]
    assert config.routes[1].port == 587 and config.routes[1].cost == 2
    assert "tls_verify" not in text.split('match = "Partner.Example"')[1]   # a default
    # an invalid change names each key and writes nothing
    with pytest.raises(ConfigError) as err:
        configedit.write(path, [{"match": "no spaces please", "via": "smarthost"}],
                         ["banana"], [], configedit.read(path)["version"])
    keys = {p.key for p in err.value.problems}
    assert {"route[0].match", "route[0].host", "relay.trusted_networks[0]",
            "domains.local"} <= keys
    assert path.read_text() == text
    # an editor that read an older version is told so
    with pytest.raises(configedit.EditConflict):
        configedit.write(path, routes, ["127.0.0.1/32"], ["example.org"], view["version"])
    # check_only validates without writing
    configedit.write(path, routes[:1], ["127.0.0.1/32"], ["example.org"],
                     configedit.read(path)["version"], check_only=True)
    assert path.read_text() == text
    configedit.restore(path)
    assert path.read_text() == before


def test_config_editor_without_routes_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "postroom.toml"
    path.write_text('data_dir = "d"\n[domains]\nlocal = ["example.org"]\n')
    view = configedit.read(path)
    assert not view["routes_written"] and view["routes"][0]["match"] == "*"
    assert view["trusted_networks"] == ["127.0.0.1/32", "::1/128"]
    config, text = configedit.write(path, view["routes"], view["trusted_networks"],
                                    view["local_domains"], view["version"])
    assert "[[route]]" in text and [r.match for r in config.routes] == ["*"]


@pytest.mark.parametrize("target, expected", [
    ("/queues?x=1", "/queues?x=1"), ("//evil.example/", "/"), ("http://evil.example/", "/"),
    ("/\\evil.example", "/"), ("", "/"), (None, "/"), ("queues", "/")])
def test_redirects_stay_on_the_console(target: str | None, expected: str) -> None:
    assert _safe_next(target) == expected


def test_chart_says_in_words_what_it_draws() -> None:
    values: list[float | None] = [None] * 57 + [0, 3, 5]
    out = str(svg("received", values))
    assert 'aria-label="Received: 8 in the last hour, 5 this minute, at most 5 a minute"' in out
    assert out.count("<rect") == 2 and 'role="img"' in out


def test_a_flood_of_refused_logins_is_one_event_per_window() -> None:
    t = Throttle()
    keys = ["ip:192.0.2.9"]
    assert t.note_refusal(keys, 100.0) is True
    assert [t.note_refusal(keys, 100.0 + i) for i in range(1, 50)] == [False] * 49
    assert t.note_refusal(keys, 100.0 + Throttle.WINDOW + 1) is True


ROUTES_WITH_COMMENTS = '''data_dir = "d"
[domains]
local = ["example.org"]

# A: the partner, through its smart host
[[route]]
match = "partner.example"   # the partner
via = "smarthost"
host = "smtp.partner.example"

# B: everything else by MX
[[route]]
match = "*"
via = "mx"
'''


def test_removing_a_route_takes_its_own_comments_and_no_others(tmp_path: Path) -> None:
    path = tmp_path / "postroom.toml"
    path.write_text(ROUTES_WITH_COMMENTS)
    view = configedit.read(path)
    assert [r["index"] for r in view["routes"]] == [0, 1]
    _, text = configedit.write(path, view["routes"][1:], view["trusted_networks"],
                               view["local_domains"], view["version"])
    assert "smtp.partner.example" not in text and "# the partner" not in text
    assert '# B: everything else by MX\n[[route]]\nmatch = "*"' in text
    # and the other way round: removing B keeps A's comments with A
    path.write_text(ROUTES_WITH_COMMENTS)
    view = configedit.read(path)
    _, text = configedit.write(path, view["routes"][:1], view["trusted_networks"],
                               view["local_domains"], view["version"])
    assert '# A: the partner, through its smart host\n[[route]]\nmatch = "partner.example"' \
        '   # the partner' in text
    assert "# B" not in text.split("# the partner")[0] and 'match = "*"' not in text


def test_routes_written_inline_can_all_be_removed(tmp_path: Path) -> None:
    path = tmp_path / "postroom.toml"
    path.write_text('data_dir = "d"\nroute = [{match = "*", via = "smarthost", '
                    'host = "relay.example"}]\n[domains]\nlocal = ["example.org"]\n')
    view = configedit.read(path)
    config, text = configedit.write(path, [], view["trusted_networks"],
                                    view["local_domains"], view["version"])
    assert "relay.example" not in text
    assert [(r.match, r.via) for r in config.routes] == [("*", "mx")]    # the default


def test_the_editor_never_sets_or_changes_a_password_file(tmp_path: Path) -> None:
    path = tmp_path / "postroom.toml"
    (tmp_path / "secret").write_text("pw\n")
    path.write_text(ROUTES_WITH_COMMENTS.replace(
        'host = "smtp.partner.example"', 'host = "smtp.partner.example"\n'
        'username = "u"\npassword_file = "secret"'))
    view = configedit.read(path)
    routes = view["routes"]
    assert routes[0]["password_file"] == "secret"
    # kept as it is: fine
    configedit.write(path, routes, view["trusted_networks"], view["local_domains"],
                     view["version"], check_only=True)
    # pointed at another file, or set on a new route: refused, by key
    for changed in ([routes[0] | {"password_file": "data/admin.token"}, routes[1]],
                    [*routes, {"match": "x.example", "via": "smarthost", "host": "h",
                               "username": "u", "password_file": "/etc/shadow"}]):
        with pytest.raises(ConfigError) as err:
            configedit.write(path, changed, view["trusted_networks"],
                             view["local_domains"], view["version"])
        assert [p.key for p in err.value.problems][0].endswith(".password_file")
