"""``nio-logd tail --from nats://HOST:PORT/STREAM``: read the JetStream stream all hosts forward to.

design: an ephemeral pull consumer without acks (``AckPolicy.NONE``; the server drops it after
``INACTIVE`` seconds unused, and we delete it when done), reading from the first message, from a
start time (``--since``, less a margin for clocks and forwarding delay) or from the last N.
What the stream held when we started is "the past" (``on_batch(..., past=True)``, then
``on_caught_up``); with ``follow`` new messages come as they are stored. Every network wait is
bounded; an unreachable server or a missing stream is a ClientError with one line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..errors import ClientError, UsageError

CONNECT_TIMEOUT = 3
API_TIMEOUT = 5.0
FETCH_BATCH = 1000
FETCH_WAIT = 1.0
INACTIVE = 60.0  # seconds before the server removes a consumer nobody reads (we were killed)
SINCE_MARGIN = timedelta(minutes=5)  # records are stored after they are written, by hosts' clocks


@dataclass(frozen=True, slots=True)
class StreamURL:
    """``nats://HOST:PORT/STREAM`` (or ``tls://``): the server to ask and the stream to read."""

    server: str
    stream: str

    @classmethod
    def parse(cls, text: str) -> StreamURL:
        scheme, sep, rest = text.partition("://")
        if not sep or scheme not in ("nats", "tls"):
            raise UsageError(f"--from {text!r}: expected nats://HOST:PORT/STREAM")
        hostport, slash, stream = rest.partition("/")
        stream = stream.strip("/")
        if not hostport or not slash or not stream or any(c in stream for c in " .*>/"):
            raise UsageError(f"--from {text!r}: expected nats://HOST:PORT/STREAM (a stream name after the /)")
        return cls(f"{scheme}://{hostport}", stream)


Batch = Callable[[list[bytes], bool], None]  # the messages' data, and whether they were in the stream at the start


def read_stream(
    url: StreamURL,
    *,
    last: int | None,
    since: datetime | None,
    follow: bool,
    on_batch: Batch,
    on_caught_up: Callable[[], None],
) -> None:
    """Read the stream (from the ``last`` N, or since ``since``, else all); raise ClientError."""
    try:
        asyncio.run(_read(url, last=last, since=since, follow=follow, on_batch=on_batch, on_caught_up=on_caught_up))
    except ClientError:
        raise
    except (TimeoutError, OSError) as exc:
        raise ClientError(f"{url.server}: {type(exc).__name__}: {exc}") from None


async def _read(
    url: StreamURL,
    *,
    last: int | None,
    since: datetime | None,
    follow: bool,
    on_batch: Batch,
    on_caught_up: Callable[[], None],
) -> None:
    import nats
    from nats.errors import Error as NatsError
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
    from nats.js.errors import NotFoundError

    async def quiet(_exc: Exception) -> None:
        pass  # nats-py would print each failed attempt with a traceback; the outcome is reported once

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                [url.server],
                connect_timeout=CONNECT_TIMEOUT,
                allow_reconnect=follow,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                error_cb=quiet,
            ),
            CONNECT_TIMEOUT + 2,
        )
    except TimeoutError:
        raise ClientError(
            f"cannot connect to {url.server}: no NATS server answered within {CONNECT_TIMEOUT + 2} s"
        ) from None
    except Exception as exc:  # noqa: BLE001 - NoServersError, refused, TLS: one line
        raise ClientError(f"cannot connect to {url.server}: {type(exc).__name__}: {exc}".rstrip(": ")) from None
    try:
        js = nc.jetstream(timeout=API_TIMEOUT)
        try:
            info = await js.stream_info(url.stream)
        except NotFoundError:
            raise ClientError(f"{url.server}: no stream {url.stream!r}") from None
        except (TimeoutError, NatsError) as exc:
            raise ClientError(f"{url.server}: stream {url.stream!r}: {type(exc).__name__}: {exc}") from None
        end = int(info.state.last_seq)
        first = int(info.state.first_seq)
        config = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=INACTIVE)
        if last == 0:
            config.deliver_policy = DeliverPolicy.NEW
        elif last is not None:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = max(first, end - last + 1, 1)
        elif since is not None:
            config.deliver_policy = DeliverPolicy.BY_START_TIME
            config.opt_start_time = since - SINCE_MARGIN
        subjects = list(info.config.subjects or [])
        subject = subjects[0] if len(subjects) == 1 else ""
        try:
            sub = await js.pull_subscribe(subject, stream=url.stream, config=config)
        except (TimeoutError, NatsError) as exc:
            raise ClientError(f"{url.server}: cannot read stream {url.stream!r}: {type(exc).__name__}: {exc}") from None
        has_past = end > 0 and not (
            last is not None and config.opt_start_seq is not None and config.opt_start_seq > end
        )
        try:
            await _pump(sub, end if has_past else 0, follow, on_batch, on_caught_up)
        finally:
            try:
                await asyncio.wait_for(sub.unsubscribe(), API_TIMEOUT)
            except (TimeoutError, NatsError):
                pass
    finally:
        try:
            await asyncio.wait_for(nc.close(), API_TIMEOUT)
        except (TimeoutError, NatsError):
            pass


async def _pump(sub: object, end: int, follow: bool, on_batch: Batch, on_caught_up: Callable[[], None]) -> None:
    from nats.errors import Error as NatsError

    past = end > 0
    if not past:
        on_caught_up()
        if not follow:
            return
    idle_past = 0
    while True:
        try:
            msgs = await sub.fetch(FETCH_BATCH, timeout=FETCH_WAIT)  # type: ignore[attr-defined]
        except (TimeoutError, NatsError):
            msgs = []
        if not msgs:
            if past:
                idle_past += 1
                if idle_past >= 2:  # nothing more from the past (--since after it, or removed by limits)
                    past = False
                    on_caught_up()
                    if not follow:
                        return
            continue
        idle_past = 0
        if not past:
            on_batch([m.data for m in msgs], False)
            continue
        older = [m.data for m in msgs if m.metadata.sequence.stream <= end]
        newer = [m.data for m in msgs if m.metadata.sequence.stream > end]
        if older:
            on_batch(older, True)
        if newer or msgs[-1].metadata.sequence.stream >= end:
            past = False
            on_caught_up()
            if not follow:
                return
            if newer:
                on_batch(newer, False)
