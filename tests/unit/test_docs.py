"""The reference docs stay true to the code.

- docs/replies.md has a table row for every reply in ``postroom.replies`` (constants and
  builder functions), with the reply's code, enhanced code and exact text.
- docs/configuration.md describes every key ``config.parse_config`` accepts, in its own
  section (``[[route]]`` keys under the ``[[route]]`` heading), its documented defaults
  are the code's defaults, and its complete example is valid and shows every key of the
  file ``postroom serve`` writes.
- docs/delivery.md lists every entry of ``bounce.CATALOGUE`` with its statuses and
  meaning, and its example NDR is the golden file, byte for byte.

Adding a reply, a config key or a catalogue entry without documenting it fails here.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import re
import tomllib
import typing
from pathlib import Path

import pytest

from postroom import bounce, config, replies
from postroom.model import Address, Reply

ROOT = Path(__file__).resolve().parents[2]
REPLIES_MD = ROOT / "docs" / "replies.md"
CONFIG_MD = ROOT / "docs" / "configuration.md"
DELIVERY_MD = ROOT / "docs" / "delivery.md"
CONFIG_PY = ROOT / "src" / "postroom" / "config" / "parser.py"
GOLDEN_NDR = ROOT / "tests" / "golden" / "ndr"

NO_ENHANCED = "—"


# --- docs/replies.md -----------------------------------------------------------------
def _constants() -> dict[str, Reply]:
    return {name: value for name, value in vars(replies).items()
            if isinstance(value, Reply)}


def _builders() -> dict[str, typing.Callable[..., Reply]]:
    return {name: fn for name, fn in vars(replies).items()
            if inspect.isfunction(fn) and fn.__module__ == replies.__name__
            and not name.startswith("_")}


def _samples(fn: typing.Callable[..., Reply], name: str, kind: object) -> tuple[object, ...]:
    """Sample arguments of the annotated type: both values for a bool, one otherwise."""
    options = typing.get_args(kind) or (kind,)
    if Address in options:
        return (Address("alice", "example.org"),)
    if bool in options:             # before int: a bool is an int to isinstance, not here
        return (True, False)
    if int in options:
        return (26214400,)
    if str in options:
        return ("mail.example.org",)
    pytest.fail(f"replies.{fn.__name__}: no sample argument for {name}: {kind!r}; "
                "teach tests/unit/test_docs.py::_samples")


def _call(fn: typing.Callable[..., Reply], values: typing.Sequence[object]) -> Reply:
    """``fn`` with one value per parameter, keyword-only ones passed by name."""
    args, kwargs = [], {}
    for param, value in zip(inspect.signature(fn).parameters.values(), values, strict=True):
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            kwargs[param.name] = value
        else:
            args.append(value)
    return fn(*args, **kwargs)


def _call_with_samples(fn: typing.Callable[..., Reply]) -> list[Reply]:
    """Every reply the samples give (each combination of the bool arguments)."""
    hints = typing.get_type_hints(fn)
    choices = [_samples(fn, p, hints.get(p, str)) for p in inspect.signature(fn).parameters]
    return [_call(fn, values) for values in itertools.product(*choices)]


def _call_with_placeholders(fn: typing.Callable[..., Reply]) -> Reply:
    """The reply with each argument shown as ``<parameter name>``, as the doc writes it.

    A placeholder string is true, so a bool parameter shows its optional lines.
    """
    reply = _call(fn, [f"<{p}>" for p in inspect.signature(fn).parameters])
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
    shown = _call_with_placeholders(fn)
    for sample in _call_with_samples(fn):
        assert isinstance(sample, Reply), f"replies.{name} does not return a Reply"
        assert (shown.code, shown.enhanced) == (sample.code, sample.enhanced)
        for line in sample.lines():     # every line a real call sends is documented
            assert any(_line_pattern(doc).fullmatch(line) for doc in shown.lines()), (
                f"replies.{name}: {line!r} matches no line of the documented reply")
    _check_row(name, shown, reply_rows)


def _line_pattern(documented: str) -> re.Pattern[str]:
    """A documented line as a regex: each ``<placeholder>`` stands for any text."""
    parts = re.split(r"<[a-z0-9_]+>", documented)
    return re.compile(".+".join(re.escape(part) for part in parts))


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
    "delivery": set(config.DELIVERY_KEYS),
    "dns": {"nameservers"},
    "route": set(config.ROUTE_KEYS),
}
NO_LITERAL_DEFAULT = {
    ("", "hostname"),         # the machine's name
    ("route", "match"),       # required: no default
    ("smtp", "min_free_space"),   # 1.5 × max_message_size
    ("node", "name"),         # the machine's name
}
ROUTE_FUNCTION = "_routes"    # reads each [[route]] table: r.get(t, key, "name", ...)


def _route_keys(tree: ast.Module) -> set[str]:
    """The keys ``_routes`` reads from each ``[[route]]`` table."""
    [fn] = [n for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.name == ROUTE_FUNCTION]
    return {str(node.args[2].value) for node in ast.walk(fn)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get" and len(node.args) >= 3
            and ast.unparse(node.args[0]) == "t" and isinstance(node.args[2], ast.Constant)}


def _code_keys() -> tuple[set[str], dict[str, set[str]]]:
    """What config.py reads: plain top-level keys, and each table with its keys.

    Plain keys are the ``r.get(raw, "", "key", ...)`` calls; sections are the
    ``r.section("name", KEYS)`` calls, with KEYS evaluated; the ``[[route]]`` tables are
    what ``_routes`` reads with ``r.get(t, key, "name", ...)``.
    """
    plain: set[str] = set()
    sections: dict[str, set[str]] = {}
    tree = ast.parse(CONFIG_PY.read_text(encoding="utf-8"))
    sections["route"] = _route_keys(tree)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        args = node.args
        if node.func.attr == "get" and len(args) >= 3 and ast.unparse(args[0]) == "raw" \
                and isinstance(args[2], ast.Constant):
            plain.add(str(args[2].value))
        elif node.func.attr == "section":
            name, keys = args
            assert isinstance(name, ast.Constant), ast.dump(name)
            table = str(name.value)
            if isinstance(keys, ast.Name):
                sections[table] = set(getattr(config, keys.id))
            elif ast.unparse(keys) == "set()":
                sections[table] = set()
            else:
                sections[table] = set(ast.literal_eval(keys))
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

    A heading of a higher level (fewer hashes) ends the previous block. Lines inside
    fenced code blocks are never headings (a TOML comment starts with "# ").
    """
    out: dict[str, str] = {}
    heading, body = "", list[str]()
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        hashes = len(line) - len(line.lstrip("#"))
        if not fenced and 0 < hashes <= level and line[hashes:hashes + 1] == " ":
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
    assert sections["route"] == config.ROUTE_KEYS, "_routes reads other keys than ROUTE_KEYS"
    assert sections["delivery"] == config.DELIVERY_KEYS


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
    """Every documented default, fed through parse_config, gives the code's defaults.

    The ``[[route]]`` defaults go into one ``match = "*"`` route, which must come out as
    the route the code uses when the file has none.
    """
    base = {"hostname": "mail.example.org"}
    raw: dict[str, typing.Any] = dict(base)
    for section, key in _all_keys():
        body = _config_section(section)
        block = _key_blocks(body).get(key) if body is not None else None
        if block is None or (section, key) in NO_LITERAL_DEFAULT:
            continue    # an undocumented key fails test_every_key_is_documented
        value = _documented_default(block)
        assert value is not None, f"`{key}`: the Default line has no TOML value in backticks"
        if section == "route":
            raw.setdefault("route", [{"match": "*"}])[0][key] = value
        else:
            (raw.setdefault(section, {}) if section else raw)[key] = value
    assert "route" in raw, "no [[route]] key has a documented default"
    documented = config.parse_config(raw, tmp_path, "defaults")
    actual = config.parse_config(dict(base), tmp_path, "defaults")
    assert documented == actual
    assert documented.routes == config.DEFAULT_ROUTES


