"""Config errors carry the TOML line: ``FILE:LINE: key: problem``.

The locator (``nio_logd.tomlpos``) is checked against tomllib on generated documents (tables,
arrays of tables, dotted and quoted keys, inline tables, arrays and multi-line strings full of
text that looks like keys); each kind of error is checked through the real CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nio_logd import tomlpos

Key = tuple[str | int, ...]

# -- a generator of TOML documents that knows the line of every key it writes ----------------------

_BARE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
MARKER = "marker"
# Names of keys; never MARKER, which is placed once. Some need quotes, some look like syntax.
NAMES = st.one_of(
    st.sampled_from(["a", "b", "log", "path", "x-y", "_1", "7", "a b", "a.b", "é", "=", "", 'q"', "t'", "#", "[x]"]),
    st.text(alphabet="abcxyz_-. =", min_size=1, max_size=4),
).filter(lambda n: n != MARKER)
# Text that is not a key wherever it stands: inside strings and comments.
DECOYS = [
    f"{MARKER} = 1",
    f"[{MARKER}]",
    f"[[{MARKER}]]",
    f"x = {{{MARKER} = 2}}",
    f'"{MARKER}" = 3',
    "a.b = 4",
    "# not a comment",
    "'",
    '""',
    "\\\\",
]
SCALARS = ["1", "-2", "3.5", "true", "1979-05-27 07:32:00", "1979-05-27T07:32:00Z", "07:32:00", "inf", "0x1F", "1_000"]


@dataclass
class Value:
    kind: str  # "scalar", "basic", "literal", "ml_basic", "ml_literal", "array", "inline"
    text: str = ""
    items: list[Value] = field(default_factory=list)
    pairs: list[tuple[list[str], Value]] = field(default_factory=list)
    multiline: bool = False


@dataclass
class Table:
    pairs: list[tuple[list[str], Value]] = field(default_factory=list)
    subs: list[tuple[str, Table]] = field(default_factory=list)
    aots: list[tuple[str, list[Table]]] = field(default_factory=list)
    header: bool = True  # False: left implicit when it has no keys of its own


def _key(name: str, quote: int) -> str:
    if name and set(name) <= _BARE and quote == 0:
        return name
    if "'" not in name and quote == 2:
        return f"'{name}'"
    return json.dumps(name)  # a TOML basic string (\uXXXX escapes for non-ASCII)


@st.composite
def values(draw: st.DrawFn, depth: int = 0) -> Value:
    kinds = ["scalar", "basic", "literal", "ml_basic", "ml_literal"] + (["array", "inline"] if depth < 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "scalar":
        return Value(kind, draw(st.sampled_from(SCALARS)))
    if kind == "basic":
        return Value(kind, json.dumps(draw(st.lists(st.sampled_from(DECOYS), max_size=3).map(" ".join))))
    if kind == "literal":
        text = draw(st.lists(st.sampled_from([d for d in DECOYS if "'" not in d]), max_size=3).map(" ".join))
        return Value(kind, f"'{text}'")
    if kind in ("ml_basic", "ml_literal"):
        chunks = draw(st.lists(st.sampled_from(DECOYS), max_size=4))
        if kind == "ml_basic":
            body = "\n".join(c.replace("\\", "\\\\") for c in chunks)
            if draw(st.booleans()):
                body += '\\"""'  # an escaped quote and two more: not the end
            return Value(kind, f'"""\n{body}"""')
        return Value(kind, "'''\n" + "\n".join(chunks) + "'''")
    if kind == "array":
        items = draw(st.lists(values(depth + 1), max_size=3))
        return Value(kind, items=items, multiline=draw(st.booleans()))
    names = draw(st.lists(NAMES, unique=True, max_size=3))
    return Value(kind, pairs=[(draw(_dotted(n)), draw(values(depth + 1))) for n in names])


@st.composite
def _dotted(draw: st.DrawFn, first: str) -> list[str]:
    return [first, *draw(st.lists(NAMES, max_size=2))]


