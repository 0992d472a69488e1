"""The operations commands: status, stop, start, restart, reload, queue, stats.

Each one is a call to the running server's admin API (``[admin] listen``) with the token
from ``<data_dir>/admin.token``; none of them opens the spool itself. Every read command
takes ``--json`` and then prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load, parse_config
from .format import age, when

__all__ = ["AdminApiError", "ApiClient", "add_commands", "add_diagnostics", "load_or_defaults",
           "sendmail_main"]


class AdminApiError(Exception):
    """The API could not be reached, or refused the request; the text says which."""


class ApiClient:
    def __init__(self, config: Config, timeout: float = 60.0) -> None:
        if config.admin.listen is None:
            raise AdminApiError("the admin API is off ([admin] listen = \"\"); set it to "
                                "\"127.0.0.1:8025\" and restart the server")
        host, port = config.admin.listen
        host = f"[{host}]" if ":" in host else host
        self.base = f"http://{host}:{port}"
        self.timeout = timeout
        try:
            self.token = config.token_path.read_text().strip()
        except FileNotFoundError:
            raise AdminApiError(f"no admin token at {config.token_path}: has the server "
                                "been started with this config?") from None
        except PermissionError:
            raise AdminApiError(f"cannot read the admin token {config.token_path} "
                                "(mode 0600): run as the user that runs the server") from None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             query: dict[str, Any] | None = None) -> Any:
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items()
                                                 if v not in (None, "", False)})
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", "")
            except ValueError:
                message = ""
            raise AdminApiError(message or f"the admin API answered {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminApiError(f"cannot reach the admin API at {self.base} ({reason}): is "
                                "'postroom serve' running with this config?") from None
        if path == "/metrics":
            return raw.decode()
        return json.loads(raw)


# --- formatting: the shared helpers (postroom.format), in the command line's style -------
def _age(seconds: float | None) -> str:
    return age(seconds, compact=True)          # '2d3h', '5m0s': fits the columns


def _when(ts: float | None) -> str:
    return when(ts, local=True)                # local time, no zone


def _print_status(data: dict[str, Any]) -> None:
    print(f"{'COMPONENT':19} {'STATE':9} SINCE")
    for c in data["components"]:
        note = f"  ({c['note']})" if c.get("note") else ""
        print(f"{c['name']:19} {c['state']:9} {_when(c.get('since'))}{note}")
    nodes = data.get("nodes") or []
    if len(nodes) > 1 or any(n["name"] != data.get("node") for n in nodes):
        print(f"\n{'NODE':19} {'SEEN':9} CLAIMS  (this node: {data.get('node')})")
        for n in nodes:
            print(f"{n['name']:19} {_age(n.get('seconds_since')) + ' ago':9} "
                  f"{n.get('claims', 0):6}  {n.get('info', {}).get('hostname', '')}")


def _print_summary(data: dict[str, Any]) -> None:
    now = time.time()
    print(f"{'QUEUE':22} {'MESSAGES':>8} {'RECIPIENTS':>10} {'OLDEST':>8} {'NEXT RETRY':>10} "
          f"{'HELD':>5}")
    for q in data["queues"]:
        nxt = "-" if q["next_retry"] is None else \
            ("now" if q["next_retry"] <= now else "in " + _age(q["next_retry"] - now))
        print(f"{q['name']:22} {q['messages']:8} {q['recipients']:10} "
              f"{_age(q['oldest_age_seconds']):>8} {nxt:>10} {q['held']:5}")


QUEUES = ("inbound-conversion", "inbound-delivery", "outbound-conversion",
          "outbound-delivery")


def _arrival(ts: float) -> str:
    """Local time as mailq shows it: 'Sat Dec  5 23:59:52'."""
    t = time.localtime(ts)
    return f"{time.strftime('%a %b', t)} {t.tm_mday:>2} {time.strftime('%H:%M:%S', t)}"


def _why(r: dict[str, Any], now: float) -> str:
    """The reason line of one recipient, mailq's "(...)", with Postroom's retry state;
    "" for a recipient that has not been tried and waits for nothing."""
    if r["held"]:
        state = "held by the administrator: postroom queue release ID"
    elif r["next_attempt"] is None or not (r["last_reply"] or r["attempts"]):
        state = ""
    else:
        tries = f"{r['attempts']} attempt{'s' if r['attempts'] != 1 else ''}, " \
            if r["attempts"] else ""
        state = tries + ("next try now" if r["next_attempt"] <= now else
                         f"next try in {_age(r['next_attempt'] - now)}")
    return "; ".join(part for part in (r["last_reply"], state) if part)


def _print_list(data: dict[str, Any]) -> None:
    """Postfix's mailq, column for column (its queue ids are 11 characters, Postroom's
    18): queue id, '!' when held, size, arrival time, sender; then each recipient, after
    the reason it waits for in parentheses; then the total."""
    messages = data["messages"]
    if not messages:
        print(f"{data['queue']}: no messages match" if data["queue"] != "all" else
              "Mail queue is empty")
        return
    now = time.time()
    width = max(11, *(len(m["id"]) for m in messages))
    print(f"{'-Queue ID-':<{width + 1}}--Size-- ----Arrival Time---- -Sender/Recipient-------")
    for m in messages:
        held = "!" if m["recipients"] and all(r["held"] for r in m["recipients"]) else " "
        print(f"{m['id']:<{width}}{held}{m['size']:>7} {_arrival(m['received'])}  "
              f"{m['sender'] or 'MAILER-DAEMON'}")
        groups: dict[str, list[str]] = {}
        for r in m["recipients"]:
            groups.setdefault(_why(r, now), []).append(r["address"])
        for why, addresses in sorted(groups.items(), key=lambda g: g[0] != ""):
            if why:
                print(f"{'':{width + 8}}({why})")
            for address in addresses:
                print(f"{'':{width + 30}}{address}")
        print()
    total = sum(m["size"] for m in messages)
    print(f"-- {total // 1024} Kbytes in {len(messages)} "
          f"Request{'s' if len(messages) != 1 else ''}.")
    if data.get("truncated"):
        print("(more messages match: narrow the filters)")


def _list_queues(client: ApiClient, queue: str | None, query: dict[str, Any]) -> Any:
    """One queue's messages; without a queue, all four, each message once (mailq)."""
    if queue:
        return client.call("GET", f"/api/queues/{urllib.parse.quote(queue)}", query=query)
    merged: dict[str, dict[str, Any]] = {}
    truncated = False
    for name in QUEUES:
        got = client.call("GET", f"/api/queues/{name}", query=query)
        truncated = truncated or bool(got.get("truncated"))
        for m in got["messages"]:
            if m["id"] in merged:
                merged[m["id"]]["recipients"] += m["recipients"]
            else:
                merged[m["id"]] = m
    return {"queue": "all", "truncated": truncated,
            "messages": sorted(merged.values(), key=lambda m: (m["received"], m["id"]))}


