"""Forwarding to a real 3-node NATS JetStream cluster: at least once, no duplicates, across faults.

Daemons run as subprocesses and forward into streams with 3 replicas on the session's cluster
(``nats_cluster.py``); each test has its own stream. What is in the stream is read back with a
consumer and compared with what the daemons wrote to their logs.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, free_port, read_lines, wait_for, write_config
from faultkit import AckStream, Streamer, count_lines, healthz, logged_ids, metrics_address, scrape
from nats_cluster import NatsCluster, ensure_up

pytestmark = pytest.mark.slow
_names = itertools.count(1)


def new_stream(cluster: NatsCluster) -> tuple[str, str]:
    n = next(_names)
    stream, subject = f"FWD{n}_{os.getpid()}", f"fwd{n}.logs"
    cluster.create_stream(stream, [subject])
    return stream, subject


def forward_config(
    folder: Path,
    cluster: NatsCluster,
    stream: str,
    subject: str,
    host: str,
    *,
    ack: bool = False,
    workers: int = 1,
    servers: list[str] | None = None,
    log: dict[str, Any] | None = None,
    **forward: Any,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = write_config(
        folder,
        listeners=[{"address": f"tcp://127.0.0.1:{free_port()}", "ack": ack}],
        server={"workers": workers},
        metrics={"address": f"tcp://127.0.0.1:{free_port()}"},
        log=log or {},
    )
    table = {"servers": servers or cluster.servers, "subject": subject, "stream": stream, "host": host, **forward}
    with path.open("a") as f:
        f.write("[[forward]]\n")
        f.writelines(f"{key} = {json.dumps(value)}\n" for key, value in table.items())
    return path


def forwarded(daemon: Any) -> float:
    samples = scrape(metrics_address(daemon))
    return sum(samples.get("nio_logd_forward_records_total", {}).values())


def rotation_events(daemon: Any) -> list[dict[str, Any]]:
    """The daemon's events about rotation, forwarding and errors (for a failure's message)."""
    keep = ("rotat", "forward_", "error", "truncat", "loss")
    return [e for e in daemon.events if any(k in str(e.get("event", "")) for k in keep) or e.get("level") == "error"]


def forward_gauge(daemon: Any, name: str) -> float:
    samples = scrape(metrics_address(daemon))
    return sum(samples.get(name, {}).values())


def stream_pairs(cluster: NatsCluster, stream: str, subject: str) -> list[tuple[str, str]]:
    """(host, record id) of every message in the stream, in stream order."""
    out = []
    for _headers, data in cluster.read_stream(stream, subject):
        obj = json.loads(data)
        out.append((obj["host"], obj["send_msg"].rstrip(".")))
    return out


def assert_exactly_once(pairs: list[tuple[str, str]], expected: set[tuple[str, str]]) -> None:
    counts = collections.Counter(pairs)
    duplicates = [pair for pair, n in counts.items() if n > 1]
    missing = expected - counts.keys()
    extra = counts.keys() - expected
    assert not duplicates, f"{len(duplicates)} records twice in the stream, e.g. {duplicates[:5]}"
    assert not missing, f"{len(missing)} records missing from the stream, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} records in the stream that no daemon logged, e.g. {sorted(extra)[:5]}"


def log_files(path: Path) -> list[Path]:
    """The messages log and its rotated files (not the forwarders' cursors)."""
    return [p for p in path.parent.glob(f"{path.name}*") if not p.name.endswith(".cursor")]


def logged_pairs(host: str, *paths: Path) -> set[tuple[str, str]]:
    ids = [i for path in paths for i in logged_ids(path)]
    assert len(ids) == len(set(ids)), "a record is twice in the log"
    return {(host, i) for i in ids}


def wait_stream(cluster: NatsCluster, stream: str, count: int, timeout: float = 60.0) -> None:
    wait_for(lambda: cluster.stream_count(stream) >= count, timeout, 0.25)


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- the tests ------------------------------------------------------------------------------------
def test_two_daemons_forward_200000_records_into_one_stream_each_once_with_its_host(
    tmp_path: Path, daemon_factory: Any, nats_cluster: NatsCluster
) -> None:
    stream, subject = new_stream(nats_cluster)
    a = daemon_factory(forward_config(tmp_path / "a", nats_cluster, stream, subject, "host-a"))
    b = daemon_factory(forward_config(tmp_path / "b", nats_cluster, stream, subject, "host-b"))
    senders = [Streamer(a.tcp, 1, 100_000, pad=4), Streamer(b.tcp, 2, 100_000, pad=4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.finish()
    wait_for(lambda: forwarded(a) >= 100_000 and forwarded(b) >= 100_000, 90, 0.25)
    assert nats_cluster.stream_count(stream) == 200_000
    pairs = stream_pairs(nats_cluster, stream, subject)
    assert len(pairs) == 200_000
    assert_exactly_once(pairs, logged_pairs("host-a", a.messages) | logged_pairs("host-b", b.messages))
    assert {h for h, i in pairs if i.startswith("c1-")} == {"host-a"}
    status, body = healthz(metrics_address(a))
    assert status == 200, body
    wait_for(lambda: forward_gauge(a, "nio_logd_forward_lag_records") == 0, 10, 0.1)


def test_stream_leader_sigkilled_mid_forward_loses_and_duplicates_nothing(
    tmp_path: Path, daemon_factory: Any, nats_cluster: NatsCluster
) -> None:
    stream, subject = new_stream(nats_cluster)
    d = daemon_factory(forward_config(tmp_path, nats_cluster, stream, subject, "host-a", ack_timeout=2.0))
    sender = Streamer(d.tcp, 1, 40_000, pad=4)
    sender.start()
    wait_for(lambda: forwarded(d) >= 8_000, 60, 0.05)
    leader = nats_cluster.stream_leader(stream)
    assert forwarded(d) < 40_000, "forwarding finished before the leader could be killed"
    nats_cluster.kill(leader)
    try:
        sender.finish()
        wait_for(lambda: forwarded(d) >= 40_000, 90, 0.25)
    finally:
        nats_cluster.restart(leader)
    ensure_up(nats_cluster)
    pairs = stream_pairs(nats_cluster, stream, subject)
    assert_exactly_once(pairs, logged_pairs("host-a", d.messages))
    assert len(pairs) == 40_000


def test_daemon_sigkilled_mid_forward_resumes_from_its_cursor_without_gap_or_duplicate(
    tmp_path: Path, daemon_factory: Any, nats_cluster: NatsCluster
) -> None:
    stream, subject = new_stream(nats_cluster)
    config = forward_config(tmp_path, nats_cluster, stream, subject, "host-a", max_in_flight=512)
    d = daemon_factory(config)
    sender = Streamer(d.tcp, 1, 40_000, pad=4)
    sender.start()
    sender.finish()
    wait_for(lambda: forwarded(d) >= 5_000, 60, 0.02)
    d.kill()  # SIGKILL mid-forward
    done_before = nats_cluster.stream_count(stream)
    total = count_lines(d.messages)
    assert total == 40_000
    assert done_before < total, "everything was forwarded before the kill: nothing left to resume"
    cursor = json.loads(next(d.messages.parent.glob("messages.log.forward-*.cursor")).read_bytes())
    assert 0 < cursor["seq"] <= done_before
    again = daemon_factory(config)
    started = wait_for(lambda: again.event("forward_started"), 10)
    assert started["seq"] == cursor["seq"] and started["backlog_records"] == total - cursor["seq"]
    wait_for(lambda: forwarded(again) >= total - cursor["seq"], 60, 0.25)
    pairs = stream_pairs(nats_cluster, stream, subject)
    assert_exactly_once(pairs, logged_pairs("host-a", d.messages))


def test_cluster_down_30_seconds_daemon_keeps_accepting_rss_bounded_backlog_forwarded_after(
    tmp_path: Path, daemon_factory: Any, nats_cluster: NatsCluster
) -> None:
    stream, subject = new_stream(nats_cluster)
    config = forward_config(tmp_path, nats_cluster, stream, subject, "host-a", lag_bytes=1 << 20, ack_timeout=2.0)
    d = daemon_factory(config)
    warm = Streamer(d.tcp, 1, 5_000, pad=300)
    warm.start()
    warm.finish()
    wait_for(lambda: forwarded(d) >= 5_000, 30, 0.1)
    rss_before = vm_rss_kib(d.pid)
    for node in nats_cluster.nodes:
        nats_cluster.kill(node)
    down_at = time.monotonic()
    try:
        wait_for(lambda: forward_gauge(d, "nio_logd_forward_connected") == 0, 15, 0.1)
        # ~45 MB of records while the whole cluster is down: far more than the RSS may grow.
        outage = Streamer(d.tcp, 2, 60_000, pad=600)
        outage.start()
        outage.finish()
        assert count_lines(d.messages) == 65_000, "the daemon stopped accepting during the outage"
        wait_for(lambda: forward_gauge(d, "nio_logd_forward_lag_bytes") > 40 << 20, 10, 0.1)
        wait_for(lambda: forward_gauge(d, "nio_logd_forward_lag_records") >= 60_000, 10, 0.1)
        status, body = healthz(metrics_address(d))
        assert status == 503 and any("not yet forwarded" in p for p in body["problems"]), body
        rss_after = vm_rss_kib(d.pid)
        assert rss_after - rss_before < 25 * 1024, f"RSS grew from {rss_before} to {rss_after} KiB"
        time.sleep(max(0.0, 30.0 - (time.monotonic() - down_at)))
    finally:
        ensure_up(nats_cluster)
    wait_for(lambda: forwarded(d) >= 65_000, 90, 0.25)
    wait_for(lambda: forward_gauge(d, "nio_logd_forward_lag_records") == 0, 10, 0.1)
    assert forward_gauge(d, "nio_logd_forward_lag_bytes") == 0
    assert healthz(metrics_address(d))[0] == 200
    assert d.event("forward_reconnected") is not None or d.event("forward_connected") is not None
    assert wait_for(lambda: d.event("forward_caught_up"), 5)
    pairs = stream_pairs(nats_cluster, stream, subject)
    assert_exactly_once(pairs, logged_pairs("host-a", d.messages))


def _shift(log: Path, keep: int = 5) -> None:
    for i in range(keep, 0, -1):
        older = Path(f"{log}.{i}")
        if older.exists():
            os.replace(older, f"{log}.{i + 1}")


@pytest.mark.parametrize("kind", ["create+SIGUSR1", "create+SIGHUP", "copytruncate", "built-in"])
def test_rotation_during_forwarding_misses_nothing(
    kind: str, tmp_path: Path, daemon_factory: Any, nats_cluster: NatsCluster
) -> None:
    stream, subject = new_stream(nats_cluster)
    log = {"rotate_bytes": 300_000, "rotate_keep": 3} if kind == "built-in" else {}
    d = daemon_factory(forward_config(tmp_path, nats_cluster, stream, subject, "host-a", log=log))
    # Rotations *during* forwarding: the forwarder is connected first. (A round's copy can be
    # taken before the daemon has written any of it: an empty copy, which copytruncate._find_copy
    # and the reader take for the copy since 2026-12-02; before, that round's 5,000 records were in
    # neither file, and a run forwarded 10,000 of 15,000.)
    wait_for(lambda: forward_gauge(d, "nio_logd_forward_connected") == 1, 30, 0.05)
    total = 0
    for round_ in range(3):
        sender = Streamer(d.tcp, round_ + 1, 5_000, pad=20)
        sender.start()
        sender.finish()  # read by the daemon; the forwarder is mid-way through it, or behind
        total += 5_000
        if kind.startswith("create"):
            _shift(d.messages)
            os.replace(d.messages, f"{d.messages}.1")
            d.signal(signal.SIGUSR1 if kind.endswith("SIGUSR1") else signal.SIGHUP)
            wait_for(d.messages.exists, 10)  # reopened (SIGHUP re-reads the config first)
        elif kind == "copytruncate":
            _shift(d.messages)
            shutil.copyfile(d.messages, f"{d.messages}.1")
            os.truncate(d.messages, 0)
    try:
        wait_for(lambda: forwarded(d) >= total, 60, 0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: forwarded {forwarded(d)} of {total}; {rotation_events(d)}") from None
    if kind == "built-in":
        assert sum(1 for e in d.events if e.get("event") == "rotated") >= 3
    elif kind == "copytruncate":
        assert d.event("truncated") is not None
        assert d.event("forward_loss") is None
    pairs = stream_pairs(nats_cluster, stream, subject)
    expected = {("host-a", f"c{r + 1}-{i}") for r in range(3) for i in range(5_000)}
    assert_exactly_once(pairs, expected)


def test_builtin_rotation_keeps_a_file_the_forwarder_has_not_finished(
    tmp_path: Path, daemon_factory: Any, nats_cluster: NatsCluster
) -> None:
    """With the engine unreachable, the rotation is postponed instead of dropping the cursor's file."""
    stream, subject = new_stream(nats_cluster)
    log = {"rotate_bytes": 100_000, "rotate_keep": 2}
    dead = [f"nats://127.0.0.1:{free_port()}"]
    d = daemon_factory(forward_config(tmp_path, nats_cluster, stream, subject, "host-a", servers=dead, log=log))
    # Rounds of ~120 KB, each written before the next: the daemon rotates between writes, never
    # inside one, so a single burst written in one batch would rotate only once or twice (a CI run
    # wrote 10,000 records as one 2.2 MB batch) and keep 2 would not need to drop the cursor's file.
    rounds = 10
    for c in range(1, rounds + 1):
        sender = Streamer(d.tcp, c, 1_000, pad=20)
        sender.start()
        sender.finish()
        wait_for(lambda c=c: sum(map(count_lines, log_files(d.messages))) >= c * 1_000, 20)
    wait_for(lambda: d.event("rotation_postponed"), 20)
    assert d.stop() == 0
    config = forward_config(tmp_path, nats_cluster, stream, subject, "host-a", log=log)
    again = daemon_factory(config)
    sent = {("host-a", f"c{c}-{i}") for c in range(1, rounds + 1) for i in range(1_000)}
    wait_for(lambda: forwarded(again) >= len(sent), 60, 0.2)
    assert again.event("forward_loss") is None
    pairs = stream_pairs(nats_cluster, stream, subject)
    assert_exactly_once(pairs, sent)


def _acked_client(address: tuple[str, int], lines: list[bytes]) -> socket.socket:
    sock = socket.create_connection(address)
    sock.sendall(b"".join(line + b"\n" for line in lines))
    return sock


def test_ack_after_an_ok_answer_means_the_record_is_in_the_stream(
    tmp_path: Path, daemon_factory: Any, nats_cluster: NatsCluster
) -> None:
    stream, subject = f"ACKAFTER_{os.getpid()}", "ackafter.logs"  # created only later
    config = forward_config(tmp_path, nats_cluster, stream, subject, "host-a", ack=True, ack_after=True)
    d = daemon_factory(config)
    # No stream takes the subject yet: the records are written, but no client is told "ok".
    from faultkit import make_line

    sock = _acked_client(d.tcp, [make_line(1, i) for i in range(200)])
    sock.settimeout(3.0)
    wait_for(lambda: count_lines(d.messages) == 200, 10)
    with pytest.raises(TimeoutError):
        sock.recv(65536)
    nats_cluster.create_stream(stream, [subject])
    sock.settimeout(30.0)
    answers = b""
    while answers.count(b"\n") < 200:
        data = sock.recv(65536)
        assert data, "the daemon closed the connection"
        answers += data
    sock.close()
    assert all(json.loads(line)["ok"] for line in answers.splitlines())
    assert nats_cluster.stream_count(stream) >= 200
    # Under load: at every moment, the oks counted are in the stream.
    client = AckStream(d.tcp, 2, 20_000, window=2000)
    client.start()
    checks = 0
    while client.is_alive() and checks < 200:
        acked = client.acked
        in_stream = nats_cluster.stream_count(stream) - 200
        assert in_stream >= acked, f"{acked} records acked but only {in_stream} in the stream"
        checks += 1
    client.join(60)
    assert client.error is None and client.acked == 20_000
    assert checks >= 3
    pairs = stream_pairs(nats_cluster, stream, subject)
    assert_exactly_once(pairs, logged_pairs("host-a", d.messages))


def _tail(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nio_logd", "tail", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_tail_from_nats_prints_both_hosts_records_with_the_filters(
    tmp_path: Path, daemon_factory: Any, nats_cluster: NatsCluster
) -> None:
    stream, subject = new_stream(nats_cluster)
    a = daemon_factory(forward_config(tmp_path / "a", nats_cluster, stream, subject, "host-a"))
    b = daemon_factory(forward_config(tmp_path / "b", nats_cluster, stream, subject, "host-b"))
    for client, d in ((1, a), (2, b)):
        sender = Streamer(d.tcp, client, 50, pad=0)
        sender.start()
        sender.finish()
    wait_stream(nats_cluster, stream, 100, 30)
    url = f"{nats_cluster.servers[1]}/{stream}"
    out = _tail("--from", url, "-n", "all", "--json")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(records) == 100 and {r["host"] for r in records} == {"host-a", "host-b"}
    out = _tail("--from", url, "-n", "all", "--json", "--user", "u2", "--grep", "^c2-4[0-9]$")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(r["send_msg"] for r in records) == [f"c2-{i}" for i in range(40, 50)]
    assert {r["host"] for r in records} == {"host-b"}
    out = _tail("--from", url, "-n", "3", "--json")
    assert len(out.stdout.splitlines()) == 3
    out = _tail("--from", url, "--since", "2000-01-01", "--json", "--grep", "c1-7$")
    assert [json.loads(line)["send_msg"] for line in out.stdout.splitlines()] == ["c1-7"]
    # -f: what arrives later is printed as it comes, from both hosts.
    follow = subprocess.Popen(
        [sys.executable, "-m", "nio_logd", "tail", "--from", url, "-f", "-n", "0", "--json", "--grep", "late"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        time.sleep(1.5)
        for d in (a, b):
            from faultkit import make_line

            sock = socket.create_connection(d.tcp)
            sock.sendall(make_line(9, 0, pad=0).replace(b"c9-0", b"late") + b"\n")
            sock.close()
        assert follow.stdout is not None
        lines = [follow.stdout.readline() for _ in range(2)]
        assert {json.loads(line)["host"] for line in lines} == {"host-a", "host-b"}
    finally:
        follow.send_signal(signal.SIGINT)
        follow.communicate(timeout=10)
    # Clear one-line errors, no traceback.
    out = _tail("--from", f"nats://127.0.0.1:{free_port()}/{stream}", "-n", "all")
    assert out.returncode != 0 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    out = _tail("--from", f"{nats_cluster.servers[0]}/NOSUCHSTREAM", "-n", "all")
    assert out.returncode != 0 and "NOSUCHSTREAM" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_forwarding_round_trip_with_two_worker_processes(
    tmp_path: Path, daemon_factory: Any, nats_cluster: NatsCluster
) -> None:
    stream, subject = new_stream(nats_cluster)
    d = daemon_factory(forward_config(tmp_path, nats_cluster, stream, subject, "host-w", workers=2))
    senders = [Streamer(d.tcp, c, 5_000, pad=4) for c in (1, 2)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.finish()
    wait_for(lambda: forwarded(d) >= 10_000, 60, 0.2)
    pairs = stream_pairs(nats_cluster, stream, subject)
    assert_exactly_once(pairs, logged_pairs("host-w", d.messages))
    assert len(read_lines(d.messages)) == 10_000