@st.composite
def tables(draw: st.DrawFn, depth: int = 0) -> Table:
    names = draw(st.lists(NAMES, unique=True, max_size=5 if depth < 2 else 2))
    table = Table(header=draw(st.booleans()))
    for name in names:
        what = draw(st.sampled_from(["pair", "pair", "sub", "aot"] if depth < 2 else ["pair"]))
        if what == "pair":
            table.pairs.append((draw(_dotted(name)), draw(values())))
        elif what == "sub":
            table.subs.append((name, draw(tables(depth + 1))))
        else:
            table.aots.append((name, draw(st.lists(tables(depth + 1), min_size=1, max_size=3))))
    return table


class Renderer:
    """Writes a Table as TOML, noting the line of each key where it is written."""

    def __init__(self, draw: st.DrawFn, marker: tuple[int, int] | None, crlf: bool) -> None:
        self.draw = draw
        self.out: list[str] = []
        self.lines: dict[Key, int] = {}
        self.marker = marker  # (table number, position among its keys)
        self.tables_seen = 0
        self.marker_key: Key | None = None
        self.crlf = crlf

    @property
    def line(self) -> int:
        return "".join(self.out).count("\n") + 1

    def write(self, text: str) -> None:
        self.out.append(text)

    def text(self) -> str:
        text = "".join(self.out)
        return text.replace("\n", "\r\n") if self.crlf else text

    def noise(self) -> None:
        for _ in range(self.draw(st.integers(0, 2))):
            self.write(self.draw(st.sampled_from(["\n", "# [marker]\n", f"   # {MARKER} = 5\n", "\t\n"])))

    def table(self, table: Table, path: Key, keys: list[str], aot: bool) -> None:
        number = self.tables_seen
        self.tables_seen += 1
        pairs: list[tuple[list[str], Value]] = list(table.pairs)
        if self.marker is not None and self.marker[0] == number:
            pairs.insert(min(self.marker[1], len(pairs)), ([MARKER], Value("scalar", "0")))
        if path and (aot or table.header or pairs):
            self.noise()
            line = self.line
            for n in range(1, len(path)):
                self.lines.setdefault(path[:n], line)
            self.lines[path] = line
            if aot:
                self.lines.setdefault(path[:-1], line)
            spaced = self.draw(st.booleans())
            name = (" . " if spaced else ".").join(_key(k, self.draw(st.integers(0, 2))) for k in keys)
            self.write(f"[[{name}]]" if aot else (f"[ {name} ]" if spaced else f"[{name}]"))
            self.write(self.draw(st.sampled_from(["\n", "  # [[x]]\n"])))
        for parts, value in pairs:
            self.noise()
            self.pair(path, parts, value)
            self.write(self.draw(st.sampled_from(["\n", " # a = 1\n"])))
            if parts == [MARKER]:
                self.marker_key = (*path, MARKER)
        for name, sub in table.subs:
            self.table(sub, (*path, name), [*keys, name], aot=False)
        for name, items in table.aots:
            for i, item in enumerate(items):
                self.table(item, (*path, name, i), [*keys, name], aot=True)

    def pair(self, path: Key, parts: list[str], value: Value) -> None:
        line = self.line
        for n in range(1, len(parts)):
            self.lines.setdefault((*path, *parts[:n]), line)
        self.lines[(*path, *parts)] = line
        sep = " . " if self.draw(st.booleans()) else "."
        self.write(sep.join(_key(p, self.draw(st.integers(0, 2))) for p in parts) + " = ")
        self.value((*path, *parts), value)

    def value(self, path: Key, value: Value) -> None:
        if value.kind == "array":
            self.write("[")
            for i, item in enumerate(value.items):
                if value.multiline:
                    self.write(self.draw(st.sampled_from(["\n  ", f"\n  # {MARKER} = 6\n  ", "\n\n "])))
                self.lines[(*path, i)] = self.line
                self.value((*path, i), item)
                if i < len(value.items) - 1 or self.draw(st.booleans()):
                    self.write(",")
                self.write(" ")
            self.write("\n]" if value.multiline else "]")
        elif value.kind == "inline":
            self.write("{")
            for i, (parts, item) in enumerate(value.pairs):
                self.write(", " if i else " ")
                self.pair(path, parts, item)
            self.write(" }")
        else:
            self.write(value.text)


@dataclass
class Document:
    text: str
    lines: dict[Key, int]
    marker: Key
    without_marker: str


