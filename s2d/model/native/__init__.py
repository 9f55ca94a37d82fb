"""The native CPU runtime: a model's layers or LM head over a few new tokens in one C++ call.

``runtime.cpp`` (see its header for the design) is compiled on first use with the machine's C++
compiler (``$CXX`` or g++; a few seconds, no torch headers) into ``~/.cache/s2d/native`` (or
``$S2D_CACHE/native``), keyed by the source and the compiler, so it is built once per machine and
never twice. One binary serves every x86-64 CPU: it picks AVX512-BF16 or AVX2 code at run time.
A cached library is loaded only when the hash and size recorded after its build still match (a
damaged one is rebuilt, never loaded: that would kill the process); a build runs at most
``$S2D_NATIVE_BUILD_TIMEOUT`` seconds (300), and waits at most twice that for another process's build.
Where it cannot be built or run (no compiler, a compiler that hangs or fails, no AVX2, not x86-64),
models use the torch reference path with one line on stderr; ``S2D_NATIVE=0`` turns it off, and ``S2D_NATIVE_ISA=avx2`` keeps a
runtime created afterwards on its AVX2 code even where AVX512-BF16 is available (``avx512``: without
AMX tiles; tests run every level the CPU has). Passes run on torch's own OpenMP thread team (libgomp)
where torch uses one, else on the runtime's own threads (``S2D_NATIVE_POOL=own`` forces those).

Each runtime runs on the thread count torch had when it was created; ``with threads(n):`` runs the
calling Python thread's passes on n threads instead (results are bit-identical for any n). Calls on
different models may run at once from different threads (ctypes releases the GIL): overlapped
drafting (``s2d/drafting/overlap.py``) runs the target on one core while the draft runs on another.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import operator
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch
from torch import Tensor

from s2d.model.config import CheckpointError
from s2d.sampling import NONFINITE

if TYPE_CHECKING:
    from s2d.model.cache import KVCache
    from s2d.model.llama import Transformer

SOURCES = [Path(__file__).with_name("runtime.cpp"), Path(__file__).with_name("kernels.inc")]
# Passes over more new tokens than this (prefill) go to torch, whose GEMMs (oneDNN, AMX) win there.
MAX_ROWS = 64
MAX_HEAD_DIM = 512  # the kernels keep one head vector on the stack
ISA_NAMES = {0: "none", 1: "AVX2", 2: "AVX512-BF16", 3: "AMX"}
PHASES = ("qkv", "kv_write", "attention", "o", "gate_up", "down", "head")

_VP, _I, _I64, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "s2d_isa": ([], _I),
    "s2d_use_openmp": ([ctypes.c_char_p], _I),
    "s2d_model_new": ([_I, _I, _I, _I, _I, _I, _I, _I, _F, _I, _VP, _VP, _VP, _VP, _I, _I, _I], _VP),
    "s2d_model_set_layer": ([_VP, _I] + [_VP] * 10, None),
    "s2d_model_free": ([_VP], None),
    "s2d_profile": ([_VP, _I, _VP], None),
    "s2d_run_layers": ([_VP, _VP, _I, _VP, _VP, _VP, _I, _I64, _I64, _I64, _I64, _VP, _I, _I, _I], _I),
    "s2d_run_layers_multi": ([_VP, _VP, _I, _VP, _I, _VP, _VP, _VP, _VP, _VP, _I, _I64, _I64, _I64, _I, _I, _I], _I),
    "s2d_head": ([_VP, _VP, _I, _VP, _I64, _VP, _VP, _VP, _I], _I),
    "s2d_model_set_embedding": ([_VP, _VP, _I64], None),
    "s2d_greedy": ([_VP, _VP, _I, _VP, _VP, _VP, _I, _I64, _I64, _I64, _I64, _VP, _VP, _VP, _I], _I),
    "s2d_linear": ([_VP, _VP, _VP, _I, _I64, _I64, _I, _I, _I, _VP], None),
    "s2d_put_bf16": ([_VP, _I64, _VP, _I], None),
    "s2d_dot_peak": ([_I, _I, _I64], ctypes.c_double),
    "s2d_handoff_ns": ([_I, _I64], ctypes.c_double),
    "s2d_packed_size": ([_I64, _I64], _I64),
    "s2d_pack": ([_VP, _I64, _I64, _VP], None),
    "s2d_prefetch_rows": ([_I], _I),
    "s2d_wide_products": ([_I], _I),
    "s2d_fma_products": ([_I], _I),
}


def cache_dir() -> Path:
    return Path(os.environ.get("S2D_CACHE", Path.home() / ".cache" / "s2d")) / "native"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def library_path(compiler: str) -> Path:
    digest = hashlib.sha256()
    for src in SOURCES:
        digest.update(src.read_bytes())
    digest.update(compiler.encode())
    return cache_dir() / f"libs2d_runtime-{digest.hexdigest()[:16]}.so"


def build_timeout() -> float:
    """Seconds a build (and a wait for another process's build) may take: ``$S2D_NATIVE_BUILD_TIMEOUT``."""
    raw = os.environ.get("S2D_NATIVE_BUILD_TIMEOUT", "300")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise RuntimeError(f"S2D_NATIVE_BUILD_TIMEOUT must be a number of seconds > 0, got {raw!r}")
    return seconds


def _record_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _fingerprint(lib: Path) -> str:
    data = lib.read_bytes()
    return f"{hashlib.sha256(data).hexdigest()} {len(data)}"


def verified(lib: Path) -> bool:
    """Whether ``lib`` is the library a finished build wrote (its record matches its bytes).

    Loading a truncated or overwritten .so kills the process with SIGBUS/SIGSEGV and no message, so a
    library is loaded only when the hash and size recorded after its build still match.
    """
    try:
        return lib.is_file() and _record_path(lib).read_text().strip() == _fingerprint(lib)
    except (OSError, UnicodeDecodeError):
        return False


def build(compiler: str, out: Path, timeout: float | None = None) -> None:
    """Compile runtime.cpp into ``out`` atomically, then record its hash (the record last: see ``verified``)."""
    timeout = build_timeout() if timeout is None else timeout
    out.parent.mkdir(parents=True, exist_ok=True)
    print("s2d: building the native CPU runtime (once per machine, a few seconds)...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w", str(SOURCES[0]), "-o", str(tmp_out)]
        # Its own session, so a compiler that hangs is killed with every process it started.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                                start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"{compiler} did not finish building within {timeout:g} s "
                               "(S2D_NATIVE_BUILD_TIMEOUT)") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed (exit {proc.returncode}) on {SOURCES[0].name}: {stderr[-500:]}")
        record = Path(tmp) / "record"
        record.write_text(_fingerprint(tmp_out) + "\n")
        _record_path(out).unlink(missing_ok=True)  # no moment where an old record vouches for new bytes
        os.replace(tmp_out, out)
        os.replace(record, _record_path(out))


