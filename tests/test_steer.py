"""s2d-steer: the target's hidden state steers the sorted draft through a per-target map; lossless."""

from __future__ import annotations

import json

import pytest
import torch

from s2d.drafting import build_drafter
from s2d.drafting.steer import STEER_FILE, SteeredDrafter, SteeringMaps, target_fingerprint
from s2d.drafting.sorted import SortedConfig, SortedDrafter
from s2d.engine import Engine
from s2d.model.config import CheckpointError
from s2d.model.loading import load_model
from s2d.model.tiny import write_random_checkpoint
from s2d.sampling import SamplingParams
from s2d.train.steer import SteerTraining, evaluate, train_maps
from tinymodels import small_vocab_model


@pytest.fixture(scope="module")
def family(small_target_dir, sorted_draft_dir):
    paths = {"target": small_target_dir, "draft": sorted_draft_dir}
    return paths, load_model(paths["target"], dtype="float32"), load_model(paths["draft"], dtype="float32")


def random_maps(draft, target, exits=(1, 2, 3), scale=0.5, seed=0) -> SteeringMaps:
    g = torch.Generator().manual_seed(seed)
    maps = SteeringMaps(draft.cfg.hidden_size)
    for e in exits:
        maps.add(target, "target", e, scale * torch.randn(draft.cfg.hidden_size, target.cfg.hidden_size, generator=g))
    return maps


PROMPTS = [list(range(60, 90)), [7, 3, 9, 7, 3, 1, 12, 40, 41, 42] * 2]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_steered_decoding_equals_plain(family, prompt):
    _, target, draft = family
    expected = Engine(target, eos_token_ids=()).generate(prompt, SamplingParams(), 40).output
    drafter = SteeredDrafter(draft, 2, random_maps(draft, target))
    state = Engine(target, drafter, 4, eos_token_ids=()).generate(prompt, SamplingParams(), 40)
    assert state.output == expected
    assert state.stats.proposed > 0


def test_zero_map_reproduces_the_plain_exit(family):
    _, target, draft = family
    prompt = PROMPTS[1]
    plain = Engine(target, SortedDrafter(draft, SortedConfig((2,), (0.0,))), 3, eos_token_ids=())
    steered = Engine(target, SteeredDrafter(draft, 2, random_maps(draft, target, scale=0.0)), 3, eos_token_ids=())
    a, b = plain.generate(prompt, SamplingParams(), 30), steered.generate(prompt, SamplingParams(), 30)
    assert a.output == b.output
    assert a.stats.accepted_at == b.stats.accepted_at and a.stats.proposed == b.stats.proposed
    # Seeded sampling too: the same q, the same draws.
    params = SamplingParams(temperature=1.0, seed=5)
    assert plain.generate(prompt, params, 30).output == steered.generate(prompt, params, 30).output


def test_a_map_changes_the_draft(family):
    _, target, draft = family
    context = PROMPTS[0]
    with torch.no_grad():
        hidden = target.run_layers(target.embed_tokens(torch.tensor([context[:-1]])), torch.arange(len(context) - 1),
                                   target.new_cache())[0, -1]
    drafts = []
    for scale in (0.0, 3.0):
        drafter = SteeredDrafter(draft, 2, random_maps(draft, target, scale=scale))
        drafter.bind_target(target)
        drafter.observe(hidden)
        drafts.append(drafter.propose(context, 4, SamplingParams(), None).tokens.tolist())
    plain = SortedDrafter(draft, SortedConfig((2,), (0.0,))).propose(context, 4, SamplingParams(), None)
    assert drafts[0] == plain.tokens.tolist() and drafts[1] != drafts[0]


