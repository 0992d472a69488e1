"""Editing the address spaces and relay settings in the config file, keeping its comments.

The console's routing page (through the admin API) reads the file's ``[[route]]`` tables,
``[relay] trusted_networks`` and ``[domains] local``, and writes changes back with tomlkit,
which keeps the administrator's comments and layout. A change is validated by the same
parser as ``postroom check`` before anything is written; the file is replaced atomically
(the old one is kept as ``<file>.bak``) and only then reloaded.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import AoT, Comment, Table

from .config import ROUTE_KEYS, Config, ConfigError, Problem, parse_text
from .files import atomic_write

__all__ = ["EditConflict", "ROUTE_FIELDS", "apply", "read", "write"]

# every key of a [[route]], in the order the form shows them (a route's password stays
# in its password_file: the console never sees it)
ROUTE_FIELDS = ("match", "via", "host", "path", "tls", "tls_verify", "username", "password_file",
                "cost")
assert set(ROUTE_FIELDS) == ROUTE_KEYS
_ROUTE_DEFAULTS: dict[str, Any] = {"via": "mx", "host": "", "path": "", "tls": "opportunistic",
                                   "tls_verify": True, "username": "", "password_file": "",
                                   "cost": 1}
_DEFAULT_TRUSTED = ["127.0.0.1/32", "::1/128"]
_DEFAULT_LOCAL = ["localhost"]


class EditConflict(ValueError):
    """The file changed since the editor read it."""


def version_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _route_view(t: dict[str, Any]) -> dict[str, Any]:
    return {k: t.get(k, _ROUTE_DEFAULTS.get(k, "")) for k in ROUTE_FIELDS}


def read(path: Path) -> dict[str, Any]:
    # each route carries its position in the file ("index"): a change names the tables
    # it keeps, so removing one never hands its comments to another
    """What the editor shows: the routes and relay settings as the file writes them."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(str(path), [Problem("(file)", "no such file: the server runs on "
                                              "built-in defaults, so there is nothing to "
                                              "edit")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [Problem("(syntax)", str(exc))]) from None
    routes = raw.get("route")
    relay = raw.get("relay")
    relay = relay if isinstance(relay, dict) else {}
    domains = raw.get("domains")
    domains = domains if isinstance(domains, dict) else {}
    return {
        "source": str(path), "version": version_of(text),
        "routes": [_route_view(t) | {"index": i} for i, t in enumerate(routes)
                   if isinstance(t, dict)]
        if isinstance(routes, list) else [_route_view({"match": "*", "via": "mx"})],
        "routes_written": isinstance(routes, list),
        "trusted_networks": list(relay.get("trusted_networks", _DEFAULT_TRUSTED)),
        "local_domains": list(domains.get("local", _DEFAULT_LOCAL)),
    }


def _clean_route(r: dict[str, Any], i: int) -> dict[str, Any]:
    """One route from the form, every key present: strings trimmed, cost and tls_verify
    typed."""
    out: dict[str, Any] = {}
    for k in ROUTE_FIELDS:
        v = r.get(k, _ROUTE_DEFAULTS.get(k, ""))
        if k == "tls_verify":
            v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "on", "yes")
        elif k == "cost":
            try:
                v = int(str(v).strip() or "1")
            except ValueError:
                raise ConfigError("the form", [Problem(f"route[{i}].cost",
                                                       f"{v!r} is not a whole number")]) from None
        else:
            v = str(v).strip()
        out[k] = v
    return out


def _update(table: Table, want: dict[str, Any]) -> None:
    """Set what changed. A key the file writes stays written (even at its default); a key
    it leaves out is added only when it differs from the default; an emptied string key
    is removed."""
    for k, v in want.items():
        if k in table:
            if v == "" and k != "match":
                del table[k]
            elif table[k] != v:
                table[k] = v
        elif k in ("match", "via") or v != _ROUTE_DEFAULTS.get(k):
            table[k] = v


def _index(r: dict[str, Any]) -> int | None:
    value = r.get("index")
    if value in (None, ""):
        return None
    try:
        return int(str(value))
    except ValueError:
        raise ValueError(f"route index {value!r} is not a number") from None


def _indices(routes: list[dict[str, Any]]) -> list[int | None]:
    """Each route's table in the file; without any index, by position."""
    indexed = [_index(r) for r in routes]
    if not any(i is not None for i in indexed):
        return list(range(len(routes)))
    return indexed


