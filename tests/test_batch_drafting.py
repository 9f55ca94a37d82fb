"""Drafting batched across sequences (issue 26, part 2): the model drafters of a batched step share one draft
pass per level, and every sequence proposes exactly what it proposes alone (greedy and seeded sampling, float32
and bf16 on the native runtime), for every model-drafting method; the decoded outputs equal each alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from s2d.drafting import DraftOptions, SortedConfig, SortedDrafter, build_drafter, engine_draft_tokens
from s2d.drafting.base import Draft, Drafter
from s2d.drafting.batch import run_alone, run_together
from s2d.drafting.gates import ExitGates
from s2d.drafting.length import DraftLength
from s2d.drafting.refine import CorpusNgram, RefinedDrafter, RefineWeights
from s2d.drafting.steer import SteeredDrafter, SteeringMaps
from s2d.engine import Engine
from s2d.model import native
from s2d.model.loading import load_model
from s2d.sampling import SamplingParams

# Contexts of different lengths (one crossing the draft's 64-row passes and the 256-key attention chunks).
PROMPTS = [list(range(40, 70)), [7, 3, 9, 7, 3, 1, 12, 40, 41, 42] * 3, list(range(1, 200)) + list(range(5, 70)),
           [99, 98, 97]]
TEXT = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n" * 20


@pytest.fixture(scope="module")
def family(target_and_draft):
    return target_and_draft


def makers(target, draft) -> dict[str, tuple]:
    """method -> (a fresh drafter, the most tokens it drafts per step): every model-drafting method."""
    g = torch.Generator().manual_seed(0)
    c, ct = draft.cfg.hidden_size, target.cfg.hidden_size
    maps = SteeringMaps(c)
    maps.add(target, "t", 2, 0.5 * torch.randn(c, ct, generator=g))
    gates = ExitGates({1: torch.randn(c, generator=g), 2: torch.randn(c, generator=g)}, {1: 0.0, 2: 0.0})
    corpus = CorpusNgram.build(np.frombuffer(TEXT.encode(), np.uint8).astype(np.int64), 257, min_count=1)
    options = DraftOptions(num_draft_tokens=4)

    def by_name(method: str, opts: DraftOptions = options) -> tuple:
        return lambda: build_drafter(method, draft, opts, target), engine_draft_tokens(method, opts)

    return {
        "sd": by_name("sd"),
        "sd-exit-1": by_name("sd-exit-1"),
        "sd-exit-2": by_name("sd-exit-2"),
        # the head over a vocabulary subset (the s2d default's, where a draft ships a ranking): shared by drafters
        "sd-exit-2-subset": (lambda: SortedDrafter(draft, SortedConfig((2,)), DraftLength(4), vocab=SUBSET), 4),
        # thresholds low enough for this random draft's flat softmax: tokens leave at every exit
        "s2d-softmax": by_name("s2d-softmax", DraftOptions(num_draft_tokens=4, exit_thresholds=(0.06, 0.06, 0.0))),
        "s2d-gate": (lambda: SortedDrafter(draft, SortedConfig((1, 2, 3), (0.5, 0.5, 0.0)), DraftLength(4),
                                           gates=gates), 4),
        "steer-exit-2": (lambda: SteeredDrafter(draft, 2, maps, DraftLength(4), target=target), 4),
        "refine-exit-2": (lambda: RefinedDrafter(draft, 2, corpus, length=DraftLength(4),
                                                 weights=RefineWeights(0.3, 0.3, 8), target=target), 4),
        "s2d-tree": by_name("s2d-tree"),
        "rsd": by_name("rsd"),
        "rsd-sbs": by_name("rsd-sbs"),
        "lookup+sd-exit-1": by_name("lookup+sd-exit-1"),
        "s2d": by_name("s2d"),
        "lookup+rsd": by_name("lookup+rsd"),
    }


SUBSET = list(range(0, 257, 2)) + [1, 3, 5]
METHODS = ["sd", "sd-exit-1", "sd-exit-2", "sd-exit-2-subset", "s2d-softmax", "s2d-gate", "steer-exit-2", "refine-exit-2", "s2d-tree",
           "rsd", "rsd-sbs", "lookup+sd-exit-1", "s2d", "lookup+rsd"]


def same_tree(a, b) -> bool:
    return (torch.equal(a.tokens, b.tokens) and a.parents == b.parents and a.exits == b.exits
            and (a.probs is None) == (b.probs is None) and (a.probs is None or torch.equal(a.probs, b.probs)))


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("method", METHODS)
@torch.inference_mode()
def test_batched_proposals_equal_each_alone(family, method, sampling):
    """Round after round, the proposals of four sequences drafted together equal each drafted alone (tokens,
    tree, exits and q bit for bit); one sequence leaves after two rounds, and contexts grow as steps accept."""
    target, draft = family
    make, k = makers(target, draft)[method]
    n = len(PROMPTS)
    together, alone = [make() for _ in range(n)], [make() for _ in range(n)]
    params = SamplingParams(temperature=1.0, top_p=0.9) if sampling else SamplingParams()
    gens = [[torch.Generator().manual_seed(i) for i in range(n)] for _ in range(2)]
    contexts = [list(p) for p in PROMPTS]
    rounds = [6, 2, 6, 5]
    g = torch.Generator().manual_seed(1)
    exits: set[int] = set()
    for r in range(max(rounds)):
        live = [i for i in range(n) if r < rounds[i]]
        for i in live:  # the target's hidden state after a verification (steered drafters read it)
            h = torch.randn(target.cfg.hidden_size, generator=g).to(target.dtype)
            together[i].observe(h)
            alone[i].observe(h)
        trees = run_together([together[i].proposal(contexts[i], params, gens[0][i], k) for i in live])
        for i, tree in zip(live, trees):
            assert not isinstance(tree, Exception), tree
            expected = run_alone(alone[i].proposal(contexts[i], params, gens[1][i], k))
            assert same_tree(tree, expected), (method, r, i)
            exits |= set(tree.exits)
            # the step accepts about half the draft, then the target's own token
            contexts[i] += tree.tokens[: len(tree) // 2].tolist() + [(7 * r + i) % 250 + 1]
    if method == "s2d-softmax" and not sampling:
        assert len(exits) > 1  # the cascade answered at more than one exit


@pytest.mark.skipif(native.library() is None, reason="one pass for all rows is the native runtime's")
def test_one_draft_pass_per_level_for_every_sequence(sorted_draft_dir, monkeypatch):
    """sd-exit-2 (its head over a vocabulary subset), greedy, 4 tokens each: 4 draft passes (the catch-up, then
    one per drafted token), each carrying a row of every sequence, and no head call of one sequence alone."""
    draft = load_model(sorted_draft_dir, dtype="bfloat16")
    passes: list[int] = []
    multi, top1 = draft.run_layers_multi, draft.top1

    def count_passes(seqs, start=0, end=None):
        passes.append(len(seqs))
        return multi(seqs, start, end)

    def refuse_alone(*args, **kwargs):
        raise AssertionError("a head call of one sequence alone")

    monkeypatch.setattr(draft, "run_layers_multi", count_passes)
    contexts = [[5, 6, 7], [9, 8, 7, 6, 5, 4], [1, 2], [3] * 10, [40, 41, 42, 43]]

    def make():
        return SortedDrafter(draft, SortedConfig((2,)), DraftLength(4), vocab=SUBSET)

    drafters = [make() for _ in contexts]
    monkeypatch.setattr(draft, "top1", refuse_alone)
    with torch.inference_mode():
        trees = run_together([d.proposal(c, SamplingParams(), None, 4) for d, c in zip(drafters, contexts)])
    monkeypatch.setattr(draft, "top1", top1)
    assert passes == [5] * 4 and all(len(t) == 4 for t in trees)
    # the same drafts as each alone
    for c, tree in zip(contexts, trees):
        with torch.inference_mode():
            expected = run_alone(make().proposal(c, SamplingParams(), None, 4))
        assert same_tree(tree, expected)
        assert set(tree.tokens.tolist()) <= set(SUBSET)


@torch.inference_mode()
def test_a_failing_drafter_fails_only_its_sequence(family):
    """Non-finite logits in one sequence's draft: that proposal ends with the error (the head pass they shared
    is rerun sequence by sequence), the others propose what they propose alone."""
    target, draft = family
    make, k = makers(target, draft)["sd-exit-1"]
    drafters = [make() for _ in PROMPTS[:3]]
    nan = torch.full((draft.cfg.hidden_size,), float("nan"), dtype=draft.dtype)
    drafters[1].readout = lambda pos: nan  # what a broken draft reads out
    out = run_together([d.proposal(p, SamplingParams(), None, k) for d, p in zip(drafters, PROMPTS[:3])])
    assert isinstance(out[1], Exception) and "NaN or inf" in str(out[1])
    for i in (0, 2):
        assert same_tree(out[i], run_alone(make().proposal(PROMPTS[i], SamplingParams(), None, k)))


class PlainOverride(SortedDrafter):
    """A subclass that changes propose only: its drafting must go through that override in a batch too."""

    def propose(self, context, max_tokens, params, generator) -> Draft:
        draft = super().propose(context, max_tokens, params, generator)
        return Draft(draft.tokens.flip(0), draft.probs, draft.exits)


def test_a_subclass_overriding_propose_is_not_bypassed(family):
    _, draft = family
    assert PlainOverride.proposal is Drafter.proposal and SortedDrafter.proposal is not Drafter.proposal
    d = PlainOverride(draft, SortedConfig((1,)), DraftLength(4))
    tree = run_together([d.proposal(PROMPTS[0], SamplingParams(), None, 4)])[0]
    plain = SortedDrafter(draft, SortedConfig((1,)), DraftLength(4)).propose(PROMPTS[0], 4, SamplingParams(), None)
    assert tree.tokens.tolist() == plain.tokens.flip(0).tolist()


DECODE_METHODS = ["sd", "sd-exit-2", "s2d-softmax", "s2d-gate", "steer-exit-2", "refine-exit-2", "rsd-sbs",
                  "lookup+sd-exit-1", "s2d", "s2d-tree"]
MAX_NEW = [30, 24, 12, 40]


def decode(target, make, k, prompts, params, max_new, eos=()):
    """(each alone, the batch): the outputs of ``prompts`` decoded one by one and together."""
    alone = [Engine(target, make(), k, eos).generate(p, q, n).output for p, q, n in zip(prompts, params, max_new)]
    engine = Engine(target, None, k, eos)
    together = [s.output for s in engine.generate_batch(prompts, params, max_new, [make() for _ in prompts])]
    return alone, together


@pytest.mark.parametrize("method", DECODE_METHODS)
def test_batched_greedy_decoding_equals_each_alone(family, method):
    """Different prompt lengths and output limits; one sequence ends early at an end-of-sequence token."""
    target, draft = family
    make, k = makers(target, draft)[method]
    greedy = [SamplingParams()] * len(PROMPTS)
    first = Engine(target, make(), k, ()).generate(PROMPTS[0], SamplingParams(), 30).output
    eos = (first[5],)
    alone, together = decode(target, make, k, PROMPTS, greedy, MAX_NEW, eos)
    assert together == alone and len(together[0]) <= 6


@pytest.mark.parametrize("method", ["sd", "s2d-softmax", "steer-exit-2", "refine-exit-2", "rsd-sbs", "s2d"])
def test_batched_seeded_sampling_equals_each_alone(family, method):
    target, draft = family
    make, k = makers(target, draft)[method]
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=i) for i in range(len(PROMPTS))]
    alone, together = decode(target, make, k, PROMPTS, params, MAX_NEW)
    assert together == alone
