"""Goodput-aware draft lengths for a batch: how many tokens each sequence may draft in this pass.

Alone, a sequence drafts as its method says. In a batch every drafted token is one more row of the shared
target pass, and on a CPU a row is arithmetic the whole batch waits for: eight sequences each drafting
eight tokens make a 72-row pass that costs several one-row passes, for tokens most of which are rejected.
So before a batched pass the draft budget is handed out slot by slot, best first (vLLM's adaptive
verification and DeepSeek's scheduler do the same on GPUs): a slot is (sequence, draft position), worth
the probability that the sequence's draft survives to that position (its running acceptance there), and
a slot is granted only while it raises the batch's expected tokens per second, given what a pass of that
many rows over those sequences' caches costs on this machine (``PassCost``: measured from the passes
themselves, attention apart from the rest).

Greedy output does not depend on how much is drafted (every method is lossless), and sampled output
keeps the target's distribution; a seeded sampling request keeps its method's own length, so it draws
exactly as it does alone.
"""

from __future__ import annotations

import heapq
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from s2d.model import native
from s2d.model.llama import Transformer

PRIOR_ROW_COST = 0.25  # a row over a one-row pass before any pass is measured (AVX512-BF16 zoo-l: ~0.2-0.3)
# attention per (row, cached key) over attention per cached key read, before two kinds of pass are measured
# (Zen 4, zoo-l, 32 sequences after 600 tokens: 0.09 against 1.46 ns; benchmarks/batch_passes.py)
PRIOR_ROW_KEY = 0.06
FIRST_SURVIVAL = 0.6  # the chance a sequence's first draft token is accepted, before it has any statistics
DECAY = 0.7  # each further position, past what the sequence has statistics for
EXPLORE = 2  # slots a sequence gets regardless while it has too few statistics to be judged
KNOWN = 4  # proposals at a position before its acceptance counts


@dataclass
class PassCost:
    """Seconds of a target pass, learned from the passes run, in two parts that grow with different things.

    - Everything but attention (the products, above all) grows with the pass's rows: an exponential moving
      mean per row count, and a straight line through them (fixed + per_row * rows). A step of more rows than
      one pass carries (``native.MAX_ROWS``) pays the fixed part once a pass.
    - Attention reads each sequence's cached keys and values once per pass, however many rows the sequence
      has, and computes a little per (row, key): per key read, a line in the key-weighted rows per sequence
      (per_key + per_row_key * rows). With many sequences in a pass this part is most of it (32 zoo-l
      sequences after 600 tokens: 28 of 45 ms), so a draft row costs far less than the pass's mean row; a line
      in rows alone saw that mean and granted 32 sequences almost no draft.

    Where the pass is not timed by phase (torch, CUDA: ``observe`` without ``attention``), the line in rows
    holds the whole pass."""

    seconds: dict[int, float] = field(default_factory=dict)  # rows -> all but attention, seconds
    per_key: dict[float, float] = field(default_factory=dict)  # rows per key (to 1/4) -> attention s per key

    def observe(self, rows: int, seconds: float, attention: float | None = None, keys: int = 0,
                row_keys: int = 0) -> None:
        """One pass of ``rows`` rows took ``seconds``, ``attention`` of them in attention (None: not timed
        apart), over ``keys`` cached keys read (each sequence's cache length) and ``row_keys`` (each row's
        cached keys, summed)."""
        _average(self.seconds, rows, seconds if attention is None else max(seconds - attention, 0.0))
        if attention is not None and keys > 0:
            _average(self.per_key, round(4 * row_keys / keys) / 4, attention / keys)

    def rows_line(self) -> tuple[float, float]:
        """(fixed, per row) of all but attention: seconds once a pass is measured, else one-row-pass units."""
        points = sorted(self.seconds.items())
        if len(points) >= 2:
            return _line(points)
        rows, seconds = points[0] if points else (1, 1.0)
        one = seconds / (1.0 - PRIOR_ROW_COST + PRIOR_ROW_COST * rows)
        return (1.0 - PRIOR_ROW_COST) * one, PRIOR_ROW_COST * one

    def key_line(self) -> tuple[float, float]:
        """(per key read, per row and key) of attention, in seconds; (0, 0) where attention was never timed."""
        points = sorted(self.per_key.items())
        if len(points) >= 2:
            return _line(points)
        if not points:
            return 0.0, 0.0
        rows, per_key = points[0]
        base = per_key / (1.0 + PRIOR_ROW_KEY * rows)
        return base, PRIOR_ROW_KEY * base

    def relative(self) -> tuple[float, float]:
        """(fixed, per row) of all but attention, in units of a one-row pass."""
        fixed, per_row = self.rows_line()
        return fixed / (fixed + per_row), per_row / (fixed + per_row)

    def __call__(self, rows: int, keys: int = 0, row_keys: int = 0) -> float:
        """The predicted cost of ``rows`` rows (in passes of at most ``native.MAX_ROWS``) reading ``keys``
        cached keys, ``row_keys`` summed over the rows."""
        fixed, per_row = self.rows_line()
        per_key, per_row_key = self.key_line()
        passes = max(1.0, rows / native.MAX_ROWS)  # smooth, so that one more slot never looks like a whole pass
        return fixed * passes + per_row * rows + per_key * keys + per_row_key * row_keys