def _print_show(m: dict[str, Any]) -> None:
    c = m["client"]
    print(f"Queue id:  {m['id']}")
    print(f"Received:  {_when(m['received'])} from [{c.get('peer')}] helo={c.get('helo')} "
          f"listener={c.get('listener')} tls={'yes' if c.get('tls') else 'no'} "
          f"auth={c.get('auth') or '-'}")
    print(f"Sender:    <{m['sender']}>  size {m['size']}"
          + "".join(f"  {k}={v}" for k, v in m["params"].items()))
    print("Headers:")
    for line in m["headers"].rstrip("\r\n").split("\r\n"):
        print(f"  {line}")
    for r in m["recipients"]:
        print(f"Recipient <{r['address']}>: {r['state']} ({r['queue']}), attempts "
              f"{r['attempts']}{', HELD' if r['held'] else ''}"
              + (f", in flight (claimed by {r['claimed_by']})" if r.get("claimed_by") else ""))
        if r["last_reply"]:
            print(f"  last reply: {r['last_reply']}")
        for a in r["attempt_log"]:
            where = a["hop"] + (f" {a['remote_host']} [{a['remote_ip']}]"
                                if a.get("remote_ip") else "")
            print(f"  attempt {_when(a['at'])} {a['step']} via {where}: {a['reply']}")
        if r["transcript"]:
            print("  transcript of the last attempt:")
            for line in r["transcript"].splitlines():
                print(f"    {line}")


def _print_reasons(data: dict[str, Any]) -> None:
    if not data["reasons"]:
        print("nothing is waiting for a retry")
        return
    for g in data["reasons"]:
        print(f"[{g['id']}] {g['recipients']} recipients in {g['messages']} messages, "
              f"oldest {_age(g['oldest_age_seconds'])}, via {g['hop'] or '-'}, status "
              f"{g['status'] or '-'}")
        print(f"    {g['reply']}")
    print("Act on a group with: postroom queue retry|hold|bounce|delete --reason ID --all")


