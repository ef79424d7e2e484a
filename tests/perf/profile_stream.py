"""Where nio-logd's time per record goes during a stream run: py-spy samples, grouped by stage.

Run by hand (needs py-spy and ptrace rights, e.g. root):

    python tests/perf/profile_stream.py                 # 500,000 records over 8 connections
    python tests/perf/profile_stream.py --records 200000 --gil --svg /tmp/profile.svg

Starts a nio-logd daemon, attaches ``py-spy record --format raw --threads --idle`` to it, runs
``nio-logd bench`` (stream), and sorts every sample of the I/O thread and of the writer thread
into a stage by the frames on its stack (the innermost matching rule wins): recv, framing,
validation, rendering, batching, writing, waiting. "wall µs/record" is samples / rate / records
(wall-clock time, inflated by py-spy's pauses and by waiting for a CPU); "CPU µs/record" spreads
the thread's measured CPU time (/proc) over its non-waiting stages by their share of samples.
schedstat gives each thread's time on a CPU and its time runnable but waiting for one.
With ``--gil`` only samples holding the GIL are kept (Python CPU; blocking calls drop out).
Also reports each thread's CPU time from /proc/PID/task/TID/stat over the run.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from perfutil import CLK_TCK, NioLogd, cpu_seconds  # noqa: E402

from nio_logd.config import parse_address  # noqa: E402
from nio_logd.tools.bench import Plan, run_bench  # noqa: E402

# (stage, predicate on one frame "func (file:line)" and that line's source text); innermost match wins.
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")

STAGES_IO = (
    ("recv (socket.recv)", lambda f, src: f.endswith("on_readable") and ".recv(" in src),
    ("framing (LineFramer)", lambda f, src: f.startswith("LineFramer.")),
    ("validation (pydantic)", lambda f, src: f.startswith(("RecordValidator.", "TypeAdapter."))),
    ("rendering (structlog + orjson)", lambda f, src: f.startswith("Renderer.") or "structlog" in src),
    (
        "accept + connection set-up/close",
        lambda f, src: (
            f
            in {
                "IOLoop._accept",
                "IOLoop.adopt",
                "Connection.__init__",
                "Connection.close",
                "IOLoop.forget",
                "Server.admit",
                "Server.connection_closed",
                "_peer_name",
                "Connection.update_events",
                "Connection.finish_if_done",
            }
            or f.startswith(
                ("EpollSelector.register", "EpollSelector.unregister", "EpollSelector.modify", "socket.accept")
            )
        ),
    ),
    (
        "batching + hand-off",
        lambda f, src: (
            f
            in {
                "IOLoop._flush_batch",
                "Batch.__init__",
                "Writer.submit",
                "IOLoop._complete",
                "IOLoop.batch_done",
                "IOLoop.call_soon_threadsafe",
                "IOLoop._on_wake",
                "Renderer.take",
            }
        ),
    ),
    ("refusals", lambda f, src: f == "IOLoop._refuse"),
    ("wait in select (idle or GIL)", lambda f, src: f.endswith(".select") and "selectors" in src),
)
STAGES_WRITER = (
    ("write: join lines", lambda f, src: f.startswith("Writer._write") and "join" in src),
    ("write: os.write", lambda f, src: "os.write" in src),
    ("write: fsync", lambda f, src: "fsync" in src),
    ("write: fstat/other", lambda f, src: f.startswith(("LogFile.", "Writer."))),
    ("wait for batches", lambda f, src: f in {"Condition.wait", "Writer._gather"}),
)


class Sources:
    """Source lines by (file, line), read from the tree the daemon runs from."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = roots
        self.cache: dict[str, list[str]] = {}

    def line(self, file: str, line: str | None) -> str:
        if not line:
            return ""
        if file not in self.cache:
            self.cache[file] = []
            for root in self.roots:
                path = root / file
                if path.exists():
                    self.cache[file] = path.read_text(errors="replace").splitlines()
                    break
        lines = self.cache[file]
        n = int(line)
        return lines[n - 1] if 0 < n <= len(lines) else ""


def classify(frames: list[str], stages: tuple[Any, ...], sources: Sources) -> str:
    for frame in reversed(frames):  # innermost first
        m = FRAME.match(frame)
        if not m:
            continue
        func, file = m["func"], m["file"]
        src = sources.line(file, m["line"])
        if "structlog/" in file:
            src += " structlog"
        if file.startswith("selectors"):
            src += " selectors"
        for stage, rule in stages:
            if rule(func, src):
                return str(stage)
    return "loop overhead (other)"