@st.composite
def documents(draw: st.DrawFn) -> Document:
    root = draw(tables())
    root.header = False
    count = Renderer(draw, None, False)
    count.table(root, (), [], aot=False)
    marker = (draw(st.integers(0, count.tables_seen - 1)), draw(st.integers(0, 6)))
    crlf = draw(st.booleans())
    with_marker = Renderer(draw, marker, crlf)
    with_marker.table(root, (), [], aot=False)
    without = Renderer(draw, None, crlf)
    without.table(root, (), [], aot=False)
    assert with_marker.marker_key is not None
    return Document(with_marker.text(), with_marker.lines, with_marker.marker_key, without.text())


def _paths(data: Any, prefix: Key = ()) -> dict[Key, Any]:
    """Every key of tomllib's data: table keys and array indices."""
    out: dict[Key, Any] = {prefix: data}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(_paths(v, (*prefix, k)))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out.update(_paths(v, (*prefix, i)))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(documents())
def test_the_locator_finds_every_key_on_its_line_and_the_marker_on_its_own(doc: Document) -> None:
    data = tomllib.loads(doc.text)  # the generator writes valid TOML
    entries = tomlpos.index(doc.text)
    assert entries is not None, doc.text
    assert set(entries) == set(_paths(data)), doc.text  # the same keys as tomllib, no more, no less
    assert tomlpos.line_of(doc.text, doc.marker) == doc.lines[doc.marker], doc.text
    for key, line in doc.lines.items():
        assert entries[key].line == line, (key, doc.text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(documents(), st.lists(st.one_of(NAMES, st.just(MARKER), st.integers(0, 3)), min_size=1, max_size=4))
def test_an_absent_key_has_no_line(doc: Document, key: list[str | int]) -> None:
    """The marker taken out (its text still in strings and comments), and random keys not in the
    document: no line. A key under a plain value (a number, a string) is at that value's line, by
    design (pydantic's type tags: ``owner.str``); under a table or an array, no line."""
    data = tomllib.loads(doc.without_marker)
    present = _paths(data)
    assert tomlpos.line_of(doc.without_marker, doc.marker) is None, doc.without_marker
    path = tuple(key)
    if path in present:
        return
    depth = max(n for n in range(len(path)) if path[:n] in present)
    above = present[path[:depth]]
    line = tomlpos.line_of(doc.without_marker, path)
    if depth and not isinstance(above, (dict, list)):
        assert line == tomlpos.line_of(doc.without_marker, path[:depth]) != None  # noqa: E711
    else:
        assert line is None, (path, doc.without_marker)


# -- the locator's rules on small examples --------------------------------------------------------


def test_locator_examples() -> None:
    text = (
        "[a.b.c]\n"  # 1
        "x = 1\n"  # 2
        "[a]\n"  # 3: a, defined after a.b.c: its own header is its place
        'note = """\n'  # 4
        "y = 2\n"  # 5: inside a string
        '"""\n'  # 6
        "'quoted key' = {p = 1, q.r = 2}\n"  # 7
        "[[t]]\n"  # 8
        "[[t]]\n"  # 9
        "arr = [\n"  # 10
        "  1, # z = 3\n"  # 11
        "  {k = 4},\n"  # 12
        "]\n"  # 13
    )
    assert tomllib.loads(text)
    assert tomlpos.line_of(text, ("a",)) == 3
    assert tomlpos.line_of(text, ("a", "b")) == 1
    assert tomlpos.line_of(text, ("a", "b", "c", "x")) == 2
    assert tomlpos.line_of(text, ("a", "note")) == 4
    assert tomlpos.line_of(text, ("a", "y")) is None
    assert tomlpos.line_of(text, ("z",)) is None
    assert tomlpos.line_of(text, ("a", "quoted key", "q", "r")) == 7
    assert tomlpos.line_of(text, ("t", 1)) == 9
    assert tomlpos.line_of(text, ("t", 2)) is None
    assert tomlpos.line_of(text, ("t", 1, "arr", 1, "k")) == 12
    assert tomlpos.line_of(text, ("t", 1, "arr", 0, "str")) == 11  # a type tag under a value
    # a missing key: at its table, never further up
    assert tomlpos.line_of(text, ("t", 1, "cert"), missing=True) == 9
    assert tomlpos.line_of(text, ("t", 1, "cert")) is None
    assert tomlpos.line_of(text, ("t", 1, "tls", "cert"), missing=True) is None
    assert tomlpos.line_of(text, ("a", "quoted key", "s"), missing=True) == 7
    assert tomlpos.line_of("[a\n", ("a",)) is None  # not TOML: no line, never a guess


def test_syntax_error_text() -> None:
    assert tomlpos.syntax_error("Invalid value (at line 2, column 5)") == (2, "Invalid value (column 5)")
    assert tomlpos.syntax_error("Unterminated string (at end of document)") is None


# -- every kind of error, through the real CLI ----------------------------------------------------


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nio_logd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def refused(path: Path) -> list[str]:
    """check-config's problem lines (exit 78, no traceback), without the "nio-logd check-config: " prefix."""
    result = check(path)
    assert result.returncode == 78, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ": warning: " not in ln]
    assert lines and all(ln.startswith("nio-logd check-config: ") for ln in lines), lines
    return [ln.removeprefix("nio-logd check-config: ") for ln in lines]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


