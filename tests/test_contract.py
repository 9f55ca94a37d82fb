"""The drafter contract and the method table: every composition binds its drafters to the target it serves,
wrappers forward every hook, drafters of another vocabulary are refused, and the table drives every name."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from s2d.drafting import METHODS, TABLE, DraftOptions, build_drafter, default_options, parse_method
from s2d.drafting.base import Draft, Drafter, DrafterWrapper, DraftTree
from s2d.drafting.hybrid import HybridDrafter
from s2d.drafting.overlap import OverlapDrafter, OverlapThreads
from s2d.drafting.refine import NGRAM_FILE, CorpusNgram, RefinedDrafter
from s2d.drafting.sorted import SortedConfig, SortedDrafter
from s2d.drafting.steer import SteeredDrafter, SteeringMaps, target_fingerprint
from s2d.engine import Engine
from s2d.model.loading import load_model
from s2d.sampling import SamplingParams
from tinymodels import small_vocab_model

EXITS = (1, 2, 3)


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_checkpoint, sorted_draft_dir):
    """Two targets and a 3-exit draft with steering maps for both and an n-gram model beside it."""
    root = tmp_path_factory.mktemp("contract")
    targets = [load_model(tiny_checkpoint(num_layers=2, seed=50 + i), dtype="float32") for i in range(2)]
    draft_dir = Path(shutil.copytree(sorted_draft_dir, root / "draft"))  # a copy: maps and n-grams go beside it
    draft = load_model(draft_dir, dtype="float32")
    maps = SteeringMaps(draft.cfg.hidden_size)
    g = torch.Generator().manual_seed(0)
    for i, target in enumerate(targets):
        for e in EXITS:
            maps.add(target, f"t{i}", e, torch.randn(draft.cfg.hidden_size, target.cfg.hidden_size, generator=g))
    maps.save(draft_dir)
    stream = np.frombuffer(b"def add(a, b):\n    return a + b\n" * 40, np.uint8).astype(np.int64)
    CorpusNgram.build(stream, draft.cfg.vocab_size, min_count=1).save(draft_dir / NGRAM_FILE)
    return targets, load_model(draft_dir, dtype="float32"), maps


def chain_of(drafter: Drafter) -> list[Drafter]:
    """The drafter and every drafter it wraps, outermost first."""
    out = [drafter]
    while isinstance(out[-1], DrafterWrapper):
        out.append(out[-1].inner)
    return out


COMPOSED = ["overlap+steer-exit-1", "overlap+s2d-steer", "overlap+refine-exit-1", "overlap+lookup+steer-exit-2",
            "overlap+lookup+refine-exit-2", "lookup+steer-exit-1", "lookup+refine-exit-3", "s2d-steer", "s2d-refine",
            "steer-exit-2", "refine-exit-1", "s2d", "s2d-overlap", "lookup+s2d-tree", "lookup+rsd"]


@pytest.mark.parametrize("method", COMPOSED)
def test_every_composition_binds_its_drafters_to_the_target(family, method):
    targets, draft, maps = family
    for target in targets:  # each target gets its own map / weights / cost, never the other's
        drafter = build_drafter(method, draft, default_options(method, draft), target)
        layers = chain_of(drafter)
        for d in layers:
            if isinstance(d, HybridDrafter):
                assert d.cost == pytest.approx(d.inner.token_cost(target)) and d.cost > 0
            if isinstance(d, SteeredDrafter):
                assert torch.equal(d.matrix, maps.for_target(target, d.exit_layers))
            if isinstance(d, RefinedDrafter):
                assert d.fingerprint == target_fingerprint(target)
                assert d.behind_lookup == any(isinstance(h, HybridDrafter) for h in layers)
        innermost = layers[-1]
        assert innermost.draft_model is draft and drafter.draft_model is draft  # forwarded through every wrapper
        if parse_method(method).overlaps:
            assert any(isinstance(d, OverlapDrafter) for d in layers)


def test_a_wrapper_forwards_every_hook():
    """Each hook of the contract reaches the inner drafter through a wrapper that overrides nothing."""
    calls: list[str] = []

    class Recorder(Drafter):
        def propose(self, context, max_tokens, params, generator):
            calls.append("propose")
            return Draft(torch.tensor([1, 2][:max_tokens]))

        def reset(self):
            calls.append("reset")

        def feedback(self, num_proposed, num_accepted):
            calls.append("feedback")

        def observe(self, hidden):
            calls.append("observe")

        def speculate(self, context, max_tokens, params, generator):
            calls.append("speculate")
            return super().speculate(context, max_tokens, params, generator)

        def token_cost(self, target):
            calls.append("token_cost")
            return 0.5

    class Plain(DrafterWrapper):
        pass

    wrapped = Plain(Recorder())
    tree = wrapped.propose_tree([0, 1], SamplingParams(), None, max_nodes=2)
    assert isinstance(tree, DraftTree) and tree.is_chain and tree.tokens.tolist() == [1, 2]
    wrapped.reset()
    wrapped.feedback(2, 1)
    wrapped.observe(torch.zeros(4))
    with wrapped.speculate([0], 1, SamplingParams(), None):
        pass
    assert wrapped.token_cost(None) == 0.5
    assert calls == ["propose", "reset", "feedback", "observe", "speculate", "token_cost"]


def test_a_drafter_must_draft_something():
    with pytest.raises(TypeError, match="must implement propose"):
        class Nothing(Drafter):  # noqa: F841 - defining it is the test
            pass


def test_overlap_refuses_a_tree_drafter(family):
    _, draft, _ = family
    with pytest.raises(ValueError, match="tree drafter cannot be overlapped"):
        OverlapDrafter(build_drafter("s2d-tree", draft), OverlapThreads(1, 1))


@pytest.mark.parametrize("method", ["s2d", "lookup+sd-exit-1", "overlap+sd-exit-2", "overlap+lookup+sd-exit-1",
                                    "sd", "s2d-tree", "lookup+rsd"])
def test_a_draft_of_another_vocabulary_is_refused_when_built(family, method):
    targets, _, _ = family
    other = small_vocab_model(3, seed=3, exits=(1, 2, 3))  # 8 tokens, not the byte tokenizer's
    with pytest.raises(ValueError, match=r"draft vocab_size 8 != target vocab_size"):
        build_drafter(method, other, default_options(method, other), targets[0])
    # Built without a target and handed to an Engine, the engine refuses it (through every wrapper).
    with pytest.raises(ValueError, match=r"draft vocab_size 8 != target vocab_size"):
        Engine(targets[0], build_drafter(method, other, default_options(method, other)))


def test_lookup_drafters_need_no_vocabulary_check(family):
    targets, _, _ = family
    for method in ("pld", "lookup", "ar"):
        Engine(targets[0], build_drafter(method, None), 4)


def test_every_row_is_documented_and_reachable():
    """The CLI's and bench's help and the README read the one table: every row is listed, and a name of
    each row parses back to it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert METHODS == tuple(spec.shown for spec in TABLE)
    for spec in TABLE:
        assert f"`{spec.shown}`" in readme, f"README's method table lacks {spec.shown}"
        example = spec.pattern.replace("{E}", "2").replace("{M}", "sd-exit-1")
        assert parse_method(example).spec is spec


