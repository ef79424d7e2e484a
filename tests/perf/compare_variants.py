"""End-to-end measurement of the optimisation proposals: the daemon as it is against prototypes.

Run by hand:  python tests/perf/compare_variants.py [--records 300000] [--rounds 3] [--source DIR]

Starts ``nio-logd run`` and, on other ports, ``proto_daemon.py`` with each proposal (the daemon's
own Server, monkeypatched; see that file), sends every one the same stream with ``nio-logd bench``
(8 connections, 100-150-byte records) in interleaved rounds, the order rotating each round, and
reports per variant: records/s in the file (median, per round), the ratio to the daemon in the
same round, CPU-seconds per million records (all the variant's processes) and peak RSS.
``--source`` runs every variant from another tree (e.g. a ``git archive`` of a commit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from perfutil import (  # noqa: E402
    NioLogd,
    ProtoDaemon,
    count_lines,
    cpu_seconds,
    enter_private_netns,
    median,
    status_kb,
    tcp_ext,
)

from nio_logd.config import parse_address  # noqa: E402
from nio_logd.tools.bench import Plan, run_bench  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "bind once": ["--bind-once"],
    "lines in a bytearray": ["--collect-bytearray"],
    "bind once + bytearray": ["--bind-once", "--collect-bytearray"],
    "bind once + bytearray + fast timestamp": ["--bind-once", "--collect-bytearray", "--fast-ts"],
    "2 workers (SO_REUSEPORT)": ["--workers", "2"],
    "2 workers + bind once + bytearray + fast timestamp": [
        "--workers",
        "2",
        "--bind-once",
        "--collect-bytearray",
        "--fast-ts",
    ],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--source", type=Path)
    parser.add_argument("--only", action="append", help="run only these variants (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--mode", choices=["stream", "one-per-connection"], default="stream")
    parser.add_argument("--processes", type=int, default=2, help="generator processes (default 2)")
    parser.add_argument("--host-netns", action="store_true", help="do not run in a private network namespace")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help='an extra prototype variant, e.g. "accept 4096=--accepts-per-event 4096"',
    )
    args = parser.parse_args()
    network = enter_private_netns(not args.host_netns)
    for extra in args.variant:
        name, _, flags = extra.partition("=")
        VARIANTS[name] = flags.split()
    base = Path(tempfile.mkdtemp(prefix="nio-logd-variants-"))
    daemons: list[NioLogd] = []
    runs: list[dict[str, Any]] = []
    try:
        daemons.append(NioLogd(base / "current", name="nio-logd (current)", source=args.source))
        for name, flags in VARIANTS.items():
            if (args.only and name not in args.only) or (
                args.variant and not args.only and name not in [v.partition("=")[0] for v in args.variant]
            ):
                continue
            daemons.append(
                ProtoDaemon(base / name.replace(" ", "_").replace("/", ""), name=name, flags=flags, source=args.source)
            )
        for r in range(args.rounds):
            order = daemons[r % len(daemons) :] + daemons[: r % len(daemons)]
            for d in order:
                plan = Plan(
                    address=parse_address(f"tcp://127.0.0.1:{d.port}"),
                    connections=args.connections,
                    records=args.records,
                    processes=min(args.processes, args.connections),
                    timeout=600,
                    mode=args.mode,
                )
                pids = d.pids
                cpu0, ovf0 = sum(cpu_seconds(p) for p in pids), tcp_ext("ListenOverflows")
                result = run_bench(plan, wait_file=str(d.output), wait_slack=args.records // 1000, settle=5.0)
                cpu1, ovf1 = sum(cpu_seconds(p) for p in pids), tcp_ext("ListenOverflows")
                run = {
                    "round": r + 1,
                    "variant": d.name,
                    "records_per_s": result["written"]["records_per_s"],
                    "complete": result["written"]["complete"],
                    "cpu_s_per_million": round((cpu1 - cpu0) / args.records * 1e6, 2),
                    "listen_overflows": ovf1 - ovf0,
                }
                runs.append(run)
                print(
                    f"  round {r + 1} {d.name:<40} {run['records_per_s'] or 0:>10,.0f} records/s  "
                    f"cpu {run['cpu_s_per_million']:.2f} s/M  overflows {run['listen_overflows']}",
                    file=sys.stderr,
                    flush=True,
                )
        rss = {d.name: round(max(status_kb(p, "VmHWM") for p in d.pids) / 1024, 1) for d in daemons}
        lines = {d.name: count_lines(d.output) for d in daemons}
    finally:
        for d in daemons:
            d.stop()
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    ref = daemons[0].name
    print(
        f"{args.mode}: {args.records:,} records over {args.connections} connections, {args.rounds} interleaved "
        f"rounds, {network}" + (f", source {args.source}" if args.source else "")
    )
    print()
    print(
        "| variant | records/s median | per round | / current (per round) | CPU-s per M (median) | peak RSS MB"
        " (per process) | listen overflows (all rounds) | all arrived |"
    )
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | --- |")
    summary = {}
    for d in daemons:
        mine = [x for x in runs if x["variant"] == d.name]
        theirs = [x for x in runs if x["variant"] == ref]
        ratios = [
            a["records_per_s"] / b["records_per_s"]
            for a, b in zip(mine, theirs, strict=True)
            if a["records_per_s"] and b["records_per_s"]
        ]
        rates = [x["records_per_s"] or 0 for x in mine]
        summary[d.name] = {
            "median": median(rates),
            "ratios": ratios,
            "ratio_median": median(ratios),
            "cpu_s_per_million": median([x["cpu_s_per_million"] for x in mine]),
            "rss_mb": rss[d.name],
            "lines": lines[d.name],
            "expected": args.records * args.rounds,
        }
        print(
            f"| {d.name} | {median(rates):,.0f} | {', '.join(f'{x:,.0f}' for x in rates)}"
            f" | {median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)})"
            f" | {summary[d.name]['cpu_s_per_million']:.2f} | {rss[d.name]}"
            f" | {sum(x['listen_overflows'] for x in mine)}"
            f" | {'yes' if lines[d.name] == args.records * args.rounds else f'NO: {lines[d.name]:,}'} |"
        )
    print()
    print(json.dumps({"summary": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
