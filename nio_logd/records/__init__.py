"""The records: the model and its validation, rendering, and the per-pass pipeline (sans-I/O)."""