def _print_stats(data: dict[str, Any]) -> None:
    if "nodes" in data:
        print("# added up over " + ", ".join(
            f"{n['name']} (heartbeat {_age(n['seconds_since'])} ago)" for n in data["nodes"]))
    for name, samples in sorted(data["metrics"].items()):
        for s in samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s["labels"].items()))
            value = s["value"]
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            print(f"{name}{'{' + labels + '}' if labels else ''} {shown}")


def _print_logging(data: dict[str, Any]) -> None:
    print(f"{'CATEGORY':21} LEVEL")
    for c, level in data["categories"].items():
        print(f"{c:21} {level}")
    for scope, table in (("peer", data["peers"]), ("domain", data["domains"])):
        for who, levels in table.items():
            shown = ", ".join(f"{c}={v}" for c, v in levels.items() if v != "none")
            print(f"{scope} {who}: {shown}")


def _event_line(e: dict[str, Any]) -> str:
    where = "".join(f" {k}={e[k]}" for k in ("queue_id", "peer") if e.get(k))
    return (f"{_when(e['at'])} {e['severity'].upper():7} {e['id']} {e['category']}"
            f"{where}: {e['text']}")


def _print_events(data: dict[str, Any]) -> None:
    for e in data["events"]:
        print(_event_line(e))


def _print_trace(data: dict[str, Any]) -> None:
    if not data["messages"]:
        print("no message found (the event log keeps what happened since it started)")
    for m in data["messages"]:
        print(f"Message {m['queue_id']}: {m['state']}")
        for e in m["events"]:
            print(f"  {_when(e['at'])}  [{e['id']}] {e['text']}")
            for d in e["fields"].get("decisions", []):
                print(f"      accepted {d}")
        for r in m.get("queued", []):
            print(f"  now waiting: <{r['address']}> ({r['state']}) {r['last_reply']}")
        print()


# --- commands ------------------------------------------------------------------------
def load_or_defaults(path: Path) -> Config:
    """The config at ``path``; when it does not exist, the defaults ``serve`` would write."""
    if path.exists():
        return load(path)
    return parse_config({}, path.resolve().parent, f"{path} (not found: defaults)")


def _config(args: argparse.Namespace) -> Config:
    return load_or_defaults(Path(args.config))


def _run(args: argparse.Namespace, call: Callable[[ApiClient], Any],
         show: Callable[[Any], None] | None) -> int:
    try:
        client = ApiClient(_config(args))
        data = call(client)
    except (ConfigError, AdminApiError) as exc:
        print(f"postroom: {exc}", file=sys.stderr)
        return 1
    if getattr(args, "json", False) or show is None:
        print(json.dumps(data, indent=2) if not isinstance(data, str) else data)
    else:
        show(data)
    return 0


def _process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie that its parent has not yet reaped
    has exited too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False                   # alive, and another user's
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _api_gone(client: ApiClient) -> bool:
    try:
        client.call("GET", "/api/status")
    except AdminApiError:
        return True
    return False


def _stop_server(args: argparse.Namespace) -> int:
    """``postroom stop``: the whole server, as SIGTERM stops it (``postfix stop``), and
    wait until it is gone."""
    try:
        client = ApiClient(_config(args), timeout=15.0)
        data = client.call("POST", "/api/stop")
    except (ConfigError, AdminApiError) as exc:
        print(f"postroom: {exc}", file=sys.stderr)
        return 1
    pid = int(data["pid"])
    if not args.json:
        print(f"stopping Postroom (pid {pid}): no new connections, open sessions are told "
              "421 4.3.2, queued mail stays queued", flush=True)
    started = time.monotonic()
    while not (_process_gone(pid) and _api_gone(client)):
        if time.monotonic() - started > args.timeout:
            print(f"postroom: the server (pid {pid}) is still stopping after "
                  f"{args.timeout:g}s: deliveries under way finish first; see it go with "
                  f"'postroom status', or end it with 'kill {pid}'", file=sys.stderr)
            return 1
        time.sleep(0.1)
    seconds = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps({**data, "stopped": True, "seconds": seconds}, indent=2))
    else:
        print(f"Postroom stopped (pid {pid}, after {seconds:g}s)")
    return 0


