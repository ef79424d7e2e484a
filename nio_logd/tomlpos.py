"""Where a key is in a TOML document: the line numbers tomllib does not give.

``line_of(text, ("listeners", 1, "address"))`` is the line (from 1) of the second ``[[listeners]]``
table's ``address``; None when the document does not have that key (never a guess). Only the
standard library: this is the bottom layer, used by the config's error messages.

The scanner follows TOML's structure only as far as needed to know where keys are: table headers
``[a.b]``, arrays of tables ``[[a]]`` (the Nth header is index N of its array), dotted and quoted
keys, inline tables, arrays (index N is the Nth element), and the strings (single- and multi-line)
that must be skipped whole, so that a ``key =`` inside a string or an array is never taken for a
key. It is meant for documents tomllib has accepted; on anything it cannot follow it knows no
line at all.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

Key = tuple[str | int, ...]

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\", "e": "\x1b"}
# tomllib's TOMLDecodeError text: "Invalid value (at line 2, column 5)".
_BLANK = re.compile(r"[ \t]*")
_SPACE = re.compile(r"(?:[ \t]+|#[^\n]*|\r?\n)*")  # blanks, comments and line ends, inside arrays
_SCALAR = re.compile(r"[^,\]}#\r\n]*")  # a number, a boolean, a date: up to what ends a value
_AT_LINE = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$", re.DOTALL)


def _end(pattern: re.Pattern[str], text: str, pos: int) -> int:
    """Where a match of ``pattern`` (which may be empty) from ``pos`` ends."""
    m = pattern.match(text, pos)
    return pos if m is None else m.end()


class _Unparsable(Exception):
    """The text is not TOML this scanner can follow."""


@dataclass(slots=True)
class _Node:
    line: int
    # "table" ([a], [[a]]'s items, implicit and inline tables), "aot" (an array of tables),
    # "array" (an array value), "value" (anything else).
    kind: str
    explicit: bool = False  # a table given its own [header] (not only implied by a longer one)
    children: dict[str, _Node] = field(default_factory=dict)
    items: list[_Node] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Entry:
    """One key of the document: the line it is on and what it is."""

    line: int
    kind: str  # "table", "aot", "array" or "value"


class _Scanner:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.newlines = [m.start() for m in re.finditer("\n", text)]
        self.root = _Node(1, "table", explicit=True)

    def line(self, pos: int) -> int:
        return bisect.bisect_left(self.newlines, pos) + 1

    def peek(self, ahead: int = 0) -> str:
        j = self.i + ahead
        return self.s[j] if j < len(self.s) else ""

    def skip_blank(self) -> None:
        self.i = _end(_BLANK, self.s, self.i)

    def skip_comment(self) -> None:
        if self.peek() == "#":
            end = self.s.find("\n", self.i)
            self.i = len(self.s) if end < 0 else end

    def skip_newline(self) -> bool:
        if self.peek() == "\n":
            self.i += 1
            return True
        if self.peek() == "\r" and self.peek(1) == "\n":
            self.i += 2
            return True
        return False

    def skip_space(self) -> None:
        """Blanks, comments and line ends (inside arrays)."""
        self.i = _end(_SPACE, self.s, self.i)

    def end_of_line(self) -> None:
        self.skip_blank()
        self.skip_comment()
        if not self.skip_newline() and self.i < len(self.s):
            raise _Unparsable(self.i)

    # -- the document ------------------------------------------------------------------------
    def document(self) -> _Node:
        table = self.root
        while self.i < len(self.s):
            self.skip_blank()
            if self.skip_newline():
                continue
            if self.peek() == "#":
                self.skip_comment()
                continue
            if not self.peek():
                break
            line = self.line(self.i)
            if self.peek() == "[" and self.peek(1) == "[":
                self.i += 2
                keys = self.key()
                self.expect("]]")
                table = self.array_table(keys, line)
            elif self.peek() == "[":
                self.i += 1
                keys = self.key()
                self.expect("]")
                table = self.table(keys, line)
            else:
                self.pair(table)
            self.end_of_line()
        return self.root

    def expect(self, text: str) -> None:
        self.skip_blank()
        if not self.s.startswith(text, self.i):
            raise _Unparsable(self.i)
        self.i += len(text)

    def walk(self, node: _Node, keys: list[str], line: int) -> _Node:
        """The table at ``keys`` under ``node`` (an array of tables: its last item), made if new."""
        for key in keys:
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = _Node(line, "table")
            if child.kind == "aot":
                if not child.items:
                    raise _Unparsable(line)
                child = child.items[-1]
            if child.kind != "table":
                raise _Unparsable(line)
            node = child
        return node

    def table(self, keys: list[str], line: int) -> _Node:
        node = self.walk(self.root, keys, line)
        if not node.explicit:
            node.explicit, node.line = True, line  # [a.b] after [a.b.c]: the header is a's place
        return node

    def array_table(self, keys: list[str], line: int) -> _Node:
        parent = self.walk(self.root, keys[:-1], line)
        aot = parent.children.get(keys[-1])
        if aot is None:
            aot = parent.children[keys[-1]] = _Node(line, "aot")
        if aot.kind != "aot":
            raise _Unparsable(line)
        item = _Node(line, "table", explicit=True)
        aot.items.append(item)
        return item

    def pair(self, table: _Node) -> None:
        """``a.b = value`` into ``table``."""
        line = self.line(self.i)
        keys = self.key()
        self.expect("=")
        self.skip_blank()
        parent = table
        for key in keys[:-1]:  # dotted keys: implicit tables, on this line
            child = parent.children.get(key)
            if child is None:
                child = parent.children[key] = _Node(line, "table")
            if child.kind != "table":
                raise _Unparsable(line)
            parent = child
        if keys[-1] in parent.children:
            raise _Unparsable(line)  # defined twice: tomllib would have refused it
        parent.children[keys[-1]] = self.value(line)

    # -- keys ------------------------------------------------------------------------------------
    def key(self) -> list[str]:
        keys: list[str] = []
        while True:
            self.skip_blank()
            c = self.peek()
            if c == '"':
                keys.append(self.basic_string(decode=True))
            elif c == "'":
                end = self.s.find("'", self.i + 1)
                if end < 0 or "\n" in self.s[self.i : end]:
                    raise _Unparsable(self.i)
                keys.append(self.s[self.i + 1 : end])
                self.i = end + 1
            else:
                start = self.i
                while self.peek() and self.peek() in _BARE:
                    self.i += 1
                if self.i == start:
                    raise _Unparsable(self.i)
                keys.append(self.s[start : self.i])
            self.skip_blank()
            if self.peek() != ".":
                return keys
            self.i += 1

    def basic_string(self, decode: bool) -> str:
        """A one-line "basic string" from its opening quote; its text if ``decode``."""
        self.i += 1
        out: list[str] = []
        while True:
            c = self.peek()
            if c in ("", "\n"):
                raise _Unparsable(self.i)
            self.i += 1
            if c == '"':
                return "".join(out)
            if c != "\\":
                out.append(c)
                continue
            esc = self.peek()
            self.i += 1
            if esc in _ESCAPES:
                out.append(_ESCAPES[esc])
            elif esc in ("u", "U") and decode:
                width = 4 if esc == "u" else 8
                digits = self.s[self.i : self.i + width]
                try:
                    out.append(chr(int(digits, 16)))
                except ValueError:
                    raise _Unparsable(self.i) from None
                self.i += width
            elif esc in ("u", "U"):
                pass  # skipped as ordinary characters
            else:
                raise _Unparsable(self.i)

    # -- values ----------------------------------------------------------------------------------
    def value(self, line: int) -> _Node:
        c = self.peek()
        if self.s.startswith('"""', self.i) or self.s.startswith("'''", self.i):
            self.multiline_string(self.s[self.i])
        elif c == '"':
            self.basic_string(decode=False)
        elif c == "'":
            end = self.s.find("'", self.i + 1)
            if end < 0 or "\n" in self.s[self.i : end]:
                raise _Unparsable(self.i)
            self.i = end + 1
        elif c == "[":
            return self.array(line)
        elif c == "{":
            return self.inline_table(line)
        else:
            start = self.i
            self.i = _end(_SCALAR, self.s, start)
            if not self.s[start : self.i].strip():
                raise _Unparsable(start)
        return _Node(line, "value")

    def multiline_string(self, quote: str) -> None:
        self.i += 3
        while True:
            j = self.s.find(quote * 3, self.i)
            if j < 0:
                raise _Unparsable(self.i)
            if quote == '"':
                # An escaped quote (odd number of backslashes before it) does not close the string.
                k = j
                while k > self.i and self.s[k - 1] == "\\":
                    k -= 1
                if (j - k) % 2:
                    self.i = j + 1
                    continue
            end = j + 3
            while end < len(self.s) and self.s[end] == quote and end - j < 5:
                end += 1  # up to two quotes of the text itself just before the closing three
            self.i = end
            return

    def array(self, line: int) -> _Node:
        node = _Node(line, "array")
        self.i += 1
        while True:
            self.skip_space()
            if self.peek() == "]":
                self.i += 1
                return node
            node.items.append(self.value(self.line(self.i)))
            self.skip_space()
            if self.peek() == ",":
                self.i += 1
            elif self.peek() == "]":
                self.i += 1
                return node
            else:
                raise _Unparsable(self.i)

    def inline_table(self, line: int) -> _Node:
        """``{a = 1, b.c = 2}``: its keys (the lines they are on; one line but for values that span more)."""
        node = _Node(line, "table", explicit=True)
        self.i += 1
        self.skip_space()
        if self.peek() == "}":
            self.i += 1
            return node
        while True:
            self.skip_space()
            self.pair(node)
            self.skip_space()
            if self.peek() == ",":
                self.i += 1
                self.skip_space()
                if self.peek() == "}":  # TOML 1.1's trailing comma
                    self.i += 1
                    return node
            elif self.peek() == "}":
                self.i += 1
                return node
            else:
                raise _Unparsable(self.i)


