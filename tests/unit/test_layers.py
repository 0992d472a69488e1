"""Imports point down only (docs/architecture.md, "Layers"). Walks every module's imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "postroom"

# The planned layers, bottom up. A module imports only from layers below its own, or from
# its own layer where SIDEWAYS names the edge. Packages (spool, delivery, diagnostics,
# console, config) are one component each; the smtp package is split by module.
PLAN: list[tuple[str, set[str]]] = [
    ("values", {"model", "replies", "address", "process"}),
    ("foundation", {"config", "observability", "body", "metrics", "format", "files",
                    "syncer"}),
    ("logic", {"routing", "policy", "bounce", "conversion", "configedit", "smtp.protocol"}),
    ("storage and protocols", {"spool", "store", "users", "events", "dns", "tls",
                               "smtp.client", "mailauth"}),
    ("agents and intake", {"delivery", "intake", "notices"}),
    ("components", {"smtp", "smtp.server", "qmgr", "direct", "diagnostics", "imap"}),
    ("operations", {"admin"}),
    ("console", {"console"}),             # pages over the admin API
    ("composition root", {"app"}),        # builds everything: the console too, on purpose
    ("commands", {"ctl", "cli"}),
]
LAYERS: dict[str, int] = {name: level for level, (_, names) in enumerate(PLAN)
                          for name in names}
SIDEWAYS = {
    ("replies", "model"), ("replies", "address"), ("address", "model"),
    ("policy", "routing"),
    ("users", "store"),
    ("notices", "intake"),      # a notice is queued mail: intake decides its direction
    ("cli", "ctl"),
    ("mailauth", "dns"),        # verification's lookups go through the configured resolver
    ("body", "files"),          # a big message's file starts its writeback as it grows
}
# Edges that would point down, yet break the design.
FORBIDDEN = {
    ("smtp.server", "qmgr"), ("smtp.server", "delivery"), ("smtp.server", "store"),
    ("smtp.protocol", "store"), ("smtp.client", "store"),
    ("spool", "routing"), ("spool", "policy"), ("spool", "delivery"), ("spool", "store"),
    ("delivery", "spool"), ("delivery", "intake"),      # agents never touch the queue
    ("intake", "delivery"),
    ("diagnostics", "spool"), ("diagnostics", "qmgr"),  # the tools reach the server by API
    ("console", "admin"), ("console", "qmgr"), ("console", "app"),
    ("ctl", "app"), ("ctl", "spool"), ("ctl", "admin"), ("ctl", "console"),
}
PURE = {"model", "replies", "address", "policy", "routing", "bounce", "conversion"}
IO_MODULES = {"asyncio", "socket", "sqlite3", "ssl", "subprocess", "threading", "os"}
# Where SQL may live: the spool's SQLite backend and the user and event stores.
SQL_HOMES = {"spool/sqlite.py", "spool/postgres.py", "users.py", "events.py"}


def _component(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    if rel.parts[0] == "smtp" and len(rel.parts) > 1 and rel.parts[1] != "__init__":
        return f"smtp.{rel.parts[1]}"
    return rel.parts[0]


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported postroom component or stdlib top module, line) for one file."""
    tree = ast.parse(path.read_text())
    found = []
    depth = len(path.relative_to(SRC).parts) - 1
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                up = node.level - 1
                base = list(path.relative_to(SRC).parts[:-1])[: depth - up] if up else \
                    list(path.relative_to(SRC).parts[:-1])
                mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
                if not mod:           # "from . import x"
                    for alias in node.names:
                        found.append((alias.name, node.lineno))
                    continue
                parts = mod.split(".")
                if parts[0] == "smtp" and len(parts) > 1:
                    found.append((f"smtp.{parts[1]}", node.lineno))
                elif parts == ["smtp"]:
                    for alias in node.names:
                        found.append((f"smtp.{alias.name}", node.lineno))
                else:
                    found.append((parts[0], node.lineno))
            elif node.module and node.module.startswith("postroom"):
                parts = node.module.split(".")
                if len(parts) > 2 and parts[1] == "smtp":
                    found.append((f"smtp.{parts[2]}", node.lineno))
                else:
                    found.append((parts[1] if len(parts) > 1 else node.names[0].name, node.lineno))
            elif node.module:
                found.append(("std:" + node.module.split(".")[0], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("postroom."):
                    found.append((alias.name.split(".")[1], node.lineno))
                else:
                    found.append(("std:" + alias.name.split(".")[0], node.lineno))
    return found


def test_every_module_has_a_layer() -> None:
    for path in SRC.rglob("*.py"):
        comp = _component(path)
        if comp == "__init__":
            continue
        assert comp in LAYERS, f"{path.relative_to(SRC)} is not in the layer map"


def test_imports_point_down_only() -> None:
    breaches = []
    for path in SRC.rglob("*.py"):
        comp = _component(path)
        if comp == "__init__":
            continue
        for target, line in _imports(path):
            if target.startswith("std:") or target in ("__init__", "__version__", comp):
                continue
            assert target in LAYERS, f"{path.relative_to(SRC)}:{line} imports unknown {target}"
            same = LAYERS[target] == LAYERS[comp] and (comp, target) in SIDEWAYS
            if (LAYERS[target] >= LAYERS[comp] and not same) or (comp, target) in FORBIDDEN:
                breaches.append(f"{path.relative_to(SRC)}:{line} ({comp}, "
                                f"{PLAN[LAYERS[comp]][0]}) imports {target} "
                                f"({PLAN[LAYERS[target]][0]})")
    assert not breaches, "\n".join(breaches)


def test_pure_layers_do_no_io() -> None:
    for path in SRC.rglob("*.py"):
        comp = _component(path)
        if comp not in PURE:
            continue
        for target, line in _imports(path):
            if target.startswith("std:"):
                assert target[4:] not in IO_MODULES, f"{path.name}:{line} imports {target[4:]}"


def test_smtp_never_imports_delivery_or_the_queue_manager() -> None:
    for path in (SRC / "smtp").rglob("*.py"):
        targets = {t for t, _ in _imports(path)}
        assert not targets & {"qmgr", "delivery", "store"}, path.name


def test_sqlite_and_sql_only_in_their_homes() -> None:
    """The queue's SQL is the spool's SQLite backend's: no other module opens the spool."""
    sql = re.compile(r"\b(SELECT .* FROM|INSERT INTO|UPDATE \w+ SET|DELETE FROM)\b")
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel in SQL_HOMES:
            continue
        assert "std:sqlite3" not in {t for t, _ in _imports(path)}, f"{rel} imports sqlite3"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not sql.search(node.value), f"{rel}:{node.lineno} holds SQL"


def test_every_layer_rule_names_known_components() -> None:
    for a, b in SIDEWAYS | FORBIDDEN:
        assert a in LAYERS and b in LAYERS, (a, b)
    for a, b in SIDEWAYS:
        assert LAYERS[a] == LAYERS[b], (a, b)


def test_the_import_walk_sees_known_edges() -> None:
    """Guard the walker itself: edges that exist must be found."""
    server = {t for t, _ in _imports(SRC / "smtp" / "server.py")}
    assert {"smtp.protocol", "policy", "spool", "replies", "intake"} <= server
    assert "smtp.client" in {t for t, _ in _imports(SRC / "delivery" / "smtp.py")}
    assert "sqlite3" in (SRC / "spool" / "sqlite.py").read_text()
