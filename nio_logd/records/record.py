"""The record model: pydantic validation of one framed line into fields or a refusal.

design: the model is a TypedDict validated by a pydantic ``TypeAdapter`` straight from the JSON
bytes, so parsing, UTF-8 checking and every rule run in pydantic-core (Rust) in one call, about a
microsecond per record. ``send_time`` is a chain: a string that looks like a date and time, then a
datetime; so epoch numbers ("1700000000") that pydantic would otherwise take are refused.
pydantic-core keeps the last of duplicate keys; a record with any is refused instead (a log is
evidence), by an exact check that runs only when a count of ``"`` bytes says a duplicate is possible.
With the default extra = "forbid", the same count stands in for pydantic's unknown-key check: a
record is validated with extra "ignore" first, and again with "forbid" only when the count says it
may hold a field more than the three, or when it is refused (``RecordValidator.validate_exact``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Final, Literal, cast

import orjson
from pydantic import ConfigDict, GetPydanticSchema, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails
from pydantic_core import core_schema as cs
from typing_extensions import TypedDict

from ..config import RecordSettings


class TooLarge:
    """A record that exceeded the size bound; ``prefix`` is its first ``max_bytes`` bytes."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TooLarge) and other.prefix == self.prefix

    def __hash__(self) -> int:
        return hash(self.prefix)

    def __repr__(self) -> str:
        return f"TooLarge(prefix={self.prefix[:32]!r}..., {len(self.prefix)} bytes)"


Frame = bytes | TooLarge

_FIELDS = frozenset({"send_user", "send_time", "send_msg"})


def _writable(value: Any) -> bool:
    """Whether a kept extra value survives the JSON renderer unchanged: pydantic's parser takes
    integers of any size and 1e400 as infinity, orjson refuses the first and writes null for the
    second."""
    if type(value) is int:
        return -(1 << 63) <= value < (1 << 64)
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is list:
        return all(map(_writable, value))
    if type(value) is dict:
        return all(map(_writable, value.values()))
    return True


# Keys the daemon writes itself; a kept extra field may not use them.
RESERVED_KEYS = frozenset(
    {"timestamp", "level", "event", "peer", "listener", "client", "peer_pid", "peer_uid", "peer_gid"}
)

TIME_RULE = "must be 'YYYY-MM-DD HH:MM:SS' or ISO 8601 / RFC 3339, e.g. 2026-11-29T12:00:00Z"
USER_RULE = "must not contain control or bidirectional formatting characters"

_TIME_SCHEMA = cs.custom_error_schema(
    cs.chain_schema(
        [
            cs.str_schema(pattern=r"^\d{4}-\d{2}-\d{2}[Tt _]\d{2}:\d{2}"),
            cs.datetime_schema(strict=False),  # its input is the str of the step before
        ]
    ),
    custom_error_type="send_time_format",
    custom_error_message=TIME_RULE,
)

SendTime = Annotated[datetime, GetPydanticSchema(lambda _t, _h: _TIME_SCHEMA)]


# C0 controls, DEL and C1 controls, and the bidi controls (embeddings, overrides, isolates, the
# ALM/LRM/RLM marks) that make one name display as another. pydantic-core's regex runs in Rust.
_USER_PATTERN: Final = r"^[^\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]*$"


def _user_schema(max_chars: int) -> cs.CoreSchema:
    # One string schema with the bounds and the pattern (a chain with a custom error around the
    # pattern measured 6 % more instructions a record); a mismatch is said as USER_RULE by
    # _refusal, not with pydantic's text that quotes the pattern.
    return cs.str_schema(min_length=1, max_length=max_chars, pattern=_USER_PATTERN)


# Every `"` byte in JSON opens or closes a string or is escaped inside one, and an accepted record
# has three string keys with three string values: 12 at least. A duplicate key is one more string,
# so a record with exactly 12 cannot have one, and the exact check is skipped on the common path.
# An extra field, kept or ignored, is one more string too (its key): with extra = "forbid" this
# count is also what decides whether a record is validated again with "forbid".
_PLAIN_RECORD_QUOTES: Final = 12


