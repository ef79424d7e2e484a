"""Exceptions raised by the library and the exit codes the CLI maps them to."""

from __future__ import annotations

# Exit codes (sysexits.h / LSB where one fits).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3  # LSB: "program is not running"
EXIT_CONFIG = 78  # EX_CONFIG
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: cannot bind, cannot write, cannot reach
EXIT_NOINPUT = 66  # EX_NOINPUT: an input file does not exist or cannot be read


class NioLogdError(Exception):
    """Base class: every error the CLI reports as one line."""

    exit_code = EXIT_FAILURE


class ConfigError(NioLogdError):
    """The configuration file is unreadable or invalid."""

    exit_code = EXIT_CONFIG


class StartupError(NioLogdError):
    """The daemon cannot start: a socket cannot be bound, a log file cannot be opened."""

    exit_code = EXIT_UNAVAILABLE


class ClientError(NioLogdError):
    """The client cannot reach the daemon or the daemon refused records."""

    exit_code = EXIT_FAILURE


class NotRunningError(NioLogdError):
    """The classic daemon is not running."""

    exit_code = EXIT_NOT_RUNNING


class AlreadyRunningError(NioLogdError):
    """`nio-logd start` while the classic daemon named by the pidfile is running."""

    exit_code = EXIT_FAILURE


class StopTimeoutError(NioLogdError):
    """The classic daemon did not exit within the time `nio-logd stop` waits."""

    exit_code = EXIT_FAILURE


class UsageError(NioLogdError):
    """A command-line value the parser cannot check: a bad regular expression, an unreadable time."""

    exit_code = EXIT_USAGE


class NoInputError(NioLogdError):
    """A file to read (``nio-logd tail FILE``) does not exist or cannot be read."""

    exit_code = EXIT_NOINPUT
