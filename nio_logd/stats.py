"""What the daemon counts: one typed schema, summable across loops (and processes).

design: each counter lives in a slots dataclass field, bumped as a plain attribute by the one
thread that owns the object (a loop, the writer). Readers (metrics, the systemd STATUS line,
``/healthz``, the events) get a ``Stats`` from ``Server.snapshot()``, built by summing the
loops' ``LoopStats`` with ``add`` — integers add, dictionaries of counts add per key, nested
counts add field by field — so that worker processes can send theirs and be summed the same way.
Every counter kept here is exported by the metrics (``metrics.ServerCollector``).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field, fields
from typing import Any


def _add_into(into: Any, other: Any) -> None:
    for f in fields(into):
        mine = getattr(into, f.name)
        theirs = getattr(other, f.name)
        if isinstance(mine, dict):
            # dict() copies in C, holding the GIL: safe while the owning thread adds a key.
            for key, value in dict(theirs).items():
                mine[key] = mine.get(key, 0) + value
        elif isinstance(mine, (int, float)):
            setattr(into, f.name, mine + theirs)
        else:
            _add_into(mine, theirs)


@dataclass(slots=True)
class RecordCounts:
    """What the record pipeline counts."""

    accepted: int = 0
    refused: int = 0
    refused_by_reason: dict[str, int] = field(default_factory=dict)
    rejects_suppressed: int = 0  # reject lines left out by the per-connection rate (counted, not written)
    closed_refused_records: int = 0  # connections closed for sending nearly only refused records

    def add(self, other: RecordCounts) -> None:
        _add_into(self, other)


@dataclass(slots=True)
class LoopStats:
    """What one I/O loop counts (connections and their bytes), records included."""

    records: RecordCounts = field(default_factory=RecordCounts)
    connections_total: int = 0
    connections_refused: int = 0
    connections_refused_by_reason: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    idle_closed: int = 0
    closed_buffer_bytes: int = 0  # closed for holding the most when buffer_bytes was exceeded
    read_errors: int = 0
    handler_errors: int = 0
    accept_errors: int = 0
    accept_dead: int = 0  # reset before accept (a health check's RST)
    connections_handed_off: int = 0  # accepted here, sent to a worker process that held fewer
    pauses: int = 0
    paused_seconds: float = 0.0  # finished pauses; the current one is added by the reader
    rate_limited: int = 0
    incomplete_dropped: int = 0
    tls_handshakes: int = 0
    tls_handshake_failed: int = 0
    tls_handshake_incomplete: int = 0

    def add(self, other: LoopStats) -> None:
        _add_into(self, other)


@dataclass(slots=True)
class WriterStats:
    """What the writer counts and how it is doing now."""

    written: int = 0
    rejects_written: int = 0
    rejects_lost: int = 0
    write_errors: int = 0
    queue_bytes: int = 0
    queue_records: int = 0
    queue_limit: int = 0
    write_failing_seconds: float = 0.0
    writer_stalled_seconds: float = 0.0
    last_write_error: str = ""


@dataclass(slots=True)
class ForwardStats:
    """What one forwarder (a ``[[forward]]`` table) counts and how far behind it is now."""

    name: str = ""
    forwarded: int = 0  # records the engine acknowledged (since the daemon started)
    resent: int = 0  # publishes sent again (no ack in time, or an error answer)
    lag_bytes: int = 0  # bytes of the log past the acknowledged position
    lag_records: int = 0
    oldest_unforwarded_seconds: float = 0.0  # how long the oldest record not yet acknowledged has waited
    engine_errors: int = 0  # failed connects, error answers, timed-out acks
    lost_records: int = 0  # records known lost (a rotated file deleted before it was forwarded)
    lost_files: int = 0
    connected: bool = False
    lag_limit_bytes: int = 0
    lag_limit_seconds: float = 0.0
    last_error: str = ""

    @property
    def lagging(self) -> str | None:
        """Why the lag is past its threshold, or None."""
        if self.lag_limit_bytes and self.lag_bytes > self.lag_limit_bytes:
            return f"forward {self.name}: {self.lag_bytes} bytes not yet forwarded (limit {self.lag_limit_bytes})"
        if self.lag_limit_seconds and self.oldest_unforwarded_seconds > self.lag_limit_seconds:
            return (
                f"forward {self.name}: the oldest record not yet forwarded has waited "
                f"{self.oldest_unforwarded_seconds:.0f} s (limit {self.lag_limit_seconds:g} s)"
            )
        return None


@dataclass(slots=True)
class Stats:
    """The daemon's counters and gauges at one moment (``Server.snapshot()``)."""

    loops: LoopStats
    writer: WriterStats
    connections: int = 0  # open now
    buffered_bytes: int = 0
    paused_loops: int = 0
    paused_now_seconds: float = 0.0
    paused_seconds: float = 0.0
    threads_alive: bool = True
    stopping: bool = False
    fatal: str | None = None
    forward: tuple[ForwardStats, ...] = ()

    @property
    def paused(self) -> bool:
        return self.paused_loops > 0

    def as_dict(self) -> dict[str, Any]:
        """Flat ``name: value`` (the events' fields and the older readers' keys)."""
        loops, records, writer = self.loops, self.loops.records, self.writer
        return {
            "connections": self.connections,
            "connections_total": loops.connections_total,
            "connections_refused": loops.connections_refused,
            "connections_refused_by_reason": dict(loops.connections_refused_by_reason),
            "connections_handed_off": loops.connections_handed_off,
            "connections_closed_by_reason": {
                "idle_timeout": loops.idle_closed,
                "refused_records": records.closed_refused_records,
                "buffer_bytes": loops.closed_buffer_bytes,
            },
            "accepted": records.accepted,
            "refused": records.refused,
            "refused_by_reason": dict(records.refused_by_reason),
            "rejects_suppressed": records.rejects_suppressed,
            "bytes_in": loops.bytes_in,
            "buffered_bytes": self.buffered_bytes,
            "queue_bytes": writer.queue_bytes,
            "queue_records": writer.queue_records,
            "queue_limit": writer.queue_limit,
            "written": writer.written,
            "rejects_written": writer.rejects_written,
            "rejects_lost": writer.rejects_lost,
            "write_errors": writer.write_errors,
            "write_failing_seconds": writer.write_failing_seconds,
            "last_write_error": writer.last_write_error,
            "writer_stalled_seconds": writer.writer_stalled_seconds,
            "paused": self.paused,
            "paused_loops": self.paused_loops,
            "paused_now_seconds": self.paused_now_seconds,
            "paused_seconds": self.paused_seconds,
            "pauses": loops.pauses,
            "rate_limited": loops.rate_limited,
            "incomplete_dropped": loops.incomplete_dropped,
            "threads_alive": self.threads_alive,
            "stopping": self.stopping,
            "fatal": self.fatal,
            "idle_closed": loops.idle_closed,
            "read_errors": loops.read_errors,
            "handler_errors": loops.handler_errors,
            "accept_errors": loops.accept_errors,
            "accept_dead": loops.accept_dead,
            "tls_handshakes": loops.tls_handshakes,
            "tls_handshake_failed": loops.tls_handshake_failed,
            "tls_handshake_incomplete": loops.tls_handshake_incomplete,
            "forward": {
                f.name: {
                    "forwarded": f.forwarded,
                    "lag_bytes": f.lag_bytes,
                    "lag_records": f.lag_records,
                    "connected": f.connected,
                    "engine_errors": f.engine_errors,
                }
                for f in self.forward
            },
        }

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]


# Seconds; one write() or fsync() of a whole group of batches, from 100 µs to 30 s.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class LatencyHistogram:
    """Counts of durations per bucket; ``observe`` is called by one thread only (the writer)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def __repr__(self) -> str:
        return f"<LatencyHistogram count={sum(self.counts)} sum={self.total:.3f}>"

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """Prometheus buckets (``le`` label, cumulative count) and the sum of observations."""
        counts = list(self.counts)  # a copy: the writer may observe meanwhile
        out = []
        running = 0
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), counts, strict=True):
            running += n
            out.append((bound, float(running)))
        return out, self.total
