"""nio-logd against rsyslog (imtcp -> omfile), side by side: the same records, interleaved rounds.

Run by hand (pytest does not collect this file):

    python tests/perf/compare_rsyslog.py                                  # full size
    python tests/perf/compare_rsyslog.py --records 100000 --seed-records 2000 --rounds 3   # quick

Every daemon runs on a free loopback port with a private config under a temporary directory:

- "rsyslog": only imtcp loaded, a ``%rawmsg%\\n`` template and an async omfile (a raw copy; no
  system log is touched);
- "rsyslog json", the peer doing comparable work: the same, but every record parsed by
  mmjsonparse (``cookie=""``, ``useRawMsg="on"``), written re-serialised from the parsed tree
  (``%$!all-json%``), records that fail to parse to a rejects file;
- nio-logd once per ``--workers`` value (default ``1,auto``: "nio-logd w1", the single-process
  shape, and "nio-logd auto", one worker per CPU around the hub that owns the files), defaults
  otherwise (one listener, durability "write");
- two more nio-logd with ``ack = true`` (durability "write" and "fsync"), with the workers of the
  last ``--workers`` value (so, by default, "auto"), compared with the un-acked nio-logd of the
  same workers.

Each round runs every pattern against every daemon with ``nio-logd bench`` (the same seed, so
the same bytes), the order rotating from round to round. The seed pattern (one record per
connection, open loop, ``--seed-connections`` concurrent clients, one sender process each: 4 by
default) runs against rsyslog and each nio-logd; ``--seed-json-peer`` adds "rsyslog json" (its
per-connection path is imtcp's, as rsyslog's, and it takes about as long: minutes a round).

Measured per run: records/s until the records are in the output file (the clock stops when at
most 0.1% of the lines are missing, the same rule for every daemon, because rsyslog's async
writer flushes its last buffer only after ``flushInterval``), then a full count once the file
stops growing; the daemon's CPU per million records, summed over all its processes (utime+stime
from /proc/PID/stat of the top process and of every descendant, the list read at each
measurement, plus the top process's cutime+cstime, which holds the workers that died and were
reaped in between); the kernel's TcpExt ListenOverflows delta. After the stream rounds and at the
end: peak RSS (VmHWM) of each process, the largest and the sum. At the end: idle CPU over 2 s
(all processes, all daemons at once), then every output file checked against what was sent:
each line must be one of the sent records, as many times as it was sent (rsyslog: the same
bytes; rsyslog json: a JSON object with exactly the sent fields and values; nio-logd: a JSON
object with the sent ``send_user``, ``send_msg`` and, as a time, ``send_time``).

Prints a Markdown table, then the JSON document (also written with ``--json-out``), which records
the commit measured (``git rev-parse HEAD``) and whether nio_logd/ differs from it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Hashable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import perfutil  # noqa: E402
from perfutil import (  # noqa: E402
    RSYSLOGD,
    Daemon,
    NioLogd,
    Rsyslog,
    count_lines,
    cpu_ns_between,
    enter_private_netns,
    git_state,
    median,
    snapshot,
    tcp_ext,
    thread_cpu_ns,
    tree_cpu_seconds,
    tree_hwm_kb,
    wait_stable_count,
    working_tree_state,
)

from nio_logd.config import parse_address  # noqa: E402
from nio_logd.tools.bench import (  # noqa: E402
    CHUNK_RECORDS,
    ONE_PER_CONNECTION,
    STREAM,
    Plan,
    lane_pool,
    run_bench,
    split,
)

BUFFER_LINES = 65536 // 100
RAW, JSON_PEER, NIO = "raw", "json", "nio"  # how a target's output lines are checked
RSYSLOG, RSYSLOG_JSON = "rsyslog", "rsyslog json"
ACK_NAMES = ("nio-logd ack write", "nio-logd ack fsync")
WORKER_EVENTS = ("workers_started", "worker_died", "worker_restarted", "worker_stopped")
EXPECTED_WARNINGS = ("running_as_root",)  # the harness runs every daemon as root, on purpose


class Target:
    """A daemon under test, how its lines are checked, and the records it should hold so far."""

    def __init__(self, daemon: Daemon, kind: str, workers: str | None = None) -> None:
        self.daemon = daemon
        self.kind = kind
        self.workers = workers  # nio-logd's ``--workers`` value ("1", "auto", ...)
        self.expected = 0
        self.sent: list[tuple[str, int, int, bool]] = []  # (mode, records, connections, ack) per run

    @property
    def name(self) -> str:
        return self.daemon.name


def parse_workers(text: str) -> list[str]:
    """``1,auto`` -> ["1", "auto"]: each a number of processes, "auto", or "default" (key not set)."""
    out: list[str] = []
    for item in text.split(","):
        value = item.strip().lower()
        if value in ("auto", "default") or (value.isdigit() and 1 <= int(value) <= 64):
            out.append(str(int(value)) if value.isdigit() else value)
        else:
            raise argparse.ArgumentTypeError(f"{item!r}: a number from 1 to 64, auto or default")
    if not out or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"{text!r}: one or more distinct values, comma-separated")
    return out


def workers_setting(value: str) -> int | str | None:
    return None if value == "default" else ("auto" if value == "auto" else int(value))


def nio_name(value: str) -> str:
    return f"nio-logd {'w' + value if value.isdigit() else value}"


def run_one(
    target: Target,
    *,
    mode: str,
    records: int,
    connections: int,
    processes: int,
    ack: bool = False,
    settle: float = 3.0,
    seed: int = 1,
) -> dict[str, Any]:
    d = target.daemon
    plan = Plan(
        address=parse_address(f"tcp://127.0.0.1:{d.port}"),
        mode=mode,
        connections=connections,
        records=records,
        ack=ack,
        processes=processes,
        seed=seed,
        timeout=1800.0,
    )
    # The clock stops when at most this many lines are missing from the file: 0.1% of the records,
    # and for the stream at least one 64 KiB omfile buffer of 100-byte lines, which rsyslog's async
    # writer flushes only after flushInterval (1 s). The same rule for every daemon.
    slack = max(records // 1000, BUFFER_LINES) if mode == STREAM else records // 1000
    # The daemon's processes are listed at each reading: a worker may have been restarted.
    cpu0, ovf0, drops0 = tree_cpu_seconds(d.pid), tcp_ext("ListenOverflows"), tcp_ext("ListenDrops")
    result = run_bench(plan, wait_file=str(d.output), wait_slack=slack, settle=settle)
    cpu1, ovf1, drops1 = tree_cpu_seconds(d.pid), tcp_ext("ListenOverflows"), tcp_ext("ListenDrops")
    processes_now = len(d.pids)
    target.expected += records
    target.sent.append((mode, records, connections, ack))
    # Late records (SYN retransmits after an overflow, an async flush) still count as arrived.
    total = wait_stable_count(d.output, target.expected, settle=max(settle, 5.0))
    arrived = records - (target.expected - total)
    written = result["written"]
    rate = written["records_per_s"]
    run = {
        "daemon": target.name,
        "workers": target.workers,
        "mode": mode,
        "ack": ack,
        "records": records,
        "arrived": arrived,
        "complete": arrived >= records,
        "records_per_s": rate,
        "seconds_in_file": written["seconds"],
        "sent_records_per_s": result["sent"]["records_per_s"],
        "mb_per_s": round(result["sent"]["bytes"] / written["seconds"] / 1e6, 2) if rate else None,
        "cpu_s_per_million": round((cpu1 - cpu0) / records * 1e6, 3),
        "processes": processes_now,
        "sender_processes": processes,
        "listen_overflows": ovf1 - ovf0,
        "listen_drops": drops1 - drops0,
        "latency_ms": result["latency_ms"],
        "refused": result["refused"],
        "client_errors": result["errors"],
        "client_error_samples": result["error_samples"],
    }
    # The count of the file, checked: read again at once it must agree, and it cannot exceed what
    # the senders had sent when the clock stopped (beyond their progress reports' lag; acked
    # senders count acks, which lag the file by the records in flight). Two rounds on record
    # (cea62f4, e5cd492) had the file at 2x the senders' pace, a rate the daemon's CPU time
    # rules out; this check says which part failed.
    lag = max(slack, records // 50)
    if written.get("recounted_lines") is not None and written["recounted_lines"] != written["lines"]:
        run["invalid"] = f"count {written['lines']:,} but {written['recounted_lines']:,} on a recount"
    elif rate and written.get("sent_when_counted") is not None and written["lines"] > 0:
        counted_then = round(rate * written["seconds"])
        if counted_then > written["sent_when_counted"] + lag:
            run["invalid"] = (
                f"{counted_then:,} lines counted in the file when the senders had sent {written['sent_when_counted']:,}"
            )
    if not rate:
        # The file never came within 0.1% of the records (some were lost): rate of what arrived.
        run["records_per_s_of_arrived"] = round(arrived / written["seconds"], 1)
    print(
        f"  {target.name:<20} {mode:<19} {'ack ' if ack else ''}{_fmt_rate(run)} records/s  "
        f"arrived {arrived:,}/{records:,}  cpu {run['cpu_s_per_million']:.2f} s/M ({processes_now} proc)  "
        f"overflows {run['listen_overflows']}" + (f"  INVALID: {run['invalid']}" if run.get("invalid") else ""),
        file=sys.stderr,
        flush=True,
    )
    return run


def _fmt_rate(run: dict[str, Any]) -> str:
    if run["records_per_s"]:
        return f"{run['records_per_s']:>11,.0f}"
    return f"{run['records_per_s_of_arrived']:>10,.0f}*"


def idle_cpu_ms(targets: list[Target], seconds: float = 2.0) -> dict[str, float]:
    """CPU of each daemon (all its processes) over the same ``seconds``, in ms."""
    before = {t.name: thread_cpu_ns(t.daemon.pid) for t in targets}
    time.sleep(seconds)
    return {t.name: round(cpu_ns_between(before[t.name], thread_cpu_ns(t.daemon.pid)) / 1e6, 3) for t in targets}


def memory(targets: list[Target]) -> dict[str, dict[str, Any]]:
    """Peak RSS (VmHWM) of each daemon's processes: the largest, the sum, how many."""
    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        kb = tree_hwm_kb(t.daemon.pid)
        out[t.name] = {
            "processes": len(kb),
            "max_mb": round(max(kb.values(), default=0) / 1024, 1),
            "sum_mb": round(sum(kb.values()) / 1024, 1),
            "per_process_mb": [round(v / 1024, 1) for v in kb.values()],
        }
    return out


