"""A PROTOTYPE launcher for measuring optimisation ideas end to end, without changing the daemon.

Not a product: it runs the daemon's own ``Server`` (same validator, same renderer, same writer)
with monkeypatches that each stand for one proposal, so ``nio-logd bench`` can compare them side
by side with the real daemon:

  --bind-once      each loop's structlog loggers are bound once (``wrap_logger(...).bind()``):
                   same processors, same output, no BoundLoggerLazyProxy re-assembly per record.
  --fast-ts        TimeStamper(fmt="iso", utc=True) replaced by a processor writing the same text
                   per record with the date part cached per second (see micro_render.py).
  --collect-bytearray
                   rendered message lines are appended to one bytearray per batch (the orjson
                   result, a 4 KiB allocation, is freed at once) and handed on as ONE pre-joined
                   element, so the writer's join writes the same bytes. The prototype leaves the
                   writer's per-batch line count wrong (1 per batch); the file is right.
  --accepts-per-event N
                   how many connections the loop accepts per readiness of the listening socket
                   (the daemon's ioloop.ACCEPTS_PER_EVENT, 256 today).
  --recv-bytes N   the largest recv() per readable socket (the daemon's ioloop.RECV_BYTES, 256 KiB
                   today): smaller reads mean smaller batches in flight per loop pass.
  --nice N         os.nice(N) at start (what a unit's Nice= would do), e.g. -5: the daemon's threads
                   then win CPU from busy clients on a small machine.
  --workers K      K processes, each a whole Server with its own SO_REUSEPORT listening socket
                   (the kernel spreads connections over them), I/O thread and writer thread, all
                   appending whole batches to the same O_APPEND file. Only a measurement: the
                   writer's undo-on-error (ftruncate to the size before the write) and size
                   rotation assume one writer per file and are NOT safe with K > 1.

    python tests/perf/proto_daemon.py --config DIR/nio-logd.toml --workers 2 --bind-once

Runs until SIGTERM/SIGINT, then shuts every worker down cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

if "--source" in sys.argv:
    sys.path.insert(0, sys.argv[sys.argv.index("--source") + 1])

import structlog  # noqa: E402

from nio_logd import render as render_module  # noqa: E402
from nio_logd import server as server_module  # noqa: E402
from nio_logd.config import load_file  # noqa: E402
from nio_logd.wire.listeners import Listener  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from micro_render import FastStamper  # noqa: E402


def reuseport_bind(settings: Any) -> list[Listener]:
    out = []
    for ls in settings.listeners:
        addr = ls.parsed
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(4096)
        sock.setblocking(False)
        out.append(Listener(sock, ls, ls.address))
    return out


class ByteCollector:
    """Drop-in for render._Collector: keeps one growing buffer instead of a list of lines."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def info(self, line: bytes) -> None:
        self.buf += line
        self.buf += b"\n"

    warning = info

    @property
    def lines(self) -> list[bytes]:
        return [bytes(self.buf[:-1])] if self.buf else []  # the writer's join adds the last newline

    @lines.setter
    def lines(self, _value: list[bytes]) -> None:
        self.buf = bytearray()


def patch_loop(loop: Any, bind_once: bool, fast_ts: bool) -> None:
    renderer = loop.renderer
    for attr in ("_msg", "_rej"):
        logger = getattr(renderer, attr)
        if bind_once or fast_ts:
            logger = logger.bind()  # a real BoundLogger over the same collector and processors
        if fast_ts:
            logger._processors = [
                FastStamper() if isinstance(p, structlog.processors.TimeStamper) else p for p in logger._processors
            ]
        setattr(renderer, attr, logger)


def serve_one(config: Path, bind_once: bool, fast_ts: bool, reuseport: bool, collect_bytearray: bool) -> None:
    settings = load_file(config)
    if collect_bytearray:
        render_module._Collector = ByteCollector  # type: ignore[misc,assignment]
    if reuseport:
        server_module.bind = reuseport_bind  # type: ignore[assignment]
    server = server_module.Server(settings)
    server.startup()
    for loop in server.loops:
        patch_loop(loop, bind_once, fast_ts)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"worker {os.getpid()} ready", file=sys.stderr, flush=True)
    stop.wait()
    server.shutdown(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--bind-once", action="store_true")
    parser.add_argument("--fast-ts", action="store_true")
    parser.add_argument("--collect-bytearray", action="store_true")
    parser.add_argument("--accepts-per-event", type=int)
    parser.add_argument("--recv-bytes", type=int)
    parser.add_argument("--nice", type=int)
    parser.add_argument("--source", help="import nio_logd from this tree")
    args = parser.parse_args()
    from nio_logd import ioloop

    if args.accepts_per_event:
        ioloop.ACCEPTS_PER_EVENT = args.accepts_per_event
    if args.recv_bytes:
        ioloop.RECV_BYTES = args.recv_bytes
    if args.nice:
        os.nice(args.nice)
    if args.workers == 1:
        serve_one(args.config, args.bind_once, args.fast_ts, reuseport=False, collect_bytearray=args.collect_bytearray)
        return 0
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                serve_one(
                    args.config, args.bind_once, args.fast_ts, reuseport=True, collect_bytearray=args.collect_bytearray
                )
            finally:
                os._exit(0)
        children.append(pid)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    for pid in children:
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