def _start_server(args: argparse.Namespace) -> int:
    """``postroom start`` without a component: the server is started by ``postroom
    serve``, which runs in the foreground; say so, and whether one already runs."""
    try:
        client = ApiClient(_config(args), timeout=5.0)
        client.call("GET", "/api/status")
    except ConfigError as exc:
        print(f"postroom: {exc}", file=sys.stderr)
        return 1
    except AdminApiError:
        print(f"postroom: 'postroom start' starts a stopped component; the server itself "
              f"runs in the foreground:\n  postroom serve -c {args.config}\n(under systemd "
              "or another service manager to keep it running; it stops cleanly with "
              "'postroom stop' or SIGTERM)", file=sys.stderr)
        return 1
    print(f"postroom: the server is already running (its admin API answers at "
          f"{client.base}); 'postroom start COMPONENT' starts a stopped component "
          "(see 'postroom status')", file=sys.stderr)
    return 1


def _events(args: argparse.Namespace) -> int:
    query = {"since": args.since, "severity": args.severity, "category": args.category,
             "queue_id": args.queue_id, "limit": args.limit}
    if not args.follow:
        return _run(args, lambda c: c.call("GET", "/api/events", query=query), _print_events)
    try:
        client = ApiClient(_config(args))
        last = 0
        while True:
            got = client.call("GET", "/api/events", query={**query, "after": last or None})
            for e in got["events"]:
                last = max(last, e["seq"])
                print(json.dumps(e) if args.json else _event_line(e), flush=True)
            if not got["events"]:
                last = last or -1          # nothing yet: from now on, only new events
            time.sleep(1)
    except (ConfigError, AdminApiError) as exc:
        print(f"postroom: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"domain": args.domain, "sender": args.sender, "rcpt": args.rcpt,
            "older_than": args.older_than,
            "held": None if not args.held else True}


