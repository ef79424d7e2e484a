"""The seed client's pattern at full size against nio-logd only: one record per connection, open
loop, 20,000 connections a round, 4 sender processes, for each ``[server] workers`` value, rounds
interleaved; the kernel's ListenOverflows and ListenDrops per round (the target: 0).

Run by hand (pytest does not collect this file); rsyslog takes this pattern at tens of records/s,
so ``compare_rsyslog.py`` runs it with fewer connections:

    python tests/perf/seed_pattern.py                      # 3 rounds of 20,000, workers 1 and auto
    python tests/perf/seed_pattern.py --records 5000 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import perfutil  # noqa: E402
from perfutil import NioLogd, count_lines, median, tcp_ext, working_tree_state  # noqa: E402

from nio_logd.config import parse_address  # noqa: E402
from nio_logd.tools.bench import ONE_PER_CONNECTION, Plan, run_bench  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--workers", default="1,auto")
    ap.add_argument("--json-out")
    ap.add_argument(
        "--same-session", action="store_true", help="the daemons in this script's session (see perfutil.OWN_SESSION)"
    )
    args = ap.parse_args()
    perfutil.OWN_SESSION = not args.same_session
    base = Path(tempfile.mkdtemp(prefix="nio-logd-seed-"))
    daemons = {
        f"nio-logd w{w}": NioLogd(base / f"w{w}", name=f"nio-logd w{w}", workers=int(w) if w.isdigit() else w)
        for w in args.workers.split(",")
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in daemons}
    try:
        for r in range(args.rounds):
            order = list(daemons.items())
            order = order[r % len(order) :] + order[: r % len(order)]
            for name, d in order:
                before = count_lines(d.output)
                ovf0, drops0 = tcp_ext("ListenOverflows"), tcp_ext("ListenDrops")
                plan = Plan(
                    parse_address(f"tcp://127.0.0.1:{d.port}"),
                    mode=ONE_PER_CONNECTION,
                    connections=args.senders,
                    records=args.records,
                    processes=args.senders,
                    seed=r + 1,
                    timeout=600,
                )
                out = run_bench(plan, wait_file=str(d.output), wait_slack=0)
                ovf, drops = tcp_ext("ListenOverflows") - ovf0, tcp_ext("ListenDrops") - drops0
                written = count_lines(d.output) - before
                rate = out["written"]["records_per_s"] if out.get("written") else out["sent"]["records_per_s"]
                results[name].append({"records_per_s": rate, "overflows": ovf, "drops": drops, "written": written})
                print(f"round {r + 1} {name}: {rate:,.0f} records/s, {written} written, overflows {ovf}, drops {drops}")
    finally:
        for d in daemons.values():
            d.stop()
    summary = {
        name: {
            "records_per_s_median": median([x["records_per_s"] for x in runs]),
            "overflows": sum(x["overflows"] for x in runs),
            "drops": sum(x["drops"] for x in runs),
            "written": sum(x["written"] for x in runs),
            "sent": args.records * len(runs),
        }
        for name, runs in results.items()
    }
    print()
    print(
        f"| seed pattern: {args.records:,} one-record connections a round, {args.senders} senders, {args.rounds} "
        "rounds | records/s (median) | listen overflows (all rounds) | drops | written / sent |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, s in summary.items():
        rate = f"{s['records_per_s_median']:,.0f}"
        print(f"| {name} | {rate} | {s['overflows']} | {s['drops']} | {s['written']} / {s['sent']} |")
    sessions = "the harness's session" if args.same_session else "each daemon in a session of its own"
    doc = {
        "code": working_tree_state(),
        "args": vars(args),
        "sessions": sessions,
        "rounds": results,
        "summary": summary,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if all(s["written"] == s["sent"] for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
