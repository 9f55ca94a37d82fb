"""The one registry of decoding methods, and learned exit gates (training, round trip, decoding)."""

from __future__ import annotations

import shutil

import pytest
import torch

from s2d.drafting import (DraftOptions, ExitGates, HybridDrafter, ModelDrafter, NgramDrafter,
                          PromptLookupDrafter, SortedDrafter, build_drafter, engine_draft_tokens, parse_method,
                          resolve_default)
from s2d.drafting.gates import GATES_FILE
from s2d.engine import Engine
from s2d.model.config import CheckpointError
from s2d.model.loading import load_model
from s2d.sampling import SamplingParams
from s2d.train.data import DataConfig
from s2d.train.gates import GateTraining, train_gates


def test_method_names_parse_and_bad_ones_are_refused():
    assert parse_method("lookup+sd-exit-2").model == "sd-exit-2" and parse_method("lookup+sd-exit-2").lookup
    assert not parse_method("lookup").needs_draft and parse_method("s2d").needs_draft
    assert parse_method("lookup+s2d-tree").model == "s2d-tree" and parse_method("lookup+rsd").lookup
    assert parse_method("rsd-sbs").model == "rsd-sbs" and parse_method("lookup+rsd-sbs").lookup
    with pytest.raises(ValueError, match="overlap runs a chain method"):
        parse_method("overlap+rsd-sbs")
    for bad in ("sd-exit", "lookup+", "lookup+pld", "lookup+lookup", "S2D", "s2d-forest", "lookup+s2d-forest"):
        with pytest.raises(ValueError, match="unknown method"):
            parse_method(bad)
    opts = DraftOptions(num_draft_tokens=3, lookup_tokens=9)
    assert engine_draft_tokens("sd", opts) == 3 and engine_draft_tokens("lookup+sd", opts) == 9
    assert engine_draft_tokens("sd", DraftOptions(num_draft_tokens=3, schedule="heuristic")) == 16
    with pytest.raises(ValueError, match="min_lookup"):
        DraftOptions(min_lookup=5, lookup_tokens=4)


@pytest.fixture(scope="module")
def family(tmp_path_factory, small_target_dir, sorted_draft_dir):
    root = tmp_path_factory.mktemp("methods")
    target, draft = small_target_dir, sorted_draft_dir  # shared and read-only: tests that add gates copy the draft
    text = root / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 200 + "for i in range(10):\n    print(i)\n" * 200)
    return {"target": target, "draft": draft, "corpus": text, "root": root}


def test_each_name_builds_its_drafter(family):
    draft = load_model(family["draft"], dtype="float32")
    assert build_drafter("ar", None) is None
    assert isinstance(build_drafter("pld", None), PromptLookupDrafter)
    assert isinstance(build_drafter("lookup", None), NgramDrafter)
    assert isinstance(build_drafter("sd", draft), ModelDrafter)
    exit2 = build_drafter("sd-exit-2", draft)
    assert isinstance(exit2, SortedDrafter) and exit2.config.exits == (2,)
    hybrid = build_drafter("lookup+s2d-softmax", draft)
    assert isinstance(hybrid, HybridDrafter) and hybrid.inner.gates is None
    with pytest.raises(ValueError, match="exit gates"):
        build_drafter("s2d-gate", draft)  # none trained yet
    assert resolve_default(draft) == "lookup+sd-exit-2"  # the middle of exits 1, 2, 3
    assert resolve_default(draft, DraftOptions(exit=3)) == "lookup+sd-exit-3"  # a calibration's choice
    with pytest.raises(ValueError, match="not one of the draft's exits"):
        resolve_default(draft, DraftOptions(exit=7))
    plain = load_model(family["target"], dtype="float32")
    assert resolve_default(plain) == "lookup+sd"  # a one-exit draft: nothing to choose between
    with pytest.raises(ValueError, match="needs a draft"):
        build_drafter("s2d", None)


def test_gates_train_round_trip_and_decode_losslessly(family, tmp_path):
    draft_dir = tmp_path / "draft"
    shutil.copytree(family["draft"], draft_dir)
    report = train_gates(GateTraining(draft_dir, DataConfig((family["corpus"],), seq_len=32), positions=2000,
                                      batch_size=8), progress=False)
    assert set(report["per_exit"]) == {"1", "2"}
    for r in report["per_exit"].values():
        assert r["samples"] >= 2000 and 0.0 <= r["agree_with_deepest"] <= 1.0
        assert r["train_accuracy"] >= max(r["agree_with_deepest"], 1 - r["agree_with_deepest"]) - 0.02
    draft = load_model(draft_dir, dtype="float32")
    gates = ExitGates.load(draft_dir, draft)
    assert gates is not None and set(gates.weights) == {1, 2}
    target = load_model(family["target"], dtype="float32")
    prompt = [7, 3, 9, 7, 3, 1, 12, 40, 41, 42]
    plain = Engine(target, eos_token_ids=()).generate(prompt, SamplingParams(), 40).output
    exits_used = set()
    for thresholds in ((0.5, 0.5, 0.0), (0.0, 1.0, 0.0), (1.0, 1.0, 0.0)):
        drafter = build_drafter("s2d-gate", draft, DraftOptions(num_draft_tokens=4, exit_thresholds=thresholds))
        state = Engine(target, drafter, 4, eos_token_ids=()).generate(prompt, SamplingParams(), 40)
        assert state.output == plain
        exits_used |= set(state.stats.exit_counts)
    # threshold 0: exit 1 always answers; 1.0: the gates defer (unless one saturates at exactly 1)
    assert 1 in exits_used and exits_used - {1}
    state = Engine(target, build_drafter("s2d", draft), 8, eos_token_ids=()).generate(prompt, SamplingParams(), 40)
    assert state.output == plain


