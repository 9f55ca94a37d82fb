"""A compiled CPU kernel for bf16 weights times a few float32 rows, on x86 CPUs without native bf16.

torch's own bf16 product there costs about M one-row products for M rows, which makes verifying a
block of draft tokens as slow as decoding them one by one. ``bf16_rows.cpp`` loads each weight row
once for all M rows (see its header). It is compiled on first use with the machine's C++ compiler
(torch.utils.cpp_extension; cached under ~/.cache/s2d/kernels, or $S2D_CACHE/kernels). Where that is
impossible, callers fall back to torch's path with a one-time warning; ``S2D_CPU_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("bf16_rows.cpp")


def _wanted() -> bool:
    if os.environ.get("S2D_CPU_KERNEL", "1") == "0":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def bf16_rows_kernel() -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    """``f(x [M, K] f32, w [N, K] bf16, bias [N] f32 or empty) -> [M, N] f32``, or None if unavailable."""
    if not _wanted():
        return None
    try:
        from torch.utils.cpp_extension import load

        build = Path(os.environ.get("S2D_CACHE", Path.home() / ".cache" / "s2d")) / "kernels" / (
            f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}")
        build.mkdir(parents=True, exist_ok=True)
        if not (build / "s2d_bf16_rows.so").exists():
            print("s2d: compiling the AVX2 bf16 kernel (once per machine, ~1 min)...", file=sys.stderr, flush=True)
        module = load(name="s2d_bf16_rows", sources=[str(SOURCE)], build_directory=str(build),
                      extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
        return module.bf16_rows_linear
    except Exception as err:  # no compiler, no ninja, a read-only cache...: slower, still correct
        warnings.warn(f"s2d: cannot build the AVX2 bf16 kernel ({type(err).__name__}: {err}); "
                      "multi-token bf16 passes use torch's slower path", stacklevel=2)
        return None


def bf16_rows_linear_reference(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """What the kernel computes, in plain torch: x [M, K] f32, w [N, K] bf16 -> [M, N] f32."""
    return torch.nn.functional.linear(x, w.float(), bias)
