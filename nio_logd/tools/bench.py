"""``nio-logd bench``: a load generator against a running daemon (records/s, MB/s, ack latency).

design: the load comes from worker processes (multiprocessing), so the generator uses every core
and is not the bottleneck. Each worker drives its "lanes" (a stream connection, or a slot that
opens one connection per record) with non-blocking sockets and one selector, and sends
pre-joined chunks of records, so its cost per record is a fraction of a kernel copy. Records are
generated before the clock starts, deterministically from ``--seed`` and the lane number, so two
daemons benchmarked with the same arguments receive the same bytes. The parent starts every
worker at once (an Event), shows a progress line on a terminal, optionally watches the log file
grow (``--wait-file``: the clock then stops when the records are in the file, not merely sent),
and sums the workers' reports.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import queue
import random
import selectors
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import Address, parse_address
from ..errors import ClientError

STREAM = "stream"
ONE_PER_CONNECTION = "one-per-connection"
MODES = (STREAM, ONE_PER_CONNECTION)
MIN_RECORD_BYTES = 80  # a short user, a time and a few characters of text
CHUNK_RECORDS = 1024  # records joined into one send() buffer (about 128 KB)
POOL_CHUNKS = 20  # distinct chunks per lane before its records repeat
PROGRESS_EVERY = 0.25

_USERS = (
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
    "mallory",
    "niaj",
    "olivia",
    "peggy",
    "rupert",
    "sybil",
    "trent",
    "victor",
    "walter",
    "yolanda",
    "Lyon",
    "Paris",
    "Zoë",
    "Jürgen",
    "Łukasz",
    "Søren",
    "Renée",
    "José",
    "svc-backup",
    "cron@db-01",
    "web.frontend.3",
    "ci-runner-17",
    "root",
    "postgres",
    "nginx",
    "k8s/node-a",
    "Ана",
    "李雷",
)
_WORDS = (
    "the",
    "request",
    "completed",
    "in",
    "ms",
    "user",
    "logged",
    "out",
    "session",
    "expired",
    "cache",
    "miss",
    "for",
    "key",
    "retrying",
    "connection",
    "to",
    "upstream",
    "reset",
    "by",
    "peer",
    "disk",
    "usage",
    "at",
    "percent",
    "backup",
    "finished",
    "OK",
    "ERROR",
    "warning:",
    "GET",
    "/api/v1/items?id=42",
    "POST",
    "status=200",
    "status=503",
    "latency",
    "queue",
    "depth",
    "worker",
    "started",
    "stopped",
    "héllo",
    "naïve",
    "café",
    "über",
    "日本語",
    'said "hi"',
    "C:\\temp\\x",
    "tab\there",
    "{json: 'inside'}",
    "<html>",
    "a&b",
    "100%",
    "deploy",
    "v2.3.1",
    "rollback",
    "token=***",
    "timeout",
    "after",
    "3",
    "attempts",
    "ok",
    "--",
    "…",
    "✓",
    "price",
    "€12.50",
    "load",
    "0.73",
    "pid",
    "1234",
    "exit",
    "code",
    "0",
)


# -- records ----------------------------------------------------------------------------------------
def parse_record_bytes(text: str) -> tuple[int, int]:
    """``"120"`` or ``"100-150"``: the sizes of the generated records, newline not counted."""
    lo_text, sep, hi_text = text.partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
    except ValueError:
        raise ValueError(f"{text!r}: expected N or LO-HI, e.g. 100-150") from None
    if lo < MIN_RECORD_BYTES or hi < lo:
        raise ValueError(f"{text!r}: sizes must be at least {MIN_RECORD_BYTES} bytes and LO <= HI")
    return lo, hi


def make_record(rng: random.Random, size: int) -> bytes:
    """One valid record of exactly ``size`` bytes, with a varied user, time and text."""
    import orjson

    user = rng.choice(_USERS)
    second = rng.randrange(86400)
    hms = f"{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}"
    style = rng.random()
    if style < 0.8:
        when = f"2026-11-29 {hms}"  # what the original client sends
    elif style < 0.9:
        when = f"2026-11-29T{hms}Z"
    else:
        when = f"2026-11-29T{hms}+01:00"
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    msg = " ".join(words)

    def dump(text: str) -> bytes:
        return orjson.dumps({"send_user": user, "send_time": when, "send_msg": text})

    if len(dump("")) > size:  # a small size and a long user or time: make room
        user, when = "u", f"2026-11-29 {hms}"
    record = dump(msg)
    over = len(record) - size
    if over > 0:
        msg = msg[:-over].rstrip()  # each character is at least one byte: now at most ``size``
        record = dump(msg)
    if len(record) < size:
        record = dump(msg + "." * (size - len(record)))
    assert len(record) == size, (len(record), size)
    return record


def lane_pool(seed: int, lane: int, count: int, sizes: tuple[int, int], per_chunk: int) -> list[bytes]:
    """The distinct records of one lane: at most POOL_CHUNKS chunks' worth, then they repeat."""
    rng = random.Random(f"nio-logd-bench:{seed}:{lane}")  # noqa: S311 - test data, not secrets
    n = min(count, per_chunk * POOL_CHUNKS)
    lo, hi = sizes
    return [make_record(rng, rng.randint(lo, hi)) for _ in range(n)]


