"""The service: the server's lifecycle, signals, systemd, metrics, the classic daemon, privileges."""
