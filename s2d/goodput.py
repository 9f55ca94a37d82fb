"""Goodput-aware draft lengths for a batch: how many tokens each sequence may draft in this pass.

Alone, a sequence drafts as its method says. In a batch every drafted token is one more row of the shared
target pass, and on a CPU a row is arithmetic the whole batch waits for: eight sequences each drafting
eight tokens make a 72-row pass that costs several one-row passes, for tokens most of which are rejected.
So before a batched pass the draft budget is handed out slot by slot, best first (vLLM's adaptive
verification and DeepSeek's scheduler do the same on GPUs): a slot is (sequence, draft position), worth
the probability that the sequence's draft survives to that position (its running acceptance there), and
a slot is granted only while it raises the batch's expected tokens per second, given what a pass of that
many rows costs on this machine (``PassCost``: measured from the passes themselves).

Greedy output does not depend on how much is drafted (every method is lossless), and sampled output
keeps the target's distribution; a seeded sampling request keeps its method's own length, so it draws
exactly as it does alone.
"""

from __future__ import annotations

import heapq
import weakref
from dataclasses import dataclass, field

from s2d.model.llama import Transformer

PRIOR_ROW_COST = 0.25  # a row over a one-row pass before any pass is measured (AVX512-BF16 zoo-l: ~0.2-0.3)
FIRST_SURVIVAL = 0.6  # the chance a sequence's first draft token is accepted, before it has any statistics
DECAY = 0.7  # each further position, past what the sequence has statistics for
EXPLORE = 2  # slots a sequence gets regardless while it has too few statistics to be judged
KNOWN = 4  # proposals at a position before its acceptance counts


@dataclass
class PassCost:
    """Seconds of a target pass by its rows, learned from the passes run: an exponential moving mean per row
    count, and a straight line through them (cost = fixed + per_row * rows)."""

    seconds: dict[int, float] = field(default_factory=dict)

    def observe(self, rows: int, seconds: float) -> None:
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def relative(self) -> tuple[float, float]:
        """(fixed, per row), in units of a one-row pass."""
        points = sorted(self.seconds.items())
        if len(points) < 2:
            return 1.0 - PRIOR_ROW_COST, PRIOR_ROW_COST
        n = len(points)
        mx = sum(r for r, _ in points) / n
        my = sum(s for _, s in points) / n
        var = sum((r - mx) ** 2 for r, _ in points)
        slope = max(sum((r - mx) * (s - my) for r, s in points) / var, 0.0)
        fixed = max(my - slope * mx, 1e-9)
        one = fixed + slope
        return fixed / one, slope / one

    def __call__(self, rows: int) -> float:
        fixed, per_row = self.relative()
        return fixed + per_row * rows


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


def allocate(caps: list[int], stats: list[tuple[list[int], list[int]]], cost: PassCost) -> list[int]:
    """Draft tokens per sequence for one batched pass: at most ``caps[i]`` for sequence i, whose
    ``stats[i]`` = (accepted_at, proposed_at); granted best slot first while the batch's expected tokens
    over the pass's cost rise. Every sequence verifies at least its own next token (one row).

    A sequence with too few statistics to be judged gets ``EXPLORE`` slots regardless: otherwise a batch
    that starts out judged not to pay would never draft, and so never learn that it does."""
    budget = [0] * len(caps)
    rows = len(caps)
    tokens = float(len(caps))  # each sequence's own next token
    for i, (accepted_at, proposed_at) in enumerate(stats):
        if not proposed_at or proposed_at[0] < KNOWN:
            budget[i] = min(caps[i], EXPLORE)
            rows += budget[i]
            tokens += sum(survival(accepted_at, proposed_at, j) for j in range(budget[i]))
    heap = [(-survival(*stats[i], budget[i]), i) for i in range(len(caps)) if budget[i] < caps[i]]
    heapq.heapify(heap)
    while heap:
        neg_gain, i = heapq.heappop(heap)
        gain = -neg_gain
        if (tokens + gain) / cost(rows + 1) <= tokens / cost(rows):
            break  # the best slot left no longer pays; every other is worth less
        budget[i] += 1
        rows += 1
        tokens += gain
        if budget[i] < caps[i]:
            heapq.heappush(heap, (-survival(*stats[i], budget[i]), i))
    return budget
