"""Draft training, the parts: SoFT loss, divergences, data loading and packing, refusal of bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from s2d.cli import main
from s2d.model.config import CheckpointError
from s2d.model.loading import load_model
from s2d.model.tiny import byte_tokenizer, write_random_checkpoint
from s2d.train import DataConfig, DivergenceSpec, TrainConfig, train_draft
from s2d.train.data import exclusion_list, global_batch, load_packed, pack, read_documents
from s2d.train.draft import SortedDraft, init_from_checkpoint
from s2d.train.losses import TeacherMixture, divergence, soft_loss


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("train_units")
    src = root / "src"
    (src / "pkg").mkdir(parents=True)
    for i in range(6):
        (src / "pkg" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 20)
    return {"target": checkpoints["target"], "src": src, "root": root}  # the target is only read


# ---- losses -------------------------------------------------------------------------------------

def test_soft_loss_is_the_mean_of_per_exit_cross_entropies(tiny):
    draft = SortedDraft(init_from_checkpoint(tiny["target"], 3), (1, 3))
    torch.manual_seed(0)
    ids = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        got = soft_loss([z.reshape(-1, z.shape[-1]) for z in draft(ids[:, :-1])], ids[:, 1:].reshape(-1))
    # By hand: each exit is the checkpoint cut to E layers (s2d's runtime, an independent code path).
    per_exit = []
    for e in (1, 3):
        model = load_model(tiny["target"], dtype="float32", num_layers=e)
        logits = model(ids[:, :-1], torch.arange(8), model.new_cache(batch=2))  # [2, 8, V]
        logp = logits.log_softmax(-1)
        per_exit.append(-logp.gather(-1, ids[:, 1:, None])[..., 0].reshape(-1))
    expected = (per_exit[0] + per_exit[1]) / 2
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(per_exit[0], per_exit[1], atol=1e-2)  # the exits really differ


P = [0.5, 0.3, 0.2]
Q = [0.2, 0.2, 0.6]


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


@pytest.mark.parametrize("kind,beta,expected", [
    ("fkl", 0.5, kl(P, Q)),
    ("rkl", 0.5, kl(Q, P)),
    ("tvd", 0.5, 0.5 * sum(abs(x - y) for x, y in zip(P, Q))),
    ("jsd", 0.5, 0.5 * kl(P, [(x + y) / 2 for x, y in zip(P, Q)]) + 0.5 * kl(Q, [(x + y) / 2 for x, y in zip(P, Q)])),
    ("jsd", 0.2, 0.2 * kl(P, [0.2 * x + 0.8 * y for x, y in zip(P, Q)])
     + 0.8 * kl(Q, [0.2 * x + 0.8 * y for x, y in zip(P, Q)])),
])
def test_divergences_match_hand_computation(kind, beta, expected):
    # Logits are log-probabilities plus an arbitrary per-row shift: softmax must undo it.
    p_logits = torch.tensor([P]).log() + 3.0
    q_logits = torch.tensor([Q]).log() - 1.0
    got = divergence(p_logits, q_logits, DivergenceSpec(kind, beta))
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd"])
def test_teacher_mixture_averages_over_targets(kind):
    torch.manual_seed(0)
    teachers = [torch.randn(5, 11) * 2 for _ in range(3)]
    q = torch.randn(5, 11)
    spec = DivergenceSpec(kind)
    expected = torch.stack([divergence(p, q, spec) for p in teachers]).mean(0)
    assert torch.allclose(TeacherMixture(teachers, spec).loss(q), expected, atol=1e-5)
    assert (expected > 0).all()


def test_divergence_is_zero_for_equal_distributions():
    z = torch.randn(4, 7)
    for kind in ("fkl", "rkl", "jsd", "tvd"):
        assert divergence(z, z + 5.0, DivergenceSpec(kind)).abs().max() < 1e-5


# ---- data ---------------------------------------------------------------------------------------

def test_reads_directories_text_and_jsonl(tmp_path):
    src = tmp_path / "lib"
    (src / "site-packages").mkdir(parents=True)
    (src / "a").mkdir()
    (src / "a" / "keep.py").write_text("x = 1\n")
    (src / "a" / "held.py").write_text("held out\n")
    (src / "a" / "notes.txt").write_text("not python\n")
    (src / "big.py").write_text("y = 2\n" * 100)
    (src / "site-packages" / "dep.py").write_text("z = 3\n")
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(json.dumps({"text": "from text"}) + "\n\n" + json.dumps({"turns": ["t1", "t2"]}) + "\n")
    txt = tmp_path / "plain.txt"
    txt.write_text("plain file")
    cfg = DataConfig(paths=(src, jsonl, txt), exclude_dirs=("site-packages",), exclude_files=("a/held.py",),
                     max_file_bytes=100, seq_len=4)
    docs = read_documents(cfg)
    assert [d.text for d in docs] == ["x = 1\n", "from text", "t1", "t2", "plain file"]
    assert docs[0].source == "a/keep.py"


def test_packing_shifts_by_one_and_drops_nothing_but_the_tail():
    stream = torch.arange(23, dtype=torch.int32)
    rows = pack(stream, 5)
    assert rows.shape == (4, 6)
    assert rows[0].tolist() == [0, 1, 2, 3, 4, 5] and rows[1].tolist() == [5, 6, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack(torch.arange(4, dtype=torch.int32), 5)


def test_load_packed_separates_documents_with_eos_and_caches(tmp_path, tiny):
    tok = byte_tokenizer()
    cfg = DataConfig(paths=(tiny["src"],), seq_len=16)
    data = load_packed(cfg, tok, tmp_path / "tokens.pt")
    assert (tmp_path / "tokens.pt").exists() and len(data.sources) == 6
    assert int((data.rows[:, :-1] == tok.eos_token_id).sum()) >= 5
    again = load_packed(cfg, tok, tmp_path / "tokens.pt")
    assert torch.equal(again.rows, data.rows)


def test_global_batches_cover_an_epoch_and_are_reproducible():
    seen = torch.cat([global_batch(s, 12, 4, seed=3) for s in range(3)])
    assert sorted(seen.tolist()) == list(range(12))
    assert torch.equal(global_batch(1, 12, 4, seed=3), global_batch(1, 12, 4, seed=3))
    assert not torch.equal(global_batch(3, 12, 4, seed=3), global_batch(0, 12, 4, seed=3))  # a new epoch reshuffles


def test_exclusion_list_reads_split_json(tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"validation_files": ["a/held.py", "b.py"]}))
    assert exclusion_list(split) == ("a/held.py", "b.py")
    with pytest.raises(ValueError, match="validation_files"):
        (tmp_path / "bad.json").write_text("{}")
        exclusion_list(tmp_path / "bad.json")


# ---- bad input ----------------------------------------------------------------------------------

def config(tiny, tmp_path, **kw):
    base = dict(out_dir=tmp_path / "out", data=DataConfig(paths=(tiny["src"],), seq_len=16), exits=(1, 2),
                init=tiny["target"], steps=1, batch_size=2, micro_batch_size=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_refuses_exits_beyond_the_draft(tiny, tmp_path):
    with pytest.raises(ValueError, match="beyond the draft's 2 layers"):
        config(tiny, tmp_path, exits=(1, 3), num_layers=2)
    with pytest.raises(ValueError, match="ascending"):
        config(tiny, tmp_path, exits=(2, 1))
    with pytest.raises(CheckpointError, match="cannot take 4 layers"):  # the init has 3 layers
        train_draft(config(tiny, tmp_path, exits=(2, 4)))


def test_refuses_empty_data(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.py").write_text("   \n")
    (empty / "notes.txt").write_text("not matched by the glob")
    with pytest.raises(ValueError, match="no training text"):
        train_draft(config(tiny, tmp_path, data=DataConfig(paths=(empty,), seq_len=16)))
    with pytest.raises(ValueError, match="does not exist"):
        DataConfig(paths=(tmp_path / "missing",))


def test_refuses_targets_with_another_tokenizer(tiny, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(257)}
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                    eos_token="t1")
    stranger = write_random_checkpoint(tmp_path / "stranger", num_layers=1, tokenizer=other)
    with pytest.raises(CheckpointError, match="different tokenizers"):
        train_draft(config(tiny, tmp_path, objective="distill", targets=(tiny["target"], stranger)))


def test_refuses_inconsistent_objectives(tiny, tmp_path):
    with pytest.raises(ValueError, match="needs at least one target"):
        config(tiny, tmp_path, objective="distill")
    with pytest.raises(ValueError, match="on-policy"):
        config(tiny, tmp_path, on_policy=0.5)
    with pytest.raises(ValueError, match="divergence"):
        DivergenceSpec("kl")
    with pytest.raises(ValueError, match="exactly one of init"):
        config(tiny, tmp_path, init=None)


def test_cli_reports_bad_input_cleanly(tiny, tmp_path, capsys):
    code = main(["train-draft", "--out", str(tmp_path / "o"), "--data", str(tiny["src"]), "--init",
                 str(tiny["target"]), "--exits", "1,5", "--num-layers", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "exit 5 is beyond the draft's 3 layers" in err and "Traceback" not in err
