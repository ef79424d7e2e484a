"""Who may connect: allowed networks per listener, and a limiter for the events refusals log.

design: a listener's ``allow`` networks are compiled once into (network, mask) integer pairs per
address family, so the check at accept is an ``inet_pton`` and a few integer operations. IPv4
addresses that arrive IPv4-mapped on an IPv6 socket (``::ffff:127.0.0.1``) are checked against
the IPv4 networks.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterable

_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


class AllowList:
    """The networks a listener accepts connections from; empty means everyone."""

    __slots__ = ("_v4", "_v6", "networks")

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        self._v4 = tuple((int(n.network_address), int(n.netmask)) for n in self.networks if n.version == 4)
        self._v6 = tuple((int(n.network_address), int(n.netmask)) for n in self.networks if n.version == 6)

    def __repr__(self) -> str:
        return f"<AllowList {[str(n) for n in self.networks]}>"

    def __bool__(self) -> bool:
        return bool(self.networks)

    def permits(self, host: str) -> bool:
        """True if ``host`` (as in a peer name: ``127.0.0.1``, ``[::1]``, ``fe80::1%eth0``) may connect.

        Anything that is not an IP address (``unknown``: the peer vanished before we could ask)
        is refused when the list is not empty.
        """
        if not self.networks:
            return True
        text = host.strip("[]").partition("%")[0]
        try:
            packed = socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
        except OSError:
            return False
        if len(packed) == 16 and packed.startswith(_MAPPED_PREFIX):
            packed = packed[12:]
        value = int.from_bytes(packed, "big")
        table = self._v4 if len(packed) == 4 else self._v6
        return any(value & mask == network for network, mask in table)


class OncePer:
    """Say whether an event about a key should be logged: at most once per ``interval`` per key.

    ``check(key)`` returns None while the key is muted, else how many events were muted since the
    last one logged (0 the first time). Thread-safe. Memory is bounded: past ``max_keys`` keys,
    expired ones are dropped, and if that is not enough every further new key shares one entry.
    """

    __slots__ = ("_last", "_lock", "_muted", "interval", "max_keys")

    OVERFLOW = "(other addresses)"

    def __init__(self, interval: float = 60.0, max_keys: int = 10_000) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._muted: dict[str, int] = {}
        self._lock = threading.Lock()

    def check(self, key: str, now: float | None = None) -> int | None:
        now = time.monotonic() if now is None else now
        with self._lock:
            last = self._last.get(key)
            if last is None and len(self._last) >= self.max_keys:
                self._prune(now)
                if len(self._last) >= self.max_keys:
                    key = self.OVERFLOW
                    last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._muted[key] = self._muted.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._muted.pop(key, 0)

    def _prune(self, now: float) -> None:
        expired = [k for k, t in self._last.items() if now - t >= self.interval]
        for k in expired:
            del self._last[k]
            self._muted.pop(k, None)
