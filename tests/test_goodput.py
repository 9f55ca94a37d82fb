"""Goodput-aware draft lengths (issue 26, part 4): the batch's draft budget goes to the slots most likely
accepted, while they pay for the rows they add; the pass-cost model is learned from measured passes."""

from __future__ import annotations

import pytest

from s2d.goodput import PassCost, allocate, survival


def cost_with(per_row: float) -> PassCost:
    cost = PassCost()
    for rows in (1, 8, 32):  # a line: 1 + per_row * (rows - 1) one-row passes
        cost.observe(rows, 0.004 * (1 + per_row * (rows - 1)))
    return cost


def test_the_pass_cost_is_a_line_through_the_measured_passes():
    fixed, per_row = cost_with(0.3).relative()
    assert per_row == pytest.approx(0.3) and fixed == pytest.approx(0.7)
    assert PassCost().relative()[1] > 0  # a prior before any pass is measured


def test_survival_is_the_accepted_share_and_decays_past_the_statistics():
    assert survival([9, 6], [10, 10], 0) == pytest.approx(9.5 / 11)
    assert survival([9, 6], [10, 10], 1) == pytest.approx(6.5 / 11)
    assert survival([9, 6], [10, 10], 2) < survival([9, 6], [10, 10], 1)
    assert 0 < survival([], [], 0) < 1


def test_free_rows_draft_everything_and_dear_rows_draft_nothing():
    stats = [([8, 7, 6], [10, 10, 10])] * 4  # known sequences (new ones explore: see below)
    assert allocate([5] * 4, stats, cost_with(0.0)) == [5] * 4
    assert allocate([5] * 4, stats, cost_with(5.0)) == [0] * 4


def test_the_budget_follows_acceptance():
    good, poor = ([9, 9, 8, 8], [10, 10, 10, 10]), ([2, 1, 0, 0], [10, 10, 10, 10])
    granted = allocate([4, 4], [good, poor], cost_with(0.15))
    assert granted[0] > granted[1]
    assert allocate([0, 4], [good, poor], cost_with(0.0)) == [0, 4]  # a cap of 0 stays 0


def test_a_bigger_batch_gets_shorter_drafts_each():
    """Rows cost the same, but in a bigger batch a row's share of the pass is worth less: per sequence the
    budget shrinks (vLLM's batch-size-dependent draft length)."""
    stats = ([8, 6, 5, 4, 3, 2], [10] * 6)
    per_seq = [sum(allocate([6] * n, [stats] * n, cost_with(0.25))) / n for n in (1, 4, 16)]
    assert per_seq[0] >= per_seq[1] >= per_seq[2] and per_seq[0] > per_seq[2]


def test_positions_proposed_but_never_accepted():
    assert survival([3], [10, 10, 10], 2) == pytest.approx(0.5 / 11)


def test_new_sequences_explore_so_that_a_batch_learns():
    """Dear rows would give a new sequence nothing; it drafts a little until its acceptance is known."""
    assert allocate([5, 5, 1], [([], []), ([1], [2]), ([], [])], cost_with(5.0)) == [2, 2, 1]


def kv_cost(fixed=0.006, per_row=0.0003, per_key=1.5e-6, per_row_key=1e-7) -> PassCost:
    """A cost measured from passes timed by phase: the rest a line in rows, attention a line per key read."""
    cost = PassCost()
    for seqs, rows_each, context in ((1, 1, 100), (8, 2, 300), (32, 1, 600), (32, 2, 600), (16, 4, 400)):
        rows, keys = seqs * rows_each, seqs * context
        attention = per_key * keys + per_row_key * rows_each * keys
        cost.observe(rows, fixed + per_row * rows + attention, attention, keys, rows_each * keys)
    return cost


def test_attention_is_learned_per_key_read_apart_from_the_rows():
    cost = kv_cost()
    assert cost.rows_line() == pytest.approx((0.006, 0.0003))
    assert cost.key_line() == pytest.approx((1.5e-6, 1e-7))
    # a step of 100 rows runs as two passes: the fixed part twice (smoothly: 100/64 of it)
    assert cost(100, 19200, 38400) == pytest.approx(0.006 * 100 / 64 + 0.03 + 1.5e-6 * 19200 + 1e-7 * 38400)
    unmeasured = PassCost()
    unmeasured.observe(32, 0.045)  # torch / CUDA: the whole pass on the line in rows, no attention term
    assert unmeasured.key_line() == (0.0, 0.0) and unmeasured(32) == pytest.approx(0.045)


def test_many_long_caches_make_draft_rows_cheap():
    """32 sequences after 600 tokens: reading their caches is most of the pass, so a draft row (products and
    its own attention) is a small share and the batch drafts; the same sequences with empty caches, or the
    cost seen as a line in rows alone (every row at the pass's mean), draft much less."""
    stats = [([7, 5, 4, 3], [10] * 4)] * 32
    long = sum(allocate([5] * 32, stats, kv_cost(), [600] * 32))
    empty = sum(allocate([5] * 32, stats, kv_cost(), [0] * 32))
    line = PassCost()
    for rows in (1, 32, 64):  # whole passes of one token per sequence, each after 600 tokens
        line.observe(rows, 0.006 + 0.0003 * rows + 1.6e-6 * 600 * rows)
    by_rows = sum(allocate([5] * 32, stats, line, [600] * 32))
    assert long >= 64 and long > empty and by_rows < 32


def test_a_long_context_pays_more_for_its_rows():
    stats = [([6, 4, 3], [10] * 3)] * 2
    short, long = allocate([5, 5], stats, kv_cost(per_row_key=2e-6), [100, 1900])
    assert short >= long
