"""The daemon's memory bound: what each configured limit lets it hold, summed.

design: every byte the daemon holds for its clients is under one of the limits below, each
counting what is held (rendered lines, answers, unfinished lines), not what arrived. The figures
for the interpreter and for one connection were measured on Debian 12, CPython 3.11 (idle daemon
40 MiB; 1.1 KiB per plain connection, 16 KiB per TLS connection), then rounded up.
"""

from __future__ import annotations

from ..config import Settings
from ..forward.reader import RECENT
from ..output.copytruncate import JOURNAL_BYTES
from ..wire.ioloop import DEFER_BYTES, DEFER_CONNECTIONS, DEFER_FRAMES, RECV_BYTES

BASE_BYTES = 48 << 20  # the interpreter, pydantic-core, structlog, orjson, the threads' stacks in use
PLAIN_CONNECTION_BYTES = 4 << 10
TLS_CONNECTION_BYTES = 32 << 10


def pass_limit(queue_bytes: int) -> int:
    """Rendered bytes after which a pass hands its batch to the writer before it ends."""
    return max(RECV_BYTES, min(queue_bytes // 4, 8 << 20))


def memory_bound(settings: Settings) -> dict[str, int]:
    """The parts of the bound, in bytes, and their ``total``."""
    limits = settings.limits
    tls = any(listener.tls is not None for listener in settings.listeners)
    workers = settings.server.worker_count
    loops = workers * settings.server.io_threads
    parts = {
        # One interpreter per process: the hub and each worker (or the one process).
        "base": BASE_BYTES * (workers + 1 if workers > 1 else 1),
        # Batches queued for the writer, and the writer's joined copy of the group it writes.
        "writer_queue": 2 * limits.queue_bytes,
        # Each loop may hand over one more pass after the queue (a worker's credit) went over its bound.
        "pass_overshoot": loops * pass_limit(limits.queue_bytes // workers),
        # Unfinished lines, records read but not taken yet, unsent answers: over all connections.
        "buffers": limits.buffer_bytes,
        # A burst's first reads waiting to be validated together (IOLoop.take_frames), per loop:
        # their bytes and, at most DEFER_FRAMES a connection, their objects.
        "burst_reads": loops * (DEFER_BYTES + DEFER_CONNECTIONS * DEFER_FRAMES * 64),
        # The connections' own objects (socket, framer; OpenSSL's buffers with TLS).
        "connections": limits.max_connections * (TLS_CONNECTION_BYTES if tls else PLAIN_CONNECTION_BYTES),
        # The last bytes written to each of the two files, to repair a copytruncate.
        "copytruncate_journal": 2 * JOURNAL_BYTES,
    }
    if settings.forward:
        # Each forwarder's reader keeps the last bytes it read (to find a copytruncate copy), and
        # copies them once when the log is truncated.
        parts["forward_recent"] = len(settings.forward) * 2 * RECENT
    if workers > 1:
        # A worker keeps only the acks and the size of a batch it has sent (ipc.RemoteWriter.submit):
        # its lines are the hub's, in writer_queue. While one is being sent, both ends hold it (the
        # hub's receive buffer is made whole first): one batch a loop, a pass at most.
        parts["batches_in_transit"] = loops * pass_limit(limits.queue_bytes // workers)
    parts["total"] = sum(parts.values())
    return parts
