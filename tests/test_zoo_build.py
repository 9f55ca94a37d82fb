"""``s2d zoo build`` at toy size: every artefact loads back, s2d decodes with it, re-runs resume."""

from __future__ import annotations

import json

import pytest
import torch

from s2d.cli import main
from s2d.drafting.gates import ExitGates
from s2d.drafting.vocab import load_vocab
from s2d.engine import MultiTargetEngine
from s2d.model.loading import load_model, read_shapes
from s2d.model.tokenizer import fast_tokenizer
from s2d.sampling import SamplingParams
from s2d.zoo import PRESETS, ZooBuild, build_zoo, is_held_out

TARGETS = ("zoo-s", "zoo-m", "zoo-l")
STAGES = ["split", "tokenizer", *TARGETS, "draft"]


def write_corpus(root):
    """Small Python files; mod2, mod49 and pkg/util44 are held out by the zoo's rule."""
    for i in range(50):
        body = "".join(f"    if value > {j}:\n        total += helper_{i}(value - {j * i})\n" for j in range(6))
        (root / f"mod{i}.py").parent.mkdir(parents=True, exist_ok=True)
        (root / f"mod{i}.py").write_text(f"def compute_{i}(value):\n    total = 0\n{body}    return total\n")
    (root / "pkg").mkdir()
    (root / "pkg" / "util44.py").write_text("class Util44:\n    def run(self):\n        return 'é' * 44\n" * 4)
    (root / "site-packages").mkdir()
    (root / "site-packages" / "installed.py").write_text("import this\n")  # not the standard library
    return root


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    corpus = write_corpus(root / "corpus")
    cfg = ZooBuild(root / "family", preset="tiny", corpus=corpus, minutes=5, progress=False)
    ran = build_zoo(cfg)
    return {"cfg": cfg, "out": cfg.out, "corpus": corpus, "ran": ran}


def test_every_stage_runs_and_the_split_follows_the_rule(family):
    out = family["out"]
    assert family["ran"] == STAGES
    split = json.loads((out / "split.json").read_text())
    assert split["validation_files"] == ["mod2.py", "mod49.py", "pkg/util44.py"]
    assert all(is_held_out(f) for f in split["validation_files"])
    for run in (*TARGETS, "draft"):
        used = json.loads((out / "runs" / run / "data_files.json").read_text())["documents"]
        assert len(used) == 48 and not set(used) & set(split["validation_files"])
        assert not any(d.startswith("site-packages") for d in used)
        assert not (out / "runs" / run / "checkpoints").exists()  # finished runs keep no optimizer state
    build = json.loads((out / "build.json").read_text())
    assert all(build["stages"][s]["done"] for s in STAGES)
    assert build["stages"]["zoo-s"]["plan"]["max_minutes"] > 0  # --minutes: each stage had a share


def test_the_tokenizer_loads_with_transformers_and_with_s2d(family):
    from transformers import AutoTokenizer

    text = "def f(x):\n    return x * 2  # ünïcode ✓\n"
    for folder in ("tokenizer", *TARGETS, "draft"):
        hf = AutoTokenizer.from_pretrained(family["out"] / folder)
        fast = fast_tokenizer(family["out"] / folder)
        assert fast is not None, "the project's fast path must accept the tokenizer"
        assert hf.eos_token_id == hf.bos_token_id == hf.pad_token_id == fast.eos_token_id == 0
        assert hf.convert_ids_to_tokens(0) == "<|endoftext|>"
        ids = hf(text, add_special_tokens=False).input_ids
        assert fast(text).input_ids == ids and hf.decode(ids) == fast.decode(ids) == text
        assert len(hf) == PRESETS["tiny"].vocab_size