def apply(text: str, routes: list[dict[str, Any]], trusted_networks: list[str],
          local_domains: list[str]) -> str:
    """The file's text with these routes and relay settings; everything else untouched.

    A route with ``index`` updates that [[route]] table of the file (in place: its
    comments stay); tables no route names are removed; routes without one are added at
    the end. Without any index, routes match the file's tables by position."""
    doc = tomlkit.parse(text)
    wanted = [(idx, _clean_route(r, i))
              for i, (idx, r) in enumerate(zip(_indices(routes), routes, strict=True))]

    relay = doc.get("relay")
    if not isinstance(relay, Table):
        relay = tomlkit.table()
        doc["relay"] = relay
    relay["trusted_networks"] = [n.strip() for n in trusted_networks if n.strip()]
    domains = doc.get("domains")
    if not isinstance(domains, Table):
        domains = tomlkit.table()
        doc["domains"] = domains
    domains["local"] = [d.strip() for d in local_domains if d.strip()]

    existing = doc.get("route")
    if isinstance(existing, AoT):
        n = len(existing)
        kept = [idx for idx, _ in wanted if idx is not None and idx < n]
        if kept != sorted(set(kept)):
            raise ValueError("routes must keep the file's order, each at most once")
        for j in reversed(range(n)):
            if j not in kept:
                _keep_trailing_comments(doc, existing, j)
                del existing[j]
        # the tables left are the kept ones, in order; routes beyond them are new
        tables = list(existing)
        pos = 0
        for idx, want in wanted:
            if idx is not None and idx < n:
                _update(tables[pos], want)
                pos += 1
            else:
                existing.append(_table(want))
        if not wanted:
            del doc["route"]
    else:
        if existing is not None:           # an inline array, or something else
            del doc["route"]
        if wanted:
            aot = tomlkit.aot()
            for _, want in wanted:
                aot.append(_table(want))
            doc.append("route", aot)
    return tomlkit.dumps(doc)


def _keep_trailing_comments(doc: Any, aot: AoT, j: int) -> None:
    """Before table ``j`` is removed: tomlkit keeps the comments written above a table
    at the end of the table before it, so table j's trailing comments belong to table
    j + 1. Hand them to what comes before table j, so they stay above their own route.
    (Comments above the removed table itself stay where they are.)"""
    body = aot[j].value.body
    k = len(body)
    while k > 0 and body[k - 1][0] is None:
        k -= 1
    tail = body[k:]
    if not tail or not any(isinstance(item, Comment) for _, item in tail):
        return
    del body[k:]
    if j > 0:
        before = aot[j - 1].value.body
    else:            # the table or keys before the [[route]] array
        items = doc.body
        at = next(i for i, (key, item) in enumerate(items) if item is aot)
        prev = items[at - 1][1] if at > 0 else None
        if isinstance(prev, Table):
            before = prev.value.body
        else:
            before = items
            for offset, entry in enumerate(tail):
                items.insert(at + offset, entry)
            return
    before.extend(tail)


def _table(values: dict[str, Any]) -> Table:
    t = tomlkit.table()
    _update(t, values)
    t.add(tomlkit.nl())
    return t


def _same_password_files(text: str, routes: list[dict[str, Any]]) -> None:
    """Refuse to set or change a route's password_file here: whoever may edit routes
    through the API (the console's admins) could otherwise point a smart host's AUTH at
    any file the server can read, and send it to a host of their choice. Set it in the
    file on the server."""
    raw = tomllib.loads(text).get("route")
    tables = raw if isinstance(raw, list) else []
    problems = []
    for i, (idx, r) in enumerate(zip(_indices(routes), routes, strict=True)):
        before = ""
        if idx is not None and 0 <= idx < len(tables) and isinstance(tables[idx], dict):
            before = str(tables[idx].get("password_file", ""))
        if str(r.get("password_file", "") or "").strip() != before:
            problems.append(Problem(f"route[{i}].password_file",
                                    "can only be set or changed in the config file on the "
                                    "server (the console never points a route at a file)"))
    if problems:
        raise ConfigError("the change", problems)


def write(path: Path, routes: list[dict[str, Any]], trusted_networks: list[str],
          local_domains: list[str], version: str, *, check_only: bool = False
          ) -> tuple[Config, str]:
    """Validate the change and, unless ``check_only``, write it. Returns the new config
    and the new text. Raises ConfigError (every problem, by key) or EditConflict."""
    old = path.read_text(encoding="utf-8")
    if version and version != version_of(old):
        raise EditConflict(f"{path} changed since this page was loaded: reload the page "
                           "and make the change again")
    for r in routes:
        unknown = [k for k in r if k not in ROUTE_FIELDS and k != "index"]
        if unknown:
            raise ValueError(f"unknown route keys: {', '.join(unknown)}")
    _same_password_files(old, routes)
    new = apply(old, routes, trusted_networks, local_domains)
    config = parse_text(new, path)
    if check_only:
        return config, new
    backup = path.with_name(path.name + ".bak")
    mode = path.stat().st_mode & 0o777
    atomic_write(backup, old, mode)
    atomic_write(path, new, mode)
    return config, new


def restore(path: Path) -> None:
    """Put back the version kept by the last write (after a reload refused it)."""
    backup = path.with_name(path.name + ".bak")
    atomic_write(path, backup.read_text(encoding="utf-8"), path.stat().st_mode & 0o777)