def add_commands(sub: Any, with_config: Callable[[argparse.ArgumentParser],
                                                  argparse.ArgumentParser]) -> None:
    def read(name: str, help_: str) -> argparse.ArgumentParser:
        p = with_config(sub.add_parser(name, help=help_))
        p.add_argument("--json", action="store_true", help="print one JSON document")
        return p

    read("status", "each component's state").set_defaults(
        fn=lambda a: _run(a, lambda c: c.call("GET", "/api/status"), _print_status))
    for action in ("stop", "start", "restart"):
        p = read(action, {"stop": "stop one component, or without one the whole server",
                          "start": "start one stopped component",
                          "restart": "restart one component"}[action])
        p.add_argument("component", nargs=None if action == "restart" else "?",
                       help="smtp, submission, conversion, queue-manager, local-delivery "
                            "or outbound-delivery")
        if action == "stop":
            p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                           help="without a component: how long to wait for the server to "
                                "be gone (default 60)")
        p.set_defaults(fn=lambda a, action=action: _run(
            a, lambda c: c.call("POST", f"/api/components/{a.component}/{action}"),
            lambda d: print(f"{d['name']}: {d['state']}")) if a.component else
            _stop_server(a) if action == "stop" else _start_server(a))
    read("reload", "re-read the config without dropping connections or mail").set_defaults(
        fn=lambda a: _run(a, lambda c: c.call("POST", "/api/reload"), lambda d: print(
            f"reloaded {d['reloaded']}" + (f"; a restart is needed to change: "
                                           f"{', '.join(d['needs_restart'])}"
                                           if d["needs_restart"] else ""))))
    st = read("stats", "the counters (also at /metrics)")
    st.add_argument("--all-nodes", action="store_true",
                    help="add up every node's counters (several nodes on one PostgreSQL "
                         "spool: as each published them with its last heartbeat)")
    st.set_defaults(fn=lambda a: _run(
        a, lambda c: c.call("GET", "/api/stats" + ("?nodes=all" if a.all_nodes else "")),
        _print_stats))

    lg = read("logging", "diagnostic logging: each category's level")
    lg.set_defaults(fn=lambda a: _run(a, lambda c: c.call("GET", "/api/logging"),
                                      _print_logging))
    lgs = lg.add_subparsers(dest="logging_command")
    st = with_config(lgs.add_parser("set", help="set a category's level, at once"))
    st.add_argument("category", help="a category, or all")
    st.add_argument("level", help="none, minimum, medium or maximum")
    scope = st.add_mutually_exclusive_group()
    scope.add_argument("--peer", help="only for this client address")
    scope.add_argument("--domain", help="only for mail to this recipient domain")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=lambda a: _run(a, lambda c: c.call("POST", "/api/logging", body={
        "category": a.category, "level": a.level, "peer": a.peer, "domain": a.domain}),
        _print_logging))

    ev = read("events", "the event log")
    ev.add_argument("--since", help="this long ago, e.g. 10m, 2h, 1d")
    ev.add_argument("--severity", choices=["error", "warning", "info"],
                    help="this severity or worse")
    ev.add_argument("--category", help="one diagnostic category")
    ev.add_argument("--queue-id", help="events of one message")
    ev.add_argument("--limit", type=int, default=200)
    ev.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    ev.set_defaults(fn=_events)

    tr = read("trace", "one timeline per message, from the event log")
    tr.add_argument("id", nargs="?", help="a queue id")
    tr.add_argument("--message-id", help="the Message-ID header")
    tr.add_argument("--sender", help="envelope sender")
    tr.add_argument("--rcpt", help="a recipient")
    tr.add_argument("--since", help="received within this long, e.g. 1d")
    tr.set_defaults(fn=lambda a: _run(a, lambda c: c.call("GET", "/api/trace", query={
        "id": a.id, "message_id": a.message_id, "sender": a.sender, "rcpt": a.rcpt,
        "since": a.since}), _print_trace))

    q = read("queue", "the four queues: summary, list, show, reasons and actions")
    q.set_defaults(fn=lambda a: _run(a, lambda c: c.call("GET", "/api/queues"),
                                     _print_summary))
    qs = q.add_subparsers(dest="queue_command")

    def filtered(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--domain", help="recipient domain")
        p.add_argument("--sender", help="envelope sender (<> for the null sender)")
        p.add_argument("--rcpt", help="recipient address")
        p.add_argument("--older-than", help="received longer ago than this (e.g. 1h, 2d)")
        p.add_argument("--held", action="store_true", help="held recipients only")
        return p

    ls = filtered(with_config(qs.add_parser("list", help="the messages in one queue, or "
                                                         "in all four (as mailq)")))
    ls.add_argument("queue", nargs="?", help="inbound-conversion, inbound-delivery, "
                    "outbound-conversion or outbound-delivery (default: all of them)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=lambda a: _run(a, lambda c: _list_queues(c, a.queue, _filters(a)),
                                      _print_list))

    sh = with_config(qs.add_parser("show", help="one message, its recipients and attempts"))
    sh.add_argument("id")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(fn=lambda a: _run(a, lambda c: c.call(
        "GET", f"/api/messages/{urllib.parse.quote(a.id)}"), _print_show))

    rs = with_config(qs.add_parser("reasons", help="why mail waits, grouped"))
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(fn=lambda a: _run(a, lambda c: c.call("GET", "/api/queues/reasons"),
                                      _print_reasons))

    for action, what in (("retry", "try again now"), ("hold", "stop trying until released"),
                         ("release", "undo hold"), ("delete", "remove, with no NDR"),
                         ("bounce", "return to the sender with an NDR")):
        p = filtered(with_config(qs.add_parser(action, help=what)))
        p.add_argument("ids", nargs="*", help="queue ids")
        p.add_argument("--queue", help="only recipients in this queue")
        p.add_argument("--reason", help="a group id from 'postroom queue reasons'")
        p.add_argument("--all", action="store_true",
                       help="confirm that the filters may select many messages")
        p.add_argument("--json", action="store_true")
        p.set_defaults(fn=lambda a, action=action: _run(a, lambda c: c.call(
            "POST", "/api/queues/actions", body={
                "action": action, "ids": a.ids, "queue": a.queue, "reason": a.reason,
                "all": a.all, **_filters(a)}),
            lambda d: print(f"{d['action']}: {d['recipients']} recipients of "
                            f"{d['messages']} messages")))


