"""Moving a connection just accepted to a worker that holds fewer.

SO_REUSEPORT gives each TCP connection to a worker by a hash of its addresses, which spreads many
connections well and a few badly: in the bench's runs the 8 connections were split 58/42, 68/32
and 86/14 between two workers, and the busier one set the pace while the other idled.

design: one Unix seqpacket socket pair per worker (its inbox; messages kept whole, as datagrams
would be, while the daemon holds no datagram socket outside systemd), made by the hub and held
open by it for its whole life, so a restarted worker gets the same inbox with whatever was sent to
the one before it. Every worker gets its inbox's receiving end and every worker's sending end. A worker that has
just admitted a TCP connection, from which nothing has been read, while it holds at least two more
than a worker that takes connections, sends it there: the socket (SCM_RIGHTS) with the listener's
index, the peer and the client's address. Not a connection whose client has shut its side already
(POLLRDHUP, one record a connection): all it will send is waiting, and it is served and closed
here at once, for less than the move would cost. The choice and the send happen under the shared counts'
lock (``admission.py``), and a worker stops taking connections under that lock too, before it
drains: whatever was sent to it is in its inbox by then, and it reads its inbox to the end as it
drains, so no connection handed over is dropped. A send that fails (a full inbox) keeps the
connection where it was accepted.
"""

from __future__ import annotations

import _socket
import array
import select
import socket
import struct

from ..wire.listeners import Listener
from .admission import SharedCounts

_HEAD = struct.Struct("!HH")  # the listener's index, the peer's length in bytes; then peer, client address
MAX_MESSAGE = 4096
PER_EVENT = 64  # connections taken from the inbox per readiness event (all of them when draining)


def inboxes(workers: int) -> list[tuple[socket.socket, socket.socket]]:
    """The hub: one (receiving end, sending end) pair per worker."""
    pairs = []
    for _ in range(workers):
        receive, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        receive.setblocking(False)
        send.setblocking(False)
        pairs.append((receive, send))
    return pairs


def _closed_by_client(sock: _socket.socket) -> bool:
    """The client has shut its side already: what it sent waits in the kernel, nothing more comes."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return bool(poller.poll(0))


def _encode(index: int, peer: str, host: str) -> bytes:
    peer_bytes = peer.encode("utf-8", "surrogateescape")
    return _HEAD.pack(index, len(peer_bytes)) + peer_bytes + host.encode("utf-8", "surrogateescape")


def _decode(data: bytes) -> tuple[int, str, str]:
    index, size = _HEAD.unpack_from(data)
    start = _HEAD.size
    peer = data[start : start + size].decode("utf-8", "surrogateescape")
    host = data[start + size :].decode("utf-8", "surrogateescape")
    return index, peer, host


class Handoff:
    """One worker's side: offering connections to lighter workers, and taking those sent to it."""

    def __init__(
        self,
        index: int,
        inbox: socket.socket,
        outboxes: list[socket.socket],
        shared: SharedCounts,
        listeners: list[Listener],
    ) -> None:
        self.index = index
        self.inbox = inbox
        self.outboxes = outboxes  # by worker index (this worker's own is never used)
        self.shared = shared
        self.listeners = listeners

    def __repr__(self) -> str:
        return f"<Handoff worker={self.index} of {self.shared.workers}>"

    def fileno(self) -> int:
        return self.inbox.fileno()

    def taking(self, on: bool) -> None:
        """Start (once serving) or stop (before draining) taking connections handed over."""
        with self.shared:
            self.shared.set_taking(self.index, on)

    def offer(self, sock: _socket.socket, listener: Listener, peer: str, host: str) -> bool:
        """Send ``sock`` (admitted here, nothing read from it) to a lighter worker; True if sent,
        and then this worker has closed its copy and no longer counts it."""
        shared = self.shared
        if shared.lighter(self.index) is None:  # without the lock: the common, balanced case
            return False
        if _closed_by_client(sock):
            return False  # sent all it will and closed (one record a connection): served here at once
        try:
            listener_index = self.listeners.index(listener)
        except ValueError:
            return False
        with shared:
            target = shared.lighter(self.index)
            if target is None:
                return False
            fds = array.array("i", [sock.fileno()])
            try:
                self.outboxes[target].sendmsg(
                    [_encode(listener_index, peer, host)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
                )
            except OSError:
                return False  # its inbox is full (or gone): served here
            shared.moved_out(self.index, target, host)
        sock.close()
        return True

    def receive(self, *, everything: bool = False) -> list[tuple[_socket.socket, Listener, str, str]]:
        """The connections waiting in the inbox (at most PER_EVENT unless ``everything``), now
        counted as this worker's: (socket, listener, peer, client address)."""
        out: list[tuple[_socket.socket, Listener, str, str]] = []
        while everything or len(out) < PER_EVENT:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.inbox, MAX_MESSAGE, 1)
            except (BlockingIOError, InterruptedError):
                break
            if not fds:
                continue
            sock = socket.socket(fileno=fds[0])
            # The descriptor is non-blocking already (the sender set it); the socket object made
            # here must know it too, or TLS would wait inside the handshake and hold the loop.
            sock.setblocking(False)
            try:
                index, peer, host = _decode(data)
                listener = self.listeners[index]
            except (struct.error, IndexError):
                sock.close()  # cannot be: only this daemon's workers write here
                with self.shared:
                    self.shared.moved_in(self.index, None)
                continue
            with self.shared:
                self.shared.moved_in(self.index, host)
            out.append((sock, listener, peer, host))
        return out