def _complete_example() -> str:
    text = CONFIG_MD.read_text(encoding="utf-8")
    section = _split(text, 2)["## A complete example"]
    m = re.search(r"```toml\n(.*?)```", section, re.S)
    assert m, "docs/configuration.md: the complete example has no ```toml block"
    return m.group(1)


def _shape(raw: dict[str, typing.Any]) -> dict[str, set[str]]:
    """Table name ("" for the top level) -> its keys; ``[[route]]`` keys merged."""
    shape: dict[str, set[str]] = {"": set()}
    for key, value in raw.items():
        if isinstance(value, dict):
            shape[key] = set(value)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            shape[key] = set().union(*value)
        else:
            shape[""].add(key)
    return shape


def test_the_complete_example_shows_every_key_of_the_generated_file() -> None:
    example = _shape(tomllib.loads(_complete_example()))
    generated = _shape(tomllib.loads(config.default_config_text("mail.example.org",
                                                                ["example.org"])))
    for table, keys in generated.items():
        where = f"[{table}]" if table else "the top level"
        assert table in example, f"the complete example has no {where}"
        if table != "aliases":
            assert keys <= example[table], (
                f"the complete example lacks {sorted(keys - example[table])} in {where}")
    assert example["route"] == config.ROUTE_KEYS, "the example's routes should use every key"


