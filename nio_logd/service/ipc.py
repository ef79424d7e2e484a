"""The channel between a worker process and the process that owns the files (the hub).

design: one Unix stream socket pair per worker, made by the hub before it starts the worker. A
message is a 5-byte header (kind, payload length) and its payload. The hub's first message
(``BOOT``) holds a digest of its code, and a worker refuses to run under other code. The worker
sends the batches its loops rendered (``BATCH``: sequence number, counts, the messages bytes and
the rejects bytes, sent as they are, never re-encoded), its reports (``STATS``) and its events
(``EVENT``); the hub answers with the highest sequence number written (``DONE``: batches are
written in the order they arrive, so one number covers every batch before it), and sends requests
(``QUERY``, ``SETTINGS``, ``STOP``, ``FORCE``).

Credit-based backpressure: the worker's ``RemoteWriter`` counts the bytes it has sent and not yet
seen written; past its credit (its share of ``[limits] queue_bytes``) ``submit`` tells the loop to
stop reading its sockets, and the loop reads again once half of it is written. So the hub never
holds more than the credits of its workers, and never has to stop reading a worker's socket.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..output.writer import Batch, Completion
from ..stats import WriterStats

BATCH = 1  # worker -> hub: rendered lines
STATS = 2  # worker -> hub: a Stats (the answer to QUERY)
EVENT = 3  # worker -> hub: one rendered event line for the hub's stderr
READY = 4  # worker -> hub: every loop of the worker runs and listens
DONE = 10  # hub -> worker: every batch up to this sequence number is written
QUERY = 11  # hub -> worker: send a STATS
SETTINGS = 12  # hub -> worker: reloaded settings to apply
STOP = 13  # hub -> worker: stop accepting, drain, exit
FORCE = 14  # hub -> worker: the drain is over (a second signal): close everything, exit
BOOT = 15  # hub -> worker, the first message: the hub's code_identity(), then the pickled Bootstrap

HEADER = struct.Struct("!BI")
BATCH_HEAD = struct.Struct("!QIII")  # seq, accepted, refused, len(messages); then messages, rejects
SEQ = struct.Struct("!Q")
# What one message may carry: a batch is at most a pass's limit (8 MiB) plus one pass of lines.
MAX_PAYLOAD = 1 << 30
SOCKET_BUFFER = 4 << 20


@functools.cache
def code_identity() -> bytes:
    """A digest of this package's Python source (32 bytes). Both ends of a channel must run the
    same code: its messages are pickled, and the shared counts' layout is this code's. A worker
    started after an upgrade on disk would not be the hub's (the worker is a fresh interpreter)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode("utf-8", "surrogateescape") + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError as exc:
            digest.update(f"unreadable: {exc.errno}".encode())
        digest.update(b"\0")
    return digest.digest()