def delimiting_quotes(frame: bytes) -> int:
    """How many ``"`` bytes of a valid JSON text open or close a string (escaped ones do not).

    Outside strings a backslash is not valid JSON, and inside one each backslash that is not
    itself escaped starts an escape: so removing the escaped backslashes (``\\\\``, pairs taken
    left to right, as the parser pairs them) leaves every other backslash in front of the byte it
    escapes, and each ``\\"`` left is an escaped quote. Bytes only; for a record whose text has
    quotes (JSON in a message), this spares the exact duplicate check in Python.
    """
    if b"\\" not in frame:
        return frame.count(b'"')
    plain = frame.replace(b"\\\\", b"")
    return plain.count(b'"') - plain.count(b'\\"')


class _Repeated(Exception):
    """A key occurs twice in one object (raised from the parser's hook, to stop at the first)."""


def _refuse_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Repeated
    return obj


# Shared by every record and thread: building a decoder per call (what json.loads does when given
# a hook) costs more than the parse. Numbers stay text: their values do not matter here, and int()
# refuses more than 4300 digits.
_REPEAT_FINDER: Final = json.JSONDecoder(object_pairs_hook=_refuse_repeats, parse_int=str, parse_float=str)


def _duplicate_key_errors(frame: bytes) -> list[dict[str, str]]:
    """One error per key repeated in one object, at any depth, named by its dotted path; keys
    compare after JSON unescaping, as the parser that accepted the record compared them."""
    try:
        text = frame.decode("utf-8")
        try:
            _REPEAT_FINDER.decode(text)
        except _Repeated:
            return _name_repeats(text)
    except RecursionError:
        # Only reachable with extra = "keep" near pydantic-core's own depth limit; refusing beats
        # ending the I/O thread.
        return [{"field": "(record)", "error": "nested too deeply to check for duplicate keys"}]
    except ValueError:
        # pydantic-core accepted these bytes, so Python's parser should too; if not, the record
        # cannot be shown to be unambiguous.
        return [{"field": "(record)", "error": "cannot be checked for duplicate keys"}]
    return []


def _name_repeats(text: str) -> list[dict[str, str]]:
    """The rare path, once a duplicate is known: parse again, noting every object with one."""
    # Every flagged object stays referenced here, so no id() is reused while the tree is walked.
    flagged: dict[int, tuple[dict[str, Any], list[str]]] = {}

    def note_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            repeated: dict[str, None] = {}  # an ordered set: a list would make this quadratic
            for key, _ in pairs:
                if key in seen:
                    repeated[key] = None
                seen.add(key)
            flagged[id(obj)] = (obj, list(repeated))
        return obj

    root = json.loads(text, object_pairs_hook=note_repeats, parse_int=str, parse_float=str)
    # A duplicate's discarded value may hold flagged objects of its own: only what is reachable
    # from the root is named. Iterative, since the tree may be as deep as the parser allowed.
    errors: list[dict[str, str]] = []
    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        prefix = f"{path}." if path else ""
        if type(node) is dict:
            entry = flagged.get(id(node))
            if entry is not None and entry[0] is node:
                errors.extend({"field": prefix + key, "error": "duplicate key"} for key in entry[1])
            children = [(value, prefix + key) for key, value in node.items()]
        elif type(node) is list:
            children = [(value, f"{prefix}{i}") for i, value in enumerate(node)]
        else:
            continue
        stack.extend(reversed(children))  # document order
    return errors


# A refusal is written twice (the rejects log, the answer) for one record: bounded, so that a record
# of thousands of unknown keys, or one key of 200 KB, cannot make its refusal many times its size.
MAX_ERRORS = 10
MAX_FIELD_CHARS = 200


def _bounded(errors: list[dict[str, str]]) -> list[dict[str, str]]:
    out = []
    for err in errors[:MAX_ERRORS]:
        name = err["field"]
        if len(name) > MAX_FIELD_CHARS:
            err = {**err, "field": f"{name[:MAX_FIELD_CHARS]}... ({len(name)} characters)"}  # noqa: PLW2901
        out.append(err)
    if len(errors) > MAX_ERRORS:
        out.append({"field": "(record)", "error": f"{len(errors) - MAX_ERRORS} more errors not listed"})
    return out


