"""What bounds speculative speedup here: forward-pass costs of targets and draft exits, and where they go.

    python benchmarks/costs.py --zoo ../shared/zoo --draft s2d/data/default/draft [--context 400] [--out F]
    python benchmarks/costs.py --models runs/llama-1b-shape --draft s2d/data/default/draft --sizes 1,6,16

For each target: the time of one greedy verification pass over 1 new token and over k new tokens
at a fixed context length (sizes timed round-robin, so machine drift does not bend their ratios), through the native runtime and through the torch reference path (``--reference``);
where each pass size goes, phase by phase (the runtime's profiler: qkv, the cache writes, attention, o, gate/up,
down, the head, and the rest: Python, the ctypes call, the embedding row), each phase also as a multiple of the
one-token pass's; for the draft: one token through the layers of each exit plus the
head, and the head alone. Ratios to the target's 1-token pass are the c of Leviathan et al.:
expected speedup ~ MAT / (1 + k * c) * (t_1 / t_{k+1}).

The ``floor`` column is the memory-bandwidth floor of a one-token pass: the time to read the bytes such a
pass must stream (every weight it multiplies by: the layers, the final norm and the LM head; not an untied
input embedding, of which a pass reads one row) once, on the same torch threads the runtime runs on. It is
measured, not computed from a datasheet: ``torch.amax`` over a float32 buffer of that many bytes (at least
twice the CPU's last-level cache as sysfs reports it and at least 64 MiB, so it streams from DRAM every
time; a smaller model's floor is that read scaled down to its bytes), filled with ones first so that every
page is real memory (an untouched ``torch.empty`` maps the shared zero page and would read from cache). A
float32 max is far below the CPU's arithmetic peak, so it measures what the memory delivers (on the Zen 4 host amax
read ~10% faster than sum, and a bfloat16 sum no faster: the floor takes the fastest read found). The
floor is timed in the same rounds as the passes (round-robin with the sizes; back to back, its own run
of reads in each round), because this host's bandwidth drifts 2-3x between minutes: ``1 tok / floor`` compares times
taken within the same seconds. A model whose weights (partly) stay in the last-level cache from one pass to the
next can run below this floor (zoo-s on the Zen 4; zoo-l on the AMX Xeon VM, whose L3 holds some 64-100 MB).

The ``arith`` columns are the arithmetic floor of a k-token pass: its products' multiply-adds (2 k flops per
weight it streams) at the rate the runtime's own product reaches when nothing waits on memory (``peak``: 64
rows against a [2048, 576] weight that stays in the CPU's caches, packed where passes pack, the same threads),
timed in the same rounds as the passes and the memory floor. A pass cannot beat the larger of its two floors:
``pass / bound`` says how far above that it runs, and which bound it is (mem or arith).

Each round also times the threads' hand-off of one cache line (``native.handoff_ns``): a VM's two vCPUs may
sit on two cores that share an L3 (~30 ns) or on two dies (~170 ns), and move between the two from minute to
minute; on the Zen 4 host, the second placement streams memory faster and slows every exchange between the
threads (barriers, rows one thread writes and the other reads), so one-token passes get faster and many-row
passes slower there. ``--rounds`` (3) sets how many back-to-back rounds run; from 5 on, each ratio's spread over
them is printed too: on the AMX Xeon VM held to AVX512-BF16 a 6-row pass cost 1.20x to 2.00x a one-row pass from
one round to the next (median 1.69x over 20; benchmarks/RESULTS.md, thirteenth session).

The ``ceiling`` table bounds the goals stated as ratios ("a k-token pass within x of a one-token pass"):
the instruction set's multiply-add rate with nothing but registers (``native.dot_peak``: AVX512-BF16 dot
products or AVX2 FMAs; AMX is not measured), timed in the same rounds, and the least time a k-token pass's
products and attention could take at it. Where that least time over the one-token pass measured exceeds a
goal's ratio, no kernel can meet the goal against that one-token pass.

``--stream`` adds the product kernel alone: k rows against one weight of the pass's bytes (the model's width,
packed where passes pack, at least FLOOR_MIN_BYTES; with ``--stream-bytes pass`` exactly the pass's bytes, which
may stay in the last-level cache between calls as a pass's weights do), one call, timed in the same rounds. It is a
pass's products with nothing else (no attention, norms, head argmax or barriers between products), so it shows how
far the kernel overlaps its arithmetic with its reads. ``(k tok stream - 1 tok stream) / 1 tok`` is the share of a
one-token pass that k rows add in the products alone: where it exceeds 0.3 for k = 6, no change outside the product
kernel brings a 6-token pass within 1.3x of a one-token pass.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from s2d.bench.results import cpu_name
from s2d.drafting import sorted_exits
from s2d.model import native
from s2d.model.loading import load_model

CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")


def last_level_cache_bytes(cache_dir: Path = CACHE_DIR) -> int:
    """The largest cache this CPU reports (Linux sysfs: ``index*/size``, e.g. "32768K"), or 32 MiB where it says
    nothing (the Zen 4 host's L3)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for path in cache_dir.glob("index*/size"):
        text = path.read_text().strip()
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=32 << 20)


