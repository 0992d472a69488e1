"""Imports point down only (docs/architecture.md, "Layers"). Walks every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "postroom"

LAYERS: dict[str, float] = {
    "model": 0, "replies": 0.5, "address": 0.5,     # 0.5: values built on model
    "config": 1, "observability": 1, "body": 1, "format": 1,
    "routing": 1.5, "policy": 2, "bounce": 2, "conversion": 2,
    "spool": 3, "store": 3, "events": 3, "dns": 3, "tls": 3,
    "users": 3.2,                                   # a user and its Maildir (store)
    # the smtp package: the sans-I/O core and the client are protocol libraries; the
    # server is the receiving component
    "smtp": 4, "smtp.protocol": 2.5, "smtp.client": 3, "smtp.server": 4,
    "delivery": 3.5,
    "qmgr": 4, "diagnostics": 4,
    "admin": 4.5, "app": 5, "ctl": 5.5, "queueops": 3.5, "metrics": 1,
    "cli": 6, "console": 4.75, "configedit": 1.5,
}
PURE = {"model", "replies", "address", "policy", "routing", "bounce", "conversion"}
IO_MODULES = {"asyncio", "socket", "sqlite3", "ssl", "subprocess", "threading", "os"}


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
            if LAYERS[target] >= LAYERS[comp]:
                breaches.append(f"{path.relative_to(SRC)}:{line} ({comp}, layer {LAYERS[comp]}) "
                                f"imports {target} (layer {LAYERS[target]})")
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


def test_the_import_walk_sees_known_edges() -> None:
    """Guard the walker itself: edges that exist must be found."""
    server = {t for t, _ in _imports(SRC / "smtp" / "server.py")}
    assert {"smtp.protocol", "policy", "spool", "replies"} <= server
    assert "smtp.client" in {t for t, _ in _imports(SRC / "delivery.py")}