GOOD_LISTENER = '[[listeners]]\naddress = "tcp://127.0.0.1:0"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            '[log]\npath = """\ndurability = "fsync"\n"""\n\ndurability = "sometimes"\n',
            ":6: log.durability: Input should be 'write' or 'fsync'",
            id="bad-value-after-a-lookalike-in-a-string",
        ),
        pytest.param("# x\n\n[log]\nrotate_keep = 2\nbogus = 1\n", ":5: log.bogus: unknown key", id="unknown-key"),
        pytest.param("[log]\n\n[nope]\nx = 1\n", ":3: nope: unknown key", id="unknown-table"),
        pytest.param('log.durability = "x"\n', ":1: log.durability:", id="dotted-key"),
        pytest.param('[log]\n"durability" = "x"\n', ":2: log.durability:", id="quoted-key"),
        pytest.param(
            f'{GOOD_LISTENER}\n[[listeners]]\naddress = "tcp://127.0.0.1:0"\n\n[listeners.tls]\ncert = "c"\n',
            ":7: listeners.1.tls.key: Field required",
            id="missing-key-at-its-table",
        ),
        pytest.param(
            f'{GOOD_LISTENER}[[listeners]]\naddress = "tcp://127.0.0.1:0"\ntls = {{cert = "c"}}\n',
            ":5: listeners.1.tls.key: Field required",
            id="missing-key-in-an-inline-table",
        ),
        pytest.param(
            'listeners = [\n  {address = "tcp://127.0.0.1:0"},\n  {address = "http://x"},\n]\n',
            ":3: listeners.1.address:",
            id="array-of-inline-tables",
        ),
        pytest.param(
            '[[listeners]]\naddress = "tcp://127.0.0.1:7001"\n\n[[listeners]]\nack = true\naddress = "tcp://127.0.0.1:7001"\n',
            ":6: listeners.0 and listeners.1 are both tcp://127.0.0.1:7001",
            id="duplicate-address-at-the-second",
        ),
        pytest.param(
            '[log]\nrejects_path = "same.log"\nrotate_keep = 2\npath = "same.log"\n',
            ":2: log.path and log.rejects_path are the same file",
            id="path-is-rejects-path",
        ),
        pytest.param(
            '[[listeners]]\naddress = "unix:///tmp/x.sock"\n\n\ntls = {cert = "c", key = "k"}\n',
            ":5: listeners.0: tls: TLS is for tcp:// listeners",
            id="validator-naming-a-key",
        ),
        pytest.param(
            '[[listeners]]\n\nowner = 1.5\naddress = "unix:///tmp/x.sock"\n', ":3: listeners.0.owner", id="union"
        ),
        pytest.param("[log]\n\nrotate_keep = \n", ":3: invalid TOML: Invalid value (column 15)", id="syntax-error"),
        pytest.param('\n\nbase_dir = "/"\n', ":3: base_dir: unknown key", id="reserved-key"),
        pytest.param(
            '[[forward]]\nstream = "A"\n\n[[forward]]\nstream = "A"\n',
            ":4: forward: two tables are named 'A-logs_nio'",
            id="duplicate-forward-at-its-table",
        ),
        pytest.param(
            '\n[daemon]\n\nuser = "no-such-user-nio"\n', ":4: [daemon] user: no such user", id="preflight-user"
        ),
    ],
)
def test_each_error_names_the_file_and_line(tmp_path: Path, text: str, expected: str) -> None:
    config = _write(tmp_path / "c.toml", text)
    lines = refused(config)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{config}{expected}"), lines[0]