# -- verification: every output line against what was sent --------------------------------------------
@functools.lru_cache(maxsize=16)
def sent_records(mode: str, records: int, connections: int, ack: bool, seed: int = 1) -> Counter[bytes]:
    """The records ``nio-logd bench`` sends for this run, with how many times each (as bench makes them)."""
    plan = Plan(
        address=parse_address("tcp://127.0.0.1:9"), mode=mode, connections=connections, records=records, ack=ack
    )
    per_chunk = plan.per_chunk if mode == STREAM else CHUNK_RECORDS
    out: Counter[bytes] = Counter()
    for lane, count in enumerate(split(records, connections)):
        if not count:
            continue
        pool = lane_pool(seed, lane, count, plan.sizes, per_chunk)  # sent cycled: pool[i % len(pool)]
        rounds, extra = divmod(count, len(pool))
        for i, record in enumerate(pool):
            out[record] += rounds + (1 if i < extra else 0)
    return out


def _as_time(value: Any) -> Any:
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return ("not a time", value)


def line_key(kind: str) -> Callable[[bytes], Hashable]:
    """What must match between a sent record and an output line; ValueError: the line does not parse."""
    if kind == RAW:
        return bytes
    if kind == JSON_PEER:

        def exact(line: bytes) -> Hashable:
            obj = orjson.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            return tuple(sorted(obj.items()))

        return exact

    def fields(line: bytes) -> Hashable:
        obj = orjson.loads(line)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        return obj.get("send_user"), _as_time(obj.get("send_time")), obj.get("send_msg")

    return fields