def lane_chunks(pool: list[bytes], count: int, per_chunk: int) -> list[tuple[bytes, int]]:
    """``count`` records of ``pool`` (cycled) as newline-terminated chunks: (bytes, records)."""
    cache: dict[tuple[int, int], bytes] = {}
    out: list[tuple[bytes, int]] = []
    size = len(pool)
    for start in range(0, count, per_chunk):
        n = min(per_chunk, count - start)
        key = (start % size, n)
        data = cache.get(key)
        if data is None:
            first = key[0]  # the pool is a whole number of chunks: a chunk never wraps around
            data = cache[key] = b"\n".join(pool[first : first + n]) + b"\n"
        out.append((data, n))
    return out


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal counts."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# -- what a run is ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Everything a run needs; pickled to the workers."""

    address: Address
    mode: str = STREAM
    connections: int = 8
    records: int = 100_000
    sizes: tuple[int, int] = (100, 150)
    ack: bool = False
    window: int = 1000
    processes: int = 2
    seed: int = 1
    timeout: float = 120.0

    @property
    def per_chunk(self) -> int:
        # With acks, a chunk must be well under the window, or the window would serialise sends.
        return min(CHUNK_RECORDS, max(1, self.window // 4)) if self.ack else CHUNK_RECORDS

    def lanes_of(self, worker: int) -> list[tuple[int, int]]:
        """(lane number, record count) for each lane this worker drives."""
        counts = split(self.records, self.connections)
        return [(lane, counts[lane]) for lane in range(worker, self.connections, self.processes)]


@dataclass
class WorkerReport:
    records: int = 0  # sent (and, with acks, answered)
    bytes: int = 0
    acked: int = 0
    refused: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    connections: int = 0
    started: float = 0.0
    finished: float = 0.0
    latencies: list[tuple[float, int]] = field(default_factory=list)  # (seconds, records)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(text)


def _new_socket(address: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    if address.scheme == "unix":
        family = socket.AF_UNIX
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    if family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _target(address: Address) -> str | tuple[str, int]:
    return address.path if address.scheme == "unix" else (address.host, address.port)


def _start_connect(address: Address) -> socket.socket:
    sock = _new_socket(address)
    err = sock.connect_ex(_target(address))
    if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
        sock.close()
        raise OSError(err, os.strerror(err))
    return sock


class _AckCounter:
    """Counts answer lines (and refusals) from a connection, and each record's latency."""

    __slots__ = ("acked", "counted", "partial", "pending", "refused")

    def __init__(self) -> None:
        self.partial = b""
        self.acked = 0
        self.refused = 0
        self.counted = 0  # records whose latency has been taken
        self.pending: deque[tuple[int, float]] = deque()  # (records sent up to here, when)

    def feed(self, data: bytes, now: float, latencies: list[tuple[float, int]]) -> None:
        cut = data.rfind(b"\n")
        if cut < 0:
            self.partial += data
            return
        whole = self.partial + data[: cut + 1]
        self.partial = data[cut + 1 :]
        lines = whole.count(b"\n")
        self.refused += lines - whole.count(b'"ok":true')
        self.acked += lines
        pending = self.pending
        while self.counted < self.acked and pending:
            end, sent_at = pending[0]
            upto = min(end, self.acked)
            latencies.append((now - sent_at, upto - self.counted))
            self.counted = upto
            if upto == end:
                pending.popleft()


class _StreamLane:
    """One connection that sends its records back to back, pipelined."""

    __slots__ = (
        "acks",
        "broken",
        "chunk",
        "chunk_records",
        "chunks",
        "done",
        "mask",
        "next_chunk",
        "sent",
        "shut",
        "sock",
        "total",
    )

    def __init__(self, sock: socket.socket, chunks: list[tuple[bytes, int]], total: int) -> None:
        self.sock = sock
        self.chunks = chunks
        self.total = total
        self.next_chunk = 0
        self.chunk: memoryview | None = None  # the rest of the chunk being sent
        self.sent = 0  # records fully handed to the kernel
        self.acks = _AckCounter()
        self.done = False
        self.shut = False  # write side shut down (all sent, no acks to wait for)
        self.broken = False
        self.mask = selectors.EVENT_READ | selectors.EVENT_WRITE
        self.chunk_records = 0

    def window_open(self, ack: bool, window: int) -> bool:
        """May the next chunk go out? Without acks always; with acks, within the window."""
        if not ack or self.sent == self.acks.acked:
            return True  # nothing in flight: send, even a chunk larger than the window
        return self.sent + self.chunks[self.next_chunk][1] - self.acks.acked <= window


class _Slot:
    """A connection slot that opens one connection per record (the seed client's pattern)."""

    __slots__ = ("acks", "begun", "index", "records", "sock")

    def __init__(self, records: list[bytes]) -> None:
        self.records = records
        self.index = 0
        self.sock: socket.socket | None = None
        self.begun = 0.0
        self.acks = _AckCounter()


class _Worker:
    """One generator process: drives its lanes, then reports."""

    def __init__(self, plan: Plan, index: int, start: Any, ready: Any, progress: Any) -> None:
        self.plan = plan
        self.index = index
        self.start = start  # an Event: the parent starts the clock and every worker at once
        self.ready = ready  # a Queue to the parent: ("set" | "report" | "failed", worker, payload)
        self.progress = progress  # shared counters, one per worker, for the progress line
        self.report = WorkerReport()
        self.sel = selectors.DefaultSelector()
        self.done = 0

    def main(self) -> None:
        try:
            if self.plan.mode == STREAM:
                self.run_stream()
            else:
                self.run_one_per_connection()
        except ClientError as exc:
            self.ready.put(("failed", self.index, str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which names it
            self.ready.put(("failed", self.index, f"{type(exc).__name__}: {exc}"))
            return
        finally:
            self.sel.close()
        self.ready.put(("report", self.index, asdict(self.report)))

    def wait_for_start(self) -> float:
        """Tell the parent the records are built (and connections open); wait for the start."""
        self.ready.put(("set", self.index, None))
        self.start.wait()
        self.report.started = now = time.monotonic()
        return now

    # -- stream: long connections, pipelined -----------------------------------------------------
    def run_stream(self) -> None:
        plan, report, sel = self.plan, self.report, self.sel
        per_chunk = plan.per_chunk
        streams: list[_StreamLane] = []
        for lane, count in plan.lanes_of(self.index):
            if not count:
                continue
            chunks = lane_chunks(lane_pool(plan.seed, lane, count, plan.sizes, per_chunk), count, per_chunk)
            sock = _new_socket(plan.address)
            sock.setblocking(True)
            sock.settimeout(plan.timeout)
            try:
                sock.connect(_target(plan.address))
            except OSError as exc:
                raise ClientError(f"cannot connect to {plan.address}: {exc.strerror or exc}") from None
            sock.setblocking(False)
            streams.append(_StreamLane(sock, chunks, count))
            report.connections += 1
        deadline = self.wait_for_start() + plan.timeout
        for lane_ in streams:
            sel.register(lane_.sock, lane_.mask, lane_)
        active = len(streams)
        ack = plan.ack
        while active:
            events = sel.select(1.0)
            now = time.monotonic()
            if now > deadline:
                report.error(f"timed out after {plan.timeout} s with {active} connections unfinished")
                break
            for key, mask in events:
                s: _StreamLane = key.data
                if s.done:
                    continue
                if mask & selectors.EVENT_WRITE:
                    self.stream_send(s, now)
                if mask & selectors.EVENT_READ and self.stream_read(s, now):
                    active -= 1
            self.progress[self.index] = sum(x.acks.acked if ack else x.sent for x in streams)
        report.finished = time.monotonic()
        for x in streams:
            report.records += x.acks.acked if ack else x.sent
            report.acked += x.acks.acked
            report.refused += x.acks.refused
            if not x.done:
                x.sock.close()

    def stream_read(self, s: _StreamLane, now: float) -> bool:
        """Answers (with acks) or the end of the connection; True once the lane is done."""
        ack = self.plan.ack
        try:
            data = s.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.report.error(f"recv: {exc.strerror or exc}")
            data = b""
        if data:
            s.acks.feed(data, now, self.report.latencies)
            if ack and s.sent < s.total and not s.broken:
                self.stream_send(s, now)  # answers open the window
            if not ack or s.acks.acked < s.total:
                return False
        elif (ack and s.acks.acked < s.total) or s.sent < s.total:
            self.report.error(f"the daemon closed a connection after {s.sent} of {s.total} records")
        s.done = True
        self.sel.unregister(s.sock)
        s.sock.close()
        return True

    def stream_send(self, s: _StreamLane, now: float) -> None:
        """Hand the kernel as much as it takes; with acks, no more than ``window`` records unanswered."""
        ack, window = self.plan.ack, self.plan.window
        while True:
            if s.chunk is None:
                if s.next_chunk >= len(s.chunks) or not s.window_open(ack, window):
                    break
                data, n = s.chunks[s.next_chunk]
                s.chunk = memoryview(data)
                s.next_chunk += 1
                s.chunk_records = n
            try:
                sent = s.sock.send(s.chunk)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.report.error(f"send: {exc.strerror or exc}")
                s.broken = True  # the read side sees the end and closes the lane
                break
            self.report.bytes += sent
            if sent < len(s.chunk):
                s.chunk = s.chunk[sent:]
                continue
            s.chunk = None
            s.sent += s.chunk_records
            if ack:
                s.acks.pending.append((s.sent, now))
        finished = s.chunk is None and s.next_chunk >= len(s.chunks)
        if finished and not ack and not s.shut:
            s.shut = True
            with contextlib.suppress(OSError):
                s.sock.shutdown(socket.SHUT_WR)  # the daemon closes once it has read everything
        wants_write = not s.broken and (s.chunk is not None or (not finished and s.window_open(ack, window)))
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if wants_write else 0)
        if mask != s.mask:
            s.mask = mask
            self.sel.modify(s.sock, mask, s)

    # -- one record per connection: the seed client's pattern ---------------------------------------
    def run_one_per_connection(self) -> None:
        plan, report, sel = self.plan, self.report, self.sel
        slots: list[_Slot] = []
        for lane, count in plan.lanes_of(self.index):
            if count:
                pool = lane_pool(plan.seed, lane, count, plan.sizes, CHUNK_RECORDS)
                slots.append(_Slot([pool[i % len(pool)] for i in range(count)]))
        deadline = self.wait_for_start() + plan.timeout
        active = sum(self.open_next(slot) for slot in slots)
        while active:
            events = sel.select(1.0)
            now = time.monotonic()
            if now > deadline:
                report.error(f"timed out after {plan.timeout} s")
                break
            for key, mask in events:
                slot: _Slot = key.data
                if self.slot_event(slot, mask, now) and not self.open_next(slot):
                    active -= 1
            self.progress[self.index] = self.done
        report.finished = time.monotonic()
        for slot in slots:
            report.acked += slot.acks.acked
            report.refused += slot.acks.refused
            if slot.sock is not None:
                slot.sock.close()

    def open_next(self, slot: _Slot) -> bool:
        """Start the slot's next connection; False when it has no record left."""
        while slot.index < len(slot.records):
            slot.begun = time.monotonic()
            try:
                slot.sock = _start_connect(self.plan.address)
            except OSError as exc:
                self.report.error(f"connect: {exc.strerror or exc}")
                slot.index += 1
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.EADDRNOTAVAIL):
                    time.sleep(0.01)
                continue
            slot.acks.partial = b""
            self.sel.register(slot.sock, selectors.EVENT_WRITE, slot)
            return True
        return False

    def slot_event(self, slot: _Slot, mask: int, now: float) -> bool:
        """Connected: send the record (and close); answered: close. True when this record is done."""
        sock = slot.sock
        assert sock is not None
        report = self.report
        finished = False
        if mask & selectors.EVENT_WRITE:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            record = slot.records[slot.index]
            try:
                if err:
                    raise OSError(err, os.strerror(err))
                sock.sendall(record)  # one small record: a fresh socket buffer takes it whole
            except OSError as exc:
                report.error(f"connect/send: {exc.strerror or exc}")
                finished = True
            else:
                report.bytes += len(record)
                report.connections += 1
                if self.plan.ack:
                    sock.shutdown(socket.SHUT_WR)  # the record ends at EOF; wait for its answer
                    self.sel.modify(sock, selectors.EVENT_READ, slot)
                    slot.acks.pending.append((slot.acks.acked + 1, slot.begun))
                else:
                    report.records += 1
                    finished = True
        elif mask & selectors.EVENT_READ:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                report.error(f"recv: {exc.strerror or exc}")
                data = b""
            finished = True
            if data:
                before = slot.acks.acked
                slot.acks.feed(data, now, report.latencies)
                if slot.acks.acked > before:
                    report.records += 1
                else:
                    finished = False  # a partial answer line: wait for the rest
            else:
                report.error("the daemon closed the connection without an answer")
        if finished:
            self.sel.unregister(sock)
            sock.close()
            slot.sock = None
            slot.index += 1
            self.done += 1
        return finished


def _worker_main(plan: Plan, index: int, start: Any, ready: Any, progress: Any) -> None:
    _Worker(plan, index, start, ready, progress).main()


# -- the log file, watched ----------------------------------------------------------------------------
class LineCounter:
    """Counts the lines appended to a file since it was created (cheap: reads only new bytes)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = self.start = self._size()
        self.lines = 0

    def _size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def poll(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return self.lines
        try:
            os.lseek(fd, self.offset, os.SEEK_SET)
            while True:
                data = os.read(fd, 8 << 20)
                if not data:
                    break
                self.offset += len(data)
                self.lines += data.count(b"\n")
        finally:
            os.close(fd)
        return self.lines

    def recount(self) -> int:
        """The lines between the start and the offset reached, read again at once: a check that
        the count taken a piece at a time while the file grew is the file's."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        lines, offset = 0, self.start
        try:
            while offset < self.offset:
                data = os.pread(fd, min(8 << 20, self.offset - offset), offset)
                if not data:
                    break
                offset += len(data)
                lines += data.count(b"\n")
        finally:
            os.close(fd)
        return lines


# -- the parent -------------------------------------------------------------------------------------
def _percentile(samples: list[tuple[float, int]], total: int, q: float) -> float:
    rank = max(1, math.ceil(q * total))
    seen = 0
    for value, count in samples:
        seen += count
        if seen >= rank:
            return value
    return samples[-1][0] if samples else 0.0


def run_bench(
    plan: Plan,
    *,
    wait_file: str | None = None,
    wait_slack: int = 0,
    settle: float = 3.0,
    progress_out: Any = None,
    on_started: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run one benchmark and return its results (the ``--json`` document).

    ``wait_file``: also stop a second clock when that file holds the records (at most
    ``wait_slack`` lines missing), then wait until its count is complete or has not changed for
    ``settle`` seconds. ``on_started`` is called right after the clock starts.
    """
    import multiprocessing  # only here: ``nio-logd --help`` should not pay for it

    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    ready = ctx.Queue()
    progress = ctx.Array("q", plan.processes, lock=False)
    procs = [
        ctx.Process(
            target=_worker_main, args=(plan, i, start, ready, progress), name=f"nio-logd-bench-{i}", daemon=True
        )
        for i in range(plan.processes)
    ]
    reports: dict[int, dict[str, Any]] = {}
    counter = LineCounter(wait_file) if wait_file else None
    try:
        for p in procs:
            p.start()
        waiting = set(range(plan.processes))
        limit = time.monotonic() + max(60.0, plan.timeout)
        while waiting:
            kind, worker, payload = ready.get(timeout=max(0.1, limit - time.monotonic()))
            if kind == "failed":
                raise ClientError(f"bench worker {worker}: {payload}")
            if kind == "set":
                waiting.discard(worker)
        if counter is not None:
            counter = LineCounter(counter.path)  # what the file held before our records
        t0 = time.monotonic()
        start.set()
        if on_started is not None:
            on_started()
        expected = plan.records
        written_at: float | None = None
        written_lines = 0
        sent_then = 0  # what the senders had sent when the clock stopped: the file cannot hold more
        last_show = 0.0
        show = progress_out is not None
        while len(reports) < plan.processes:
            try:
                kind, worker, payload = ready.get(timeout=0.005 if counter else PROGRESS_EVERY)
            except queue.Empty:
                kind, worker, payload = "", -1, None
            if kind == "failed":
                raise ClientError(f"bench worker {worker}: {payload}")
            if kind == "report":
                reports[worker] = payload
            now = time.monotonic()
            if counter is not None and written_at is None and counter.poll() >= expected - wait_slack:
                written_at, written_lines, sent_then = now, counter.lines, sum(progress)
            if show and now - last_show >= PROGRESS_EVERY:
                last_show = now
                _show_progress(progress_out, sum(progress), expected, now - t0, counter)
            if now - t0 > plan.timeout + 30 and not any(p.is_alive() for p in procs):
                raise ClientError("bench workers ended without a report")
        sent_done = max(r["finished"] for r in reports.values())
        written: dict[str, Any] | None = None
        if counter is not None:
            last_count, last_change = counter.poll(), time.monotonic()
            while True:
                now = time.monotonic()
                count = counter.poll()
                if written_at is None and count >= expected - wait_slack:
                    written_at, written_lines, sent_then = now, count, sum(progress)
                if count != last_count:
                    last_count, last_change = count, now
                if count >= expected or now - last_change >= settle or now - t0 > plan.timeout + settle:
                    break
                if show and now - last_show >= PROGRESS_EVERY:
                    last_show = now
                    _show_progress(progress_out, sum(progress), expected, now - t0, counter)
                time.sleep(0.005 if written_at is None else 0.05)
            written = {
                "file": counter.path,
                "lines": counter.lines,
                "complete": counter.lines >= expected,
                "seconds": round((written_at or now) - t0, 4),
                "slack_lines": wait_slack,
                "sent_when_counted": sent_then,
                "recounted_lines": counter.recount(),
            }
            written["records_per_s"] = round(written_lines / written["seconds"], 1) if written_at else None
        if show:
            progress_out.write("\r\x1b[K")
            progress_out.flush()
    finally:
        start.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)
        ready.close()
    return _summarise(plan, reports, t0, sent_done, written)


def _show_progress(out: Any, done: int, total: int, elapsed: float, counter: LineCounter | None) -> None:
    rate = done / elapsed if elapsed > 0 else 0.0
    text = f"\r  {done:,}/{total:,} records  {rate:,.0f} records/s  {elapsed:.1f} s"
    if counter is not None:
        text += f"  in file {counter.lines:,}"
    out.write(text + "\x1b[K")
    out.flush()


def _summarise(
    plan: Plan, reports: dict[int, dict[str, Any]], t0: float, sent_done: float, written: dict[str, Any] | None
) -> dict[str, Any]:
    records = sum(r["records"] for r in reports.values())
    nbytes = sum(r["bytes"] for r in reports.values())
    seconds = max(sent_done - t0, 1e-9)
    latencies = sorted(sample for r in reports.values() for sample in r["latencies"])
    answered = sum(count for _v, count in latencies)
    latency = None
    if plan.ack and answered:
        latency = {
            name: round(_percentile(latencies, answered, q) * 1000, 3)
            for name, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999))
        }
        latency["max"] = round(latencies[-1][0] * 1000, 3)
    samples = [s for r in reports.values() for s in r["error_samples"]]
    lo, hi = plan.sizes
    result: dict[str, Any] = {
        "address": str(plan.address),
        "mode": plan.mode,
        "connections": plan.connections,
        "processes": plan.processes,
        "records": plan.records,
        "record_bytes": {"min": lo, "max": hi},
        "ack": plan.ack,
        "window": plan.window if plan.ack else None,
        "seed": plan.seed,
        "sent": {
            "records": records,
            "bytes": nbytes,
            "seconds": round(seconds, 4),
            "records_per_s": round(records / seconds, 1),
            "mb_per_s": round(nbytes / seconds / 1e6, 2),
        },
        "connections_made": sum(r["connections"] for r in reports.values()),
        "acked": sum(r["acked"] for r in reports.values()) if plan.ack else None,
        "refused": sum(r["refused"] for r in reports.values()) if plan.ack else None,
        "latency_ms": latency,
        "errors": sum(r["errors"] for r in reports.values()),
        "error_samples": samples[:5],
        "written": written,
    }
    return result


def format_text(result: dict[str, Any]) -> str:
    """The human summary of ``run_bench``'s result."""
    sent = result["sent"]
    lo, hi = result["record_bytes"]["min"], result["record_bytes"]["max"]
    size = f"{lo}" if lo == hi else f"{lo}-{hi}"
    what = "acknowledged" if result["ack"] else "sent"
    lines = [
        f"nio-logd bench: {result['mode']} to {result['address']}, {result['connections']} connections "
        f"from {result['processes']} processes, {result['records']:,} records of {size} bytes"
        + (f", ack window {result['window']}" if result["ack"] else ""),
        f"  {what:<12} {sent['records']:>11,} records in {sent['seconds']:.3f} s: "
        f"{sent['records_per_s']:>11,.0f} records/s  {sent['mb_per_s']:.1f} MB/s",
    ]
    written = result["written"]
    if written is not None:
        rate = f"{written['records_per_s']:>11,.0f} records/s" if written["records_per_s"] else "incomplete"
        lines.append(
            f"  {'in the file':<12} {written['lines']:>11,} records in {written['seconds']:.3f} s: {rate}"
            + ("" if written["complete"] else f"  (INCOMPLETE: {written['lines']:,} of {result['records']:,})")
        )
    if result["ack"]:
        lines.append(f"  answers      {result['acked']:,} ({result['refused']:,} refusals)")
    if result["latency_ms"]:
        lat = result["latency_ms"]
        lines.append(
            f"  ack latency  p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms  p99.9 {lat['p99.9']:.2f} ms"
            f"  max {lat['max']:.2f} ms"
        )
    if result["errors"]:
        lines.append(f"  errors       {result['errors']:,}: " + "; ".join(result["error_samples"]))
    return "\n".join(lines)


# -- the command --------------------------------------------------------------------------------------
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _sizes(text: str) -> tuple[int, int]:
    try:
        return parse_record_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def bench_command(args: argparse.Namespace) -> tuple[int, str]:
    """``nio-logd bench``: run it; the exit code and the report to print (the CLI prints it)."""
    from ..errors import EXIT_FAILURE, EXIT_OK

    address_text = args.address
    if address_text is None:
        from ..config import load_settings

        address_text = load_settings(args.config).listeners[0].address
    try:
        address = parse_address(address_text)
    except ValueError as exc:
        raise ClientError(str(exc)) from None
    connections = args.connections
    processes = args.processes or min(connections, max(2, os.cpu_count() or 1))
    plan = Plan(
        address=address,
        mode=args.mode,
        connections=connections,
        records=args.records,
        sizes=args.record_bytes,
        ack=args.ack,
        window=args.window,
        processes=min(processes, connections),
        seed=args.seed,
        timeout=args.timeout,
    )
    if plan.records < plan.connections:
        raise ClientError(f"--records ({plan.records}) must be at least --connections ({plan.connections})")
    out = sys.stderr if sys.stderr.isatty() and not args.quiet else None
    result = run_bench(plan, wait_file=args.wait_file, wait_slack=args.wait_slack, progress_out=out)
    text = json.dumps(result, indent=2) if args.json else format_text(result)
    complete = result["sent"]["records"] == plan.records and not result["errors"]
    if result["written"] is not None:
        complete = complete and result["written"]["complete"]
    if plan.ack:
        complete = complete and not result["refused"]
    return (EXIT_OK if complete else EXIT_FAILURE), text


def register(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """Add ``bench`` to the ``nio-logd`` subcommands (the CLI sets its handler)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="load-generate against a running daemon: records/s, MB/s, ack latency",
        epilog="examples:\n"
        "  nio-logd bench --address tcp://127.0.0.1:8888 --records 1000000 --connections 8 "
        "--wait-file logs/messages.log\n"
        "  nio-logd bench --address tcp://127.0.0.1:8889 --ack --records 200000     # ack latency p50/p99/p99.9\n"
        "  nio-logd bench --mode one-per-connection --records 20000 --connections 4  # the seed client's pattern\n"
        "  nio-logd bench --records 100000 --json | jq .sent.records_per_s          # the config's first listener\n",
    )
    common(p)  # --config: its first listener is the default --address
    p.add_argument("--address", help="tcp://HOST:PORT or unix:///PATH (default: the config's first listener)")
    p.add_argument(
        "--connections",
        type=_positive,
        default=8,
        help="concurrent connections (default 8); in one-per-connection mode, concurrent slots",
    )
    p.add_argument("--records", type=_positive, default=100_000, help="records to send in all (default 100000)")
    p.add_argument(
        "--record-bytes",
        type=_sizes,
        default=(100, 150),
        metavar="N|LO-HI",
        help="size of each record without its newline (default 100-150)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default=STREAM,
        help="stream: pipelined on long connections; one-per-connection: connect, send one record "
        "without a newline, close (the seed client's pattern)",
    )
    p.add_argument(
        "--ack",
        action="store_true",
        help="the listener has ack = true: wait for every answer; report latency p50/p99/p99.9",
    )
    p.add_argument(
        "--window", type=_positive, default=1000, help="with --ack: records in flight per connection (default 1000)"
    )
    p.add_argument(
        "--processes",
        type=_positive,
        default=0,
        help="generator processes (default: the number of CPUs, at least 2, at most --connections)",
    )
    p.add_argument(
        "--wait-file",
        metavar="PATH",
        help="the daemon's messages log: also time until the records are in it (counts new lines)",
    )
    p.add_argument(
        "--wait-slack",
        type=int,
        default=0,
        metavar="N",
        help="with --wait-file: stop that clock when at most N lines are missing (default 0)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the generated records (default 1)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds (default 300)")
    p.add_argument("--json", action="store_true", help="print the results as JSON (for scripts)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p
