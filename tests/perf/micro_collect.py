"""Micro-benchmark: what a rendered line costs in memory while it waits for the writer, and in time.

Run by hand:  python tests/perf/micro_collect.py [--records 200000] [--batch 2048] [--repeats 7]

orjson (3.13 here) returns each ``dumps()`` result in a 4 KiB allocation, whatever its length: a
282-byte line keeps 4 KiB of heap alive for as long as the line object lives. The daemon's
renderer keeps every rendered line as its own bytes object in a list until the writer joins and
writes the batch, so each line in flight holds ~4 KiB (and the writer queue's byte bound counts
282, not 4096). Variants, all producing the same bytes for the file:

  list + join        today: lines collected in a list, ``b"\\n".join`` in the writer.
  bytearray          each line appended (plus its newline) to one bytearray per batch as soon as it
                     is rendered; the orjson buffer is freed at once; the writer gets one buffer.
  copy into list     ``bytes(memoryview(line))``: a right-sized copy kept in the list.

Reports µs per record (render + collect + join) and the memory held per line in flight: traced by
tracemalloc while one whole run's lines are held (the worst case: a writer that is behind).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import orjson

PEER = "127.0.0.1:51234"
LISTENER = "tcp://127.0.0.1:8888"


def events(n: int) -> list[dict[str, Any]]:
    base = dt.datetime(2026, 11, 29, 12, 0, 0)
    return [
        {
            "timestamp": "2026-11-29T12:00:00.123456Z",
            "level": "info",
            "event": "message",
            "send_user": f"user{i % 97}",
            "send_time": base + dt.timedelta(seconds=i),
            "send_msg": f"message number {i} " + "x" * (40 + i % 50),
            "peer": PEER,
            "listener": LISTENER,
        }
        for i in range(n)
    ]


def collect_list(evs: list[dict[str, Any]], size: int) -> list[Any]:
    dumps = orjson.dumps
    return [[dumps(e) for e in evs[i : i + size]] for i in range(0, len(evs), size)]


def collect_bytearray(evs: list[dict[str, Any]], size: int) -> list[Any]:
    dumps = orjson.dumps
    held = []
    for i in range(0, len(evs), size):
        buf = bytearray()
        for e in evs[i : i + size]:
            buf += dumps(e)
            buf += b"\n"
        held.append(buf)
    return held


def collect_copy(evs: list[dict[str, Any]], size: int) -> list[Any]:
    dumps = orjson.dumps
    return [[bytes(memoryview(dumps(e))) for e in evs[i : i + size]] for i in range(0, len(evs), size)]


def write_lists(held: list[Any]) -> list[bytes]:
    return [b"\n".join([*lines, b""]) for lines in held]


def write_buffers(held: list[Any]) -> list[bytes]:
    return [bytes(buf) for buf in held]  # os.write takes the bytearray itself; the copy is for the check


Variant = tuple[Callable[[list[dict[str, Any]], int], list[Any]], Callable[[list[Any]], list[bytes]]]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    evs = events(args.records)
    one = orjson.dumps(evs[0])
    cases: dict[str, Variant] = {
        "list + join (today)": (collect_list, write_lists),
        "bytearray per batch": (collect_bytearray, write_buffers),
        "right-sized copy into list": (collect_copy, write_lists),
    }
    reference = b"".join(write_lists(collect_list(evs[:5000], 1000)))
    for name, (collect, write) in cases.items():
        assert b"".join(write(collect(evs[:5000], 1000))) == reference, name
    memory: dict[str, float] = {}
    for name, (collect, _write) in cases.items():
        tracemalloc.start()
        held = collect(evs, args.batch)
        memory[name] = tracemalloc.get_traced_memory()[0] / len(evs)
        tracemalloc.stop()
        del held
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (collect, write) in cases.items():
            t0 = time.perf_counter()
            for i in range(0, len(evs), args.batch * 8):  # eight batches in flight at a time
                write(collect(evs[i : i + args.batch * 8], args.batch))
            times[name].append((time.perf_counter() - t0) / len(evs) * 1e6)
    print(
        f"{len(evs):,} events, lines of ~{len(one)} bytes, batches of {args.batch}, orjson {orjson.__version__}; "
        f"sys.getsizeof(line) = {sys.getsizeof(one)}"
    )
    print()
    print(f"| variant | µs / record (median of {args.repeats}) | heap held per line in flight (tracemalloc) |")
    print("| --- | ---: | ---: |")
    for name in cases:
        print(f"| {name} | {statistics.median(times[name]):.2f} | {memory[name]:,.0f} B |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