def test_a_new_method_is_one_row(family, monkeypatch):
    """Adding a row is all a method needs: it parses, has its knobs and builds, with no other edit."""
    from s2d.drafting import methods

    row = methods.MethodSpec("top-exit", "the deepest exit alone", "model",
                             lambda r: SortedDrafter(r.model, SortedConfig((r.draft.exits[-1],)), r.length),
                             knobs={"num_draft_tokens": 2}, composable=True)
    monkeypatch.setattr(methods, "TABLE", (*methods.TABLE, row))
    targets, draft, _ = family
    assert methods.parse_method("top-exit").needs_draft
    assert methods.default_options("top-exit", draft).num_draft_tokens == 2
    hybrid = methods.build_drafter("lookup+top-exit", draft, DraftOptions(), targets[0])
    assert isinstance(hybrid, HybridDrafter) and hybrid.inner.config.exits == (3,)
    plain = Engine(targets[0], eos_token_ids=()).generate(list(range(30, 50)), SamplingParams(), 20).output
    state = Engine(targets[0], hybrid, 12, eos_token_ids=()).generate(list(range(30, 50)), SamplingParams(), 20)
    assert state.output == plain


def test_unknown_names_are_refused_naming_the_choices():
    for bad in ("lookup+lookup", "lookup+s2d", "overlap+overlap+sd", "sd-exit-x", "nope"):
        with pytest.raises(ValueError, match=re.escape(bad)):
            parse_method(bad)
