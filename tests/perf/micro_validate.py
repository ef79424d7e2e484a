"""Micro-benchmark: validating one record with the daemon's pydantic model, per call and per batch.

Run by hand:  python tests/perf/micro_validate.py [--records 200000] [--repeats 7] [--batch 2048]

  current            ``RecordValidator.validate(frame)``: one ``TypeAdapter.validate_json`` call per
                     record (the daemon's path, including its Python wrapper).
  validate_batch     ``RecordValidator.validate_batch`` over ``--batch`` frames a call: the map over
                     pydantic-core, the proof that no key repeats and the fields as one JSON array.
  validate_json      the same TypeAdapter's ``validate_json`` called directly (no wrapper): the
                     configured rules (extra "forbid"); the daemon's first pass uses a validator
                     with extra "ignore", about 0.3 µs a record faster (record.py).
  list, one call     the same core schema wrapped in a list schema, validating ``[f1,f2,...]`` (the
                     frames joined with commas) in one call per batch; the results are checked
                     equal to the per-record ones. NOT safe as it stands: frames that are not one
                     JSON value each (``{..},{..}`` or a string split over two lines) can change how
                     the array splits, so the daemon would have to prove the item count and
                     boundaries, or fall back; it is measured to see whether it is worth that.
  orjson.loads       parsing only (no validation): the floor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import orjson  # noqa: E402
import pydantic  # noqa: E402
from pydantic_core import SchemaValidator  # noqa: E402
from pydantic_core import core_schema as cs  # noqa: E402

from nio_logd.config import RecordSettings  # noqa: E402
from nio_logd.records.record import Frame, RecordValidator  # noqa: E402
from nio_logd.tools.bench import lane_pool  # noqa: E402


def frames_of(n: int) -> list[bytes]:
    out: list[bytes] = []
    lane = 0
    while len(out) < n:
        out.extend(lane_pool(1, lane, min(20480, n - len(out)), (100, 150), 1024))
        lane += 1
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=2048)
    args = parser.parse_args()
    frames = frames_of(args.records)
    validator = RecordValidator(RecordSettings(), 256 * 1024)
    # The daemon keeps only the schema validator its TypeAdapter built; that validator pickles as
    # (its core schema, its config), which is how the list schema gets the very same record schema.
    schema_validator = cast(Any, validator._validate_json).__self__
    record_schema, record_config = schema_validator.__reduce__()[1][:2]
    list_validator = SchemaValidator(cs.list_schema(items_schema=record_schema), record_config)
    size = args.batch

    def current() -> None:
        validate = validator.validate
        for f in frames:
            validate(f)

    def batch() -> None:
        validate_batch = validator.validate_batch
        for i in range(0, len(frames), size):
            validate_batch(cast("list[Frame]", frames[i : i + size]))

    def direct() -> None:
        vj = validator._validate_json
        for f in frames:
            vj(f)

    def as_list() -> None:
        vj = list_validator.validate_json
        for i in range(0, len(frames), size):
            chunk = frames[i : i + size]
            result = vj(b"[" + b",".join(chunk) + b"]")
            assert len(result) == len(chunk)

    def loads() -> None:
        parse = orjson.loads
        for f in frames:
            parse(f)

    sample = frames[:3000]
    per_record = [validator.validate(f) for f in sample]
    assert list_validator.validate_json(b"[" + b",".join(sample) + b"]") == per_record

    cases: dict[str, Callable[[], None]] = {
        "current (RecordValidator.validate)": current,
        f"RecordValidator.validate_batch, {size} records a call (the daemon's read path)": batch,
        "TypeAdapter.validate_json direct": direct,
        f"list schema, one call per {size} records (unsafe as is)": as_list,
        "orjson.loads (parse only, floor)": loads,
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / len(frames) * 1e6)
    base = statistics.median(times["current (RecordValidator.validate)"])
    print(
        f"validating {len(frames):,} records of 100-150 bytes, median of {args.repeats} interleaved repeats "
        f"(pydantic {pydantic.VERSION}, orjson {orjson.__version__})"
    )
    print()
    print("| variant | µs / record (median) | min–max | vs current |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.2f} | {min(values):.2f}–{max(values):.2f} | {med - base:+.2f} µs |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
