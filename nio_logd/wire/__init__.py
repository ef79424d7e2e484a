"""The wire: listeners, TLS, who may connect, framing, and the I/O loops that own the sockets."""
