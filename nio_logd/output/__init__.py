"""The output: the writer thread, the log files and their rotation, the copytruncate repair."""
