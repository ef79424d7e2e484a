"""The loop's readiness poller: epoll, one handler per file descriptor.

design: what ``selectors.EpollSelector`` gives the loop, without the work its generality costs
on every call (a ``SelectorKey`` per registration, a file-object lookup, ``socket.fileno()``),
which the one-record-per-connection pattern pays three times a connection. Handlers are looked
up when ``poll`` returns, as the selectors module does: a handler that closes another
connection in the same pass leaves that connection's handler to find itself closed. Masks are
``READ`` and ``WRITE``, the values of ``selectors.EVENT_READ`` and ``EVENT_WRITE``; an error or
a hang-up reports both, so the handler reads (and sees EOF or the error) and flushes.
"""

from __future__ import annotations

import select
from collections.abc import Callable

READ = 1
WRITE = 2
_TO_EPOLL = (0, select.EPOLLIN, select.EPOLLOUT, select.EPOLLIN | select.EPOLLOUT)
_NOT_IN = ~select.EPOLLIN
_NOT_OUT = ~select.EPOLLOUT

Handler = Callable[[int], None]


class Poller:
    """epoll with a handler per registered descriptor."""

    __slots__ = ("_epoll", "_handlers")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}

    def __repr__(self) -> str:
        return f"<Poller {len(self._handlers)} registered>"

    def __len__(self) -> int:
        return len(self._handlers)

    def register(self, fd: int, events: int, handler: Handler) -> None:
        """Watch ``fd`` for ``events`` (READ, WRITE or both); raise KeyError if it is watched."""
        if fd in self._handlers:
            raise KeyError(f"descriptor {fd} is already registered")
        self._epoll.register(fd, _TO_EPOLL[events])
        self._handlers[fd] = handler

    def modify(self, fd: int, events: int, handler: Handler) -> None:
        self._epoll.modify(fd, _TO_EPOLL[events])
        self._handlers[fd] = handler

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``; KeyError if it was not watched. Call it before closing ``fd``."""
        del self._handlers[fd]
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # closed already: the kernel dropped it from the set when it closed

    def poll(self, timeout: float | None) -> list[tuple[Handler, int]]:
        """Wait up to ``timeout`` seconds (None: until something is ready); the ready handlers
        with their masks."""
        handlers = self._handlers
        ready = self._epoll.poll(-1 if timeout is None else timeout, max(len(handlers), 1))
        out: list[tuple[Handler, int]] = []
        for fd, ev in ready:
            handler = handlers.get(fd)
            if handler is not None:
                out.append((handler, (WRITE if ev & _NOT_IN else 0) | (READ if ev & _NOT_OUT else 0)))
        return out

    def close(self) -> None:
        self._handlers.clear()
        self._epoll.close()
