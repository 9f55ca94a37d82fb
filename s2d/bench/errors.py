"""The one error type of the harness: bad input that the CLI reports as a clear message."""

from __future__ import annotations


class BenchError(ValueError):
    """A benchmark request that cannot run (missing file, unknown method or category, missing --draft)."""