def verify(target: Target, seed: int = 1) -> dict[str, Any]:
    """Every line of the target's output file checked against the records sent to it."""
    t0 = time.monotonic()
    key = line_key(target.kind)
    sent: Counter[bytes] = Counter()
    for run in target.sent:
        sent.update(sent_records(*run, seed=seed))
    expected: Counter[Hashable] = Counter()
    for record, n in sent.items():
        expected[key(record)] += n
    seen: Counter[Hashable] = Counter()
    unparsed, samples = 0, list[str]()
    with target.daemon.output.open("rb") as f:
        for raw in f:
            line = raw.rstrip(b"\n")
            try:
                seen[key(line)] += 1
            except ValueError:
                unparsed += 1
                if len(samples) < 3:
                    samples.append(line[:200].decode(errors="replace"))
    missing = expected - seen
    unexpected = seen - expected
    rejects_path = getattr(target.daemon, "rejects", None) if target.kind != RAW else None
    out = {
        "check": {
            RAW: "each line is a sent record, byte for byte",
            JSON_PEER: "each line is a JSON object with exactly the sent fields and values",
            NIO: "each line is a JSON object with the sent send_user, send_msg and send_time (as a time)",
        }[target.kind],
        "lines": sum(seen.values()) + unparsed,
        "sent": sum(expected.values()),
        "matched": sum((seen & expected).values()),
        "missing": sum(missing.values()),
        "unexpected": sum(unexpected.values()),
        "unparsed": unparsed,
        "unparsed_samples": samples,
        "unexpected_samples": [repr(k)[:200] for k in list(unexpected)[:3]],
        "rejects": count_lines(rejects_path) if rejects_path else None,
        "seconds": round(time.monotonic() - t0, 2),
    }
    out["ok"] = out["missing"] == out["unexpected"] == out["unparsed"] == 0 and not out["rejects"]
    print(
        f"  {target.name:<20} verified: {'ok' if out['ok'] else 'MISMATCH'}  {out['matched']:,}/{out['sent']:,}"
        f" matched, {out['missing']:,} missing, {out['unexpected']:,} unexpected, {unparsed:,} unparsed,"
        f" rejects {out['rejects']}",
        file=sys.stderr,
        flush=True,
    )
    return out


