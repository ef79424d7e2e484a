"""A real 3-node NATS JetStream cluster on loopback for the forwarding tests (Debian's nats-server).

One cluster per session: free ports (never 4222), its own store folders, a meta leader awaited on
the monitor port's /jsz. Streams are created with 3 replicas (retried while the cluster settles),
any node can be SIGKILLed and restarted, and every node is stopped by its pid at the end
(SIGTERM, then SIGKILL). Every wait is bounded. Reading a stream back uses nats-py on a loop of
its own (``NatsCluster.run``), so tests stay synchronous.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
T = TypeVar("T")


def _free_port() -> int:
    """A free loopback port, never 4222 (some machines run their own NATS there)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 4222:
            return port


class Node:
    """One nats-server process of the cluster."""

    def __init__(self, name: str, folder: Path, client: int, monitor: int, route: int, routes: list[str]) -> None:
        self.name = name
        self.client = client
        self.monitor = monitor
        self.route = route
        self.store = folder / f"store-{name}"
        self.config = folder / f"{name}.conf"
        self.logfile = folder / f"{name}.log"
        self.config.write_text(
            f"server_name: {name}\n"
            f"listen: 127.0.0.1:{client}\n"
            f"http: 127.0.0.1:{monitor}\n"
            f"jetstream {{ store_dir: {json.dumps(str(self.store))}, max_memory_store: 64MB, max_file_store: 2GB }}\n"
            f"cluster {{ name: niotest, listen: 127.0.0.1:{route}, routes: [{', '.join(routes)}] }}\n"
            f"log_file: {json.dumps(str(self.logfile))}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [NATS_SERVER, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def jsz(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.monitor}/jsz?streams=true&config=true", timeout=2
            ) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None


class NatsCluster:
    """Three JetStream nodes with routes to each other; ``servers`` is what a forward table lists."""

    def __init__(self, folder: Path) -> None:
        ports = [(_free_port(), _free_port(), _free_port()) for _ in range(3)]
        routes = [f"nats-route://127.0.0.1:{route}" for _c, _m, route in ports]
        self.nodes = [Node(f"n{i}", folder, c, m, r, routes) for i, (c, m, r) in enumerate(ports)]
        self.loop = asyncio.new_event_loop()

    @property
    def servers(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        self.wait_meta_leader()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.loop.close()

    def wait_meta_leader(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.alive:
                    continue
                info = node.jsz()
                leader = ((info or {}).get("meta_cluster") or {}).get("leader")
                if leader:
                    return str(leader)
            time.sleep(0.1)
        raise AssertionError(f"no JetStream meta leader after {timeout} s")

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def stream_leader(self, stream: str, timeout: float = 20.0) -> Node:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.alive:
                    continue
                for account in (node.jsz() or {}).get("account_details") or []:
                    for detail in account.get("stream_detail") or []:
                        leader = (detail.get("cluster") or {}).get("leader")
                        if detail.get("name") == stream and leader:
                            return self.node(leader)
            time.sleep(0.1)
        raise AssertionError(f"stream {stream} has no leader after {timeout} s")

    def kill(self, node: Node) -> None:
        node.kill()

    def restart(self, node: Node) -> None:
        node.start()

    # -- nats-py, on the cluster's own loop ------------------------------------------------------
    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    async def _connect(self) -> Any:
        import nats

        return await nats.connect(self.servers, connect_timeout=2, max_reconnect_attempts=5, reconnect_time_wait=0.5)

    def create_stream(self, name: str, subjects: list[str], timeout: float = 30.0) -> None:
        """Create (or create again, empty) a stream with 3 replicas, retrying while the cluster settles."""
        from nats.js.api import StreamConfig

        async def create() -> None:
            nc = await self._connect()
            try:
                js = nc.jetstream(timeout=5)
                try:
                    await js.delete_stream(name)
                except Exception:
                    pass
                await js.add_stream(StreamConfig(name=name, subjects=subjects, num_replicas=3))
            finally:
                await nc.close()

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.run(create(), 20)
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"cannot create stream {name}: {exc!r}") from None
                time.sleep(0.5)

    def stream_count(self, name: str) -> int:
        async def count() -> int:
            nc = await self._connect()
            try:
                info = await nc.jetstream(timeout=5).stream_info(name)
                return int(info.state.messages)
            finally:
                await nc.close()

        return self.run(count(), 20)

    def read_stream(self, name: str, subject: str, timeout: float = 60.0) -> list[tuple[dict[str, str], bytes]]:
        """Every message in the stream now: (headers, data), in stream order (an ordered pull of all)."""

        from nats.js.api import AckPolicy, ConsumerConfig

        async def read() -> list[tuple[dict[str, str], bytes]]:
            nc = await self._connect()
            try:
                js = nc.jetstream(timeout=10)
                total = int((await js.stream_info(name)).state.messages)
                out: list[tuple[dict[str, str], bytes]] = []
                if not total:
                    return out
                config = ConsumerConfig(ack_policy=AckPolicy.NONE)
                sub = await js.pull_subscribe(subject, durable=None, stream=name, config=config)
                deadline = time.monotonic() + timeout
                while len(out) < total and time.monotonic() < deadline:
                    try:
                        msgs = await sub.fetch(min(5000, total - len(out)), timeout=2)
                    except Exception:
                        continue
                    out.extend((dict(msg.headers or {}), msg.data) for msg in msgs)
                await sub.unsubscribe()
                return out
            finally:
                await nc.close()

        return self.run(read(), timeout + 30)


def ensure_up(cluster: NatsCluster) -> None:
    """Every node running (a test may have killed some), and a meta leader."""
    for node in cluster.nodes:
        if not node.alive:
            node.start()
    cluster.wait_meta_leader()


@pytest.fixture(scope="session")
def nats_cluster() -> Iterator[NatsCluster]:
    if not os.path.exists(NATS_SERVER):
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    folder = Path(tempfile.mkdtemp(prefix="nio-logd-nats-"))
    cluster = NatsCluster(folder)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)
