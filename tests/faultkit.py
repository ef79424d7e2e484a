"""Helpers for the fault-injection tests: streaming clients, RSS sampling, metrics, mounts.

Everything here is real: sockets on 127.0.0.1, /proc of the daemon process, mount(8) and
fsfreeze(8) as root. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from nio_logd.tools.client import SendResult, send


def is_root() -> bool:
    return os.geteuid() == 0


def children(pid: int) -> list[int]:
    """The process's children (a daemon's worker processes), as the kernel lists them now."""
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _own_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def rss_kib(pid: int) -> int:
    """The resident set size of a daemon (VmRSS) in KiB: the process and its worker processes,
    summed (the memory a flood costs may sit in any of them)."""
    total = _own_rss_kib(pid)
    for child in children(pid):
        try:
            total += _own_rss_kib(child)
        except (OSError, AssertionError):
            pass  # a worker that just ended
    return total


class RssSampler:
    """Samples a process's VmRSS every 50 ms in a thread; ``peak`` is the highest seen (KiB)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
            except (OSError, AssertionError):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(2)
        return self.peak


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def make_line(client: int, index: int, pad: int = 40) -> bytes:
    """A valid record whose send_msg ``c<client>-<index>`` identifies it; ``pad`` grows it."""
    msg = f"c{client}-{index}" + "." * pad
    return b'{"send_user":"u%d","send_time":"2026-11-29 12:00:00","send_msg":"%s"}' % (client, msg.encode())


def msg_id(msg: str) -> str:
    return msg.rstrip(".")


def logged_ids(path: Path) -> list[str]:
    """The ``c<client>-<index>`` of every line in a messages log (fails on a partial line)."""
    data = path.read_bytes() if path.exists() else b""
    assert not data or data.endswith(b"\n"), f"{path} ends with a partial line: {data[-200:]!r}"
    return [msg_id(json.loads(line)["send_msg"]) for line in data.splitlines()]


_STREAMS: weakref.WeakSet[Streamer] = weakref.WeakSet()


def close_streams() -> None:
    """Close every Streamer's socket (wakes a blocked sendall): a failed test must not leak them."""
    for stream in list(_STREAMS):
        stream.stop.set()
        try:
            stream.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        stream.sock.close()


class Streamer(threading.Thread):
    """An un-acked client: sends ``total`` records in chunks of ``chunk`` with sendall().

    ``sent`` counts the records whose sendall() had returned; once ``stop`` is set no new
    sendall() starts. A connection error ends the stream (``error`` holds it).
    """

    def __init__(self, address: tuple[str, int], client: int, total: int, chunk: int = 500, pad: int = 40) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.client = client
        self.total = total
        self.chunk = chunk
        self.pad = pad
        self.sent = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.sock = socket.create_connection(address)
        _STREAMS.add(self)

    def run(self) -> None:
        try:
            while self.sent < self.total and not self.stop.is_set():
                end = min(self.total, self.sent + self.chunk)
                data = b"".join(make_line(self.client, i, self.pad) + b"\n" for i in range(self.sent, end))
                self.sock.sendall(data)
                self.sent = end
        except OSError as exc:
            self.error = exc
        finally:
            self.finished.set()

    def close(self) -> None:
        self.stop.set()
        self.join(30)
        self.sock.close()

    def finish(self) -> None:
        """Half-close and wait for the daemon to close: it has then read every byte."""
        self.join(120)
        if self.error is not None:
            raise AssertionError(f"stream {self.client} failed after {self.sent} records") from self.error
        self.sock.shutdown(socket.SHUT_WR)
        self.sock.settimeout(60)
        while self.sock.recv(65536):
            pass
        self.sock.close()


class AckedSender(threading.Thread):
    """The client library's ``send(..., ack=True)`` in a thread: at-least-once delivery."""

    def __init__(self, address: str, lines: list[bytes], **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.lines = lines
        self.kwargs = kwargs
        self.result: SendResult | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = send(self.address, self.lines, ack=True, **self.kwargs)
        except BaseException as exc:  # reported by the test
            self.error = exc


def metrics_address(daemon: Any) -> str:
    ev = daemon.event("metrics_listening")
    assert ev is not None, "no metrics_listening event"
    return str(ev["address"]).removeprefix("tcp://")


def scrape(hostport: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET /metrics: {sample name: {sorted labels: value}}."""
    with urllib.request.urlopen(f"http://{hostport}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def metric(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def healthz(hostport: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://{hostport}/healthz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# -- mounts (root only) ---------------------------------------------------------------------------
def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "nio-logd-test", str(path))


def mount_loop_ext4(image: Path, path: Path, size_mib: int) -> None:
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    run("mkfs.ext4", "-q", "-F", str(image))
    path.mkdir(parents=True, exist_ok=True)
    run("mount", "-o", "loop", str(image), str(path))


def unmount(path: Path) -> None:
    subprocess.run(["fsfreeze", "-u", str(path)], capture_output=True, timeout=30)
    for _ in range(50):
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def have_tools(*names: str) -> bool:
    return all(shutil.which(n) for n in names)


class AckStream(threading.Thread):
    """A raw acked client on one connection (no reconnects): pipelines up to ``window`` records and
    counts the answers as they come (``acked``: ok, ``refused``: not ok), checking their order."""

    def __init__(self, address: tuple[str, int], client: int, total: int, window: int = 2000, pad: int = 40) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.client = client
        self.total = total
        self.window = window
        self.pad = pad
        self.acked = 0
        self.refused = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _run(self) -> None:
        import selectors

        sock = socket.create_connection(self.address)
        sock.setblocking(False)
        sel = selectors.DefaultSelector()
        both = selectors.EVENT_READ | selectors.EVENT_WRITE
        sel.register(sock, both)
        nxt = 0
        out = b""
        buf = b""
        try:
            while self.acked + self.refused < self.total and not self.stop.is_set():
                answered = self.acked + self.refused
                want_write = bool(out) or (nxt < self.total and nxt - answered < self.window)
                sel.modify(sock, both if want_write else selectors.EVENT_READ)
                for _key, mask in sel.select(0.2):
                    if mask & selectors.EVENT_WRITE:
                        if not out:
                            end = min(self.total, nxt + 200, answered + self.window)
                            out = b"".join(make_line(self.client, i, self.pad) + b"\n" for i in range(nxt, end))
                            nxt = end
                        out = out[sock.send(out) :]
                    if mask & selectors.EVENT_READ:
                        data = sock.recv(65536)
                        if not data:
                            raise ConnectionError("the daemon closed the connection")
                        buf += data
                        *lines, buf = buf.split(b"\n")
                        for raw in lines:
                            answer = json.loads(raw)
                            assert answer["seq"] == self.acked + self.refused + 1, answer
                            if answer["ok"]:
                                self.acked += 1
                            else:
                                self.refused += 1
        finally:
            sel.close()
            sock.close()


def wait_stable(value: Callable[[], Any], period: float = 1.0, timeout: float = 60.0) -> Any:
    """Wait until ``value()`` stays the same for ``period`` seconds; return it."""
    deadline = time.monotonic() + timeout
    last = value()
    while time.monotonic() < deadline:
        time.sleep(period)
        now = value()
        if now == last:
            return now
        last = now
    raise AssertionError(f"{value} kept changing for {timeout} s")
