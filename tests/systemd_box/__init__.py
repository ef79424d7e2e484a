"""Helpers that boot a throw-away systemd for tests/test_systemd_real.py."""