def test_every_target_loads_as_a_plain_llama(family):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    ids = torch.tensor([[5, 80, 200, 7, 31]])
    for name, size in zip(TARGETS, PRESETS["tiny"].sizes.values()):
        folder = family["out"] / name
        raw = json.loads((folder / "config.json").read_text())
        assert "s2d_exits" not in raw and raw["num_hidden_layers"] == size.layers
        ours = load_model(folder, dtype="float32")
        assert ours.cfg.exits == () and ours.cfg.hidden_size == size.hidden and ours.cfg.vocab_size == 320
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert type(theirs) is LlamaForCausalLM
        with torch.no_grad():
            expected = theirs(ids).logits[0]
        cache = ours.new_cache(capacity=8)
        got = ours(ids, torch.arange(5), cache)[0]
        assert torch.allclose(got, expected, atol=1e-4)
        info = json.loads((folder / "zoo_info.json").read_text())
        assert info["name"] == name and info["layers"] == size.layers and info["steps"] == 3
        assert info["params"] == sum(torch.Size(s).numel() for s in read_shapes(folder).values())
        assert isinstance(info["val_loss_nats"], float) and 0 < info["val_loss_nats"] < 10


def test_the_draft_loads_with_its_exits_gates_and_vocabulary(family):
    folder = family["out"] / "draft"
    draft = load_model(folder, dtype="float32")
    assert draft.cfg.exits == (1, 2) and draft.cfg.num_layers == 2
    assert ExitGates.load(folder, draft) is not None
    assert sorted(load_vocab(folder, 320)) == list(range(320))
    info = json.loads((folder / "zoo_info.json").read_text())
    assert info["init"] == "zoo-s" and set(info["val_loss_nats"]) == {"1", "2"} and "1" in info["gates"]


def test_s2d_on_the_family_decodes_exactly_as_plain_decoding(family):
    targets = {name: load_model(family["out"] / name, dtype="float32") for name in TARGETS}
    draft = load_model(family["out"] / "draft", dtype="float32")
    s2d = MultiTargetEngine(targets, draft, method="s2d", eos_token_ids=())
    ar = MultiTargetEngine(targets, None, method="ar", eos_token_ids=())
    prompt = [12, 40, 99, 7, 180, 3]
    for name in TARGETS:
        expected = ar.generate(name, prompt, SamplingParams(), 24).output
        assert s2d.generate(name, prompt, SamplingParams(), 24).output == expected


def test_bad_input_is_refused_before_anything_is_written(family, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown preset"):
        ZooBuild(tmp_path / "a", preset="huge")
    with pytest.raises(ValueError, match="--sizes"):
        ZooBuild(tmp_path / "a", preset="tiny", sizes=("xl",))
    with pytest.raises(ValueError, match="shallower than the smallest target"):
        ZooBuild(tmp_path / "a", preset="tiny", draft_exits=(1, 3))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no python here")
    with pytest.raises(ValueError, match="holds no"):
        build_zoo(ZooBuild(tmp_path / "a", preset="tiny", corpus=tmp_path / "empty"))
    assert not (tmp_path / "a").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        build_zoo(ZooBuild(tmp_path / "busy", preset="tiny", corpus=family["corpus"]))
    with pytest.raises(ValueError, match="other settings"):
        build_zoo(ZooBuild(family["out"], preset="tiny", corpus=family["corpus"], seed=1))
    assert main(["zoo", "build", "--out", str(tmp_path / "b"), "--preset", "tiny", "--sizes", "s,q"]) == 2
    assert "--sizes" in capsys.readouterr().err


def test_a_rerun_skips_finished_stages_and_resumes_a_cut_stage(family, monkeypatch):
    """Runs last: it rebuilds parts of the shared family."""
    out = family["out"]
    cfg = ZooBuild(out, preset="tiny", corpus=family["corpus"], minutes=5, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "runs" not in p.parts}
    assert build_zoo(cfg) == []
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # The draft stage dies after its training, before its gates: the next run resumes its checkpoint.
    import shutil

    import s2d.train.gates

    shutil.rmtree(out / "draft")
    monkeypatch.setattr(s2d.train.gates, "add_gates_and_vocab", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build_zoo(cfg)
    assert not (out / "draft").exists() and (out / "runs" / "draft" / "checkpoints").is_dir()
    monkeypatch.undo()
    assert build_zoo(cfg) == ["draft"]
    events = [json.loads(line).get("event") for line in (out / "runs" / "draft" / "train_log.jsonl").open()]
    assert "resume" in events
    assert load_model(out / "draft").cfg.exits == (1, 2)
    # A stage that runs again invalidates the stages after it (the draft's targets changed).
    shutil.rmtree(out / "zoo-l")
    assert build_zoo(cfg) == ["zoo-l", "draft"]