# Twice the last-level cache (at least 64 MiB): a buffer this large cannot stay cached, so the floor reads DRAM. A
# fixed 64 MiB did not on an AMX Xeon VM that reports a 480 MiB L3: there amax read 64 MiB at 52-56 GB/s, 105 MiB
# at 23-30 and 256 MiB-2 GiB at 19-27 (benchmarks/RESULTS.md, ninth session).
FLOOR_MIN_BYTES = max(64 << 20, 2 * last_level_cache_bytes())


def streamed_bytes(model) -> int:
    """Bytes of weights one decoding pass reads: every parameter but an untied input embedding (one row of
    which is read); a tied embedding is the LM head and is read whole, once (parameters() lists it once)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head.weight is not model.embed.weight:
        total -= model.embed.weight.numel() * model.embed.weight.element_size()
    return total


class Floor:
    """Calling it reads a DRAM-resident buffer once (torch.amax, torch's current threads); ``seconds(t)``
    scales a measured read to ``nbytes``, the bytes of the model's weights."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        # Written (ones), not torch.empty: untouched pages all map the zero page, which reads from cache.
        self.buffer = torch.ones(max(nbytes, FLOOR_MIN_BYTES) // 4, dtype=torch.float32)
        self.scale = nbytes / (self.buffer.numel() * 4)

    def __call__(self) -> None:
        self.buffer.amax()

    def seconds(self, measured: float) -> float:
        return measured * self.scale


PEAK_SHAPE = (64, 2048, 576)  # rows, outputs, inputs of the product that measures the arithmetic rate


class Peak:
    """Calling it runs the runtime's product over PEAK_SHAPE four times: the first brings the weight into cache
    (a pass before it has flushed it), the fastest of the other three is a sample (``take``: their median).
    Each call also measures the instruction set's multiply-add ceiling (``native.dot_peak``, registers only)
    and the threads' hand-off time (``native.handoff_ns``); ``take`` leaves the fastest ceiling since the last
    take in ``ceiling`` (GFLOP/s) and the median hand-off in ``handoff`` (ns; None where not measured)."""

    def __init__(self, dtype: torch.dtype) -> None:
        m, n, k = PEAK_SHAPE
        gen = torch.Generator().manual_seed(0)
        self.w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
        self.x = torch.randn(m, k, generator=gen).to(dtype)
        packs = dtype == torch.bfloat16 and native.isa_level() in native.PACKED_LEVELS
        self.panels = native.pack(self.w) if packs else None  # packed once, as a model's weights are
        self.samples: list[float] = []
        self.ceilings: list[float] = []
        self.ceiling: float | None = None
        self.handoffs: list[float] = []
        self.handoff: float | None = None

    def __call__(self) -> None:
        native.linear(self.x, self.w, packed=self.panels)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            native.linear(self.x, self.w, packed=self.panels)
            best = min(best, time.perf_counter() - t0)
        self.samples.append(best)
        ceiling = native.dot_peak(seconds=0.005)
        if ceiling is not None:
            self.ceilings.append(ceiling)
        handoff = native.handoff_ns(2000)
        if handoff is not None:
            self.handoffs.append(handoff)

    def take(self) -> float:
        """Seconds of one call with the weight in cache: the median sample since the last take."""
        samples, self.samples = sorted(self.samples), []
        self.ceiling, self.ceilings = max(self.ceilings, default=None), []
        handoffs, self.handoffs = sorted(self.handoffs), []
        self.handoff = handoffs[len(handoffs) // 2] if handoffs else None
        return samples[len(samples) // 2]


class Stream:
    """``stream(k)`` runs the runtime's product of k rows against one weight [N, width] of the pass's bytes,
    packed where passes pack; ``seconds(t)`` scales a call to those bytes, as Floor does. ``resident``: the
    weight is the pass's bytes exactly, so that it may stay in the last-level cache between calls as a pass's
    weights do; otherwise it is at least FLOOR_MIN_BYTES, and read from DRAM."""

    def __init__(self, nbytes: int, width: int, dtype: torch.dtype, sizes: list[int], resident: bool = False) -> None:
        size = dtype.itemsize
        outputs = (nbytes if resident else max(nbytes, FLOOR_MIN_BYTES)) // (width * size) // 32 * 32  # whole panels
        gen = torch.Generator().manual_seed(0)
        self.w = torch.empty(outputs, width, dtype=dtype).uniform_(-0.05, 0.05, generator=gen)
        packs = dtype == torch.bfloat16 and native.isa_level() in native.PACKED_LEVELS
        self.panels = native.pack(self.w) if packs else None
        self.x = {k: torch.randn(k, width, generator=gen).to(dtype) for k in sizes}
        self.out = {k: torch.empty(k, outputs) for k in sizes}  # written in place: no allocation per call
        self.scale = nbytes / (outputs * width * size)

    def __call__(self, k: int) -> None:
        native.linear(self.x[k], self.w, packed=self.panels, out=self.out[k])

    def seconds(self, measured: float) -> float:
        return measured * self.scale


def timed_together(fns: dict, reps: int) -> dict:
    """Median seconds of each function, called round-robin (one call of each per round), so that a
    machine whose speed drifts during the run shifts all of them alike and their ratios stay true."""
    times: dict = {k: [] for k in fns}
    for fn in fns.values():
        fn()
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def timed(fn, reps: int) -> float:
    return timed_together({0: fn}, reps)[0]


def prefilled(model, context: int, extra: int):
    cache = model.new_cache(capacity=context + extra)
    ids = torch.randint(0, model.cfg.vocab_size, (1, context + extra))
    model(ids[:, :context], torch.arange(context), cache, logits_at=None)
    return cache, ids


def pass_fn(model, cache, ids, context: int, new: int):
    """One greedy pass over ``new`` tokens after ``context`` cached ones, as the engine runs it (one token: plain
    decoding's ``greedy_token``; more: a verification pass's ``greedy``), the cache truncated back to the
    context first, so every call sees the same context."""
    block, positions = ids[:, context:context + new], torch.arange(context, context + new)
    token = int(ids[0, context])

    @torch.inference_mode()
    def step() -> None:
        cache.truncate(context)
        if new == 1:
            model.greedy_token(token, context, cache)
        else:
            model.greedy(block, positions, cache)

    return step


@torch.inference_mode()
def block_costs(model, context: int, sizes: list[int], reps: int, floor: Floor | None = None,
                peak: Peak | None = None, stream: Stream | None = None) -> dict:
    """Seconds of one greedy verification pass as the engine runs it (``new`` tokens in, their argmax out),
    by size; with ``floor``, also its read of the weights' bytes (key "floor"), with ``peak``, one call
    of the peak product (key "peak"), and with ``stream``, its k-row product (key "stream k"), in the same
    rounds."""
    # One cache for all sizes (each pass truncates it back to the context): separate caches would
    # multiply the working set and push the weights out of the CPU's caches.
    cache, ids = prefilled(model, context, max(sizes))
    steps = {new: pass_fn(model, cache, ids, context, new) for new in sizes}
    if floor is not None:
        steps["floor"] = floor
    if peak is not None:
        steps["peak"] = peak
    if stream is not None:
        steps.update({f"stream {k}": functools.partial(stream, k) for k in sizes})
    times = timed_together(steps, reps)
    if floor is not None:
        times["floor"] = floor.seconds(times["floor"])
    if stream is not None:
        for k in sizes:
            times[f"stream {k}"] = stream.seconds(times[f"stream {k}"])
    if peak is not None:
        times["peak"] = peak.take()
        if peak.ceiling is not None:
            times["ceiling"] = peak.ceiling
        if peak.handoff is not None:
            times["handoff"] = peak.handoff
    return times


@torch.inference_mode()
def block_costs_back_to_back(model, context: int, sizes: list[int], reps: int, rounds: int = 3,
                             floor: Floor | None = None, peak: Peak | None = None,
                             stream: Stream | None = None) -> dict:
    """Seconds of a greedy pass when passes of one size follow each other (as in plain decoding): each
    size ``reps`` times in a row, ``rounds`` rounds alternating the sizes, the best round's median; with
    ``floor`` (``peak``, ``stream``), its reads (calls) ``reps`` times in a row in each round too (key
    "floor", "peak", "stream k"). Key "rounds": each round's medians by size, and its hand-off (ns) where
    measured: the best of each size may come from different rounds, a ratio within a round from one."""
    cache, ids = prefilled(model, context, max(sizes))
    best: dict = {"rounds": []}
    for _ in range(rounds):
        this: dict = {}
        if floor is not None:
            best["floor"] = min(best.get("floor", float("inf")), floor.seconds(timed(floor, reps)))
        if peak is not None:
            for _ in range(reps):
                peak()
            best["peak"] = min(best.get("peak", float("inf")), peak.take())
            if peak.ceiling is not None:
                best["ceiling"] = max(best.get("ceiling", 0.0), peak.ceiling)
            if peak.handoff is not None:
                best.setdefault("handoffs", []).append(peak.handoff)
                this["handoff"] = peak.handoff
        for new in sizes:
            this[new] = timed(pass_fn(model, cache, ids, context, new), reps)
            best[new] = min(best.get(new, float("inf")), this[new])
            if stream is not None:
                key = f"stream {new}"
                best[key] = min(best.get(key, float("inf")), stream.seconds(timed(functools.partial(stream, new), reps)))
        best["rounds"].append(this)
    return best


@torch.inference_mode()
def step_breakdown(model, context: int, reps: int, new: int = 1) -> dict[str, float]:
    """Milliseconds per ``new``-token pass by phase (native runtime only; its own profiler), and the rest."""
    runtime = model.native_runtime()
    cache, ids = prefilled(model, context, new)
    step = pass_fn(model, cache, ids, context, new)

    step()
    runtime.profile(True)
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    total = (time.perf_counter() - t0) / reps
    out = {k: v / reps for k, v in runtime.profile(False).items()}
    out["rest"] = total - sum(out.values())
    out["total"] = total
    return {k: 1000 * v for k, v in out.items()}


def print_breakdown(report: dict) -> None:
    """Each pass size's phases (ms), and each phase over the one-token pass's where that was timed."""
    print("\nPasses by phase (ms; the runtime's profiler; rest: Python, dispatch, embedding):")
    for name, row in report["targets"].items():
        parts = row.get("breakdown", {})
        if not parts:
            continue
        phases = list(next(iter(parts.values())))
        print(f"\n| {name}: rows | " + " | ".join(phases) + " |\n|---|" + "---|" * len(phases))
        for k, times in parts.items():
            cells = [f"{v:.3f}" + (f" ({v / parts[1][p]:.2f}x)" if k != 1 and 1 in parts and parts[1][p] > 0 else "")
                     for p, v in times.items()]
            print(f"| {k} | " + " | ".join(cells) + " |")


@torch.inference_mode()
def exit_cost(draft, context: int, layers: int, reps: int, head_only: bool = False) -> float:
    """Seconds of one draft token through ``layers`` layers and the head (or the head alone)."""
    cache = draft.new_cache(num_layers=layers)
    ids = torch.randint(0, draft.cfg.vocab_size, (1, context + 1))
    draft.run_layers(draft.embed_tokens(ids[:, :context]), torch.arange(context), cache, 0, layers)
    pos = torch.arange(context, context + 1)
    h = draft.embed_tokens(ids[:, context:])

    def step():
        if head_only:
            draft.logits(h[0, -1]).argmax()
            return
        cache.truncate(context)
        out = draft.run_layers(draft.embed_tokens(ids[:, context:]), pos, cache, 0, layers)
        draft.logits(out[0, -1]).argmax()

    return timed(step, reps)


def timed_paths(report: dict, key: str):
    """(target, path, the target's row, the path's times) for each path of each target that measured ``key``."""
    for name, row in report["targets"].items():
        for path_name in ("native", "back to back"):
            if key in row.get(path_name, {}):
                yield name, path_name, row, row[path_name]


def print_bounds(report: dict, sizes: list[int]) -> None:
    """Each pass against the larger of its memory and arithmetic floors (see above), per path timed."""
    print("\n| target | path | peak GFLOP/s | " + " | ".join(f"{k} tok: arith | {k} tok / bound" for k in sizes) + " |")
    print("|---|---|---|" + "---|---|" * len(sizes))
    for name, path_name, row, r in timed_paths(report, "peak"):
        flops = 2 * PEAK_SHAPE[0] * PEAK_SHAPE[1] * PEAK_SHAPE[2]  # of one peak call, r["peak"] ms
        gflops = flops / r["peak"] / 1e6
        cells = []
        for k in sizes:
            arith = r["peak"] * 2 * k * row["params"] / flops  # ms
            bound, which = (arith, "arith") if arith > r["floor"] else (r["floor"], "mem")
            cells.append(f"{arith:.2f} | {r[k] / bound:.2f} ({which})")
        print(f"| {name} | {path_name} | {gflops:.0f} | " + " | ".join(cells) + " |")
    print("\narith: a pass's products at the peak (64 rows against a weight in cache, the runtime's own product, "
          "timed in the same rounds); bound: the larger of arith and the memory floor.")
    many = [k for k in sizes if k > 1]
    if 1 not in sizes or not many or next(timed_paths(report, "ceiling"), None) is None:
        return
    print("\n| target | path | ceiling GFLOP/s | " + " | ".join(f"{k} tok: least | {k} tok / 1 tok: least" for k in many)
          + " |")
    print("|---|---|---|" + "---|---|" * len(many))
    for name, path_name, row, r in timed_paths(report, "ceiling"):
        cells = []
        for k in many:
            least = pass_flops(row, k) / r["ceiling"] / 1e6  # ms
            cells.append(f"{least:.2f} | {least / r[1]:.2f}")
        print(f"| {name} | {path_name} | {r['ceiling']:.0f} | " + " | ".join(cells) + " |")
    print("\nceiling: the instruction set's multiply-add rate, registers only (native.dot_peak), the fastest in the "
          "same rounds; least: a k-token pass's products and attention (QK and PV at the context) at that rate, the "
          "least time any kernel could take, and that over the one-token pass timed: where it exceeds a goal's "
          "ratio, no design meets that goal against this one-token pass.")


def print_placement(report: dict, sizes: list[int]) -> None:
    """Each back-to-back round's ratios with its threads' hand-off, then every hand-off measured."""
    for name, row in report["targets"].items():
        rounds = row.get("back to back", {}).get("rounds", [])
        if 1 in sizes and len(sizes) > 1 and rounds:
            print(f"back to back, {name}, round by round: " + "; ".join(
                (f"hand-off {r['handoff']:.0f} ns: " if "handoff" in r else "")
                + ", ".join(f"{k} tok / 1 tok {r[k] / r[1]:.2f}" for k in sizes if k != 1) for r in rounds))
            if len(rounds) >= 5:
                print(f"back to back, {name}, over {len(rounds)} rounds: " + "; ".join(
                    f"{k} tok / 1 tok " + spread([r[k] / r[1] for r in rounds]) for k in sizes if k != 1))
    handoffs = [f"{name}, {path}: {fmt_handoff(row[path].get('handoff', row[path].get('handoffs')))}"
                for name, row in report["targets"].items() for path in ("native", "back to back")
                if "handoff" in row.get(path, {}) or "handoffs" in row.get(path, {})]
    if handoffs:
        print("threads' hand-off (ns each way, in the same rounds; ~30: the two cores share an L3, ~170: they sit on "
              "different dies): " + "; ".join(handoffs))


def spread(values: list[float]) -> str:
    """The least, the quartiles and the largest of ``values``: "min / q1 / median / q3 / max"."""
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return " / ".join(f"{x:.2f}" for x in (min(values), *quartiles, max(values))) + " (min / q1 / median / q3 / max)"


def fmt_handoff(v: float | list[float]) -> str:
    """One median, or one per round (back to back) joined by slashes."""
    return "/".join(f"{x:.0f}" for x in v) if isinstance(v, list) else f"{v:.0f}"


def in_ms(times: dict) -> dict:
    """block_costs' seconds in milliseconds (each round's too); the ceiling stays in GFLOP/s, hand-offs in ns."""
    return {k: [in_ms(r) for r in v] if k == "rounds" else v if k in ("ceiling", "handoff", "handoffs") else 1000 * v
            for k, v in times.items()}


def pass_flops(row: dict, k: int) -> float:
    """Multiply-add flops of a k-token pass: its products (2 k per weight it streams) and attention (scores and
    values against the context: 4 k context head_dim flops per head and layer)."""
    return 2 * k * row["params"] + k * row["attention_flops_per_row"]


def print_stream(report: dict, sizes: list[int]) -> None:
    """The product kernel alone over the pass's bytes (``--stream``), against the passes of the same rounds."""
    print("\n| target | path | " + " | ".join(f"{k} tok: stream" for k in sizes)
          + " | " + " | ".join(f"{k} tok: (stream - stream 1) / 1 tok" for k in sizes if k > 1) + " |")
    print("|---|---|" + "---|" * (2 * len(sizes) - (1 in sizes)))
    for name, row in report["targets"].items():
        for path_name in ("native", "back to back"):
            r = row.get(path_name, {})
            if "stream 1" not in r or 1 not in r:
                continue
            cells = [f"{r[f'stream {k}']:.2f}" for k in sizes]
            cells += [f"{(r[f'stream {k}'] - r['stream 1']) / r[1]:.2f}" for k in sizes if k > 1]
            print(f"| {name} | {path_name} | " + " | ".join(cells) + " |")
    print("\nstream: a k-token pass's products alone (the runtime's product of k rows over one weight of the pass's "
          "bytes, timed in the same rounds); (stream - stream 1) / 1 tok: what k rows add in the products alone, "
          "as a share of the one-token pass.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, help="the zoo directory (targets zoo-s, zoo-m, zoo-l)")
    ap.add_argument("--models", default=None, help="comma-separated target directories instead of --zoo")
    ap.add_argument("--draft", type=Path, required=True)
    ap.add_argument("--targets", default="zoo-s,zoo-m,zoo-l")
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--sizes", default="1,2,4,6,9,16,32,64", help="new tokens per pass")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--reference", action="store_true", help="also time the torch reference path")
    ap.add_argument("--back-to-back", action="store_true",
                    help="also time each size alone, passes of one size in a row (the fair ratio to a one-token pass)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="back-to-back rounds (each times every size, the floor and the peak); more rounds show how "
                         "the ratios move from minute to minute")
    ap.add_argument("--no-floor", action="store_true", help="leave out the memory floor (see above)")
    ap.add_argument("--stream", action="store_true",
                    help="also time the product kernel alone over the pass's bytes, k rows (see above)")
    ap.add_argument("--stream-bytes", choices=["dram", "pass"], default="dram",
                    help="--stream's weight: at least twice the last-level cache (dram), or exactly the pass's bytes, "
                         "which may stay cached between calls as a pass's weights do (pass)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.models:
        targets = {Path(p).name: Path(p) for p in args.models.split(",")}
    elif args.zoo:
        targets = {name: args.zoo / name for name in args.targets.split(",")}
    else:
        sys.exit("costs: pass --zoo or --models")
    for path in [*targets.values(), args.draft]:
        if not path.exists():
            sys.exit(f"costs: {path} not found")
    sizes = [int(s) for s in args.sizes.split(",")]
    report: dict = {"cpu": cpu_name(), "isa": native.isa_kind(), "products": native.product_kind(),
                    "threads": torch.get_num_threads(),
                    "context": args.context, "dtype": args.dtype, "targets": {}, "draft": {}}
    print(f"{report['cpu']}; native runtime: {report['isa']} ({report['products']}); {report['threads']} threads; context "
          f"{args.context} tokens; {args.dtype}; median of {args.reps} passes, milliseconds", flush=True)

    draft = load_model(args.draft, dtype=args.dtype)
    for e in sorted_exits(draft):
        report["draft"][f"exit {e}"] = 1000 * exit_cost(draft, args.context, e, args.reps * 3)
    report["draft"]["head alone"] = 1000 * exit_cost(draft, args.context, 1, args.reps * 3, head_only=True)

    for name, path in targets.items():
        target = load_model(path, dtype=args.dtype)
        floor = None if args.no_floor else Floor(streamed_bytes(target))
        peak = Peak(target.dtype) if floor is not None and native.library() is not None else None
        stream = None
        if args.stream and native.library() is not None:
            stream = Stream(streamed_bytes(target), target.cfg.hidden_size, target.dtype, sizes,
                            resident=args.stream_bytes == "pass")
        row: dict = {"native": in_ms(block_costs(target, args.context, sizes, args.reps, floor, peak, stream))}
        if floor is not None:
            row["weights_MB"] = floor.nbytes / 1e6
            row["params"] = streamed_bytes(target) // target.embed.weight.element_size()
            cfg = target.cfg
            row["attention_flops_per_row"] = 4 * args.context * cfg.head_dim * cfg.num_heads * cfg.num_layers
        if target.native_runtime() is not None:
            row["breakdown"] = {k: step_breakdown(target, args.context, args.reps * 3, k) for k in sizes}
        if args.back_to_back:
            row["back to back"] = in_ms(block_costs_back_to_back(target, args.context, sizes, args.reps * 5,
                                                                 rounds=args.rounds, floor=floor, peak=peak,
                                                                 stream=stream))
        if args.reference:
            target.use_native = False
            row["reference"] = in_ms(block_costs(target, args.context, sizes, args.reps, floor))
            target.use_native = True
        report["targets"][name] = row
        print(f"{name}: " + ", ".join(f"{k}: {v:.2f}" for k, v in row["native"].items()
                                      if isinstance(k, int) or k == "floor"), flush=True)
        del stream  # its weight is as large as the model's

    floors = not args.no_floor
    print("\n| target | path | " + " | ".join(f"{k} tok" for k in sizes) + " | 6 tok / 1 tok |"
          + (" floor | 1 tok / floor |" if floors else ""))
    print("|---|---|" + "---|" * (len(sizes) + 1 + 2 * floors))
    for name, row in report["targets"].items():
        for path_name in ("native", "back to back", "reference"):
            if path_name in row:
                r = row[path_name]
                ratio = f"{r[6] / r[1]:.2f}" if 6 in r and 1 in r else "-"
                line = f"| {name} | {path_name} | " + " | ".join(f"{r[k]:.2f}" for k in sizes) + f" | {ratio} |"
                if floors:
                    line += f" {r['floor']:.2f} | " + (f"{r[1] / r['floor']:.2f} |" if 1 in r else "- |")
                print(line)
    if floors:
        print("\nfloor: reading the weights one pass streams (" + ", ".join(
            f"{name} {row['weights_MB']:.0f} MB" for name, row in report["targets"].items())
            + f") once with torch.amax, {report['threads']} threads, timed in the same rounds as the passes; "
            "GB/s: " + ", ".join(f"{name} {row['weights_MB'] / row['native']['floor']:.1f}"
                                 for name, row in report["targets"].items()))
    print_placement(report, sizes)
    if floors and any("peak" in row["native"] for row in report["targets"].values()):
        print_bounds(report, sizes)
    if any("stream 1" in row["native"] for row in report["targets"].values()):
        print_stream(report, sizes)
    print_breakdown(report)
    print("\nDraft (ms): " + ", ".join(f"{k}: {v:.3f}" for k, v in report["draft"].items()))
    for name, row in report["targets"].items():
        one = row["native"][sizes[0]] if sizes[0] == 1 else None
        if one:
            print(f"- / {name} one-token pass: " + ", ".join(f"{k}: {v / one:.3f}" for k, v in report["draft"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)  # runs/ by default: records stay out of the tree
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