def test_malformed_gates_file_is_named(family, tmp_path):
    draft_dir = tmp_path / "draft"
    shutil.copytree(family["draft"], draft_dir)
    draft = load_model(draft_dir, dtype="float32")
    (draft_dir / GATES_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=GATES_FILE):
        ExitGates.load(draft_dir, draft)
    ExitGates({1: torch.zeros(48)}, {1: 0.0}).save(draft_dir)  # exit 2's gate missing
    with pytest.raises(CheckpointError, match="exit 2"):
        ExitGates.load(draft_dir, draft)


def test_train_draft_objective_gates_writes_a_new_draft_with_gates(family, tmp_path, capsys):
    from s2d.cli import main

    out = tmp_path / "gated"
    argv = ["train-draft", "--objective", "gates", "--init", str(family["draft"]), "--data", str(family["corpus"]),
            "--gate-positions", "500", "--seq-len", "32"]
    assert main([*argv, "--out", str(out)]) == 0
    assert (out / GATES_FILE).exists() and (out / "config.json").exists()
    draft = load_model(out, dtype="float32")
    assert ExitGates.load(out, draft) is not None
    assert not (family["draft"] / GATES_FILE).exists()  # the input is left as it was
    capsys.readouterr()
    assert main([*argv, "--out", str(family["draft"])]) == 2  # never into its own input
    assert "--init" in capsys.readouterr().err
    assert main(["train-draft", "--objective", "gates", "--data", str(family["corpus"]), "--out",
                 str(tmp_path / "x"), "--random-init"]) == 2


def test_draft_vocabulary_subset_is_lossless_and_cheaper(family, tmp_path, capsys):
    from s2d.cli import main
    from s2d.drafting.vocab import VOCAB_FILE, load_vocab

    out = tmp_path / "ranked"
    assert main(["train-draft", "--objective", "vocab", "--init", str(family["draft"]), "--data",
                 str(family["corpus"]), "--seq-len", "32", "--out", str(out)]) == 0
    assert "coverage" in capsys.readouterr().out
    draft = load_model(out, dtype="float32")
    ranked = load_vocab(out, draft.cfg.vocab_size)
    assert sorted(ranked) == list(range(draft.cfg.vocab_size))  # a ranking of the whole vocabulary
    from s2d.model.loading import load_tokenizer

    seen = set(load_tokenizer(out)(family["corpus"].read_text()).input_ids)
    assert set(ranked[:len(seen)]) == seen  # the tokens of the corpus lead the ranking
    target = load_model(family["target"], dtype="float32")
    prompt = [7, 3, 9, 7, 3, 1, 12, 40, 41, 42]
    plain = Engine(target, eos_token_ids=()).generate(prompt, SamplingParams(), 30).output
    for n in (16, 100):
        options = DraftOptions(num_draft_tokens=3, draft_vocab=n)
        drafter = build_drafter("sd-exit-2", draft, options)
        assert drafter.head.shape[0] == n
        state = Engine(target, drafter, 3, eos_token_ids=()).generate(prompt, SamplingParams(), 30)
        assert state.output == plain
        sampled = Engine(target, build_drafter("s2d-softmax", draft, options), 3, eos_token_ids=()).generate(
            prompt, SamplingParams(temperature=1.0, seed=3), 30)
        assert len(sampled.output) == 30
    with pytest.raises(ValueError, match="s2d_draft_vocab.json"):
        build_drafter("sd-exit-1", load_model(family["draft"], dtype="float32"), DraftOptions(draft_vocab=10))
    (out / VOCAB_FILE).write_text('{"tokens": [1, 1]}')
    with pytest.raises(Exception, match="distinct"):
        build_drafter("sd-exit-1", load_model(out, dtype="float32"), DraftOptions(draft_vocab=2))


@pytest.mark.parametrize("isa, lookup_tokens, growth", [("avx2", 6, 0.3), ("avx512", 8, 0.12), ("amx", 12, 0.12)])
def test_default_knobs_follow_the_instruction_set(monkeypatch, isa, lookup_tokens, growth):
    """Lookup's length and the switch's cost per drafted token follow the runtime's instruction set
    (a level this CPU lacks runs the best it has, whose knobs are then expected)."""
    from s2d.drafting import default_options
    from s2d.drafting.methods import DEFAULT_S2D_OPTIONS, ROW_COST_KNOBS
    from s2d.model import native

    if native.library() is None:
        pytest.skip("the native runtime does not run on this machine")
    monkeypatch.setenv("S2D_NATIVE_ISA", isa)
    knobs = ROW_COST_KNOBS.get(native.isa(), {})
    if native.isa() != {"avx2": "AVX2", "avx512": "AVX512-BF16", "amx": "AMX"}[isa]:
        lookup_tokens = knobs.get("lookup_tokens", DraftOptions().lookup_tokens)
        growth = knobs.get("verify_growth", DEFAULT_S2D_OPTIONS["verify_growth"])
    s2d = default_options("s2d")
    assert (s2d.lookup_tokens, s2d.verify_growth, s2d.num_draft_tokens) == (lookup_tokens, growth, 3)
    assert default_options("lookup").lookup_tokens == lookup_tokens
    assert default_options("lookup+sd-exit-1").verify_growth == knobs.get("verify_growth", DraftOptions().verify_growth)
    assert default_options("pld") == DraftOptions() and default_options("sd-exit-2") == DraftOptions()
    assert default_options("s2d-overlap") == s2d
    assert engine_draft_tokens("s2d", s2d) == lookup_tokens