def _lock(lock_file: IO[str], timeout: float) -> None:
    """Take the build lock, waiting at most ``timeout`` seconds for another process's build."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"another process held the build lock {lock_file.name} for over {timeout:g} s "
                                   "(S2D_NATIVE_BUILD_TIMEOUT)") from None
            time.sleep(0.1)


def ensure_built(compiler: str) -> Path:
    """The verified library for ``compiler``, built (or rebuilt, when damaged) under the build lock."""
    path = library_path(compiler)
    if verified(path):
        return path
    timeout = build_timeout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Processes starting together (a server and a bench, test workers) build it once: the first holds
    # the lock and builds; the others wait (a bounded time), then find the verified library there.
    with open(path.parent / ".build.lock", "w") as lock:
        _lock(lock, 2 * timeout)  # its build's time limit, and then some
        if not verified(path):
            build(compiler, path, timeout)
    return path


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded runtime, built if needed; None (with one line on stderr) where it cannot run."""
    if os.environ.get("S2D_NATIVE", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
        return None
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
        path = ensure_built(compiler)
        lib = ctypes.CDLL(str(path))
        for name, (args, res) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        if lib.s2d_isa() == 0:
            raise RuntimeError("this CPU has neither AVX2+FMA nor AVX512")
        if (gomp := _torch_openmp()) is not None:
            lib.s2d_use_openmp(str(gomp).encode())
        return lib
    except Exception as err:  # slower, still correct
        # One line on stderr, whatever the warning filters say (a hidden fallback looks like a slowdown).
        reason = " ".join(str(err).split())[-600:]
        print(f"s2d: the native CPU runtime is unavailable ({reason}); using torch's slower path",
              file=sys.stderr, flush=True)
        return None


def _torch_openmp(maps: str | None = None) -> Path | None:
    """The libgomp torch runs on, if loaded: passes then run on torch's own OpenMP team.

    Other packages ship their own copy (sentencepiece, which ``from transformers import AutoTokenizer`` loads), and
    it may come first in ``maps`` (``/proc/self/maps``' text): the copy inside torch's install wins. On another
    copy the passes ran on a second team beside torch's, two teams of threads for the same cores (no slowdown
    measured on the AMX Xeon: RESULTS.md, fourteenth session)."""
    if os.environ.get("S2D_NATIVE_POOL") == "own" or "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        maps = Path("/proc/self/maps").read_text() if maps is None else maps
    except OSError:
        return None
    found = list(dict.fromkeys(Path(line.rsplit(" ", 1)[-1]) for line in maps.splitlines()
                               if "/libgomp" in line.rsplit(" ", 1)[-1]))
    torch_dir = Path(torch.__file__).parent
    homes = (torch_dir, torch_dir.parent / "torch.libs")  # pip wheels: torch/lib, or torch.libs (auditwheel)
    for path in found:
        if any(path.is_relative_to(home) for home in homes):
            return path
    return found[0] if found else None


# Levels whose bf16 products read packed weights (runtime.cpp's packs_at): AVX2, AVX512-BF16, AMX (tiles on panels).
PACKED_LEVELS = (1, 2, 3)
# Rows per prefill pass on the runtime (NativeRuntime.prefill_rows), and the widest model (hidden size) it prefills:
# on the vector paths 48 rows, up to 2,048 wide (measured at 576: wins; 2,048: ties); with AMX 64 rows (four
# tiles of 16), up to 512 wide (a draft of 384: wins; zoo-l, 576: a wash; the 1B shape, 2,048: loses).
# S2D_PREFILL_ROWS=N sets the rows, 0 = torch.
PREFILL_ROWS = 48
PREFILL_MAX_WIDTH = 2048
AMX_PREFILL_ROWS = 64
AMX_PREFILL_MAX_WIDTH = 512


def prefill_rows(level: int, width: int, packed: bool) -> int:
    """Rows per prefill pass on a runtime of instruction-set ``level`` for a model ``width`` wide; 0: torch."""
    rows, widest = (AMX_PREFILL_ROWS, AMX_PREFILL_MAX_WIDTH) if level == 3 else (PREFILL_ROWS, PREFILL_MAX_WIDTH)
    if not packed or width > widest:
        return 0
    setting = os.environ.get("S2D_PREFILL_ROWS", "")
    return int(setting) if setting else rows


def check_settings() -> None:
    """Refuse values of the runtime's switches that runtime.cpp would silently ignore (it reads them once per
    process, or that would break a prefill), naming the variable: S2D_NATIVE_WIDE and S2D_NATIVE_FMA take 0 or 1,
    S2D_NATIVE_PREFETCH_ROWS 1-64, S2D_PREFILL_ROWS 0-64.
    An empty value means unset, as there."""
    for name in ("S2D_NATIVE_WIDE", "S2D_NATIVE_FMA"):
        value = os.environ.get(name, "")
        if value not in ("", "0", "1"):
            raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    rows = os.environ.get("S2D_NATIVE_PREFETCH_ROWS", "")
    if rows and not (rows.isdigit() and 1 <= int(rows) <= MAX_ROWS):
        raise ValueError(f"S2D_NATIVE_PREFETCH_ROWS must be 1-{MAX_ROWS}, got {rows!r}")
    rows = os.environ.get("S2D_PREFILL_ROWS", "")
    if rows and not (rows.isdigit() and 0 <= int(rows) <= MAX_ROWS):
        raise ValueError(f"S2D_PREFILL_ROWS must be 0-{MAX_ROWS} (0: prefill on torch), got {rows!r}")


def isa_level() -> int:
    """The instruction set new runtimes use: 3 = AMX, 2 = AVX512-BF16, 1 = AVX2, 0 = none (S2D_NATIVE_ISA)."""
    lib = library()
    if lib is None:
        return 0
    check_settings()
    wanted = {"avx2": 1, "avx512": 2, "amx": 3, "": 3}.get(os.environ.get("S2D_NATIVE_ISA", "").lower())
    if wanted is None:
        raise ValueError(f"S2D_NATIVE_ISA must be avx2, avx512 or amx, got {os.environ['S2D_NATIVE_ISA']!r}")
    return min(wanted, lib.s2d_isa())


def isa() -> str:
    """The instruction set new runtimes use here: 'AMX', 'AVX512-BF16', 'AVX2' or 'none'."""
    return ISA_NAMES[isa_level()]


def product_kind() -> str:
    """How the packed products run at the level passes use here, for reports (``isa_kind`` names the level):
    'AMX tiles', 'bf16 dot products' or 'float32 FMAs' (AVX512-BF16, ``fma_products``), '512-bit FMAs' or
    '256-bit FMAs' (AVX2, ``wide_products``), or 'torch' without the runtime."""
    level = isa_level()
    if level == 3:
        return "AMX tiles"
    if level == 2:
        return "float32 FMAs" if fma_products() else "bf16 dot products"
    if level == 1:
        return "512-bit FMAs" if wide_products() else "256-bit FMAs"
    return "torch"


def isa_kind() -> str:
    """What passes run on here, for reports: ``isa()``, but 'AVX512' where the AVX2 level's products run on
    512-bit vectors (``wide_products``: CPUs with AVX-512 and no AVX512-BF16)."""
    level = isa_level()
    return "AVX512" if level == 1 and wide_products() else ISA_NAMES[level]


def pack(w: Tensor) -> Tensor:
    """w [N, K] bfloat16 in the packed layout bf16 passes read (panels of k-pairs; see runtime.cpp)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU runtime is unavailable here")
    if w.dtype != torch.bfloat16 or w.dim() != 2:
        raise ValueError("pack takes a 2-D bfloat16 weight")
    w = w.contiguous()
    out = torch.empty(lib.s2d_packed_size(*w.shape), dtype=torch.int32)
    lib.s2d_pack(w.data_ptr(), w.shape[0], w.shape[1], out.data_ptr())
    return out


def put_bf16(x: Tensor, level: int | None = None) -> Tensor:
    """float32 x rounded to bfloat16 as the runtime stores activations (nearest even; NaN stays NaN).

    For tests: the kernels of ``level`` (as ``linear``'s) round whole vectors, then a scalar tail.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU runtime is unavailable here")
    if x.dtype != torch.float32:
        raise ValueError("put_bf16 takes float32")
    level = isa_level() if level is None else min(level, lib.s2d_isa())
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    lib.s2d_put_bf16(x.data_ptr(), x.numel(), out.data_ptr(), level)
    return out


def prefetch_rows(rows: int | None = None) -> int:
    """From how many rows the vector products prefetch their packed weights ahead; sets it first if ``rows``.

    The default is 1 on Intel CPUs and 4 on others (runtime.cpp, prefetch_rows), or S2D_NATIVE_PREFETCH_ROWS.
    Prefetches are hints: products are the same bits whatever the setting. For measurements and tests.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU runtime is unavailable here")
    if rows is not None and not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"prefetch rows must be 1-{MAX_ROWS}, got {rows}")
    return lib.s2d_prefetch_rows(0 if rows is None else rows)


def wide_products(on: bool | None = None) -> bool:
    """Whether the AVX2 level's packed products run on 512-bit vectors (the same bits); sets it first if ``on``.

    By default only where the CPU has AVX-512 but no AVX512-BF16 (Skylake to Ice Lake Xeons, whose best level is
    AVX2), or as S2D_NATIVE_WIDE=0/1 says; never where the CPU lacks AVX-512 (setting it there raises).
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU runtime is unavailable here")
    if on is None:
        return bool(lib.s2d_wide_products(-1))
    if lib.s2d_wide_products(int(on)) != int(on):
        raise ValueError("512-bit products need a CPU with AVX-512 (F, BW, VL, DQ)")
    return on


def fma_products(on: bool | None = None) -> bool:
    """Whether the AVX512-BF16 level's packed products run as float32 FMAs on widened weights rather than bf16 pair
    dot products; sets it first if ``on``. Other bits (the AVX2 level's), the same for every row count.

    By default on Intel CPUs of the AMX generation, whose bf16 dot products run at half the FMAs' rate (runtime.cpp,
    fma_products), or as S2D_NATIVE_FMA=0/1 says. For measurements and tests.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU runtime is unavailable here")
    return bool(lib.s2d_fma_products(-1 if on is None else int(on)))


def dot_peak(level: int | None = None, seconds: float = 0.05) -> float | None:
    """The arithmetic ceiling of the runtime's products, GFLOP/s, on torch's threads: the widest multiply-add
    they use (AVX512-BF16 bf16 pair dot products, AVX2 float32 FMAs, 512-bit where ``wide_products``), 12
    independent accumulators per thread, registers only, for about ``seconds``. No product can run faster. None
    at level 3 (AMX tiles: not measured) or without the runtime."""
    lib = library()
    if lib is None:
        return None
    level = isa_level() if level is None else min(level, lib.s2d_isa())
    if level >= 3:
        return None
    threads = torch.get_num_threads()
    lib.s2d_dot_peak(level, threads, 1000)  # the threads wake and settle
    t0 = time.perf_counter()
    lib.s2d_dot_peak(level, threads, 100_000)
    iters = max(1000, int(100_000 * seconds / (time.perf_counter() - t0)))  # about `seconds` at this rate
    return lib.s2d_dot_peak(level, threads, iters)


def handoff_ns(iters: int = 20_000) -> float | None:
    """Nanoseconds for one hand-off of a cache line between two of torch's threads, each way: ~30 where the
    two cores share an L3, several times that where they sit on different dies (a VM's vCPUs may move
    between the two from minute to minute). None with one thread or without the runtime."""
    lib = library()
    threads = torch.get_num_threads()
    if lib is None or threads < 2:
        return None
    return lib.s2d_handoff_ns(threads, iters)


def linear(x: Tensor, w: Tensor, level: int | None = None, packed: bool | Tensor | None = None,
           out: Tensor | None = None) -> Tensor:
    """x [M, K] @ w [N, K]^T -> float32 [M, N] through the runtime's product (both float32 or both bf16).

    For tests and measurements; ``level`` caps the instruction set (1 AVX2, 2 AVX512-BF16, 3 AMX; the
    default is the best this CPU has). ``packed``: the product over packed weights (bfloat16 only), as
    passes use them; None = as passes do, False = the row-major product (the path of
    other heads), or ``pack(w)`` made once (measurements). ``out``: a contiguous float32 [M, N] to write
    into (a measurement's repeated calls then allocate nothing).
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU runtime is unavailable here")
    level = isa_level() if level is None else min(level, lib.s2d_isa())
    if x.dtype != w.dtype or x.dtype not in (torch.float32, torch.bfloat16) or x.shape[-1] != w.shape[-1]:
        raise ValueError("x and w must share K and a dtype, float32 or bfloat16")
    x, w = x.contiguous(), w.contiguous()
    packs = x.dtype == torch.bfloat16 and level in PACKED_LEVELS
    if packed is None:
        packed = packs
    if isinstance(packed, Tensor):
        if not packs or packed.numel() != lib.s2d_packed_size(*w.shape):
            raise ValueError("packed must be pack(w), for bfloat16")
        panels = packed
    elif packed:
        if not packs:
            raise ValueError("packed products exist for bfloat16 only")
        panels = pack(w)
    else:
        panels = None
    shape = (x.shape[0], w.shape[0])
    if out is not None and (out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 tensor of shape {list(shape)}")
    y = torch.empty(shape, dtype=torch.float32) if out is None else out
    lib.s2d_linear(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], w.shape[0],
                   int(x.dtype == torch.bfloat16), torch.get_num_threads(), level, _ptr(panels))
    return y


_local = threading.local()  # .threads: this Python thread's override of every runtime's thread count


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run this Python thread's native passes (every model's) on ``n`` threads inside the block.

    Other Python threads keep their own setting; 0 restores each runtime's own count (torch's thread
    count when it was created).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"a thread count must be an integer >= 0, got {n!r}")
    before = getattr(_local, "threads", 0)
    _local.threads = n
    try:
        yield
    finally:
        _local.threads = before


