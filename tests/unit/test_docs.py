"""The reference docs stay true to the code.

- docs/replies.md has a table row for every reply in ``postroom.replies`` (constants and
  builder functions), with the reply's code, enhanced code and exact text.
- docs/configuration.md describes every key ``config.parse_config`` accepts, in its own
  section, and its documented defaults are the code's defaults.

Adding a reply or a config key without documenting it fails here.
"""

from __future__ import annotations

import ast
import inspect
import re
import tomllib
import typing
from pathlib import Path

import pytest

from postroom import config, replies
from postroom.model import Address, Reply

ROOT = Path(__file__).resolve().parents[2]
REPLIES_MD = ROOT / "docs" / "replies.md"
CONFIG_MD = ROOT / "docs" / "configuration.md"
CONFIG_PY = ROOT / "src" / "postroom" / "config.py"

NO_ENHANCED = "—"


# --- docs/replies.md -----------------------------------------------------------------
def _constants() -> dict[str, Reply]:
    return {name: value for name, value in vars(replies).items()
            if isinstance(value, Reply)}


def _builders() -> dict[str, typing.Callable[..., Reply]]:
    return {name: fn for name, fn in vars(replies).items()
            if inspect.isfunction(fn) and fn.__module__ == replies.__name__
            and not name.startswith("_")}


def _sample(fn: typing.Callable[..., Reply], name: str, kind: object) -> object:
    """A sample argument of the annotated type."""
    options = typing.get_args(kind) or (kind,)
    if Address in options:
        return Address("alice", "example.org")
    if int in options:
        return 26214400
    if str in options:
        return "mail.example.org"
    pytest.fail(f"replies.{fn.__name__}: no sample argument for {name}: {kind!r}; "
                "teach tests/unit/test_docs.py::_sample")


def _call_with_samples(fn: typing.Callable[..., Reply]) -> Reply:
    hints = typing.get_type_hints(fn)
    args = [_sample(fn, p, hints.get(p, str)) for p in inspect.signature(fn).parameters]
    return fn(*args)


def _call_with_placeholders(fn: typing.Callable[..., Reply]) -> Reply:
    """The reply with each argument shown as ``<parameter name>``, as the doc writes it."""
    reply = fn(*(f"<{p}>" for p in inspect.signature(fn).parameters))
    text = re.sub(r"<<([a-z_]+)>>", r"<\1>", reply.text)
    return Reply(reply.code, reply.enhanced, text)


def _rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row except header and separator rows."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "Code":
            continue
        rows.append(cells)
    return rows


def _documented_name(cell: str) -> str | None:
    """``NAME`` or ``name(args)`` when the cell is exactly one backticked replies name."""
    m = re.fullmatch(r"`([A-Za-z_][A-Za-z0-9_]*)(\([^`]*\))?`", cell)
    return m.group(1) if m else None


@pytest.fixture(scope="module")
def reply_rows() -> dict[str, list[list[str]]]:
    by_name: dict[str, list[list[str]]] = {}
    for cells in _rows(REPLIES_MD.read_text(encoding="utf-8")):
        if len(cells) < 4:
            continue
        name = _documented_name(cells[3])
        if name is not None:
            by_name.setdefault(name, []).append(cells)
    return by_name


def _check_row(name: str, reply: Reply, rows: dict[str, list[list[str]]]) -> None:
    assert name in rows, f"docs/replies.md has no row for replies.{name} ({reply})"
    for cells in rows[name]:
        code, enhanced, text = cells[0], cells[1], cells[2]
        assert code == str(reply.code), f"{name}: documented code {code}, code says {reply.code}"
        want = reply.enhanced or NO_ENHANCED
        assert enhanced == want, f"{name}: documented enhanced code {enhanced}, code says {want}"
        for line in reply.lines():
            assert f"`{line}`" in text, (
                f"{name}: text cell of docs/replies.md does not show `{line}`")


def test_there_are_replies_to_check() -> None:
    assert len(_constants()) > 40
    assert {"greeting", "relay_denied", "internal_error"} <= set(_builders())


