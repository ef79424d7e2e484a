"""nio-logd against rsyslog (imtcp -> omfile), side by side: the same records, interleaved rounds.

Run by hand (pytest does not collect this file):

    python tests/perf/compare_rsyslog.py                                  # full size
    python tests/perf/compare_rsyslog.py --records 100000 --seed-records 2000 --rounds 3   # quick

Both daemons run on free loopback ports with private configs under a temporary directory:
rsyslog with only imtcp loaded, a ``%rawmsg%\\n`` template and an async omfile (no system log
is touched); nio-logd with its defaults (one listener, durability "write"), plus two more
nio-logd instances with ``ack = true`` (durability "write" and "fsync"). Each round runs every
pattern against every daemon with ``nio-logd bench`` (the same seed, so the same bytes), the
daemons' order alternating from round to round.

Measured per run: records/s until the records are in the output file (the clock stops when at
most 0.1% of the lines are missing, the same rule for both daemons, because rsyslog's async
writer flushes its last buffer only after ``flushInterval``), then a full count once the file
stops growing; the daemon's CPU (utime+stime from /proc/PID/stat) per million records; the
kernel's TcpExt ListenOverflows delta; peak RSS (VmHWM); idle CPU over 2 s at the end.
Prints a Markdown table, then the JSON document (also written with ``--json-out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from perfutil import (  # noqa: E402
    RSYSLOGD,
    Daemon,
    NioLogd,
    Rsyslog,
    count_lines,
    cpu_ns,
    cpu_seconds,
    enter_private_netns,
    median,
    snapshot,
    status_kb,
    tcp_ext,
    wait_stable_count,
    working_tree_state,
)

from nio_logd.config import parse_address  # noqa: E402
from nio_logd.tools.bench import ONE_PER_CONNECTION, STREAM, Plan, run_bench  # noqa: E402

BUFFER_LINES = 65536 // 100


class Target:
    """A daemon under test plus the records it should hold so far."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.expected = 0

    @property
    def name(self) -> str:
        return self.daemon.name


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
    # writer flushes only after flushInterval (1 s). The same rule for both daemons.
    slack = max(records // 1000, BUFFER_LINES) if mode == STREAM else records // 1000
    cpu0, ovf0, drops0 = cpu_seconds(d.pid), tcp_ext("ListenOverflows"), tcp_ext("ListenDrops")
    result = run_bench(plan, wait_file=str(d.output), wait_slack=slack, settle=settle)
    cpu1, ovf1, drops1 = cpu_seconds(d.pid), tcp_ext("ListenOverflows"), tcp_ext("ListenDrops")
    target.expected += records
    # Late records (SYN retransmits after an overflow, an async flush) still count as arrived.
    total = wait_stable_count(d.output, target.expected, settle=max(settle, 5.0))
    arrived = records - (target.expected - total)
    written = result["written"]
    rate = written["records_per_s"]
    run = {
        "daemon": target.name,
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
        "listen_overflows": ovf1 - ovf0,
        "listen_drops": drops1 - drops0,
        "latency_ms": result["latency_ms"],
        "refused": result["refused"],
        "client_errors": result["errors"],
        "client_error_samples": result["error_samples"],
    }
    if not rate:
        # The file never came within 0.1% of the records (some were lost): rate of what arrived.
        run["records_per_s_of_arrived"] = round(arrived / written["seconds"], 1)
    print(
        f"  {target.name:<22} {mode:<19} {'ack ' if ack else ''}{_fmt_rate(run)} records/s  "
        f"arrived {arrived:,}/{records:,}  cpu {run['cpu_s_per_million']:.2f} s/M  "
        f"overflows {run['listen_overflows']}",
        file=sys.stderr,
        flush=True,
    )
    return run


def _fmt_rate(run: dict[str, Any]) -> str:
    if run["records_per_s"]:
        return f"{run['records_per_s']:>11,.0f}"
    return f"{run['records_per_s_of_arrived']:>10,.0f}*"


def idle_cpu_ms(pid: int, seconds: float = 2.0) -> float:
    before = cpu_ns(pid)
    time.sleep(seconds)
    return round((cpu_ns(pid) - before) / 1e6, 3)


def rate_of(run: dict[str, Any]) -> float:
    return float(run["records_per_s"] or run.get("records_per_s_of_arrived") or 0.0)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def pick(name: str, mode: str, ack: bool = False) -> list[dict[str, Any]]:
        return [r for r in runs if r["daemon"] == name and r["mode"] == mode and r["ack"] == ack]

    out: dict[str, Any] = {}
    for mode in (STREAM, ONE_PER_CONNECTION):
        rs, nio = pick("rsyslog", mode), pick("nio-logd", mode)
        ratios = [rate_of(n) / rate_of(r) if rate_of(r) else float("inf") for r, n in zip(rs, nio, strict=True)]
        out[mode] = {
            "rsyslog": _stats(rs),
            "nio-logd": _stats(nio),
            "ratio_per_round": [round(x, 3) for x in ratios],
            "ratio_median": round(median(ratios), 3),
        }
    plain = pick("nio-logd", STREAM)
    for name in ("nio-logd ack write", "nio-logd ack fsync"):
        acked = pick(name, STREAM, ack=True)
        if acked:
            ratios = [rate_of(a) / rate_of(p) for a, p in zip(acked, plain, strict=True)]
            out[name] = {
                **_stats(acked),
                "ratio_to_unacked_per_round": [round(x, 3) for x in ratios],
                "ratio_to_unacked_median": round(median(ratios), 3),
                "latency_ms_median": {
                    q: round(median([r["latency_ms"][q] for r in acked if r["latency_ms"]]), 2)
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
        "listen_overflows_total": sum(r["listen_overflows"] for r in runs),
        "all_arrived": all(r["complete"] for r in runs),
        "arrived": sum(r["arrived"] for r in runs),
        "sent": sum(r["records"] for r in runs),
    }


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    st, sd = s[STREAM], s[ONE_PER_CONNECTION]
    a = doc["args"]
    mem = doc["peak_rss_mb"]
    idle = doc["idle_cpu_ms_over_2s"]

    def rounds(values: list[float]) -> str:
        return ", ".join(f"{v:,.0f}" for v in values)

    def ratios(values: list[float]) -> str:
        return ", ".join(f"{v:.3f}" for v in values)

    rows = [
        f"nio-logd: {doc['nio_logd_code']}; {doc['machine']['rsyslog']}; {doc['machine']['cpus']} CPUs; "
        f"{a['rounds']} interleaved rounds; {doc['network']}. {doc['stop_rule']}.",
        "",
        "| measure | rsyslog | nio-logd | nio-logd / rsyslog |",
        "| --- | ---: | ---: | ---: |",
        f"| stream, {a['records']:,} records over {a['connections']} connections: records/s in the file, median"
        f" | {st['rsyslog']['records_per_s_median']:,} | {st['nio-logd']['records_per_s_median']:,}"
        f" | **{st['ratio_median']:.3f}** |",
        f"| stream, per round | {rounds(st['rsyslog']['records_per_s_per_round'])}"
        f" | {rounds(st['nio-logd']['records_per_s_per_round'])} | {ratios(st['ratio_per_round'])} |",
        f"| stream, records/s read by the daemon (client side), median | {st['rsyslog']['sent_records_per_s_median']:,}"
        f" | {st['nio-logd']['sent_records_per_s_median']:,} | |",
        f"| stream, CPU-seconds per million records, median | {st['rsyslog']['cpu_s_per_million_median']:.2f}"
        f" | {st['nio-logd']['cpu_s_per_million_median']:.2f} | |",
        f"| stream, listen-queue overflows (all rounds) | {st['rsyslog']['listen_overflows_total']}"
        f" | {st['nio-logd']['listen_overflows_total']} | |",
        f"| seed pattern, {a['seed_records']:,} connections (1 record each, no newline, {a['seed_connections']}"
        f" concurrent): records/s in the file, median | {sd['rsyslog']['records_per_s_median']:,}"
        f" | {sd['nio-logd']['records_per_s_median']:,} | **{sd['ratio_median']:.1f}** |",
        f"| seed pattern, per round | {rounds(sd['rsyslog']['records_per_s_per_round'])}"
        f" | {rounds(sd['nio-logd']['records_per_s_per_round'])} | {ratios(sd['ratio_per_round'])} |",
        f"| seed pattern, CPU-seconds per million records, median | {sd['rsyslog']['cpu_s_per_million_median']:.2f}"
        f" | {sd['nio-logd']['cpu_s_per_million_median']:.2f} | |",
        f"| seed pattern, listen-queue overflows (all rounds) | {sd['rsyslog']['listen_overflows_total']}"
        f" | {sd['nio-logd']['listen_overflows_total']} | |",
        f"| every record arrived (stream; seed) | {_yes(st['rsyslog'])}; {_yes(sd['rsyslog'])}"
        f" | {_yes(st['nio-logd'])}; {_yes(sd['nio-logd'])} | |",
        f"| peak RSS (VmHWM) after the stream rounds, MB | {mem['rsyslog_after_stream']:.1f}"
        f" | {mem['nio-logd_after_stream']:.1f} | |",
        f"| peak RSS (VmHWM) at the end, MB | {mem['rsyslog']:.1f} | {mem['nio-logd']:.1f} | |",
        f"| idle CPU over 2 s, ms | {idle['rsyslog']:.1f} | {idle['nio-logd']:.1f} | |",
    ]
    ack_rows = [
        "",
        "| nio-logd, ack = true, stream | records/s median | per round | / un-acked (per round) | latency p50 / p99 /"
        " p99.9 ms (median) | CPU-s per M |",
        "| --- | ---: | --- | --- | --- | ---: |",
    ]
    for name in ("nio-logd ack write", "nio-logd ack fsync"):
        if name in s:
            x = s[name]
            lat = x["latency_ms_median"]
            ack_rows.append(
                f"| durability {name.rsplit(' ', 1)[1]} | {x['records_per_s_median']:,}"
                f" | {rounds(x['records_per_s_per_round'])} | {x['ratio_to_unacked_median']:.3f}"
                f" ({ratios(x['ratio_to_unacked_per_round'])}) | {lat['p50']} / {lat['p99']} / {lat['p99.9']}"
                f" | {x['cpu_s_per_million_median']:.2f} |"
            )
    return "\n".join(rows + ack_rows)


def _yes(stats: dict[str, Any]) -> str:
    return "yes" if stats["all_arrived"] else f"NO ({stats['arrived']:,} of {stats['sent']:,})"


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
        help="concurrent seed clients, one process each, each connecting in turn (default 4)",
    )
    parser.add_argument("--ack-records", type=int, default=None, help="records per ack run (default: --records)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2, help="generator processes for the stream (default 2)")
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
        "--snapshot",
        metavar="REV",
        help="run nio-logd from a git archive of REV (e.g. HEAD) instead of the working tree",
    )
    args = parser.parse_args()
    ack_records = args.ack_records or args.records
    network = enter_private_netns(not args.host_netns)

    base = Path(tempfile.mkdtemp(prefix="nio-logd-vs-rsyslog-"))
    print(f"working in {base}", file=sys.stderr)
    daemons: list[Daemon] = []
    runs: list[dict[str, Any]] = []
    try:
        source = None
        code = f"working tree {working_tree_state()}"
        if args.snapshot:
            source, commit = snapshot(args.snapshot, base / "source")
            code = f"git archive of {commit}"
        print(f"nio-logd from {code}", file=sys.stderr)
        rs = Target(Rsyslog(base / "rsyslog"))
        daemons.append(rs.daemon)
        nio = Target(NioLogd(base / "nio-logd", source=source))
        daemons.append(nio.daemon)
        acked: list[Target] = []
        if not args.no_ack:
            for durability in ("write", "fsync"):
                t = Target(
                    NioLogd(
                        base / f"nio-logd-ack-{durability}",
                        name=f"nio-logd ack {durability}",
                        ack=True,
                        durability=durability,
                        source=source,
                    )
                )
                daemons.append(t.daemon)
                acked.append(t)
        version = subprocess.run([RSYSLOGD, "-v"], capture_output=True, text=True).stdout.splitlines()[0]
        version = " ".join(version.replace("compiled with:", "").split())
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: stream", file=sys.stderr)
            pair = [rs, nio] if r % 2 == 0 else [nio, rs]
            for t in pair:
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
        rss_after_stream = {
            "rsyslog_after_stream": status_kb(rs.daemon.pid, "VmHWM") / 1024,
            "nio-logd_after_stream": status_kb(nio.daemon.pid, "VmHWM") / 1024,
        }
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: seed pattern", file=sys.stderr)
            pair = [rs, nio] if r % 2 == 0 else [nio, rs]
            for t in pair:
                runs.append(
                    {
                        "round": r + 1,
                        **run_one(
                            t,
                            mode=ONE_PER_CONNECTION,
                            records=args.seed_records,
                            connections=args.seed_connections,
                            processes=args.seed_connections,
                            settle=5.0,
                        ),
                    }
                )
        time.sleep(1.0)  # let the last connections' timers run out before measuring idleness
        idle = {t.name: idle_cpu_ms(t.daemon.pid) for t in (rs, nio)}
        rss = {
            **rss_after_stream,
            "rsyslog": status_kb(rs.daemon.pid, "VmHWM") / 1024,
            "nio-logd": status_kb(nio.daemon.pid, "VmHWM") / 1024,
        }
        rejects = count_lines(nio.daemon.rejects) if isinstance(nio.daemon, NioLogd) else 0
        doc = {
            "args": {
                **vars(args),
                "json_out": str(args.json_out) if args.json_out else None,
                "ack_records": ack_records,
            },
            "nio_logd_code": code,
            "network": network,
            "stop_rule": f"clock stops when at most max(0.1%, {BUFFER_LINES}) (stream) or 0.1% (seed) of the lines"
            " are missing from the file; then every line is counted once the file stops growing",
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "kernel": platform.release(),
                "rsyslog": version,
            },
            "summary": summarise(runs),
            "peak_rss_mb": {k: round(v, 1) for k, v in rss.items()},
            "idle_cpu_ms_over_2s": idle,
            "nio_logd_rejects": rejects,
            "runs": runs,
        }
    finally:
        codes = {d.name: d.stop() for d in daemons}
        print(f"daemons stopped: {codes}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(markdown(doc))
    print()
    print("```json")
    print(json.dumps(doc, indent=2))
    print("```")
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