def index(text: str) -> dict[Key, Entry] | None:
    """Every key of the document with its line: tables, array-of-tables items (``("listeners", 0)``),
    keys, array elements (by index). None if the text cannot be followed."""
    try:
        root = _Scanner(text).document()
    except (_Unparsable, RecursionError):
        return None
    out: dict[Key, Entry] = {}
    stack: list[tuple[Key, _Node]] = [((), root)]
    while stack:
        key, node = stack.pop()
        out[key] = Entry(node.line, node.kind)
        stack.extend(((*key, name), child) for name, child in node.children.items())
        stack.extend(((*key, i), item) for i, item in enumerate(node.items))
    return out


def find(entries: dict[Key, Entry] | None, key: Sequence[str | int], *, missing: bool = False) -> int | None:
    """The line of ``key`` in an ``index``.

    A key under a plain value (a type tag pydantic adds to a location: ``owner.str``) is on that
    value's line. A ``missing`` key (one that must be given but is not) is
    at its table: the table's header, or the key of an inline table. Anything else not in the
    document has no line.
    """
    if not entries or not key:
        return None
    path = tuple(key)
    if path in entries:
        return entries[path].line
    for depth in range(len(path) - 1, 0, -1):
        found = entries.get(path[:depth])
        if found is None:
            continue
        if found.kind == "value":
            return found.line
        if missing and found.kind == "table" and depth == len(path) - 1:
            return found.line
        return None
    return None


def line_of(text: str, key: Sequence[str | int], *, missing: bool = False) -> int | None:
    """The line (from 1) of ``key`` in the TOML ``text``, or None; see ``find``."""
    return find(index(text), key, missing=missing)


def syntax_error(message: str) -> tuple[int, str] | None:
    """tomllib's "Invalid value (at line 2, column 5)" as (2, "Invalid value (column 5)"); None
    for a message without a line ("at end of document")."""
    m = _AT_LINE.match(message)
    if m is None:
        return None
    return int(m["line"]), f"{m['msg']} (column {m['column']})"
