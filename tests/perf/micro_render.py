"""Micro-benchmark: the cost of rendering one accepted record, today and with cheaper call paths.

Run by hand:  python tests/perf/micro_render.py [--records 200000] [--repeats 7]

Every variant but the last two runs the daemon's own structlog processor chain
(``nio_logd.records.render._processors()``: add_log_level, TimeStamper, _put_first, JSONRenderer(orjson))
and is checked to produce byte-identical lines (timestamps masked) before it is timed:

  current           ``Renderer.message``: ``wrap_logger(...)`` is a BoundLoggerLazyProxy, and without
                    ``cache_logger_on_first_use`` every ``.info`` assembles a new BoundLogger
                    (context dict, processors lookup) before it logs.
  bound once        the same ``wrap_logger`` call with ``cache_logger_on_first_use=True`` (or
                    ``.bind()`` once): a real FilteringBoundLogger, same processors, same output.
  bound once + batch timestamp
                    as above with TimeStamper replaced by a processor that writes a timestamp
                    computed once per batch (same format; the value is the batch's time, not each
                    record's: a behaviour change to decide on, so it is listed separately).
  processors direct the same processor functions called in a loop without a BoundLogger
                    (a lower bound for "the same processor chain").
  orjson floor      one orjson.dumps of the finished dict: no structlog at all (not allowed by the
                    rules, shown as the floor).

Records come from ``nio-logd bench``'s generator and are validated by the daemon's RecordValidator,
so the fields (a datetime for send_time) are exactly what the renderer gets. Times are medians of
``--repeats`` interleaved repetitions, in µs per record, rendering in batches of ``--batch``
records (one loop pass) and dropping each batch's lines as the writer would.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import orjson  # noqa: E402
import structlog  # noqa: E402

from nio_logd import render  # noqa: E402
from nio_logd.config import RecordSettings  # noqa: E402
from nio_logd.records.record import RecordValidator  # noqa: E402
from nio_logd.tools.bench import lane_pool  # noqa: E402

PEER = "127.0.0.1:51234"
LISTENER = "tcp://127.0.0.1:8888"
TS = re.compile(rb'"timestamp":"[^"]*"')


def fields_of(n: int) -> list[dict[str, Any]]:
    validator = RecordValidator(RecordSettings(), 256 * 1024)
    out = []
    for lane in range((n + 20479) // 20480):
        for raw in lane_pool(1, lane, min(20480, n - len(out)), (100, 150), 1024):
            result = validator.validate(raw)
            assert isinstance(result, dict), result
            out.append(result)
    return out


class Collector:
    __slots__ = ("lines",)

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def info(self, line: bytes) -> None:
        self.lines.append(line)


def batch_stamper() -> tuple[Callable[..., Any], Callable[[], None]]:
    """A processor writing a timestamp taken once per batch, and the function that takes it."""
    state = {"ts": ""}

    def refresh() -> None:
        state["ts"] = dt.datetime.now(tz=dt.UTC).isoformat().replace("+00:00", "Z")

    def stamp(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict["timestamp"] = state["ts"]
        return event_dict

    refresh()
    return stamp, refresh


Variant = Callable[[list[dict[str, Any]], int], list[bytes]]


class FastStamper:
    """TimeStamper(fmt="iso", utc=True)'s exact text per record, the date part formatted once a second."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def text(self, ns: int) -> str:
        second, micro = divmod(ns // 1000, 1_000_000)  # floor, as datetime.now() does
        if second != self.second:
            self.second = second
            self.prefix = dt.datetime.fromtimestamp(second, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self.prefix}.{micro:06d}Z" if micro else self.prefix + "Z"  # isoformat drops .000000

    def __call__(self, _logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict["timestamp"] = self.text(time.time_ns())
        return event_dict


def check_fast_stamper() -> None:
    import random

    fast = FastStamper()
    rng = random.Random(5)
    for _ in range(100_000):
        ns = rng.randrange(1_600_000_000, 2_000_000_000) * 10**9 + rng.choice((0, rng.randrange(10**9)))
        second, micro = divmod(ns // 1000, 1_000_000)
        want = dt.datetime.fromtimestamp(second, tz=dt.UTC).replace(microsecond=micro).isoformat()
        assert fast.text(ns) == want.replace("+00:00", "Z"), (ns, fast.text(ns), want)


def variants() -> dict[str, Variant]:
    """Each variant renders ``records`` in loop-pass-sized batches; returns the last batch's lines."""
    wrapper = structlog.make_filtering_bound_logger(0)

    def current(records: list[dict[str, Any]], size: int) -> list[bytes]:
        r = render.Renderer(1024)
        message = r.message
        lines: list[bytes] = []
        for i in range(0, len(records), size):
            for fields in records[i : i + size]:
                message(fields, PEER, LISTENER)
            lines = r.take()[0]
        return lines

    def bound_once(records: list[dict[str, Any]], size: int) -> list[bytes]:
        sink = Collector()
        log = structlog.wrap_logger(
            sink, processors=render._processors(), wrapper_class=wrapper, cache_logger_on_first_use=True
        )
        info = log.bind().info
        lines: list[bytes] = []
        for i in range(0, len(records), size):
            for fields in records[i : i + size]:
                info("message", **fields, peer=PEER, listener=LISTENER)
            lines, sink.lines = sink.lines, []
        return lines

    def bound_once_batch_ts(records: list[dict[str, Any]], size: int) -> list[bytes]:
        sink = Collector()
        stamp, refresh = batch_stamper()
        procs = [stamp if isinstance(p, structlog.processors.TimeStamper) else p for p in render._processors()]
        info = structlog.wrap_logger(sink, processors=procs, wrapper_class=wrapper).bind().info
        lines: list[bytes] = []
        for i in range(0, len(records), size):
            refresh()  # once per loop pass
            for fields in records[i : i + size]:
                info("message", **fields, peer=PEER, listener=LISTENER)
            lines, sink.lines = sink.lines, []
        return lines

    def bound_once_fast_ts(records: list[dict[str, Any]], size: int) -> list[bytes]:
        sink = Collector()
        procs = [FastStamper() if isinstance(p, structlog.processors.TimeStamper) else p for p in render._processors()]
        info = structlog.wrap_logger(sink, processors=procs, wrapper_class=wrapper).bind().info
        lines: list[bytes] = []
        for i in range(0, len(records), size):
            for fields in records[i : i + size]:
                info("message", **fields, peer=PEER, listener=LISTENER)
            lines, sink.lines = sink.lines, []
        return lines

    def processors_direct(records: list[dict[str, Any]], size: int) -> list[bytes]:
        procs = render._processors()
        lines: list[bytes] = []
        for i in range(0, len(records), size):
            lines = []
            for fields in records[i : i + size]:
                event: Any = {"event": "message", **fields, "peer": PEER, "listener": LISTENER}
                for p in procs:
                    event = p(None, "info", event)
                lines.append(event)
        return lines

    def orjson_floor(records: list[dict[str, Any]], size: int) -> list[bytes]:
        dumps = orjson.dumps
        lines: list[bytes] = []
        for i in range(0, len(records), size):
            ts = dt.datetime.now(tz=dt.UTC).isoformat().replace("+00:00", "Z")
            lines = [
                dumps({"timestamp": ts, "level": "info", "event": "message", **f, "peer": PEER, "listener": LISTENER})
                for f in records[i : i + size]
            ]
        return lines

    return {
        "current (Renderer.message)": current,
        "bound once (cache_logger_on_first_use)": bound_once,
        "bound once + per-record timestamp, date cached per second": bound_once_fast_ts,
        "bound once + batch timestamp": bound_once_batch_ts,
        "processors direct (no BoundLogger)": processors_direct,
        "orjson floor (no structlog)": orjson_floor,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=2048, help="records per loop pass (default 2048)")
    args = parser.parse_args()
    check_fast_stamper()
    batch = fields_of(args.records)
    cases = variants()
    reference = [TS.sub(b"", line) for line in next(iter(cases.values()))(batch[:5000], 5000)]
    for name, fn in cases.items():
        got = [TS.sub(b"", line) for line in fn(batch[:5000], 5000)]
        same = got == reference
        print(f"{name:<42} output identical to current (timestamps masked): {same}", file=sys.stderr)
        if not same:
            raise SystemExit(f"{name}: output differs: {got[0]!r} vs {reference[0]!r}")
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn(batch, args.batch)
            times[name].append((time.perf_counter() - t0) / len(batch) * 1e6)
    base = statistics.median(times["current (Renderer.message)"])
    print(
        f"rendering {len(batch):,} validated records in batches of {args.batch}, "
        f"median of {args.repeats} interleaved repeats "
        f"(Python {sys.version.split()[0]}, structlog {structlog.__version__}, orjson {orjson.__version__})"
    )
    print()
    print("| variant | µs / record (median) | min–max | saves vs current |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.2f} | {min(values):.2f}–{max(values):.2f} | {base - med:+.2f} µs ({med / base:.0%}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
