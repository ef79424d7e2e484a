"""Forwarding throughput into a 3-replica JetStream stream, and how far behind the forwarder runs.

Run by hand (pytest does not collect this file), as root, with nats-server installed:

    python tests/perf/forward_nats.py                      # 1,000,000 records
    python tests/perf/forward_nats.py --records 200000     # quick

It starts a 3-node JetStream cluster on loopback (``tests/nats_cluster.py``), a stream with 3
replicas, and one nio-logd (``[server] workers`` as given, default 1) with one ``[[forward]]``
table, then sends the records with ``nio-logd bench`` (stream mode, 8 connections) while sampling
the metrics endpoint every 0.1 s: ``nio_logd_forward_lag_records`` and ``..._lag_bytes`` (the
maximum is how far behind the forwarder ran) and ``nio_logd_forward_records_total``. Reported:
the bench's ingest rate, forwarded records/s from the first record written to the last one
acknowledged by the stream, the time the forwarder needed after the bench finished, the
maximum lag, the daemon's peak RSS, and the stream's message count at the end (must equal the
records sent). Results go to stdout as JSON (and to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the cluster fixture's classes
sys.path.insert(0, str(HERE))

from nats_cluster import NatsCluster  # noqa: E402
from perfutil import free_port, wait_listening  # noqa: E402


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("nio_logd_forward_"):
            name, _, value = line.rpartition(" ")
            out[name.split("{")[0]] = float(value)
    return out


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="nio-logd-perf-nats-"))
    cluster = NatsCluster(folder)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        cluster.start()
        cluster.create_stream("PERF", ["perf.logs"])
        port, mport = free_port(), free_port()
        config = folder / "nio-logd.toml"
        config.write_text(
            f'[[listeners]]\naddress = "tcp://127.0.0.1:{port}"\n'
            f'[log]\npath = "logs/messages.log"\nrejects_path = "logs/rejects.log"\n'
            f"[server]\nworkers = {args.workers}\n"
            f'[metrics]\naddress = "tcp://127.0.0.1:{mport}"\n'
            f'[daemon]\nevents = "json"\n'
            f'[[forward]]\nservers = {json.dumps(cluster.servers)}\nsubject = "perf.logs"\nstream = "PERF"\n'
            f'host = "perf-host"\n'
        )
        daemon = subprocess.Popen(
            [sys.executable, "-m", "nio_logd", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=(folder / "events.log").open("wb"),
            cwd=folder,
        )
        wait_listening(port, proc=daemon)
        wait_listening(mport, proc=daemon)
        samples: list[tuple[float, dict[str, float]]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    samples.append((time.monotonic(), scrape(mport)))
                except OSError:
                    pass
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        bench = subprocess.run(
            [sys.executable, "-m", "nio_logd", "bench", "--address", f"tcp://127.0.0.1:{port}", "--records",
             str(args.records), "--connections", str(args.connections), "--json", "--quiet",
             "--wait-file", str(folder / "logs" / "messages.log")],
            capture_output=True, text=True, timeout=900, check=True,
        )  # fmt: skip
        t_bench = time.monotonic()
        deadline = t_bench + 600
        while time.monotonic() < deadline:
            if samples and samples[-1][1].get("nio_logd_forward_records_total", 0) >= args.records:
                break
            time.sleep(0.1)
        t_done = samples[-1][0] if samples else time.monotonic()
        stop.set()
        sampler.join(5)
        first = next((t for t, m in samples if m.get("nio_logd_forward_records_total", 0) > 0), t0)
        result: dict[str, Any] = {
            "records": args.records,
            "workers": args.workers,
            "bench": json.loads(bench.stdout),
            "forwarded": samples[-1][1].get("nio_logd_forward_records_total", 0) if samples else 0,
            "forwarded_records_per_second": round(args.records / max(1e-9, t_done - t0)),
            "forward_seconds_from_first_ack": round(t_done - first, 2),
            "seconds_after_bench_finished": round(t_done - t_bench, 2),
            "bench_seconds": round(t_bench - t0, 2),
            "max_lag_records": max((m.get("nio_logd_forward_lag_records", 0) for _t, m in samples), default=0),
            "max_lag_bytes": max((m.get("nio_logd_forward_lag_bytes", 0) for _t, m in samples), default=0),
            "engine_errors": samples[-1][1].get("nio_logd_forward_engine_errors_total", 0) if samples else 0,
            "daemon_peak_rss_kib": peak_rss_kib(daemon.pid),
            "stream_messages": cluster.stream_count("PERF"),
        }
        text = json.dumps(result, indent=2)
        print(text)
        if args.out is not None:
            args.out.write_text(text + "\n")
        return 0 if result["stream_messages"] == args.records else 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.terminate()
            daemon.wait(30)
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