# --- diagnostics: dns, probe, explain (run here, with the configured nameservers) -------
def _diag(args: argparse.Namespace, work: Callable[[Config, Any], Any],
          show: Callable[[Any], None], ok: Callable[[Any], bool] = lambda _: True) -> int:
    import asyncio

    from .dns import Resolver
    try:
        config = _config(args)
        resolver = Resolver(config.nameservers)
        data = asyncio.run(work(config, resolver))
    except ConfigError as exc:
        print(f"postroom: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"postroom: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        show(data)
    return 0 if ok(data) else 1


def _print_dns(d: dict[str, Any]) -> None:
    print(f"{d['domain']}: {d['summary']}")
    for h in d["mx"]:
        where = ", ".join(h["addresses"]) or (h["error"]["text"] if h["error"] else "-")
        label = "implicit MX" if d["implicit"] else f"MX {h['preference']:>3}"
        print(f"  {label} {h['host']}: {where}")
    for name in ("spf", "dmarc", "mta_sts"):
        p = d[name]
        state = p["record"] if p["present"] else (
            f"lookup failed: {p['error']['text']}" if p["error"] else "none")
        print(f"  {name.upper().replace('_', '-'):8} {state}")


def _print_probe(d: dict[str, Any]) -> None:
    print(d.get("transcript", "").rstrip())
    if d.get("tls"):
        t = d["tls"]
        print(f"TLS: {t['protocol']} {t['cipher']}; certificate {t.get('subject', '?')}, "
              f"expires {t.get('not_after', '?')}, "
              + ("verified" if t["verified"] else f"NOT verified ({t['verify_error']})"))
    if d.get("auth_mechanisms"):
        print(f"AUTH mechanisms: {' '.join(d['auth_mechanisms'])}")
    print(f"Verdict: {d['verdict']}" + (f": {d['reply']}" if d.get("reply") else ""))


def _print_explain(e: dict[str, Any]) -> None:
    print(f"<{e['sender']}> -> <{e['recipient']}> from [{e['client_ip']}] on {e['listener']}"
          + (f" as {e['auth']}" if e["auth"] else ""))
    print(f"MAIL: {'accepted' if e['mail']['accept'] else 'refused'} ({e['mail']['reason']})")
    print(f"RCPT: {'accepted' if e['rcpt']['accept'] else 'refused: ' + e['rcpt']['reply']}")
    print(f"      {e['rcpt']['reason']}")
    if e["rcpt"].get("fix"):
        print(f"      {e['rcpt']['meaning']}")
        print(f"      Fix: {e['rcpt']['fix']}")
    r = e["routing"]
    print(f"Routing: {r['reason']}")
    for c in r["candidates"]:
        mark = "*" if c["chosen"] else ("+" if c["matches"] else "-")
        print(f"  {mark} [[route]] match={c['match']} via={c['via']}"
              + (f" host={c['host']}" if c["host"] else "") + f" cost={c['cost']}: {c['why']}")
    for hop in e["next_hops"]:
        if hop["kind"] == "mx":
            hosts = ", ".join(f"{h['host']} ({', '.join(h['addresses']) or '-'})"
                              for h in hop["mx"])
            why = hop["error"]["text"] if hop["error"] else "null MX" if hop["null_mx"] else "-"
            print(f"Next hop: MX of {hop['domain']}: {hosts or why}")
        elif hop["kind"] == "lmtp":
            print(f"Next hop: {hop['store']}")
        elif hop["kind"] == "smarthost":
            why = hop["error"]["text"] if hop["error"] else "-"
            print(f"Next hop: smart host {hop['host']}:{hop['port']} "
                  f"({', '.join(hop['addresses']) or why})")
        else:
            print(f"Next hop: local mailbox {hop['mailbox']} "
                  f"({'exists' if hop['exists'] else 'does not exist'})"
                  + (f", delivered over {hop['store']}" if hop.get("store") else ""))
    print(f"Outcome: {e['outcome']}")


def _split_host(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 25
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, 25


def add_diagnostics(sub: Any, with_config: Callable[[argparse.ArgumentParser],
                                                     argparse.ArgumentParser]) -> None:
    def diagnostics() -> Any:            # imported when used: dnspython is slow to load
        from . import diagnostics as module
        return module

    d = with_config(sub.add_parser("dns", help="MX, A/AAAA, SPF, DMARC and MTA-STS of a "
                                               "domain, with the configured nameservers"))
    d.add_argument("domain")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=lambda a: _diag(
        a, lambda c, r: diagnostics().dns_report(r, a.domain), _print_dns))

    p = with_config(sub.add_parser("probe", help="talk to an SMTP server as delivery would "
                                                 "(exit 0 when it accepts)"))
    p.add_argument("host", help="HOST[:PORT] (default port 25)")
    p.add_argument("--from", dest="sender", help="MAIL FROM address")
    p.add_argument("--to", dest="rcpt", help="RCPT TO address")
    p.add_argument("--starttls", action="store_true")
    p.add_argument("--auth", help="AUTH as this user (the password on stdin)")
    p.add_argument("--password-stdin", action="store_true")
    p.add_argument("--send", action="store_true", help="also send a short test message")
    p.add_argument("--json", action="store_true")

    def run_probe(a: argparse.Namespace) -> int:
        password = sys.stdin.readline().rstrip("\n") if a.auth and a.password_stdin else None
        if a.auth and password is None:
            print("postroom: --auth needs --password-stdin", file=sys.stderr)
            return 1
        host, port = _split_host(a.host)
        return _diag(a, lambda c, r: diagnostics().probe(
            host, port, resolver=r, helo=c.hostname, sender=a.sender, rcpt=a.rcpt,
            starttls=a.starttls, username=a.auth, password=password, send=a.send),
            _print_probe, ok=lambda data: data["verdict"] == "accepts")
    p.set_defaults(fn=run_probe)

    e = with_config(sub.add_parser("explain", help="what the server would decide for one "
                                                   "sender and recipient, and why"))
    e.add_argument("--from", dest="sender", required=True)
    e.add_argument("--to", dest="rcpt", required=True)
    e.add_argument("--client-ip", default="127.0.0.1")
    e.add_argument("--auth", help="as if authenticated as this user")
    e.add_argument("--listener", default="mx", choices=["mx", "submission", "submissions"])
    e.add_argument("--json", action="store_true")

    def run_explain(a: argparse.Namespace) -> int:
        from .users import UserStore

        def work(c: Config, r: Any) -> Any:
            exists: Callable[[str], bool] = (UserStore(c.users_path).exists
                                             if c.users_path.exists() else lambda _: False)
            return diagnostics().explain(c, r, exists, sender=a.sender, rcpt=a.rcpt,
                           client_ip=a.client_ip, auth_user=a.auth, listener=a.listener)
        return _diag(a, work, _print_explain)
    e.set_defaults(fn=run_explain)

    dr = with_config(sub.add_parser("doctor", help="the seed case's nine steps against the "
                                                   "running server, and its store; names "
                                                   "the cause"))
    dr.add_argument("--to", dest="rcpt", help="a destination address to test")
    dr.add_argument("--from", dest="sender", help="the sender (default: the postmaster of "
                    "the first local domain); step 11 checks its domain's SPF, DKIM and "
                    "DMARC records")
    dr.add_argument("--client-ip", default="127.0.0.1",
                    help="the sending client's address, for the relay decision")
    dr.add_argument("--auth", help="as if the client authenticated as this user")
    dr.add_argument("--stuck-after", default="1h", help="a queue older than this is stuck")
    dr.add_argument("--send-test", action="store_true",
                    help="send a real test message to --to and follow it to its fate")
    dr.add_argument("--json", action="store_true")

    def run_doctor(a: argparse.Namespace) -> int:
        import asyncio

        from .config import parse_duration
        from .users import UserStore

        def work(c: Config, r: Any) -> Any:
            try:
                client: ApiClient | None = ApiClient(c)
            except AdminApiError:
                client = None

            async def fetch(path: str) -> Any:
                if client is None:
                    raise OSError("no admin token: has the server been started?")
                try:
                    return await asyncio.to_thread(client.call, "GET", path)
                except AdminApiError as exc:
                    raise OSError(str(exc)) from None
            exists: Callable[[str], bool] = (UserStore(c.users_path).exists
                                             if c.users_path.exists() else lambda _: False)
            async def submit(sender: str, rcpt: str, data: bytes) -> Any:
                import base64
                import getpass
                if client is None:
                    raise OSError("no admin token: has the server been started?")
                try:
                    return await asyncio.to_thread(client.call, "POST", "/api/submit", {
                        "sender": sender, "recipients": [rcpt], "user": getpass.getuser(),
                        "data": base64.b64encode(data).decode()})
                except AdminApiError as exc:
                    raise ValueError(str(exc)) from None
            return diagnostics().doctor(c, r, exists, fetch, rcpt=a.rcpt, sender=a.sender,
                                        client_ip=a.client_ip, auth_user=a.auth,
                                        stuck_after=parse_duration(a.stuck_after),
                                        submit=submit if a.send_test else None)
        return _diag(a, work, _print_doctor, ok=lambda d: d["verdict"] == "ok")
    dr.set_defaults(fn=run_doctor)


def _print_doctor(d: dict[str, Any]) -> None:
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
    for s in d["steps"]:
        print(f"{s['step']}. {s['name']:18} [{marks[s['status']]}] {s['finding']}")
        if s["fix"] and s["status"] in ("warn", "fail"):
            print(f"   fix: {s['fix']}")
    print(f"Verdict: {d['verdict']}")


# --- sendmail ------------------------------------------------------------------------
SENDMAIL_USAGE = """usage: postroom sendmail [-t] [-f SENDER] [-i | -oi] [-c CONFIG] [RECIPIENT ...]
  Reads a message on stdin and queues it through the running server (local submission,
  trusted like an authenticated user). Without -i, a line with a single dot ends it.
  -t       take the recipients from To, Cc and Bcc (Bcc is removed)
  -f ADDR  the envelope sender (default: your user name at the server's hostname)
  -F NAME  ignored (the From header is the program's business)
  -c FILE  Postroom's config (default ./postroom.toml, or $POSTROOM_CONFIG)"""


def sendmail_main(argv: list[str], stdin: Any = None) -> int:
    """sendmail-compatible local submission; exits non-zero with a clear error."""
    import base64
    import email.parser
    import email.utils
    import getpass
    import os

    def fail(text: str, code: int = 1) -> int:
        print(f"postroom sendmail: {text}", file=sys.stderr)
        return code

    extract = False
    dots_end = True
    sender = ""
    config_path = os.environ.get("POSTROOM_CONFIG", "postroom.toml")
    recipients: list[str] = []
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--":
            recipients += args
            break
        if a in ("-h", "--help"):
            print(SENDMAIL_USAGE)
            return 0
        if a == "-t":
            extract = True
        elif a in ("-i", "-oi"):
            dots_end = False
        elif a.startswith("-f") or a.startswith("-F") or a in ("-c", "--config"):
            value = a[2:] if len(a) > 2 and a[:2] in ("-f", "-F") else (args.pop(0) if args
                                                                         else None)
            if value is None:
                return fail(f"{a} needs a value\n{SENDMAIL_USAGE}", 64)
            if a.startswith("-f"):
                sender = value.strip("<>")
            elif a in ("-c", "--config"):
                config_path = value
        elif a == "-bs":
            return fail("-bs (SMTP on standard input and output) is not supported: speak "
                        "SMTP to the server's listener instead (swaks --server HOST:PORT; "
                        "through a program: swaks --pipe 'openssl s_client -quiet -connect "
                        "HOST:PORT' to a submissions port)", 64)
        elif a.startswith("-o") or a in ("-bm", "-em", "-ep", "-eq", "-v") or \
                a.startswith("-B") or a.startswith("-N") or a.startswith("-R") or \
                a.startswith("-V") or a.startswith("-X"):
            continue                      # sendmail options that do not apply here
        elif a.startswith("-"):
            return fail(f"unknown option {a}\n{SENDMAIL_USAGE}", 64)
        else:
            recipients.append(a)
    raw = (stdin or sys.stdin.buffer).read()
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    if dots_end and b"." in lines:
        lines = lines[: lines.index(b".")]
    if lines and lines[-1] == b"":
        lines.pop()
    data = b"".join(line + b"\r\n" for line in lines)
    try:
        config = load(Path(config_path))
    except ConfigError as exc:
        return fail(str(exc), 78)
    if extract:
        head_end = data.find(b"\r\n\r\n")
        head = data[: head_end + 2] if head_end >= 0 else data
        msg = email.parser.BytesHeaderParser().parsebytes(head)
        found = [addr for _, addr in email.utils.getaddresses(
            [v for k in ("To", "Cc", "Bcc") for v in msg.get_all(k, [])]) if addr]
        recipients = list(dict.fromkeys(recipients + found))
        # drop Bcc (and its folded lines) from the header
        out, skipping = [], False
        body = data[len(head):]
        for line in head.split(b"\r\n"):
            if line[:1] in (b" ", b"\t") and skipping:
                continue
            skipping = line.lower().startswith(b"bcc:")
            if not skipping:
                out.append(line)
        data = b"\r\n".join(out) + body
    if not sender:
        sender = f"{getpass.getuser()}@{config.hostname}"
    if not recipients:
        return fail("no recipients: give them as arguments, or use -t", 64)
    try:
        result = ApiClient(config).call("POST", "/api/submit", body={
            "sender": sender, "recipients": recipients, "user": getpass.getuser(),
            "data": base64.b64encode(data).decode()})
    except AdminApiError as exc:
        return fail(str(exc), 75)            # EX_TEMPFAIL: try again later
    print(f"postroom sendmail: queued as {result['queue_id']}", file=sys.stderr)
    return 0