def call_threads() -> int:
    """The thread count this Python thread's native calls ask for (0: each runtime's own)."""
    return getattr(_local, "threads", 0)


_version_of = operator.attrgetter("_version")


def weights_version(params: list[Tensor]) -> int:
    """The sum of the tensors' version counters: it grows with every in-place change to one."""
    return sum(map(_version_of, params))


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class NativeRuntime:
    """The C++ view of one Transformer: pointers to its own weight tensors (read in place)."""

    def __init__(self, lib: ctypes.CDLL, model: "Transformer") -> None:
        cfg = model.cfg
        self.lib = lib
        self.bf16 = model.dtype == torch.bfloat16
        self.hidden_size, self.vocab_size = cfg.hidden_size, cfg.vocab_size
        self.max_positions = model.cos.shape[0]
        self.dtype, self.embed_rows = model.dtype, model.embed.weight.shape[0]
        # The handle holds raw pointers: keep every tensor it reads alive as long as it lives.
        self._tensors = [p for p in model.parameters()] + [model.cos, model.sin]
        # The runtime reads bf16 weights from packed copies (runtime.cpp; AMX's tiles too),
        # which an in-place change of the tensors (an optimizer step) would leave stale: the tensors'
        # version counters at packing time tell (``stale``).
        self.packed = self.bf16 and isa_level() in PACKED_LEVELS and os.environ.get("S2D_NATIVE_PACK", "1") != "0"
        # Inference tensors (a model loaded under torch.inference_mode()) keep no version counter; they can
        # change in place only inside inference mode, which no optimizer step runs in. Only the packed
        # weights are watched: norms and biases are read in place. (Each counter read costs ~0.8 us right
        # after a pass, whose weights have flushed every cache: 74 of them took 62 us of a 2.4 ms zoo-l pass.)
        packed_weights = [w for layer in model.layers for w in (layer.qkv.weight, layer.o.weight,
                                                                  layer.gate_up.weight, layer.down.weight)]
        self._params = [p for p in [*packed_weights, model.lm_head.weight] if not p.is_inference()]
        self._version = weights_version(self._params)
        self.handle = lib.s2d_model_new(
            cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
            cfg.vocab_size, self.max_positions, cfg.rms_norm_eps, int(self.bf16), _ptr(model.cos), _ptr(model.sin),
            _ptr(model.norm), _ptr(model.lm_head.weight), torch.get_num_threads(), isa_level(), int(self.packed))
        self.isa = ISA_NAMES[isa_level()]
        # A causal block of more than MAX_ROWS rows (a prefill) runs as passes of this many rows here, or on
        # torch (0). Where weights are packed and the model is at most 2048 wide, 48-row passes beat or tie
        # oneDNN's 256-row products (zoo-l, width 576: 1.07x; AVX2 1.15x; the 1B shape, width 2048:
        # 1.03-1.05x, AVX2 1.03-1.09x, once rows 4 KB apart stopped sharing L1 sets; 0.77-0.87x before).
        # Wider models are unmeasured and keep torch. benchmarks/RESULTS.md, "Prefill on the runtime".
        # With AMX, models up to 512 wide (drafts) prefill in 64-row passes on the tiles: a draft's prefill is one
        # call of the whole prompt, and oneDNN builds kernels for every new row count (6-10 ms a product shape),
        # which every prompt length is: the passes ran 1.48-1.84x torch's speed on the draft's prefills of new
        # lengths (`benchmarks/prefill_paths.py --whole`). Wider models keep torch: their prefill comes in 256-row
        # chunks (decode.py), so only the last chunk's shape is new, and zoo-l (576 wide) measured a wash
        # (0.71-1.45x from one process to the next); the 1B shape (2,048 wide) 0.88x. RESULTS.md, fourteenth session.
        self.prefill_rows = prefill_rows(isa_level(), cfg.hidden_size, self.packed)
        for i, layer in enumerate(model.layers):
            lib.s2d_model_set_layer(
                self.handle, i, _ptr(layer.attn_norm), _ptr(layer.qkv.weight), _ptr(layer.qkv.bias),
                _ptr(layer.o.weight), _ptr(layer.o.bias), _ptr(layer.mlp_norm), _ptr(layer.gate_up.weight),
                _ptr(layer.gate_up.bias), _ptr(layer.down.weight), _ptr(layer.down.bias))
        lib.s2d_model_set_embedding(self.handle, _ptr(model.embed.weight), model.embed.weight.shape[0])

    def stale(self) -> bool:
        """Whether the model's weights changed in place since this runtime packed them."""
        return self.packed and weights_version(self._params) != self._version

    @classmethod
    def create(cls, model: "Transformer") -> "NativeRuntime | None":
        """A runtime for ``model``, or None when the model or machine is not one it serves."""
        lib = library()
        if lib is None or model.device.type != "cpu" or model.dtype not in (torch.bfloat16, torch.float32):
            return None
        if model.cfg.head_dim > MAX_HEAD_DIM or model.cfg.num_heads % model.cfg.num_kv_heads:
            return None
        tensors = [*model.parameters(), model.cos, model.sin]
        if any(not t.is_contiguous() or t.dtype != model.dtype for t in model.parameters()):
            return None
        if not all(t.device.type == "cpu" for t in tensors):
            return None
        return cls(lib, model)

    def __del__(self) -> None:
        handle, self.handle = getattr(self, "handle", None), None
        if handle:
            self.lib.s2d_model_free(handle)

    def profile(self, on: bool | None = None) -> dict[str, float]:
        """Seconds per phase since profiling was last turned on; ``on`` turns it on (clearing) or off."""
        out = (ctypes.c_double * len(PHASES))()
        self.lib.s2d_profile(self.handle, -1 if on is None else int(on), out)
        return dict(zip(PHASES, out))

    def run_layers(self, hidden: Tensor, positions: Tensor, cache: "KVCache", slot: int, start: int, end: int,
                   block_mask: Tensor | None) -> Tensor:
        """hidden [1, T, C] -> [1, T, C] through layers start..end-1 (keys/values at slots slot..slot+T-1)."""
        _, t, c = hidden.shape
        x = hidden.reshape(t, c).clone(memory_format=torch.contiguous_format)
        pos = positions.to(torch.int64).contiguous()
        mask = None if block_mask is None else block_mask.to(torch.uint8).contiguous()
        status = self.lib.s2d_run_layers(self.handle, x.data_ptr(), t, pos.data_ptr(), *cache.native_layout, slot,
                                         _ptr(mask), start, end, call_threads())
        self._check(status, f"{slot} + {t} tokens", cache.capacity, t, pos)
        return x.view(1, t, c)

    def run_layers_multi(self, hidden: Tensor, positions: Tensor, caches: list["KVCache"], rows: list[int],
                         slots: list[int], masks: list[Tensor | None], start: int, end: int) -> Tensor:
        """hidden [T, C]: the rows of several sequences, ``rows[i]`` of sequence i after those before it, each
        attending to ``caches[i]`` (written at slots ``slots[i]`` ..) and, among its rows, as ``masks[i]``
        ([rows, rows] bool, or None: causal) allows. One pass; returns [T, C]."""
        t, c = hidden.shape
        x = hidden.clone(memory_format=torch.contiguous_format)
        pos = positions.to(torch.int64).contiguous()
        n = len(caches)
        keep = [None if m is None else m.to(torch.uint8).contiguous() for m in masks]  # alive during the call
        seg_rows = (ctypes.c_int * n)(*rows)
        layouts = [cache.native_layout for cache in caches]  # one layout for all (the caller checks)
        kcs = (ctypes.c_void_p * n)(*[layout[0] for layout in layouts])
        vcs = (ctypes.c_void_p * n)(*[layout[1] for layout in layouts])
        seg_slots = (ctypes.c_int64 * n)(*slots)
        seg_masks = (ctypes.c_void_p * n)(*[_ptr(m) for m in keep])
        status = self.lib.s2d_run_layers_multi(self.handle, x.data_ptr(), t, pos.data_ptr(), n, seg_rows, kcs, vcs,
                                               seg_slots, seg_masks, *layouts[0][2:], start, end, call_threads())
        if status == -5:
            raise ValueError(f"the sequences' rows {rows} must each be >= 1 and add up to the pass's {t}")
        self._check(status, f"slots {slots} + rows {rows}", caches[0].capacity, t, pos)
        return x

    def greedy(self, ids: Tensor, positions: Tensor, cache: "KVCache", slot: int, block_mask: Tensor | None,
               hidden: bool = True) -> tuple[Tensor, Tensor | None]:
        """ids [1, T] -> (the argmax token after each row [T], the last layer's hidden states [T, C] or, without
        ``hidden``, None) through the embedding, every layer (keys/values at slots slot..slot+T-1) and the head,
        in one call: the tokens and bits of ``run_layers`` then ``argmax``, without returning to Python between
        them (a decoding step's Python work runs on caches the pass has just flushed: each torch call costs
        10-20 us there, and the two calls' Python ~0.3 ms of a 2.4 ms zoo-l pass)."""
        t = ids.shape[-1]
        if ids.dtype != torch.int64 or not ids.is_contiguous():
            ids = ids.to(torch.int64).contiguous()
        if positions.dtype != torch.int64 or not positions.is_contiguous():
            positions = positions.to(torch.int64).contiguous()
        mask = None if block_mask is None else block_mask.to(torch.uint8).contiguous()
        x = torch.empty(t, self.hidden_size, dtype=self.dtype) if hidden else None
        tokens = torch.empty(t, dtype=torch.int64)
        status = self.lib.s2d_greedy(self.handle, ids.data_ptr(), t, positions.data_ptr(), *cache.native_layout, slot,
                                     _ptr(mask), _ptr(x), tokens.data_ptr(), call_threads())
        if status:
            self._greedy_error(status, ids.tolist(), positions.tolist(), slot, cache.capacity)
        return tokens, x

    def greedy_token(self, token: int, position: int, cache: "KVCache", slot: int) -> int:
        """``greedy`` of one row with ints in and out: its ids live in ctypes cells, not tensors (the decoding
        loop's hot path; ``Transformer.greedy_token``)."""
        ids, pos, out = ctypes.c_int64(token), ctypes.c_int64(position), ctypes.c_int64()
        status = self.lib.s2d_greedy(self.handle, ctypes.addressof(ids), 1, ctypes.addressof(pos), *cache.native_layout,
                                     slot, None, None, ctypes.addressof(out), call_threads())
        if status:
            self._greedy_error(status, [token], [position], slot, cache.capacity)
        return out.value

    def _greedy_error(self, status: int, ids: list[int], positions: list[int], slot: int, capacity: int) -> None:
        if status == -6:
            raise IndexError(f"token ids must lie in [0, {self.embed_rows}), got {ids}")
        if status == -4:
            raise CheckpointError(NONFINITE.format(model="model"))
        self._check(status, f"{slot} + {len(ids)} tokens", capacity, len(ids), positions)

    def _check(self, status: int, filled: str, capacity: int, t: int, pos: Tensor | list[int]) -> None:
        """A layers call's status as the error it means (0: none)."""
        if status == -3:
            raise ValueError(f"cache overflow: {filled} > capacity {capacity}")
        if status == -2:
            raise ValueError(f"a native pass takes 1 to {MAX_ROWS} tokens, got {t}")
        if status:
            raise ValueError(f"positions must lie in [0, {self.max_positions}), got "
                             f"{pos.tolist() if isinstance(pos, Tensor) else pos}")

    def logits(self, hidden: Tensor, head: Tensor | None = None) -> Tensor:
        """hidden [..., C] -> float32 logits [..., V] (``head`` [V', C]: another head, e.g. a vocabulary subset)."""
        rows = self._rows(hidden)
        vocab = self.vocab_size if head is None else head.shape[0]
        out = torch.empty(rows.shape[0], vocab, dtype=torch.float32)
        self._head(rows, head, out.data_ptr(), None, None)
        return out.view(*hidden.shape[:-1], vocab)

    def argmax(self, hidden: Tensor) -> Tensor:
        """hidden [..., C] -> the argmax token of each row [...] (long), without building the logits in Python."""
        rows = self._rows(hidden)
        tokens = torch.empty(rows.shape[0], dtype=torch.int64)
        self._head(rows, None, None, tokens.data_ptr(), None)
        return tokens.view(hidden.shape[:-1])

    def top1(self, hidden: Tensor, head: Tensor | None = None) -> tuple[int, float]:
        """hidden [C] -> (argmax token, its softmax probability), without building the logits in Python.

        ``head`` [V', C]: another head (a vocabulary subset): the token is then an index into it.
        """
        rows = self._rows(hidden)
        token, prob = ctypes.c_int64(), ctypes.c_float()
        self._head(rows, head, None, ctypes.addressof(token), ctypes.addressof(prob))
        return token.value, prob.value

    def _rows(self, hidden: Tensor) -> Tensor:
        rows = hidden.reshape(-1, self.hidden_size)
        if rows.shape[0] > MAX_ROWS:
            raise ValueError(f"a native head call takes 1 to {MAX_ROWS} rows, got {rows.shape[0]}")
        return rows.contiguous()

    def _head(self, rows: Tensor, head: Tensor | None, out: int | None, tokens: int | None, probs: int | None) -> None:
        if head is not None and (head.dtype != rows.dtype or head.shape[-1] != self.hidden_size
                                 or not head.is_contiguous()):
            raise ValueError("a head must be a contiguous [V, hidden] tensor in the model's dtype")
        status = self.lib.s2d_head(self.handle, rows.data_ptr(), rows.shape[0], _ptr(head),
                                   0 if head is None else head.shape[0], out, tokens, probs, call_threads())
        if status == -4:
            raise CheckpointError(NONFINITE.format(model="model"))