@pytest.mark.parametrize("name", sorted(_constants()))
def test_every_reply_constant_is_documented(name: str, reply_rows) -> None:
    _check_row(name, _constants()[name], reply_rows)


@pytest.mark.parametrize("name", sorted(_builders()))
def test_every_reply_builder_is_documented(name: str, reply_rows) -> None:
    fn = _builders()[name]
    sample = _call_with_samples(fn)
    assert isinstance(sample, Reply), f"replies.{name} does not return a Reply"
    shown = _call_with_placeholders(fn)
    assert (shown.code, shown.enhanced) == (sample.code, sample.enhanced)
    _check_row(name, shown, reply_rows)


def test_documented_reply_names_exist(reply_rows) -> None:
    known = set(_constants()) | set(_builders())
    stale = sorted(set(reply_rows) - known)
    assert not stale, f"docs/replies.md names replies that replies.py lacks: {stale}"


def test_replies_doc_states_the_exception_rule() -> None:
    text = REPLIES_MD.read_text(encoding="utf-8")
    assert "Exception text never reaches a client" in text
    assert "reference" in text and "log" in text


# --- docs/configuration.md -----------------------------------------------------------
# The keys named in the brief for these docs; the walk of config.py must find them all.
KNOWN_TOP_KEYS = {"hostname", "data_dir"}
KNOWN_SECTION_KEYS = {
    "smtp": set(config.SMTP_KEYS),
    "tls": {"cert_file", "key_file"},
    "domains": {"local"},
    "relay": {"trusted_networks"},
    "aliases": set(),
    "delivery": {"retry"},
}
NO_LITERAL_DEFAULT = {("", "hostname")}    # the machine's name


