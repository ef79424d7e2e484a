"""``python -m nio_logd``."""

from .cli import run

run()
