"""The CPU kind a result was measured on, from /proc/cpuinfo: light (no torch), for benchmarks that must set
instruction-set caps before torch loads."""

from __future__ import annotations

from pathlib import Path


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_kind(flags: set[str]) -> str:
    """The CPU kinds results are reported by: AMX, AVX512-BF16, AVX512, AVX2 or none, from cpuinfo flags."""
    if "amx_tile" in flags and "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    if "avx512f" in flags:
        return "AVX512"
    return "AVX2" if "avx2" in flags else "none"