def parse_raw(path: Path) -> dict[str, collections.Counter[str]]:
    """{thread name: Counter(stack -> samples)} from py-spy's raw (collapsed) output."""
    threads: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        head, _, rest = stack.partition(";")
        threads[head].update({rest: int(count)})
    return threads


def thread_cpu(pid: int) -> dict[int, tuple[float, float, float]]:
    """Per thread: (utime+stime s, on-CPU s and runqueue-wait s from schedstat)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            on_cpu, waiting, _slices = (task / "schedstat").read_text().split()
        except (OSError, ValueError):
            continue
        out[int(task.name)] = ((int(fields[11]) + int(fields[12])) / CLK_TCK, int(on_cpu) / 1e9, int(waiting) / 1e9)
    return out


def schedstat_only(args: argparse.Namespace) -> int:
    """Without the profiler's pauses: how busy each thread is while the bench's clock runs."""
    base = Path(tempfile.mkdtemp(prefix="nio-logd-profile-"))
    daemon = NioLogd(base / "nio-logd", source=args.source, workers=1)  # the per-record work of one process
    print(
        "| run | records/s in the file | thread (by CPU) | on a CPU | runnable, waiting for a CPU | CPU µs / record |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    try:
        for run in range(args.no_spy):
            plan = Plan(
                address=parse_address(f"tcp://127.0.0.1:{daemon.port}"),
                connections=args.connections,
                records=args.records,
                processes=min(2, args.connections),
                mode=args.mode,
            )
            box: dict[str, Any] = {}

            def started(box: dict[str, Any] = box) -> None:
                box["t0"], box["threads"] = time.monotonic(), thread_cpu(daemon.pid)

            result = run_bench(plan, wait_file=str(daemon.output), on_started=started)
            wall, after = time.monotonic() - box["t0"], thread_cpu(daemon.pid)
            rows = []
            for tid, (_cpu, on, wait) in after.items():
                _c0, on0, wait0 = box["threads"].get(tid, (0.0, 0.0, 0.0))
                rows.append((on - on0, wait - wait0, tid))
            rows.sort(reverse=True)
            for rank, (on, wait, tid) in enumerate(rows[:3]):
                name = (
                    "main thread"
                    if tid == daemon.pid
                    else ("busiest (the I/O thread)" if rank == 0 else f"thread {tid}")
                )
                print(
                    f"| {run + 1} | {result['written']['records_per_s']:,.0f} | {name} | {on / wall:.0%} "
                    f"| {wait / wall:.0%} | {on / result['written']['lines'] * 1e6:.2f} |"
                )
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--mode", choices=["stream", "one-per-connection"], default="stream")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    parser.add_argument("--gil", action="store_true", help="keep only samples holding the GIL")
    parser.add_argument("--svg", type=Path, help="also record a flame graph (a second, separate run)")
    parser.add_argument("--source", type=Path, help="run the daemon from this source tree (default: this repo)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--no-spy",
        type=int,
        metavar="RUNS",
        default=0,
        help="no py-spy: RUNS plain runs, each thread's schedstat from the start of the clock",
    )
    args = parser.parse_args()
    if args.no_spy:
        return schedstat_only(args)

    base = Path(tempfile.mkdtemp(prefix="nio-logd-profile-"))
    daemon = NioLogd(base / "nio-logd", source=args.source, workers=1)  # the per-record work of one process
    raw = base / "profile.raw"
    try:
        cmd = [
            "py-spy",
            "record",
            "--pid",
            str(daemon.pid),
            "--rate",
            str(args.rate),
            "--format",
            "raw",
            "--output",
            str(raw),
            "--threads",
            "--idle",
        ]
        if args.gil:
            cmd.append("--gil")
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.5)  # py-spy attaches
        plan = Plan(
            address=parse_address(f"tcp://127.0.0.1:{daemon.port}"),
            connections=args.connections,
            records=args.records,
            processes=min(2, args.connections),
            mode=args.mode,
        )
        cpu0, threads0, t0 = cpu_seconds(daemon.pid), thread_cpu(daemon.pid), time.monotonic()
        result = run_bench(plan, wait_file=str(daemon.output))
        wall = time.monotonic() - t0
        cpu1, threads1 = cpu_seconds(daemon.pid), thread_cpu(daemon.pid)
        spy.send_signal(signal.SIGINT)
        _out, err = spy.communicate(timeout=60)
        if args.svg:
            svg = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--pid",
                    str(daemon.pid),
                    "--rate",
                    str(args.rate),
                    "--output",
                    str(args.svg),
                    "--threads",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.5)
            run_bench(plan, wait_file=str(daemon.output))
            svg.send_signal(signal.SIGINT)
            svg.wait(60)
    finally:
        daemon.stop()
    if not raw.exists():
        print(f"py-spy wrote nothing: {err.decode(errors='replace')}", file=sys.stderr)
        return 1

    threads = parse_raw(raw)
    shutil.rmtree(base, ignore_errors=True)
    records = result["written"]["lines"]
    sources = Sources([args.source or Path(__file__).resolve().parents[2], *map(Path, sys.path)])
    table: list[dict[str, Any]] = []
    for head, stacks in sorted(threads.items()):
        name = head.split(": ", 1)[-1]
        if name.startswith("nio-logd-io"):
            stages = STAGES_IO
        elif name == "nio-logd-writer":
            stages = STAGES_WRITER
        else:
            continue
        by_stage: collections.Counter[str] = collections.Counter()
        for stack, n in stacks.items():
            by_stage[classify(stack.split(";"), stages, sources)] += n
        total = sum(by_stage.values())
        for stage, n in by_stage.most_common():
            table.append(
                {
                    "thread": name,
                    "stage": stage,
                    "samples": n,
                    "share": round(n / total, 4),
                    "us_per_record": round(n / args.rate / records * 1e6, 3),
                }
            )
    tids = {int(m[1]): m[2] for h in threads if (m := re.match(r"thread \((\d+)\): (.*)", h))}
    per_thread: dict[str, dict[str, float]] = {}
    for tid, (cpu, on, wait) in threads1.items():
        cpu0, on0, wait0 = threads0.get(tid, (0.0, 0.0, 0.0))
        if cpu - cpu0 > 0:
            per_thread[tids.get(tid, str(tid))] = {
                "cpu_s": round(cpu - cpu0, 2),
                "on_cpu_share": round((on - on0) / wall, 3),
                "runqueue_wait_share": round((wait - wait0) / wall, 3),
            }
    # Stage shares of a thread's busy samples (not waiting), scaled to that thread's CPU time.
    for name, info in per_thread.items():
        rows = [r for r in table if r["thread"] == name and not r["stage"].startswith("wait")]
        busy = sum(r["samples"] for r in rows)
        for r in rows:
            r["cpu_us_per_record"] = round(r["samples"] / busy * info["cpu_s"] / records * 1e6, 2)
    doc = {
        "records": records,
        "wall_s": round(wall, 3),
        "records_per_s": result["written"]["records_per_s"],
        "process_cpu_s": round(cpu1 - cpu0, 2),
        "cpu_us_per_record": round((cpu1 - cpu0) / records * 1e6, 2),
        "thread_cpu_s": per_thread,
        "gil_only": args.gil,
        "rate": args.rate,
        "stages": table,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(
        f"{records:,} records in {wall:.2f} s ({doc['records_per_s']:,.0f} records/s in the file); "
        f"daemon CPU {doc['process_cpu_s']} s = {doc['cpu_us_per_record']} µs/record; "
        f"py-spy {args.rate} Hz{' GIL only' if args.gil else ''}"
    )
    print()
    for name, info in per_thread.items():
        print(
            f"  {name}: CPU {info['cpu_s']} s; on a CPU {info['on_cpu_share']:.0%} of the run, "
            f"runnable but waiting for a CPU {info['runqueue_wait_share']:.0%}"
        )
    print()
    print("| thread | stage | samples | share of thread's samples | wall µs / record | CPU µs / record |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in table:
        cpu = f"{row['cpu_us_per_record']:.2f}" if "cpu_us_per_record" in row else "–"
        print(
            f"| {row['thread']} | {row['stage']} | {row['samples']} | {row['share'] * 100:.1f}% "
            f"| {row['us_per_record']:.2f} | {cpu} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
