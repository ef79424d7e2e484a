"""nio-logd: a logging daemon for JSON records over TCP and Unix sockets."""

__version__ = "0.1.0"