def _average(means: dict, key: object, value: float) -> None:
    old = means.get(key)
    means[key] = value if old is None else 0.8 * old + 0.2 * value


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares through ``points`` (x, y): (intercept > 0, slope >= 0)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    slope = max(sum((x - mx) * (y - my) for x, y in points) / var, 0.0)
    return max(my - slope * mx, 1e-12), slope


_COSTS: "weakref.WeakKeyDictionary[Transformer, PassCost]" = weakref.WeakKeyDictionary()


def pass_cost(target: Transformer) -> PassCost:
    """The pass-cost model of ``target`` on this machine (one per loaded model, for the process's life)."""
    if (cost := _COSTS.get(target)) is None:
        cost = _COSTS[target] = PassCost()
    return cost


def survival(accepted_at: list[int], proposed_at: list[int], position: int) -> float:
    """The chance a draft survives to ``position`` (0-based): accepted there over proposed there (each
    proposal of position i is accepted only if all before it were), smoothed; past the statistics, decaying."""
    if position < len(proposed_at) and proposed_at[position] >= KNOWN:
        accepted = accepted_at[position] if position < len(accepted_at) else 0  # never accepted that deep
        return (accepted + 0.5) / (proposed_at[position] + 1.0)
    if position == 0:
        return FIRST_SURVIVAL
    return survival(accepted_at, proposed_at, position - 1) * DECAY


# (caps, stats, cost, contexts) -> draft tokens per sequence: ``allocate``, or a stand-in for it
Allocation = Callable[[list[int], list[tuple[list[int], list[int]]], "PassCost", "list[int] | None"], list[int]]


def allocate(caps: list[int], stats: list[tuple[list[int], list[int]]], cost: PassCost,
             contexts: list[int] | None = None) -> list[int]:
    """Draft tokens per sequence for one batched pass: at most ``caps[i]`` for sequence i, whose
    ``stats[i]`` = (accepted_at, proposed_at) and whose cache holds ``contexts[i]`` tokens (default 0);
    granted best slot first while the batch's expected tokens over the pass's cost rise. Every sequence
    verifies at least its own next token (one row).

    A sequence with too few statistics to be judged gets ``EXPLORE`` slots regardless: otherwise a batch
    that starts out judged not to pay would never draft, and so never learn that it does."""
    n = len(caps)
    ctx = [0] * n if contexts is None else list(contexts)
    keys = sum(ctx)
    budget = [0] * n
    rows, row_keys = n, keys
    tokens = float(n)  # each sequence's own next token
    for i, (accepted_at, proposed_at) in enumerate(stats):
        if not proposed_at or proposed_at[0] < KNOWN:
            budget[i] = min(caps[i], EXPLORE)
            rows += budget[i]
            row_keys += budget[i] * ctx[i]
            tokens += sum(survival(accepted_at, proposed_at, j) for j in range(budget[i]))
    heap = [(-survival(*stats[i], budget[i]), i) for i in range(n) if budget[i] < caps[i]]
    heapq.heapify(heap)
    while heap:
        neg_gain, i = heapq.heappop(heap)
        gain = -neg_gain
        if (tokens + gain) / cost(rows + 1, keys, row_keys + ctx[i]) <= tokens / cost(rows, keys, row_keys):
            continue  # this sequence's next slot does not pay, nor do its later ones (worth less, cost the same)
        budget[i] += 1
        rows += 1
        row_keys += ctx[i]
        tokens += gain
        if budget[i] < caps[i]:
            heapq.heappush(heap, (-survival(*stats[i], budget[i]), i))
    return budget
