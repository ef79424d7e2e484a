"""The ``nio-logd`` command line; the only place that turns errors into messages and exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from . import __version__, programs  # noqa: F401 - programs before structlog
from .config import Settings, load_settings
from .errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ClientError, NioLogdError, UsageError

Handler = Callable[[argparse.Namespace], int]


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps a one-paragraph description as usual; keeps a text of several lines (the examples of an
    epilog) line by line as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" not in text:
            return super()._fill_text(text, width, indent)
        return "".join(indent + line if line.strip() else line for line in text.splitlines(keepends=True))


def examples(*lines: str) -> str:
    """An ``examples:`` epilog for ``--help`` (and the man page, tools/gen_manpage.py): one command a line."""
    return "examples:\n" + "".join(f"  {line}\n" for line in lines)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, no usage dump: "nio-logd send: error: ..."
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $NIO_LOGD_CONFIG, then /etc/nio-logd/nio-logd.toml, then built-in defaults)",
    )


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


# -- run ------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from .events import configure_events
    from .service.runner import serve

    settings = _settings(args)
    configure_events(settings.daemon.events, settings.daemon.events_level)
    after_startup = None
    if os.geteuid() == 0:  # least privilege: refuse a config others can write; drop to [daemon] user
        from .service.daemonize import as_root

        after_startup = as_root(args.config, settings)
    clean = serve(settings, reload_settings=lambda: _settings(args), after_startup=after_startup)
    return EXIT_OK if clean else EXIT_FAILURE


# -- start / stop / status / reload (the classic daemon) -----------------------------------------
def cmd_start(args: argparse.Namespace) -> int:
    from .service.daemonize import start

    def notice(text: str) -> None:
        print(f"nio-logd start: {text}", file=sys.stderr)
        sys.stderr.flush()  # before the fork: the child must not print it a second time

    print(start(args.config, args.timeout, notice))
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    from .service.daemonize import stop

    print(stop(_settings(args), args.timeout))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from .service.daemonize import status

    code, text = status(_settings(args))
    print(text)
    return code


def cmd_reload(args: argparse.Namespace) -> int:
    from .service.daemonize import reload

    print(reload(_settings(args), args.timeout))
    return EXIT_OK


def cmd_reopen(args: argparse.Namespace) -> int:
    from .service.daemonize import reopen

    print(reopen(_settings(args)))
    return EXIT_OK


def _register_daemon(sub: Subparsers) -> None:
    p = sub.add_parser(
        "start",
        help="start the classic daemon (detaches; returns once it listens)",
        epilog=examples(
            "nio-logd start                                          # the built-in defaults, in this folder",
            "nio-logd start --config /etc/nio-logd/nio-logd.toml",
            "nio-logd start --config /etc/nio-logd/nio-logd.toml --timeout 60",
        ),
    )
    _common(p)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait until it listens (default 30)")
    p.set_defaults(func=cmd_start)
    p = sub.add_parser(
        "stop",
        help="stop the classic daemon (SIGTERM) and wait until it has exited",
        epilog=examples(
            "nio-logd stop                                           # the daemon started here with the defaults",
            "nio-logd stop --config /etc/nio-logd/nio-logd.toml --timeout 60",
        ),
    )
    _common(p)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it to exit (default 30)")
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser(
        "status",
        help="exit 0 and print the pid if the daemon runs, 3 if not",
        epilog=examples(
            "nio-logd status",
            "nio-logd status --config /etc/nio-logd/nio-logd.toml   # also the systemd service's pid",
            "nio-logd status --config /etc/nio-logd/nio-logd.toml > /dev/null || nio-logd start --config "
            "/etc/nio-logd/nio-logd.toml",
        ),
    )
    _common(p)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser(
        "reload",
        help="SIGHUP: re-read the config (and reopen the log files); exit non-zero if it failed",
        epilog=examples(
            "nio-logd reload",
            "nio-logd reload --config /etc/nio-logd/nio-logd.toml   # what systemctl reload nio-logd runs",
            "nio-logd check-config --config /etc/nio-logd/nio-logd.toml && nio-logd reload --config "
            "/etc/nio-logd/nio-logd.toml",
        ),
    )
    _common(p)
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the daemon's reload result (default 10)"
    )
    p.set_defaults(func=cmd_reload)
    p = sub.add_parser(
        "reopen",
        help="SIGUSR1: reopen the log files only (logrotate); the config is not read",
        epilog=examples(
            "mv logs/messages.log logs/messages.log.1 && nio-logd reopen   # rotate by hand",
            "nio-logd reopen --config /etc/nio-logd/nio-logd.toml           # in a logrotate postrotate script",
        ),
    )
    _common(p)
    p.set_defaults(func=cmd_reopen)


# -- check-config ---------------------------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace) -> int:
    import json

    from .config import find_config
    from .service.daemonize import events_path
    from .service.preflight import interpreter_warning, preflight

    settings = _settings(args)
    # What run would refuse or stumble on before it serves: said now, each on its line, exit 78.
    problems = preflight(settings, find_config(args.config))
    warning = interpreter_warning()
    if warning:
        print(f"nio-logd check-config: warning: {warning}", file=sys.stderr)
    if problems:
        for problem in problems:
            print(f"nio-logd check-config: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    effective = settings.model_dump(mode="json", exclude={"base_dir"})
    path = find_config(args.config)
    if path is not None:
        from .config import drop_ins, key_sources

        # Which file set each key (the main file, or the drop-in of conf.d that came last).
        effective["files"] = [str(path), *map(str, drop_ins(path))]
        effective["sources"] = key_sources(path)
    effective["paths"] = {
        "messages": str(settings.resolve(settings.log.path)),
        "rejects": str(settings.resolve(settings.log.rejects_path)),
        "pidfile": str(settings.resolve(settings.daemon.pidfile)),
        "events": str(events_path(settings)),  # [daemon] events_file, or its default next to the log
    }
    from .service.budget import memory_bound

    # What the limits let the daemon hold at most (README: "Memory bound"), in MiB.
    effective["memory_bound_mib"] = {k: round(v / (1 << 20), 1) for k, v in memory_bound(settings).items()}
    print(json.dumps(effective, indent=2))
    print(f"{settings.source}: OK", file=sys.stderr)
    return EXIT_OK


# -- send -----------------------------------------------------------------------------------------
def cmd_send(args: argparse.Namespace) -> int:
    from .tools.client import check_time, client_context, make_record, read_records, send

    # Everything that can be checked is, before reading stdin or connecting.
    if args.time is not None:
        if args.user is None and args.msg is None:
            raise UsageError("--time needs --user and --msg")
        check_time(args.time)
    tls_settings = None
    if args.address:
        addresses: list[str] = args.address
    else:
        settings = _settings(args)
        listener = settings.listeners[0]
        addresses = [listener.address]
        tls_settings = listener.tls  # the config's listener speaks TLS: so do we
    if args.user is not None or args.msg is not None:
        if args.user is None or args.msg is None:
            raise ClientError("--user and --msg go together (or give neither and pipe NDJSON on stdin)")
        lines = [make_record(args.user, args.msg, args.time)]
    else:
        if sys.stdin.isatty():
            print("reading NDJSON records from stdin (Ctrl-D to end)", file=sys.stderr)
        lines = list(read_records(sys.stdin.buffer))
    tls = None
    if args.tls or tls_settings is not None:
        if args.ca is None and tls_settings is not None:
            # The listener's tls block holds the daemon's own certificate (chain): trusting it
            # verifies the daemon as well as the CA that signed it would (see README "send").
            server_cert = str(settings.resolve(tls_settings.cert))
            tls = client_context(server_cert, args.cert, args.key, partial_chain=True)
        else:
            tls = client_context(args.ca, args.cert, args.key)
    elif args.ca or args.cert or args.key or args.server_name:
        raise ClientError("--ca, --cert, --key and --server-name need --tls")
    result = send(addresses, lines, ack=args.ack, timeout=args.timeout, tls=tls, server_name=args.server_name)
    sent = f"sent {len(lines)} record{'' if len(lines) == 1 else 's'}"
    if args.ack:
        for index, _line, answer in result.refused:
            print(f"record {index + 1} refused: {answer.get('error')}", file=sys.stderr)
        print(
            f"{sent}: {result.acked} acknowledged, {len(result.refused)} refused"
            + (
                f", {result.resent} resent after {result.reconnects} reconnect{'' if result.reconnects == 1 else 's'}"
                if result.resent
                else ""
            ),
            file=sys.stderr,
        )
        return EXIT_FAILURE if result.refused else EXIT_OK
    print(sent, file=sys.stderr)
    return EXIT_OK


# -- the parser -----------------------------------------------------------------------------------
Subparsers: TypeAlias = "argparse._SubParsersAction[_Parser]"


def _register_run(sub: Subparsers) -> None:
    p = sub.add_parser(
        "run",
        help="serve in the foreground (what systemd runs)",
        epilog=examples(
            "nio-logd run                                       # tcp://127.0.0.1:8888, logs/ in this folder",
            "nio-logd run --config /etc/nio-logd/nio-logd.toml",
            "NIO_LOGD_CONFIG=/etc/nio-logd/nio-logd.toml nio-logd run",
            "python3 -m nio_logd run                            # the same, without the console script",
        ),
    )
    _common(p)
    p.set_defaults(func=cmd_run)


def _register_check_config(sub: Subparsers) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate the config and print the effective settings",
        epilog=examples(
            "nio-logd check-config                                   # the built-in defaults",
            "nio-logd check-config --config /etc/nio-logd/nio-logd.toml",
            "nio-logd check-config --config config/nio-logd.toml | jq .sources",
        ),
    )
    _common(p)
    p.set_defaults(func=cmd_check_config)


def _register_send(sub: Subparsers) -> None:
    p = sub.add_parser(
        "send",
        help="send records (from flags, or NDJSON on stdin)",
        epilog=examples(
            'nio-logd send --user alice --msg "hello"',
            'nio-logd send --user alice --msg "hello" --time "2026-11-29 12:00:00"',
            'printf \'%s\\n\' \'{"send_user":"bob","send_time":"2026-11-29T12:00:00Z","send_msg":"one"}\' '
            "| nio-logd send",
            "nio-logd send --address tcp://10.0.0.1:8888 --address tcp://10.0.0.2:8888 --ack "
            '--user alice --msg "hi"   # --ack: listeners with ack = true',
            'nio-logd send --address unix:///run/nio-logd/nio-logd.sock --user alice --msg "hi"',
            "nio-logd send --address tcp://logs.example.net:6514 --tls --ca /etc/ssl/nio-logd-ca.pem "
            '--user alice --msg "hello" --ack',
        ),
    )
    _common(p)
    p.add_argument(
        "--address",
        action="append",
        help="tcp://HOST:PORT or unix:///PATH (default: the config's first listener, with its TLS); "
        "repeat it to fail over to the next address when one cannot be reached",
    )
    p.add_argument("--user", help="send_user of the one record to send")
    p.add_argument("--msg", help="send_msg of the one record to send")
    p.add_argument(
        "--time",
        help="send_time, 'YYYY-MM-DD HH:MM:SS' or ISO 8601 (default: now, with the local UTC offset)",
    )
    p.add_argument("--ack", action="store_true", help="wait for acknowledgements; exit 1 if any record is refused")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon (default 10)")
    p.add_argument("--tls", action="store_true", help="connect with TLS 1.2+ and verify the daemon's certificate")
    p.add_argument(
        "--ca",
        metavar="PATH",
        help="with --tls: the CA (PEM) that signed the daemon's certificate (default: the system's CAs)",
    )
    p.add_argument("--cert", metavar="PATH", help="with --tls: our client certificate (PEM)")
    p.add_argument("--key", metavar="PATH", help="with --tls: the key of --cert (PEM; default: in the --cert file)")
    p.add_argument(
        "--server-name",
        metavar="NAME",
        help="with --tls: the name the daemon's certificate must carry (default: the address's host)",
    )
    p.set_defaults(func=cmd_send)


def cmd_bench(args: argparse.Namespace) -> int:
    from .tools.bench import bench_command

    code, text = bench_command(args)
    print(text)
    return code


def cmd_tail(args: argparse.Namespace) -> int:
    from .tools.tail import tail_command

    def say(text: str) -> None:
        print(f"nio-logd tail: {text}", file=sys.stderr, flush=True)

    return tail_command(args, sys.stdout.buffer, say, sys.stdin.buffer if sys.stdin is not None else None)


def _register_bench(sub: Subparsers) -> None:
    from .tools.bench import register

    register(sub, _common).set_defaults(func=cmd_bench)


def _register_tail(sub: Subparsers) -> None:
    from .tools.tail import register

    register(sub, _common).set_defaults(func=cmd_tail)


# Every command, in the order of --help: each adds its subparser (with --config) and its handler.
COMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    _register_run,
    _register_check_config,
    _register_send,
    _register_bench,
    _register_daemon,
    _register_tail,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nio-logd",
        description="A logging daemon for JSON records.",
        epilog=examples(
            "nio-logd run                                    # serve in the foreground (Ctrl-C stops it)",
            'nio-logd send --user alice --msg "hello"        # from another terminal',
            "nio-logd tail -f                                # follow the messages log",
            "nio-logd check-config --config /etc/nio-logd/nio-logd.toml",
            "nio-logd COMMAND --help                         # each command's options and examples",
        ),
    )
    parser.add_argument("--version", action="version", version=f"nio-logd {__version__}")
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except NioLogdError as exc:
        print(f"nio-logd {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed early (`nio-logd tail | head`): not an error worth a traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def run() -> None:
    sys.exit(main())
