"""A stalled writer, for real: the log lives on a loop-mounted ext4 that is frozen with fsfreeze(8),
so the writer thread blocks inside write() exactly as on a hung disk. Clients must block in TCP,
memory must stay bounded, nothing may be dropped, and everything arrives after the thaw.
"""

from __future__ import annotations

import collections
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_for, write_config
from faultkit import (
    AckStream,
    RssSampler,
    Streamer,
    close_streams,
    have_tools,
    healthz,
    is_root,
    logged_ids,
    metric,
    metrics_address,
    mount_loop_ext4,
    rss_kib,
    scrape,
    unmount,
    wait_stable,
)

pytestmark = pytest.mark.root

CLIENTS = 2
RECORDS = 50_000
# Stated bounds with queue_bytes = 1 MiB (see test_faults_disk.py for what makes up the RSS).
RSS_PEAK_BOUND_KIB = 160 * 1024
RSS_GROWTH_WHILE_STALLED_BOUND_KIB = 24 * 1024


@pytest.fixture(autouse=True)
def _streams_closed() -> Iterator[None]:
    yield
    close_streams()


@pytest.fixture
def freezable_disk(tmp_path: Path) -> Iterator[Path]:
    if not is_root():
        pytest.skip("needs root: mounts a loop device and freezes it with fsfreeze")
    if not have_tools("mkfs.ext4", "mount", "umount", "fsfreeze"):
        pytest.skip("needs mkfs.ext4, mount and fsfreeze")
    mountpoint = tmp_path / "disk"
    try:
        mount_loop_ext4(tmp_path / "disk.img", mountpoint, 256)
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"cannot loop-mount an ext4 image here: {exc} {detail.decode(errors='replace').strip()}")
    yield mountpoint
    unmount(mountpoint)  # thaws first; runs after daemon_factory has killed the daemon


@pytest.mark.slow
@pytest.mark.both_shapes
def test_frozen_filesystem_blocks_clients_bounds_memory_and_loses_nothing(
    freezable_disk: Path, daemon_factory: Any
) -> None:
    """Acked and un-acked streams while the log's filesystem is frozen for a while, then thawed."""
    cfg = write_config(
        freezable_disk.parent,
        listeners=[{"address": f"tcp://127.0.0.1:{free_port()}", "ack": True}],
        log={"path": "disk/logs/messages.log", "rejects_path": "disk/logs/rejects.log"},
        limits={"queue_bytes": 1 << 20},
        metrics={"address": "tcp://127.0.0.1:0", "health_stall_seconds": 1.0},
    )
    d = daemon_factory(cfg)
    mx = metrics_address(d)
    idle = rss_kib(d.pid)
    acked = [AckStream(d.tcp, c, RECORDS, window=5000) for c in range(CLIENTS)]
    # ~470-byte records: 50,000 of them (23 MB) are more than the kernel's socket buffers can hold
    # (several MB each way on loopback), so the stall must reach the clients.
    pushers = [Streamer(d.tcp, 100 + c, RECORDS, pad=400) for c in range(CLIENTS)]
    for s in [*acked, *pushers]:
        s.start()
    wait_for(lambda: sum(s.acked for s in acked) >= 5000 and sum(p.sent for p in pushers) >= 5000, 60)
    before = rss_kib(d.pid)
    subprocess.run(["fsfreeze", "-f", str(freezable_disk)], check=True, timeout=60)
    try:
        sampler = RssSampler(d.pid)
        wait_for(lambda: any("no progress" in p for p in healthz(mx)[1]["problems"]), 30)
        wait_for(lambda: d.event("reading_paused"), 30)
        # The clients block: their counts stop moving (not one more ack, not one more sendall).
        blocked_at = wait_stable(lambda: ([s.acked for s in acked], [p.sent for p in pushers]))
        assert sum(blocked_at[1]) < CLIENTS * RECORDS, "the streams finished before the stall"
        samples = scrape(mx)
        assert metric(samples, "nio_logd_backpressure_paused") >= 1
        # The queue is over its bound (one process), or over one worker's credit, its share of it:
        # a worker stops reading once its own credit is used up, whatever the others hold. With
        # workers the credit counts what the worker sent, the hub's queue what it has read from
        # the channel between them; under load the hub reads it a moment later: so does the check.
        credit = (1 << 20) // d.settings.server.worker_count
        wait_for(lambda: metric(scrape(mx), "nio_logd_queue_bytes") >= credit, 10, 0.5)
        assert healthz(mx)[0] == 503
        assert d.proc.poll() is None
        peak = sampler.stop()
    finally:
        subprocess.run(["fsfreeze", "-u", str(freezable_disk)], check=False, timeout=60)

    for s in acked:
        s.join(120)
    for p in pushers:
        p.finish()
    assert [s.error for s in acked] == [None] * CLIENTS
    assert [s.acked for s in acked] == [RECORDS] * CLIENTS
    wait_for(lambda: d.event("reading_resumed"), 30)
    wait_for(lambda: healthz(mx)[0] == 200, 30)
    paused_seconds = metric(scrape(mx), "nio_logd_backpressure_paused_seconds_total")
    assert d.stop() == 0

    counts = collections.Counter(logged_ids(d.messages))
    expected = {f"c{c}-{i}" for c in [*range(CLIENTS), *range(100, 100 + CLIENTS)] for i in range(RECORDS)}
    missing = expected - set(counts)
    growth = peak - before
    print(
        f"\n[stalled writer, fsfreeze] records={len(expected)} acked={sum(s.acked for s in acked)} "
        f"acked_when_stalled={sum(blocked_at[0])} sent_when_stalled={sum(blocked_at[1])} lost={len(missing)} "
        f"duplicates={sum(n - 1 for n in counts.values())} paused_seconds={paused_seconds:.1f} "
        f"rss_idle={idle // 1024} MiB before_stall={before // 1024} MiB peak_while_stalled={peak // 1024} MiB "
        f"growth_while_stalled={growth // 1024} MiB"
    )
    assert not missing, f"{len(missing)} records lost, e.g. {sorted(missing)[:5]}"
    assert set(counts) == expected and max(counts.values()) == 1
    assert peak < RSS_PEAK_BOUND_KIB, f"RSS reached {peak} KiB during the stall"
    assert growth < RSS_GROWTH_WHILE_STALLED_BOUND_KIB, f"RSS grew by {growth} KiB during the stall"
