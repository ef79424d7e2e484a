"""The loop's epoll poller: real socket pairs, real readiness."""

from __future__ import annotations

import socket

import pytest

from nio_logd.wire.poller import READ, WRITE, Poller


def test_readable_writable_and_hang_up_are_reported_to_the_registered_handler() -> None:
    a, b = socket.socketpair()
    poller = Poller()
    seen: list[int] = []
    try:
        poller.register(a.fileno(), READ, seen.append)
        assert poller.poll(0) == []  # nothing to read yet
        b.send(b"x")
        ((handler, mask),) = poller.poll(1.0)
        handler(mask)
        assert seen == [READ]
        poller.modify(a.fileno(), READ | WRITE, seen.append)
        ((_, mask),) = poller.poll(1.0)
        assert mask == READ | WRITE
        a.recv(1)
        poller.modify(a.fileno(), READ, seen.append)
        b.close()  # a hang-up reports both: the handler reads (EOF) and flushes
        ((_, mask),) = poller.poll(1.0)
        assert mask == READ | WRITE
    finally:
        poller.close()
        a.close()
        b.close()


def test_registering_twice_and_unregistering_an_unknown_descriptor_raise_key_error() -> None:
    a, b = socket.socketpair()
    poller = Poller()
    try:
        poller.register(a.fileno(), READ, lambda _m: None)
        with pytest.raises(KeyError):
            poller.register(a.fileno(), READ, lambda _m: None)
        poller.unregister(a.fileno())
        with pytest.raises(KeyError):
            poller.unregister(a.fileno())
        assert len(poller) == 0
        b.send(b"x")
        assert poller.poll(0) == []  # unregistered: not reported
    finally:
        poller.close()
        a.close()
        b.close()


def test_an_idle_poll_waits_for_its_timeout_and_returns_nothing() -> None:
    a, b = socket.socketpair()
    poller = Poller()
    try:
        poller.register(a.fileno(), READ, lambda _m: None)
        assert poller.poll(0.05) == []
    finally:
        poller.close()
        a.close()
        b.close()