class Refusal:
    """Why one record was refused; ``raw`` is its bytes (or the first of them if too large)."""

    __slots__ = ("errors", "raw", "reason")

    def __init__(self, reason: str, errors: list[dict[str, str]], raw: bytes) -> None:
        self.reason = reason  # a short machine-readable reason, used as the metrics label
        self.errors = _bounded(errors)  # [{"field": ..., "error": ...}, ...]
        self.raw = raw

    @property
    def message(self) -> str:
        """One line for humans, naming the field(s)."""
        return "; ".join(f"{e['field']}: {e['error']}" for e in self.errors)

    def __repr__(self) -> str:
        return f"Refusal({self.reason!r}, {self.message!r})"


Fields = dict[str, Any]


def _json_validator(fields: dict[str, Any], extra: Literal["forbid", "ignore", "allow"]) -> Callable[[bytes], Fields]:
    """pydantic-core's ``validate_json`` for a record TypedDict of ``fields`` with ``extra``."""
    record: Any = TypedDict("record", fields)  # type: ignore[misc]
    record.__pydantic_config__ = ConfigDict(extra=extra, strict=True)  # type: ignore[attr-defined]
    adapter: TypeAdapter[Fields] = TypeAdapter(cast("type[Fields]", record))
    # The schema validator itself: TypeAdapter.validate_json only adds a Python call around it.
    return adapter.validator.validate_json


