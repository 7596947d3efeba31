"""Plumbing every layer may use: the clock seam, atomic files, YAML, schemas, the lock, the log."""
