"""The NATS JetStream end of a forwarder: connect, publish with a message id, collect the acks.

design: publishes go out with ``nc.publish`` and a reply subject of our own (one wildcard
subscription on a fresh inbox, ``<inbox>.<token>``), not with nats-py's ``publish_async``:
its futures never resolve when the server holding them dies, and a publish that raises leaves a
slot of its pending semaphore taken for ever. Here the caller owns every pending message and its
deadline; an answer is matched to its message by the token, and a late answer to an earlier send
of the same message is as good as the last one (same ``Nats-Msg-Id``: JetStream stored it once).
Every network wait has a timeout. ``Nats-Expected-Stream`` makes the server refuse a message
whose subject is not bound to the configured stream, instead of storing it elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ..config import ForwardSettings

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

OnAnswer = Callable[[str, str | None], None]  # token, None if stored or the error's text
CONNECT_TIMEOUT = 2
FLUSH_TIMEOUT = 5


def tls_context(settings: ForwardSettings, resolve: Callable[[str], Path]) -> ssl.SSLContext | None:
    """The client TLS context of a ``[forward.tls]`` table (None without one); OSError/SSLError if unreadable."""
    tls = settings.tls
    if tls is None:
        return None
    context = ssl.create_default_context(cafile=str(resolve(tls.ca)) if tls.ca else None)
    if tls.cert:
        context.load_cert_chain(str(resolve(tls.cert)), str(resolve(tls.key)) if tls.key else None)
    return context


class JetStreamLink:
    """One connection to the cluster, publishing to one subject of one stream."""

    def __init__(
        self,
        settings: ForwardSettings,
        tls: ssl.SSLContext | None,
        on_answer: OnAnswer,
        on_state: Callable[[str, str], None],
        resolve: Callable[[str], Path],
    ) -> None:
        self.settings = settings
        self.tls = tls
        self.on_answer = on_answer
        self.on_state = on_state  # ("disconnected" | "reconnected" | "error", detail)
        self.resolve = resolve
        self.nc: Client | None = None
        self.inbox = ""
        self.headers_base = {"Nats-Expected-Stream": settings.stream}

    def __repr__(self) -> str:
        return f"<JetStreamLink {list(self.settings.servers)} {self.settings.subject}>"

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self) -> None:
        """Connect (raises on failure); nats-py then reconnects by itself, without end."""
        s = self.settings
        options: dict[str, Any] = {
            "servers": list(s.servers),
            "connect_timeout": CONNECT_TIMEOUT,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 1,
            "ping_interval": 5,
            "max_outstanding_pings": 2,
            "name": f"nio-logd forward {s.label}",
            "disconnected_cb": self._disconnected,
            "reconnected_cb": self._reconnected,
            "error_cb": self._error,
            "pending_size": 8 << 20,
        }
        if self.tls is not None:
            options["tls"] = self.tls
        if s.user is not None and s.password is not None:
            options["user"], options["password"] = s.user, s.password.get_secret_value()
        if s.token is not None:
            options["token"] = s.token.get_secret_value()
        if s.creds is not None:
            options["user_credentials"] = str(self.resolve(s.creds))
        import nats  # here: a daemon without [[forward]], and every worker, never loads it (40 ms)

        nc = await nats.connect(**options)
        try:
            self.inbox = nc.new_inbox()
            await nc.subscribe(f"{self.inbox}.*", cb=self._answer)
            await nc.flush(timeout=FLUSH_TIMEOUT)
        except BaseException:
            await self._close(nc)
            raise
        self.nc = nc

    async def stream_exists(self, timeout: float) -> str | None:
        """None if the stream exists and takes the subject, else why not (bounded by ``timeout``)."""
        assert self.nc is not None
        js = self.nc.jetstream(timeout=timeout)
        try:
            info = await js.stream_info(self.settings.stream)
        except Exception as exc:  # noqa: BLE001 - NotFoundError, timeouts, no JetStream: all said as one line
            return f"stream {self.settings.stream}: {type(exc).__name__}: {exc}"
        subjects = info.config.subjects or []
        if not any(_matches(pattern, self.settings.subject) for pattern in subjects):
            return f"stream {self.settings.stream} does not take subject {self.settings.subject} (it takes {subjects})"
        return None

    async def publish(self, token: str, payload: bytes, msg_id: str) -> None:
        """Send one message (raises if the client cannot take it now: disconnected, buffer full)."""
        nc = self.nc
        assert nc is not None
        headers = {**self.headers_base, "Nats-Msg-Id": msg_id}
        await nc.publish(self.settings.subject, payload, reply=f"{self.inbox}.{token}", headers=headers)

    async def close(self) -> None:
        nc, self.nc = self.nc, None
        if nc is not None:
            await self._close(nc)

    @staticmethod
    async def _close(nc: Client) -> None:
        with contextlib.suppress(Exception):  # closing a dead connection: nothing more to do
            await asyncio.wait_for(nc.close(), timeout=3.0)

    # -- nats-py's callbacks -------------------------------------------------------------------
    async def _answer(self, msg: Msg) -> None:
        token = msg.subject[len(self.inbox) + 1 :]
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "503":
            self.on_answer(token, "no responders (no JetStream stream takes the subject, or no leader)")
            return
        try:
            reply = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            self.on_answer(token, f"unreadable answer {msg.data[:100]!r}")
            return
        if not isinstance(reply, dict):
            self.on_answer(token, f"unreadable answer {msg.data[:100]!r}")
        elif "error" in reply:
            error = reply["error"]
            text = error.get("description", str(error)) if isinstance(error, dict) else str(error)
            self.on_answer(token, str(text))
        elif reply.get("stream") == self.settings.stream:
            self.on_answer(token, None)
        else:
            self.on_answer(token, f"stored in stream {reply.get('stream')!r}, not {self.settings.stream!r}")

    async def _disconnected(self) -> None:
        self.on_state("disconnected", "")

    async def _reconnected(self) -> None:
        url = self.nc.connected_url if self.nc is not None else None
        self.on_state("reconnected", f"{url.netloc}" if url is not None else "")

    async def _error(self, exc: Exception) -> None:
        self.on_state("error", f"{type(exc).__name__}: {exc}")


def _matches(pattern: str, subject: str) -> bool:
    """Whether a NATS subject pattern (``*`` one token, ``>`` the rest) takes ``subject``."""
    want, have = pattern.split("."), subject.split(".")
    for i, part in enumerate(want):
        if part == ">":
            return len(have) > i
        if i >= len(have) or part not in ("*", have[i]):
            return False
    return len(want) == len(have)