# -- summary ---------------------------------------------------------------------------------------------
def rate_of(run: dict[str, Any]) -> float:
    return float(run["records_per_s"] or run.get("records_per_s_of_arrived") or 0.0)


def _ratio(runs: list[dict[str, Any]], refs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Ratios of rates round by round (the rounds both have), and their median."""
    by_round = {r["round"]: rate_of(r) for r in refs}
    ratios = [
        rate_of(r) / by_round[r["round"]] if by_round[r["round"]] else float("inf")
        for r in runs
        if r["round"] in by_round
    ]
    if not ratios:
        return None
    return {"per_round": [round(x, 3) for x in ratios], "median": round(median(ratios), 3)}


def summarise(runs: list[dict[str, Any]], names: list[str], acked: list[Target]) -> dict[str, Any]:
    def pick(name: str, mode: str, ack: bool = False) -> list[dict[str, Any]]:
        # A round whose count of the file failed its check measured nothing: left out, and said.
        return [
            r for r in runs if r["daemon"] == name and r["mode"] == mode and r["ack"] == ack and not r.get("invalid")
        ]

    out: dict[str, Any] = {}
    for mode in (STREAM, ONE_PER_CONNECTION):
        out[mode] = {}
        for name in names:
            mine = pick(name, mode)
            if not mine:
                continue
            entry = _stats(mine)
            for ref, label in ((RSYSLOG, "rsyslog"), (RSYSLOG_JSON, "rsyslog_json")):
                if name != ref and (ratio := _ratio(mine, pick(ref, mode))):
                    entry[f"ratio_to_{label}_per_round"] = ratio["per_round"]
                    entry[f"ratio_to_{label}_median"] = ratio["median"]
            out[mode][name] = entry
    for t in acked:
        mine = pick(t.name, STREAM, ack=True)
        if not mine:
            continue
        plain = nio_name(t.workers or "default")
        ratio = _ratio(mine, pick(plain, STREAM))
        out[t.name] = {
            **_stats(mine),
            "workers": t.workers,
            "unacked": plain,
            "ratio_to_unacked_per_round": ratio["per_round"] if ratio else [],
            "ratio_to_unacked_median": ratio["median"] if ratio else float("nan"),
            "latency_ms_median": {
                q: round(median([r["latency_ms"][q] for r in mine if r["latency_ms"]]), 2)
                for q in ("p50", "p99", "p99.9")
            },
        }
    return out


def _stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "records_per_s_per_round": [round(rate_of(r)) for r in runs],
        "records_per_s_median": round(median([rate_of(r) for r in runs])),
        "sent_records_per_s_median": round(median([r["sent_records_per_s"] for r in runs])),
        "cpu_s_per_million_median": round(median([r["cpu_s_per_million"] for r in runs]), 3),
        "processes": max(r["processes"] for r in runs),
        "listen_overflows_per_round": [r["listen_overflows"] for r in runs],
        "listen_overflows_total": sum(r["listen_overflows"] for r in runs),
        "all_arrived": all(r["complete"] for r in runs),
        "arrived": sum(r["arrived"] for r in runs),
        "sent": sum(r["records"] for r in runs),
    }


# -- Markdown ----------------------------------------------------------------------------------------------
def _rounds(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


def _ratios(entry: dict[str, Any], label: str, digits: int = 3) -> str:
    if f"ratio_to_{label}_median" not in entry:
        return "–"
    per_round = ", ".join(f"{v:.{digits}f}" for v in entry[f"ratio_to_{label}_per_round"])
    return f"**{entry[f'ratio_to_{label}_median']:.{digits}f}** ({per_round})"


def _verified(v: dict[str, Any] | None) -> str:
    if v is None:
        return "–"
    rejects = f", rejects {v['rejects']}" if v["rejects"] is not None else ""
    if v["ok"]:
        return f"yes: {v['matched']:,} lines{rejects}"
    return (
        f"**NO**: {v['matched']:,} of {v['sent']:,} matched, {v['missing']:,} missing,"
        f" {v['unexpected']:,} unexpected, {v['unparsed']:,} unparsed{rejects}"
    )


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    st, sd = s[STREAM], s[ONE_PER_CONNECTION]
    a = doc["args"]
    code = doc["code"]
    ver = doc["verified"]
    rows = [
        f"nio-logd: {doc['nio_logd_code']} (HEAD {code['commit'][:12]}, nio_logd/ "
        f"{'with uncommitted changes' if code['dirty'] else 'as committed'}); {doc['machine']['rsyslog']};"
        f" {doc['machine']['cpus']} CPUs; {a['rounds']} interleaved rounds; {doc['network']};"
        f" {doc['sessions']}. {doc['stop_rule']}.",
        "",
        f"| stream: {a['records']:,} records over {a['connections']} connections ({a['processes']} sender processes)"
        " | records/s in the file, median | per round | / rsyslog, median (per round)"
        " | / rsyslog json, median (per round) | records/s read (client side), median"
        " | CPU-s per million, all processes, median | processes | listen overflows | every line checked |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, x in st.items():
        rows.append(
            f"| {name} | {x['records_per_s_median']:,} | {_rounds(x['records_per_s_per_round'])}"
            f" | {_ratios(x, 'rsyslog')} | {_ratios(x, 'rsyslog_json')} | {x['sent_records_per_s_median']:,}"
            f" | {x['cpu_s_per_million_median']:.2f} | {x['processes']} | {x['listen_overflows_total']}"
            f" | {_verified(ver.get(name))} |"
        )
    rows += [
        "",
        f"| seed pattern: {a['seed_records']:,} connections a round, 1 record each, no newline, open loop,"
        f" {a['seed_connections']} concurrent from {a['seed_connections']} sender processes"
        " | records/s in the file, median | per round | / rsyslog, median (per round)"
        " | CPU-s per million, all processes, median | listen overflows per round |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, x in sd.items():
        rows.append(
            f"| {name} | {x['records_per_s_median']:,} | {_rounds(x['records_per_s_per_round'])}"
            f" | {_ratios(x, 'rsyslog', 1)} | {x['cpu_s_per_million_median']:.2f}"
            f" | {', '.join(str(n) for n in x['listen_overflows_per_round'])} |"
        )
    after, end, idle = doc["peak_rss_after_stream"], doc["peak_rss_at_end"], doc["idle_cpu_ms_over_2s"]
    rows += [
        "",
        "| daemon | processes | peak RSS (VmHWM) after the stream rounds, MB: largest process / all summed"
        " | at the end: largest / summed | idle CPU over 2 s at the end, ms (all processes) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in after:
        m, e = after[name], end[name]
        rows.append(
            f"| {name} | {m['processes']} | {m['max_mb']:.1f} / {m['sum_mb']:.1f}"
            f" | {e['max_mb']:.1f} / {e['sum_mb']:.1f} | {idle[name]:.1f} |"
        )
    acked = [name for name in ACK_NAMES if name in s]
    if acked:
        rows += [
            "",
            "| nio-logd, ack = true, stream | workers | records/s median | per round | / un-acked, median (per round)"
            " | latency p50 / p99 / p99.9 ms (median) | CPU-s per M | every line checked |",
            "| --- | --- | ---: | --- | --- | --- | ---: | --- |",
        ]
        for name in acked:
            x = s[name]
            lat = x["latency_ms_median"]
            per_round = ", ".join(f"{v:.3f}" for v in x["ratio_to_unacked_per_round"])
            rows.append(
                f"| durability {name.rsplit(' ', 1)[1]} | {x['workers']} | {x['records_per_s_median']:,}"
                f" | {_rounds(x['records_per_s_per_round'])} | **{x['ratio_to_unacked_median']:.3f}** ({per_round})"
                f" vs {x['unacked']} | {lat['p50']} / {lat['p99']} / {lat['p99.9']}"
                f" | {x['cpu_s_per_million_median']:.2f} | {_verified(ver.get(name))} |"
            )
    notes = [f"- {name} did not start and was left out: {why[:300]}" for name, why in doc["failed_to_start"].items()]
    for name, ev in doc["nio_logd_worker_events"].items():
        if ev["worker_died"] or ev["worker_restarted"] or ev["worker_stopped"] or ev["errors"]:
            notes.append(
                f"- {name}: {ev['worker_died']} workers died, {ev['worker_restarted']} restarted,"
                f" {ev['worker_stopped']} worker_stopped events, {len(ev['errors'])} warning/error events"
                " (the JSON's nio_logd_worker_events)"
            )
    for r in doc["runs"]:
        if r.get("invalid"):
            notes.append(
                f"- {r['daemon']} {r['mode']}{' ack' if r['ack'] else ''} round {r['round']} left out of the"
                f" medians, its count of the file failed its check: {r['invalid']}"
            )
    if notes:
        rows += ["", *notes]
    return "\n".join(rows)


def worker_events(target: Target) -> dict[str, Any]:
    """What the hub said about its workers (and any warning or error), from its events file."""
    events = target.daemon.events() if isinstance(target.daemon, NioLogd) else []
    out: dict[str, Any] = {name: sum(1 for e in events if e.get("event") == name) for name in WORKER_EVENTS}
    out["workers_started"] = [e.get("pids") for e in events if e.get("event") == "workers_started"]
    out["errors"] = [
        e
        for e in events
        if str(e.get("level", "")).lower() in ("warning", "error", "critical")
        and e.get("event") not in EXPECTED_WARNINGS
    ][:10]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000, help="stream records per run (default 1000000)")
    parser.add_argument("--connections", type=int, default=8, help="stream connections (default 8)")
    parser.add_argument(
        "--seed-records",
        type=int,
        default=20_000,
        help="seed-pattern connections (one record each) per run (default 20000)",
    )
    parser.add_argument(
        "--seed-connections",
        type=int,
        default=4,
        help="concurrent seed clients, one sender process each, each connecting in turn (default 4)",
    )
    parser.add_argument(
        "--seed-json-peer", action="store_true", help="run the seed pattern against rsyslog json as well"
    )
    parser.add_argument("--ack-records", type=int, default=None, help="records per ack run (default: --records)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2, help="generator processes for the stream (default 2)")
    parser.add_argument(
        "--workers",
        type=parse_workers,
        default=parse_workers("1,auto"),
        metavar="N|auto[,...]",
        help="nio-logd's [server] workers, one nio-logd target per value, comma-separated (default 1,auto; "
        "'default' leaves the key out, for commits before it existed). The ack targets use the last value.",
    )
    parser.add_argument("--no-ack", action="store_true", help="skip the ack runs")
    parser.add_argument("--json-out", type=Path, help="also write the JSON document here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--host-netns",
        action="store_true",
        help="stay in the host's network namespace (default: a private one via unshare --net, so "
        "the TcpExt counters count this run alone)",
    )
    parser.add_argument(
        "--same-session",
        action="store_true",
        help="run the daemons in this script's session (default: each in a session of its own, as a "
        "service runs: see perfutil.OWN_SESSION)",
    )
    parser.add_argument(
        "--snapshot",
        metavar="REV",
        help="run nio-logd from a git archive of REV (e.g. HEAD) instead of the working tree",
    )
    args = parser.parse_args()
    ack_records = args.ack_records or args.records
    network = enter_private_netns(not args.host_netns)
    perfutil.OWN_SESSION = not args.same_session

    base = Path(tempfile.mkdtemp(prefix="nio-logd-vs-rsyslog-"))
    print(f"working in {base}", file=sys.stderr)
    targets: list[Target] = []
    runs: list[dict[str, Any]] = []
    doc: dict[str, Any] = {}
    try:
        source = None
        code = f"working tree {working_tree_state()}"
        state = git_state()
        if args.snapshot:
            source, commit = snapshot(args.snapshot, base / "source")
            code = f"git archive of {commit}"
            state = {"commit": commit, "dirty": False, "changed_in_nio_logd": [], "snapshot_of": args.snapshot}
        print(f"nio-logd from {code}", file=sys.stderr)
        rs = Target(Rsyslog(base / "rsyslog"), RAW)
        targets.append(rs)
        rsj = Target(Rsyslog(base / "rsyslog-json", json_parse=True, name=RSYSLOG_JSON), JSON_PEER)
        targets.append(rsj)
        failed: dict[str, str] = {}

        def start_nio(name: str, value: str, directory: str, **kwargs: Any) -> Target | None:
            # A nio-logd that does not start (say, its workers fail) is reported and left out;
            # the run goes on with the others.
            try:
                daemon = NioLogd(base / directory, name=name, source=source, workers=workers_setting(value), **kwargs)
            except RuntimeError as exc:
                failed[name] = str(exc)
                print(f"{name} did not start, left out: {exc}", file=sys.stderr)
                return None
            t = Target(daemon, NIO, workers=value)
            targets.append(t)
            print(f"{name}: processes {daemon.pids}", file=sys.stderr)
            return t

        nios = [t for v in args.workers if (t := start_nio(nio_name(v), v, f"nio-logd-w{v}"))]
        acked: list[Target] = []
        if not args.no_ack:
            for durability in ("write", "fsync"):
                name = f"nio-logd ack {durability}"
                if t := start_nio(
                    name, args.workers[-1], f"nio-logd-ack-{durability}", ack=True, durability=durability
                ):
                    acked.append(t)
        version = subprocess.run([RSYSLOGD, "-v"], capture_output=True, text=True).stdout.splitlines()[0]
        version = " ".join(version.replace("compiled with:", "").split())
        stream_targets = [rs, rsj, *nios]
        seed_targets = [rs, *([rsj] if args.seed_json_peer else []), *nios]
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: stream", file=sys.stderr)
            k = r % len(stream_targets)
            for t in stream_targets[k:] + stream_targets[:k]:
                runs.append(
                    {
                        "round": r + 1,
                        **run_one(
                            t, mode=STREAM, records=args.records, connections=args.connections, processes=args.processes
                        ),
                    }
                )
            for t in acked:
                runs.append(
                    {
                        "round": r + 1,
                        **run_one(
                            t,
                            mode=STREAM,
                            records=ack_records,
                            ack=True,
                            connections=args.connections,
                            processes=args.processes,
                        ),
                    }
                )
        rss_after_stream = memory(targets)
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: seed pattern", file=sys.stderr)
            k = r % len(seed_targets)
            for t in seed_targets[k:] + seed_targets[:k]:
                runs.append(
                    {
                        "round": r + 1,
                        **run_one(
                            t,
                            mode=ONE_PER_CONNECTION,
                            records=args.seed_records,
                            connections=args.seed_connections,
                            processes=args.seed_connections,  # one sender process per concurrent client
                            settle=5.0,
                        ),
                    }
                )
        time.sleep(1.0)  # let the last connections' timers run out before measuring idleness
        idle = idle_cpu_ms(targets)
        rss_at_end = memory(targets)
        print("checking every output line against what was sent", file=sys.stderr)
        verified = {t.name: verify(t) for t in targets}
        doc = {
            "args": {
                **vars(args),
                "json_out": str(args.json_out) if args.json_out else None,
                "ack_records": ack_records,
                "seed_processes": args.seed_connections,
            },
            "code": state,
            "nio_logd_code": code,
            "network": network,
            "sessions": "the harness's session" if args.same_session else "each daemon in a session of its own",
            "stop_rule": f"clock stops when at most max(0.1%, {BUFFER_LINES}) (stream) or 0.1% (seed) of the lines"
            " are missing from the file; then every line is counted once the file stops growing",
            "machine": {
                "cpus": os.cpu_count(),
                "cpus_available": len(os.sched_getaffinity(0)),
                "python": platform.python_version(),
                "kernel": platform.release(),
                "rsyslog": version,
            },
            "daemons": {
                t.name: {
                    "kind": t.kind,
                    "workers": t.workers,
                    "config": t.daemon.config.read_text() if hasattr(t.daemon, "config") else None,
                }
                for t in targets
            },
            "summary": summarise(runs, [t.name for t in stream_targets], acked),
            "peak_rss_after_stream": rss_after_stream,
            "peak_rss_at_end": rss_at_end,
            "idle_cpu_ms_over_2s": idle,
            "verified": verified,
            "failed_to_start": failed,
            "nio_logd_worker_events": {t.name: worker_events(t) for t in targets if t.kind == NIO},
            "runs": runs,
        }
    finally:
        codes = {t.name: t.daemon.stop() for t in targets}
        print(f"daemons stopped: {codes}", file=sys.stderr)
        if doc:
            doc["exit_codes"] = codes
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(markdown(doc))
    print()
    print("```json")
    print(json.dumps(doc, indent=2))
    print("```")
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if all(v["ok"] for v in doc["verified"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