def test_steered_q_is_what_the_draft_samples():
    """The first drafted token follows the Draft's q exactly (chi-squared over 8 tokens, 4000 draws)."""
    target = small_vocab_model(2, seed=1)
    draft = small_vocab_model(3, seed=2, exits=(1, 2, 3), head_scale=2.0)
    maps = SteeringMaps(draft.cfg.hidden_size)
    maps.add(target, "t", 2, torch.randn(draft.cfg.hidden_size, target.cfg.hidden_size) * 2)
    drafter = SteeredDrafter(draft, 2, maps)
    drafter.bind_target(target)
    context = [1, 2, 3, 4]
    with torch.no_grad():
        hidden = target.run_layers(target.embed_tokens(torch.tensor([context[:-1]])), torch.arange(3),
                                   target.new_cache())[0, -1]
    drafter.observe(hidden)
    params = SamplingParams(temperature=1.0)
    q = drafter.propose(context, 1, params, torch.Generator().manual_seed(0)).probs[0]
    unsteered = SortedDrafter(draft, SortedConfig((2,), (0.0,))).propose(context, 1, params, None).probs[0]
    assert float((q - unsteered).abs().sum()) > 0.05  # the map moved the distribution
    n, counts = 4000, torch.zeros(8)
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        counts[int(drafter.propose(context, 1, params, g).tokens[0])] += 1
    expected = q * n
    keep = expected > 0
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 24.3, chi2  # 7 degrees of freedom, p = 0.001


def test_sampled_steered_output_is_distributed_like_the_target():
    target = small_vocab_model(2, seed=1)
    draft = small_vocab_model(3, seed=2, exits=(1, 2, 3))
    maps = SteeringMaps(draft.cfg.hidden_size)
    maps.add(target, "t", 1, torch.randn(draft.cfg.hidden_size, target.cfg.hidden_size, generator=torch.Generator().manual_seed(3)))
    prompt = [1, 2, 3]
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]), torch.arange(3), target.new_cache())[0, -1].softmax(-1)
        seqs = torch.tensor([prompt + [a] for a in range(8)])
        p2 = target(seqs, torch.arange(4), target.new_cache(batch=8))[:, -1].softmax(-1)
    exact = (p1[:, None] * p2).reshape(-1)
    engine = Engine(target, SteeredDrafter(draft, 1, maps), 3, eos_token_ids=())
    n, counts = 3000, torch.zeros(64)
    for i in range(n):
        out = engine.generate(prompt, SamplingParams(temperature=1.0, seed=i), 3).output
        counts[out[0] * 8 + out[1]] += 1
    tv = 0.5 * float((counts / n - exact).abs().sum())
    assert tv < 0.07, tv


def test_maps_round_trip_and_refusals(family, tmp_path):
    _, target, draft = family
    maps = random_maps(draft, target, exits=(2,))
    maps.save(tmp_path)
    loaded = SteeringMaps.load(tmp_path, draft.cfg.hidden_size)
    assert torch.equal(loaded.for_target(target, 2), maps.for_target(target, 2))
    assert loaded.targets[target_fingerprint(target)]["name"] == "target"
    with pytest.raises(ValueError, match="no steering map for this target at exit 1"):
        loaded.for_target(target, 1)
    other = small_vocab_model(1, seed=9)
    with pytest.raises(ValueError, match="target \\(exit 2\\)"):
        loaded.for_target(other, 2)
    with pytest.raises(CheckpointError, match="hidden size"):
        SteeringMaps.load(tmp_path, draft.cfg.hidden_size + 1)
    (tmp_path / STEER_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="malformed steering maps"):
        SteeringMaps.load(tmp_path, draft.cfg.hidden_size)
    assert SteeringMaps.load(tmp_path / "nowhere", 4) is None


def test_methods_need_their_maps(family, tmp_path):
    _, target, draft = family
    with pytest.raises(ValueError, match="steering maps beside the draft"):
        build_drafter("s2d-steer", draft)
    with pytest.raises(ValueError, match="needs a draft"):
        build_drafter("s2d-steer", None)


