"""Imported first by the daemon's own programs (the command line and a worker process).

structlog's development module imports rich and better_exceptions whenever they are installed,
only to draw tracebacks on a terminal; a daemon's events are the same without them. Marked as
absent here, before structlog is imported, they are never loaded: every process of the daemon
behaves and weighs the same whatever else is installed next to it (rich, which twine pulls in,
measured 4.5 MB of peak RSS and about 60 ms of start-up a process). A program that has already
imported one of them (one that imports ``nio_logd.cli`` itself) keeps it.
"""

from __future__ import annotations

import sys

for _name in ("rich", "better_exceptions"):
    sys.modules.setdefault(_name, None)  # type: ignore[arg-type]
