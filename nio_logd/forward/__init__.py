"""Forwarding the messages log to a replicated engine (NATS JetStream), at least once, from a cursor."""

from __future__ import annotations

from .forwarder import Forwarder

__all__ = ["Forwarder"]