def test_training_learns_and_the_cli_writes_a_loadable_draft(family, tmp_path, capsys):
    paths, target, draft = family
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 256, (24, 33), generator=g)
    maps, report = train_maps(draft, {"t": target}, rows[:16], (2,), SteerTraining(steps=30, batch_size=8, seq_len=32,
                              lr=1e-2), rows[16:], progress=False)
    assert report["final_loss"]["t.exit2"] > 0
    agreement = evaluate(draft, {"t": target}, maps, rows[16:, :32], (2,), 4)["t.exit2"]
    assert set(agreement) == {"plain", "steered"} and len(agreement["plain"]) == 4
    # The loss falls: the trained map fits better than the zero map on the training rows.
    from s2d.train.steer import draft_exit_states, steered_loss, target_states
    ids = rows[:8, :32]
    dh, (th, tp) = draft_exit_states(draft, ids, (2,))[2], target_states(target, ids)
    offsets = torch.zeros(32, dtype=torch.long)
    zero = torch.zeros_like(maps.for_target(target, 2))
    assert steered_loss(draft, maps.for_target(target, 2), dh, th, tp, offsets) < steered_loss(draft, zero, dh, th, tp, offsets)

    from s2d.cli import main
    data = tmp_path / "data.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "steered"
    rc = main(["train-draft", "--objective", "steer", "--init", str(paths["draft"]), "--out", str(out), "--data",
               str(data), "--targets", str(paths["target"]), "--steps", "3", "--seq-len", "32", "--batch-size", "2",
               "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steer"]["exits"] == [2]
    steered_draft = load_model(out, dtype="float32")
    drafter = build_drafter("s2d-steer", steered_draft)
    state = Engine(target, drafter, 3, eos_token_ids=()).generate(PROMPTS[0], SamplingParams(), 20)
    assert state.output == Engine(target, eos_token_ids=()).generate(PROMPTS[0], SamplingParams(), 20).output
    assert main(["train-draft", "--objective", "steer", "--init", str(paths["draft"]), "--out", str(tmp_path / "x"),
                 "--data", str(data)]) != 0
    assert "needs --targets" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_multi_target_engine_uses_each_targets_map(family, tmp_path):
    import shutil

    from s2d.engine import MultiTargetEngine

    paths, target, _ = family
    other_path = write_random_checkpoint(tmp_path / "other", num_layers=1, hidden_size=48, seed=33)
    other = load_model(other_path, dtype="float32")
    folder = tmp_path / "draft"
    shutil.copytree(paths["draft"], folder)
    draft = load_model(folder, dtype="float32")
    maps = random_maps(draft, target, exits=(2,), seed=1)
    maps.add(other, "other", 2, torch.ones(draft.cfg.hidden_size, other.cfg.hidden_size))
    maps.save(folder)
    draft = load_model(folder, dtype="float32")
    engine = MultiTargetEngine({"a": target, "b": other}, draft, "s2d-steer", eos_token_ids=())
    for name, model in (("a", target), ("b", other)):
        steered = engine.engine(name).drafter.inner  # the hybrid's model drafter
        assert torch.equal(steered.matrix, maps.for_target(model, 2))
        prompt = PROMPTS[0]
        expected = Engine(model, eos_token_ids=()).generate(prompt, SamplingParams(), 24).output
        assert engine.generate(name, prompt, SamplingParams(), 24).output == expected


def test_decode_steering_vector_equals_the_reference():
    from s2d.drafting.steer import decode_steering_vector, steering_vector

    g = torch.Generator().manual_seed(4)
    matrix, hidden = torch.randn(48, 64, generator=g), torch.randn(64, generator=g)
    fast = decode_steering_vector(matrix, hidden, 1e-6)
    torch.testing.assert_close(fast, steering_vector(matrix, hidden, 1e-6), rtol=1e-5, atol=1e-5)
    assert fast.shape == (48,) and fast.dtype == torch.float32