class RecordValidator:
    """Validate framed records against the configured rules."""

    __slots__ = ("_validate_json", "_validate_lenient", "max_record_bytes", "settings", "validate")

    def __init__(self, settings: RecordSettings, max_record_bytes: int) -> None:
        self.settings = settings
        self.max_record_bytes = max_record_bytes
        extra: Literal["forbid", "ignore", "allow"] = "allow" if settings.extra == "keep" else settings.extra
        max_user = settings.max_user_chars
        user_type = Annotated[str, GetPydanticSchema(lambda _t, _h: _user_schema(max_user))]
        msg_schema = cs.str_schema(max_length=settings.max_msg_chars)
        msg_type = Annotated[str, GetPydanticSchema(lambda _t, _h: msg_schema)]
        # Built at run time because the length limits come from the config.
        fields = {"send_user": user_type, "send_time": SendTime, "send_msg": msg_type}
        # pydantic-core's string cache stays at its default ("all"): a TypedDict's own config does
        # not reach the validator's cache setting, and "keys" set on the validator measured 0.3 µs
        # a record slower than the default (wall clock, the bench's records: a cached user name
        # is one allocation fewer).
        self._validate_json = _json_validator(fields, extra)
        # With extra = "forbid", records are first validated with extra "ignore": pydantic-core's
        # check for unknown keys costs about 0.3 µs a record (15 % of the validation), and a record
        # with an extra field has a string more than the three keys and three values, which the
        # quote counts that already rule out repeated keys see (validate_batch). A record those
        # counts do not clear, or a refused one (for its exact errors), is validated again with
        # "forbid" (validate_exact). Such records, refused with "forbid" anyway, cost about twice
        # to three times what they did; invalid JSON is not validated again (same error either way).
        self._validate_lenient = _json_validator(fields, "ignore") if extra == "forbid" else self._validate_json
        self.validate: Callable[[Frame], Fields | Refusal] = (
            self._validate_keeping
            if settings.extra == "keep"
            else self._validate
            if extra == "forbid"
            else self.validate_exact
        )

    def _validate_keeping(self, frame: Frame) -> Fields | Refusal:
        result = self.validate_exact(frame)
        if type(result) is dict and len(result) > 3:
            assert isinstance(frame, bytes)
            clash = sorted(RESERVED_KEYS.intersection(result))
            if clash:
                return Refusal(
                    "invalid_fields",
                    [{"field": name, "error": "reserved: the daemon writes this key itself"} for name in clash],
                    frame,
                )
            bad = [name for name in result if name not in _FIELDS and not _writable(result[name])]
            if bad:
                return Refusal(
                    "invalid_fields",
                    [
                        {
                            "field": name,
                            "error": "cannot be written: an integer beyond 64 bits or a number out of range",
                        }
                        for name in bad
                    ],
                    frame,
                )
        return result

    def validate_many(self, frames: list[Frame]) -> list[Fields | Refusal]:
        """``[validate(f) for f in frames]``, in as few Python calls as the read allows."""
        return self.validate_batch(frames)[0]

    def validate_batch(self, frames: list[Frame]) -> tuple[list[Fields | Refusal], bytes | None]:
        """``validate_many``'s results and, for a *plain* read of more than one frame, the records'
        fields serialised as one JSON array (orjson) for ``Renderer.splice``. Plain: every frame
        accepted and no key repeated; each result is then exactly the three fields in the
        schema's order (``send_user`` first, string and datetime values only), by construction:
        the TypedDict with extra "forbid" or "ignore" gives nothing else ("keep" never makes a
        plain read). One frame is validated alone: the proof would cost more than the record.

        The common read costs a few C calls: the records through pydantic-core by ``map`` (with
        extra "ignore" when the config says "forbid"), and the proof that no record repeats a key
        or holds a field more than the three, from counts of ``"`` bytes. Each accepted record
        has at least 12 delimiting quotes (three keys, three string values) and a repeated key is
        one string more; so a read whose frames hold exactly 12 quote bytes a record has no
        repeat and no extra field (its key would be a seventh string). Otherwise the quote bytes
        of the input are compared with those of the output: orjson writes 12 delimiting quotes a
        record plus one ``\\"`` for each quote in the values; the input holds its delimiting
        quotes plus one ``\\"`` for each quote in its strings, kept or not, and ``\\u0022`` is
        the only other way to write a quote. So without that text in the read, equal counts mean
        12 delimiting quotes a record and no string left out. Anything else (a refused record,
        invalid JSON, a frame over the size bound, a read with ``\\u0022``, a record that may
        repeat a key or hold an extra field) is decided record by record, with the results of
        ``validate_exact``.
        """
        if self.settings.extra == "keep" or len(frames) == 1:
            # One frame (a client of one record a connection): the batch's proof and splice would
            # cost more than the record; the caller renders it alone.
            return [self.validate(frame) for frame in frames], None
        results: list[Any] = []
        extend = results.extend
        validate_json = cast("Callable[[Frame], Fields]", self._validate_lenient)  # a TooLarge raises too
        n = len(frames)
        plain = True
        rest = iter(frames)  # one iterator: after a refusal the map goes on from the next frame
        while len(results) < n:
            try:
                # list.extend keeps what the map gave before it raised: the record that raised is
                # the next one, refused (validated again for its reasons), and the map goes on.
                extend(map(validate_json, rest))
            except ValidationError as exc:
                frame = frames[len(results)]
                # Refused with extra "ignore" is refused with "forbid" too, which may name more.
                results.append(self._refused(frame, exc) if type(frame) is bytes else self.validate_exact(frame))
                plain = False
        if not n:
            return results, None
        if plain:
            joined = b"".join(cast("list[bytes]", frames))
            body = orjson.dumps(results)
            quotes = joined.count(b'"')
            if quotes == _PLAIN_RECORD_QUOTES * n or (b"\\u0022" not in joined and quotes == body.count(b'"')):
                return results, body
        for i, result in enumerate(results):
            frame = frames[i]
            if (
                type(result) is dict
                and isinstance(frame, bytes)  # always, for an accepted one
                and frame.count(b'"') > _PLAIN_RECORD_QUOTES
                and delimiting_quotes(frame) > _PLAIN_RECORD_QUOTES
            ):
                checked = results[i] = self._confirm(frame, result)
                if type(checked) is not dict:
                    plain = False
        return results, body if plain else None

    def _validate(self, frame: Frame) -> Fields | Refusal:
        """``validate_exact``'s result, from extra "ignore" where the quote count proves it the same."""
        if type(frame) is bytes:
            try:
                fields = self._validate_lenient(frame)
            except ValidationError as exc:
                return self._refused(frame, exc)
            if frame.count(b'"') > _PLAIN_RECORD_QUOTES and delimiting_quotes(frame) > _PLAIN_RECORD_QUOTES:
                return self.validate_exact(frame)  # a field more than the three, or a key repeated?
            return fields
        return self.validate_exact(frame)

    def _refused(self, frame: bytes, exc: ValidationError) -> Fields | Refusal:
        """A record the first validator refused, with the errors of the configured rules: the same
        when that validator is the configured one or the JSON itself is invalid (parsed before any
        field is looked at), else from validating again with "forbid", which may name more."""
        if self._validate_lenient is self._validate_json or exc.errors(include_url=False)[0]["type"] == "json_invalid":
            return _refusal(frame, exc)
        return self.validate_exact(frame)

    def _confirm(self, frame: bytes, fields: Fields) -> Fields | Refusal:
        """An accepted record with more than 12 delimiting quotes (a string more than the three keys
        and values: an extra field or a repeated key), decided exactly."""
        if self._validate_lenient is not self._validate_json:
            return self.validate_exact(frame)  # extra "forbid": the record validated again
        errors = _duplicate_key_errors(frame)
        return Refusal("invalid_fields", errors, frame) if errors else fields

    def validate_exact(self, frame: Frame) -> Fields | Refusal:
        """The record's fields, or why it is refused: pydantic with the configured ``extra``, then
        the check for repeated keys. The rules themselves; with extra "forbid" or "ignore",
        ``validate`` and ``validate_batch`` give the same results in fewer steps (the tests
        compare them with this); "keep" adds its own refusals (``_validate_keeping``)."""
        if type(frame) is bytes:
            try:
                fields = self._validate_json(frame)
            except ValidationError as exc:
                return _refusal(frame, exc)
            if frame.count(b'"') > _PLAIN_RECORD_QUOTES and delimiting_quotes(frame) > _PLAIN_RECORD_QUOTES:
                errors = _duplicate_key_errors(frame)
                if errors:
                    return Refusal("invalid_fields", errors, frame)
            return fields
        assert isinstance(frame, TooLarge)
        return Refusal(
            "too_large",
            [{"field": "(record)", "error": f"longer than max_record_bytes ({self.max_record_bytes})"}],
            frame.prefix,
        )