class ChannelClosed(Exception):
    """The other end has gone (EOF, reset, or a message that breaks the protocol)."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """The hub's end and the worker's end (the worker's is inheritable, for pass_fds)."""
    hub, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (hub, worker):
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass  # the kernel's cap (net.core.wmem_max) applies; smaller only costs syscalls
    return hub, worker


def send_parts(sock: socket.socket, parts: list[bytes | bytearray | memoryview]) -> None:
    """Send every byte of ``parts``, in order, with as few system calls as the kernel allows."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            first = views[0]
            if sent >= len(first):
                sent -= len(first)
                views.pop(0)
            else:
                views[0] = first[sent:]
                sent = 0


def message(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes, or ChannelClosed.

    One call for the whole message as a rule (``MSG_WAITALL``: the kernel waits for all of it, on
    the channel's blocking socket), into a buffer of its own that is not zero-filled first, as a
    ``bytearray(n)`` to receive into would be (8 % of the hub's CPU in a stream). A short read (a
    signal) is finished piece by piece.
    """
    try:
        data = sock.recv(n, socket.MSG_WAITALL)
    except OSError as exc:
        raise ChannelClosed(str(exc)) from None
    if len(data) == n:
        return data
    if not data:
        raise ChannelClosed("end of stream")
    buf = bytearray(n)
    buf[: len(data)] = data
    view = memoryview(buf)
    got = len(data)
    while got < n:
        try:
            k = sock.recv_into(view[got:])
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None
        if not k:
            raise ChannelClosed("end of stream")
        got += k
    view.release()
    return bytes(buf)


def recv_head(sock: socket.socket) -> tuple[int, int]:
    """A message's kind and payload size."""
    kind, size = HEADER.unpack(recv_exact(sock, HEADER.size))
    if size > MAX_PAYLOAD:
        raise ChannelClosed(f"a message of {size} bytes")
    return int(kind), int(size)


def recv_payload(sock: socket.socket, size: int) -> bytes:
    return recv_exact(sock, size) if size else b""


def recv_message(sock: socket.socket) -> tuple[int, bytes]:
    kind, size = recv_head(sock)
    return kind, recv_payload(sock, size)


def recv_batch(sock: socket.socket, size: int) -> tuple[int, int, int, bytes, bytes]:
    """A ``BATCH`` payload of ``size`` bytes: seq, accepted, refused, the messages, the rejects.

    The messages and the rejects are read into buffers of their own: the writer's copytruncate
    journal keeps the messages it wrote, and a view into the whole payload would keep the
    rejects (and the header) alive with them."""
    if size < BATCH_HEAD.size:
        raise ChannelClosed(f"a batch of {size} bytes")
    seq, accepted, refused, n = BATCH_HEAD.unpack(recv_exact(sock, BATCH_HEAD.size))
    rest = size - BATCH_HEAD.size
    if n > rest:
        raise ChannelClosed(f"a batch of {size} bytes says it holds {n} bytes of messages")
    return int(seq), int(accepted), int(refused), recv_payload(sock, n), recv_payload(sock, rest - n)


def dumps(obj: Any) -> bytes:
    """Pickled: both ends are this program, started by the hub over a socket pair nobody else has."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes | bytearray) -> Any:
    return pickle.loads(data)  # noqa: S301 - see dumps


class RemoteWriter:
    """The worker's writer: batches go to the hub, and come back written (``DONE``).

    It offers what a loop uses of ``output.writer.Writer`` (``submit``, ``depth``, ``high_water``)
    and what ``Server`` uses (``stats``, ``alive``, ``stop`` …), so a worker's loops and server are
    the single-process ones.
    """

    def __init__(self, sock: socket.socket, credit: int) -> None:
        self.sock = sock
        self.high_water = credit
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._seq = 0
        self._pending: dict[int, Batch] = {}  # sent, not yet written (in order of seq)
        self._depth = 0
        self._paused: set[Completion] = set()
        self.closed = False  # the hub has gone
        self.on_fatal: Callable[[str, BaseException], None] | None = None

    def __repr__(self) -> str:
        return f"<RemoteWriter pending={len(self._pending)} depth={self._depth}>"

    # -- what the loops call ----------------------------------------------------------------------
    def submit(self, batch: Batch) -> bool:
        """Send a batch to the hub; True when the credit is used up and the caller must stop reading."""
        with self._send_lock:
            if self.closed:
                return True  # nothing will be written any more: stop reading, the records stay unacked
            self._seq += 1
            seq = self._seq
            with self._cond:
                self._pending[seq] = batch
                self._depth += batch.nbytes
                over = self._depth >= self.high_water
                if over and batch.owner is not None:
                    self._paused.add(batch.owner)
            head = BATCH_HEAD.pack(seq, batch.accepted, batch.refused, len(batch.messages))
            size = BATCH_HEAD.size + len(batch.messages) + len(batch.rejects)
            try:
                send_parts(self.sock, [HEADER.pack(BATCH, size), head, batch.messages, batch.rejects])
            except OSError:
                self._lost()
                return True
            # The lines are the hub's now: only the batch's acks and size wait here for DONE, so a
            # worker does not hold a second copy of what its credit lets the hub hold.
            batch.messages = batch.rejects = b""
        return over

    def send(self, kind: int, payload: bytes = b"") -> bool:
        """Any thread: one message to the hub; False if the hub has gone."""
        with self._send_lock:
            if self.closed:
                return False
            try:
                send_parts(self.sock, [HEADER.pack(kind, len(payload)), payload])
            except OSError:
                self._lost()
                return False
        return True

    @property
    def depth(self) -> int:
        return self._depth

    # -- what the channel's reader calls ------------------------------------------------------------
    def written(self, upto: int) -> None:
        """``DONE``: every batch up to ``upto`` is written; give each back to its loop."""
        done: list[Batch] = []
        with self._cond:
            for seq in list(self._pending):  # in the order sent: stop at the first not written
                if seq > upto:
                    break
                batch = self._pending.pop(seq)
                self._depth -= batch.nbytes
                done.append(batch)
            resume = self._paused if self._depth <= self.high_water // 2 else set()
            if resume:
                self._paused = set()
            self._cond.notify_all()
        for batch in done:
            if batch.owner is not None:
                batch.owner.batch_done(batch)
        for owner in resume:
            owner.resume_reading()

    def _lost(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def hub_gone(self) -> None:
        """The reader saw the channel close: nothing sent and not answered will be written."""
        self._lost()

    # -- what Server calls --------------------------------------------------------------------------
    def open(self) -> None:
        """The hub opened the files."""

    def start(self) -> None:
        """The channel's reader is started by the worker."""

    @property
    def alive(self) -> bool:
        return not self.closed

    def stats(self) -> WriterStats:
        """The hub's writer reports the files; a worker only says what it has in flight."""
        return WriterStats(queue_bytes=self._depth, queue_limit=self.high_water)

    def stalled_seconds(self) -> float:
        return 0.0

    def apply(self, *, fsync: bool, fsync_max_wait: float, rotate_bytes: int, rotate_keep: int) -> None:
        """The files are the hub's: nothing to apply here."""

    def request_reopen(self) -> None:
        """The files are the hub's."""

    def stop(self, timeout: float | None = None) -> bool:
        """Wait until every batch sent is written (or the hub has gone); True if all were."""
        with self._cond:
            self._cond.wait_for(lambda: not self._pending or self.closed, timeout)
            return not self._pending