def test_the_complete_example_is_a_valid_config(tmp_path: Path) -> None:
    """With the files it names replaced by real ones, parse_config takes it as it is."""
    raw = tomllib.loads(_complete_example())
    for i, name in enumerate(("cert_file", "key_file")):
        path = tmp_path / f"tls{i}.pem"
        path.write_text("not read by parse_config\n")
        raw["tls"][name] = str(path)
    for route in raw["route"]:
        if "password_file" in route:
            path = tmp_path / "password"
            path.write_text("s3cret\n")
            route["password_file"] = str(path)
    for key in raw["dkim"]:
        (tmp_path / key["key_file"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key["key_file"]).write_text("not read by parse_config\n")
    parsed = config.parse_config(raw, tmp_path, "example")
    assert [k.selector for k in parsed.dkim] == [k["selector"] for k in raw["dkim"]]
    assert len(parsed.routes) == len(raw["route"])
    assert any(r.via == "smarthost" and r.password == "s3cret" for r in parsed.routes)


# --- docs/delivery.md ----------------------------------------------------------------
def _status_cell(statuses: tuple[str, ...]) -> str:
    return ", ".join(f"`{s}`" if s else "any" for s in statuses)


@pytest.fixture(scope="module")
def catalogue_rows() -> dict[str, list[str]]:
    """Entry name -> the cells of its row, from the table under the catalogue heading."""
    sections = [body for heading, body in _split(DELIVERY_MD.read_text(encoding="utf-8"),
                                                 3).items() if "(the catalogue)" in heading]
    assert len(sections) == 1, "docs/delivery.md: no '### ... (the catalogue)' section"
    rows = {}
    for cells in _rows(sections[0]):
        m = re.fullmatch(r"`([a-z0-9-]+)`", cells[0])
        if m and len(cells) >= 4:
            rows[m.group(1)] = cells
    return rows


def test_there_are_catalogue_entries_to_check() -> None:
    assert len(bounce.CATALOGUE) > 20


@pytest.mark.parametrize("entry", bounce.CATALOGUE, ids=lambda e: e.name)
def test_every_catalogue_entry_is_documented(entry: bounce.CatalogueEntry,
                                             catalogue_rows) -> None:
    assert f"`{entry.name}`" in DELIVERY_MD.read_text(encoding="utf-8")
    assert entry.name in catalogue_rows, (
        f"docs/delivery.md has no catalogue table row for {entry.name}")
    cells = catalogue_rows[entry.name]
    assert cells[1] == _status_cell(entry.statuses), (
        f"{entry.name}: documented statuses {cells[1]}, code says "
        f"{_status_cell(entry.statuses)}")
    assert entry.meaning in cells[3], f"{entry.name}: the meaning is not the catalogue's"


def test_documented_catalogue_entries_exist(catalogue_rows) -> None:
    stale = sorted(set(catalogue_rows) - {e.name for e in bounce.CATALOGUE})
    assert not stale, f"docs/delivery.md lists catalogue entries bounce.py lacks: {stale}"


def test_the_catalogue_table_keeps_the_search_order(catalogue_rows) -> None:
    assert list(catalogue_rows) == [e.name for e in bounce.CATALOGUE], (
        "docs/delivery.md: the first matching entry wins, so list them in CATALOGUE order")


def test_the_example_ndr_is_the_golden_file() -> None:
    text = DELIVERY_MD.read_text(encoding="utf-8")
    m = re.search(r"<!-- golden: (\S+) -->\n+```[a-z]*\n(.*?)```", text, re.S)
    assert m, "docs/delivery.md: no example NDR marked <!-- golden: <file> -->"
    golden = (GOLDEN_NDR / m.group(1)).read_text(encoding="utf-8")
    assert m.group(2) == golden, (
        f"docs/delivery.md: the example NDR differs from tests/golden/ndr/{m.group(1)}")


# --- links between the docs ----------------------------------------------------------
def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (code blocks skipped)."""
    anchors, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} (.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


@pytest.mark.parametrize("doc", [CONFIG_MD, REPLIES_MD, DELIVERY_MD], ids=lambda p: p.name)
def test_links_between_the_docs_resolve(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for target, anchor in re.findall(r"\]\(([a-z_-]*\.md)?(?:#([^)\s]+))?\)", text):
        path = doc.parent / target if target else doc
        assert path.is_file(), f"{doc.name}: link to missing {target}"
        if anchor:
            assert anchor in _anchors(path), f"{doc.name}: no heading for {target}#{anchor}"


def test_every_event_kind_is_in_events_md() -> None:
    from postroom.events import CATALOGUE
    text = (CONFIG_MD.parent / "events.md").read_text(encoding="utf-8")
    for kind in CATALOGUE.values():
        heading = f"### {kind.id}: {kind.title}"
        assert heading in text, f"docs/events.md has no '{heading}'"
        block = text.split(heading, 1)[1].split("\n### ", 1)[0]
        assert f"**Severity:** {kind.severity}; **recorded from level:** {kind.level}" in block
        assert kind.category in text.split(heading, 1)[0].rsplit("\n## ", 1)[1]
