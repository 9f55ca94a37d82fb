"""s2d: sorted speculative decoding (see README.md)."""

from s2d._process import tune_malloc

tune_malloc()