def test_each_of_several_errors_has_its_own_line(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", '[log]\ndurability = "x"\n\n[limits]\nidle_timeout = -1\n')
    (line,) = refused(config)
    parts = line.split("; ")
    assert parts[0].startswith(f"{config}:2: log.durability:"), parts
    assert parts[1].startswith(f"{config}:5: limits.idle_timeout:"), parts


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(b"[log]\n# \xff\n")
    (line,) = refused(config)
    assert line == f"{config}:2: not UTF-8 text (byte 8)", line


def test_a_drop_in_error_names_the_drop_in_and_its_line(tmp_path: Path) -> None:
    """The drop-in's second [[listeners]] is listeners.2 of the merged config: the error is at the
    drop-in's own line for it, not at the main file's."""
    main = _write(tmp_path / "c.toml", GOOD_LISTENER + '[[listeners]]\naddress = "tcp://127.0.0.1:0"\n')
    drop = _write(
        tmp_path / "conf.d" / "10-more.toml",
        '# more\n[[listeners]]\naddress = "tcp://127.0.0.1:0"\n\n[[listeners]]\nack = "yes"\n',
    )
    (line,) = refused(main)
    assert line.startswith(f"{drop}:6: listeners.3.ack:"), line
    # a key the drop-in sets over the main file: the drop-in's line
    _write(main, GOOD_LISTENER + '[log]\ndurability = "fsync"\n')
    _write(drop, '\n\n[log]\ndurability = "never"\n')
    (line,) = refused(main)
    assert line.startswith(f"{drop}:4: log.durability:"), line
    # an error in each: each part names its own file and line
    _write(main, GOOD_LISTENER + "[log]\nbogus = 1\n")
    (line,) = refused(main)
    assert f"{main}:4: log.bogus: unknown key" in line.split("; "), line
    assert any(part.startswith(f"{drop}:4: log.durability:") for part in line.split("; ")), line
    # a syntax error in the drop-in
    _write(main, GOOD_LISTENER)
    _write(drop, "[log]\n\n[log\n")
    (line,) = refused(main)
    assert line.startswith(f"{drop}:3: invalid TOML:"), line


def test_a_clash_of_default_addresses_is_at_the_second_table(tmp_path: Path) -> None:
    """Both listeners take the default address: no address key to point at, so the second
    table's header."""
    config = _write(tmp_path / "c.toml", "[[listeners]]\n\n[[listeners]]\nack = true\n")
    (line,) = refused(config)
    assert line.startswith(f"{config}:3: listeners.0 and listeners.1 are both"), line


def test_errors_are_listed_in_the_order_of_their_lines(tmp_path: Path) -> None:
    """pydantic lists an unknown key and a bad value in an order that changed between its versions
    (2.12: the value first, 2.13: the key first); the daemon lists them by file and line."""
    config = _write(
        tmp_path / "c.toml",
        '[log]\nnote = """\ndurability = "fsync"\n"""\n\ndurability = "sometimes"\n[limits]\nx = 1\n',
    )
    (line,) = refused(config)
    assert line == (
        f"{config}:2: log.note: unknown key; {config}:6: log.durability: Input should be 'write' or 'fsync'; "
        f"{config}:8: limits.x: unknown key"
    ), line


def test_a_config_file_named_like_a_line_number_is_named_in_its_errors(tmp_path: Path) -> None:
    """The errors are ordered by where they stand; a file whose name ends in ``:`` and a digit-like
    character (``²`` is a digit to Python, not a number) must not break that."""
    config = _write(tmp_path / "c:²", '[log]\ndurability = "x"\n[limits]\nx = 1\n')
    (line,) = refused(config)
    assert line.startswith(f"{config}:2: log.durability:"), line
    assert f"{config}:4: limits.x: unknown key" in line, line