# pydantic-core's "Invalid JSON: <what> at line L column C"; <what> may itself end in " at".
_JSON_ERROR = re.compile(r"(?:Invalid JSON: )?(?P<what>.*?)(?: at)* at line (?P<line>\d+) column (?P<col>\d+)\Z", re.S)


def _json_error(msg: str) -> str:
    """The parser's message, said once: "invalid JSON: expected `:` at line 1 column 6"."""
    m = _JSON_ERROR.match(msg)
    if m is None:
        return f"invalid JSON: {msg.removeprefix('Invalid JSON: ')}"
    return f"invalid JSON: {m['what']} at line {m['line']} column {m['col']}"


def _field_error(err: ErrorDetails) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "string_pattern_mismatch":  # only send_user has a pattern of its own (send_time's
        return USER_RULE  # is inside its custom error)
    return err["msg"]


def _refusal(raw: bytes, exc: ValidationError) -> Refusal:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    kind = first["type"]
    if kind == "json_invalid":
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            return Refusal(
                "invalid_utf8",
                [{"field": "(record)", "error": f"not UTF-8: bad byte at offset {bad.start}"}],
                raw,
            )
        return Refusal("invalid_json", [{"field": "(record)", "error": _json_error(first["msg"])}], raw)
    if not first["loc"]:
        return Refusal("not_an_object", [{"field": "(record)", "error": "not a JSON object"}], raw)
    fields = [{"field": ".".join(str(p) for p in err["loc"]), "error": _field_error(err)} for err in errors]
    return Refusal("invalid_fields", fields, raw)