def _code_keys() -> tuple[set[str], dict[str, set[str]]]:
    """What config.py reads: plain top-level keys, and each ``[section]`` with its keys.

    Plain keys are the ``r.get(raw, "", "key", ...)`` calls; sections are the
    ``r.section("name", KEYS)`` calls, with KEYS evaluated.
    """
    plain: set[str] = set()
    sections: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(CONFIG_PY.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        args = node.args
        if node.func.attr == "get" and len(args) >= 3 and ast.unparse(args[0]) == "raw" \
                and isinstance(args[2], ast.Constant):
            plain.add(args[2].value)
        elif node.func.attr == "section":
            name, keys = args
            assert isinstance(name, ast.Constant), ast.dump(name)
            if isinstance(keys, ast.Name):
                sections[name.value] = set(getattr(config, keys.id))
            elif ast.unparse(keys) == "set()":
                sections[name.value] = set()
            else:
                sections[name.value] = set(ast.literal_eval(keys))
    return plain, sections


def _all_keys() -> list[tuple[str, str]]:
    """(section, key) for every key; section "" for the top-level keys."""
    plain, sections = _code_keys()
    return [("", k) for k in sorted(plain)] + \
        [(s, k) for s in sorted(sections) for k in sorted(sections[s])]


def _tables() -> list[str]:
    """Every top-level key that is a table: ``[name]`` or ``[[name]]``."""
    plain, _ = _code_keys()
    return sorted(config.TOP_KEYS - plain)


def _split(text: str, level: int) -> dict[str, str]:
    """Heading line -> the text under it, for headings of exactly ``level`` hashes.

    A heading of a higher level (fewer hashes) ends the previous block.
    """
    out: dict[str, str] = {}
    heading, body = "", []
    for line in text.splitlines():
        hashes = len(line) - len(line.lstrip("#"))
        if 0 < hashes <= level and line[hashes:hashes + 1] == " ":
            out[heading] = "\n".join(body)
            heading, body = (line, []) if hashes == level else ("", [])
        else:
            body.append(line)
    out[heading] = "\n".join(body)
    return out


def _config_section(name: str) -> str | None:
    """The text of ``## Top-level keys`` (name "") or ``## `[name]` ...``, if present."""
    text = CONFIG_MD.read_text(encoding="utf-8")
    markers = ("Top-level keys",) if name == "" else (f"`[{name}]`", f"`[[{name}]]`")
    for heading, body in _split(text, 2).items():
        if any(m in heading for m in markers):
            return body
    return None


def _key_blocks(section: str) -> dict[str, str]:
    """``### `key``` -> the text under it."""
    blocks = {}
    for heading, body in _split(section, 3).items():
        m = re.fullmatch(r"### `([a-z_]+)`", heading)
        if m:
            blocks[m.group(1)] = body
    return blocks


def test_the_walk_of_config_py_finds_the_known_keys() -> None:
    plain, sections = _code_keys()
    assert KNOWN_TOP_KEYS <= plain
    for name, keys in KNOWN_SECTION_KEYS.items():
        assert name in sections, f"config.parse_config no longer reads [{name}]"
        assert keys <= sections[name], f"[{name}]: keys missing from the walk"
    assert plain | set(sections) <= config.TOP_KEYS


def _keys_constants() -> dict[str, set[str]]:
    """Every ``*_KEYS`` set of key names in config.py (TOP_KEYS, SMTP_KEYS, ...)."""
    return {name: set(value) for name, value in vars(config).items()
            if name.endswith("_KEYS") and isinstance(value, set | frozenset)
            and all(isinstance(v, str) for v in value)}


@pytest.mark.parametrize(
    ("constant", "key"),
    sorted((c, k) for c, keys in _keys_constants().items() for k in keys))
def test_every_keys_constant_is_documented(constant: str, key: str) -> None:
    text = CONFIG_MD.read_text(encoding="utf-8")
    assert any(f"`{form}`" in text for form in (key, f"[{key}]", f"[[{key}]]")), (
        f"config.{constant} has {key!r}, which docs/configuration.md never mentions")


@pytest.mark.parametrize("table", _tables())
def test_every_table_has_a_section(table: str) -> None:
    assert _config_section(table) is not None, (
        f"docs/configuration.md has no '## `[{table}]`' section")


@pytest.mark.parametrize(("section", "key"), _all_keys())
def test_every_key_is_documented(section: str, key: str) -> None:
    text = CONFIG_MD.read_text(encoding="utf-8")
    assert f"`{key}`" in text, f"docs/configuration.md never mentions `{key}`"
    where = f"`[{section}]`" if section else "Top-level keys"
    body = _config_section(section)
    assert body is not None, f"docs/configuration.md has no '## {where}' section"
    blocks = _key_blocks(body)
    assert key in blocks, f"docs/configuration.md: no '### `{key}`' under {where}"
    for field in ("**Type:**", "**Default:**", "**Meaning:**", "**Validation:**"):
        assert field in blocks[key], f"{where} `{key}`: no {field} line"


def _documented_default(block: str) -> object | None:
    """The first backticked value on the Default line, read as TOML."""
    line = next(ln for ln in block.splitlines() if ln.startswith("- **Default:**"))
    m = re.search(r"`([^`]+)`", line)
    if m is None:
        return None
    try:
        return tomllib.loads(f"v = {m.group(1)}")["v"]
    except tomllib.TOMLDecodeError:
        return None


def test_documented_defaults_are_the_code_defaults(tmp_path: Path) -> None:
    """Every documented default, fed through parse_config, gives the code's defaults."""
    base = {"hostname": "mail.example.org"}
    raw: dict[str, typing.Any] = dict(base)
    for section, key in _all_keys():
        body = _config_section(section)
        block = _key_blocks(body).get(key) if body is not None else None
        if block is None or (section, key) in NO_LITERAL_DEFAULT:
            continue    # an undocumented key fails test_every_key_is_documented
        value = _documented_default(block)
        assert value is not None, f"`{key}`: the Default line has no TOML value in backticks"
        (raw.setdefault(section, {}) if section else raw)[key] = value
    documented = config.parse_config(raw, tmp_path, "defaults")
    actual = config.parse_config(dict(base), tmp_path, "defaults")
    assert documented == actual
