"""``s2d export-gguf`` read back with the gguf package; with llama-cpp-python, loaded by llama.cpp itself."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from s2d.cli import main
from s2d.export_gguf import export_gguf, pre_tokenizer, unpermute_rope
from s2d.model.config import CheckpointError, ModelConfig
from s2d.model.loading import load_tokenizer, read_safetensors
from s2d.model.tiny import EOS_TOKEN, write_random_checkpoint

TEXTS = ["def add(a, b):\n    return a + b\n", "Hello, world!  It's 2024... I'll go.", "  \n\n\t x = [1, 22, 333]",
         "naïve café — 東京 🚀 ok", "if (x >= 10) { y += 'abc'; }", "a" * 40 + " " + "ab" * 17]
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def bpe_tokenizer():
    """A byte-level BPE (GPT-2 split) trained in milliseconds on a few lines, with ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(TEXTS * 3 + ["import os\nimport sys\n", "the quick brown fox jumps over the lazy dog"],
                             trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN, model_max_length=512)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-src")
    return {
        # GQA (4 query heads, 2 kv heads) so the q and k permutations differ.
        "llama": write_random_checkpoint(root / "llama", num_layers=2, seed=4),
        "tied": write_random_checkpoint(root / "tied", num_layers=1, seed=5, tie_word_embeddings=True),
        "qwen2": write_random_checkpoint(root / "qwen2", "qwen2", num_layers=2, seed=6),
        "sorted": write_random_checkpoint(root / "sorted", num_layers=3, seed=7, s2d_exits=[1, 2, 3]),
        "bpe": write_random_checkpoint(root / "bpe", num_layers=2, seed=8, tokenizer=bpe_tokenizer()),
        "linear": write_random_checkpoint(root / "linear", num_layers=1, seed=10,
                                          rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
        "llama3": write_random_checkpoint(root / "llama3", num_layers=1, seed=11, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    }


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(metadata, tensors as float32 in transformers' [out, in] layout, tensor types)."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    tensors, types = {}, {}
    for t in reader.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            raw = torch.from_numpy(np.ascontiguousarray(t.data).view(np.int16).copy()).view(torch.bfloat16)
        else:
            raw = torch.from_numpy(np.array(t.data))
        tensors[t.name] = raw.float().reshape([int(d) for d in reversed(t.shape)])
        types[t.name] = t.tensor_type.name
    return meta, tensors, types


def hf_name(name: str) -> str:
    """llama.cpp tensor name -> transformers'."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    _, i, part, suffix = name.split(".")
    theirs = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}[part]
    return f"model.layers.{i}.{theirs}.{suffix}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "tied"])
def test_tensors_and_metadata_round_trip(models, tmp_path, name, dtype):
    src = models[name]
    out = export_gguf(src, tmp_path / "m.gguf", dtype=dtype)
    meta, tensors, types = read_gguf(out)
    cfg = ModelConfig.from_file(src / "config.json")
    state = read_safetensors(src)
    arch = "qwen2" if name == "qwen2" else "llama"
    assert meta["general.architecture"] == arch
    expected = {
        "block_count": cfg.num_layers, "context_length": cfg.max_positions, "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
        "attention.head_count": cfg.num_heads, "attention.head_count_kv": cfg.num_kv_heads,
        "rope.dimension_count": cfg.head_dim, "attention.key_length": cfg.head_dim,
    }
    for key, value in expected.items():
        assert meta[f"{arch}.{key}"] == value, key
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert meta["general.file_type"] == (0 if dtype == "float32" else 32)
    assert len(meta["tokenizer.ggml.tokens"]) == cfg.vocab_size

    used = set()
    for gname, got in tensors.items():
        theirs = hf_name(gname)
        used.add(theirs)
        if arch == "llama" and ".attn_q." in gname:
            got = unpermute_rope(got, cfg.num_heads)
        elif arch == "llama" and ".attn_k." in gname:
            got = unpermute_rope(got, cfg.num_kv_heads)
        want = state[theirs].float()
        if dtype == "bfloat16" and want.ndim == 2:
            want = want.to(torch.bfloat16).float()
        assert torch.equal(got, want), gname
        assert types[gname] == ("F32" if dtype == "float32" or want.ndim == 1 else "BF16"), gname
    # Every tensor of the checkpoint is there (a tied head is token_embd itself).
    assert used == set(state) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert ("output.weight" in tensors) == (not cfg.tie_word_embeddings)
    if name == "qwen2":
        assert "blk.0.attn_q.bias" in tensors and "blk.0.attn_output.bias" not in tensors


def test_permutation_is_llama_cpps_rope_layout():
    """Row 2j and 2j+1 of a permuted head are rows j and j + head_dim/2 of transformers' head."""
    from s2d.export_gguf import permute_rope

    heads, head_dim = 3, 8
    w = torch.arange(heads * head_dim, dtype=torch.float32)[:, None].repeat(1, 2)  # row index as value
    p = permute_rope(w, heads)
    for h in range(heads):
        base = h * head_dim
        for j in range(head_dim // 2):
            assert p[base + 2 * j, 0] == base + j and p[base + 2 * j + 1, 0] == base + j + head_dim // 2
    assert torch.equal(unpermute_rope(p, heads), w)


def test_sorted_draft_exit(models, tmp_path):
    meta, tensors, _ = read_gguf(export_gguf(models["sorted"], tmp_path / "e2.gguf", exit_layers=2))
    assert meta["llama.block_count"] == 2 and meta["general.name"] == "sorted-exit2"
    assert {n.split(".")[1] for n in tensors if n.startswith("blk.")} == {"0", "1"}
    state = read_safetensors(models["sorted"])
    # The exit reads through the draft's shared final norm and head.
    assert torch.equal(tensors["output_norm.weight"], state["model.norm.weight"])
    meta, tensors, _ = read_gguf(export_gguf(models["sorted"], tmp_path / "deepest.gguf"))
    assert meta["llama.block_count"] == 3
    # llama.cpp accepts a -md draft only with the target's vocabulary: same tokenizer, same metadata.
    target, _, _ = read_gguf(export_gguf(models["llama"], tmp_path / "target.gguf"))
    assert {k: v for k, v in meta.items() if k.startswith("tokenizer.")} == {
        k: v for k, v in target.items() if k.startswith("tokenizer.")}


def test_rope_scaling(models, tmp_path):
    meta, tensors, _ = read_gguf(export_gguf(models["linear"], tmp_path / "linear.gguf"))
    assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 4.0
    assert "rope_freqs.weight" not in tensors
    meta, tensors, _ = read_gguf(export_gguf(models["llama3"], tmp_path / "llama3.gguf"))
    # llama3: a per-frequency divisor, 1 for the fastest-turning dimensions, the full factor for the slowest.
    factors = tensors["rope_freqs.weight"]
    assert factors.shape == (16 // 2,) and factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(8.0)
    assert "llama.rope.scaling.type" not in meta


def gguf_ids(meta: dict, text: str) -> list[int]:
    """Tokenise with a BPE rebuilt from the file's tokens and merges alone (llama.cpp's inputs)."""
    from tokenizers import AddedToken, Tokenizer, models as tm, pre_tokenizers

    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k != gguf.TokenType.UNUSED}
    tok = Tokenizer(tm.BPE(vocab, [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # Control tokens match as a whole in the text, under their own ids.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == gguf.TokenType.CONTROL])
    return tok.encode(text).ids


@pytest.mark.parametrize("name", ["llama", "bpe"])
def test_tokenizer_reproduces_transformers_ids(models, tmp_path, name):
    meta, _, _ = read_gguf(export_gguf(models[name], tmp_path / "t.gguf"))
    hf = load_tokenizer(models[name])
    if name == "bpe":
        assert len(meta["tokenizer.ggml.merges"]) > 50
    eos = hf.eos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == eos and meta["tokenizer.ggml.bos_token_id"] == eos
    assert meta["tokenizer.ggml.token_type"][eos] == gguf.TokenType.CONTROL
    assert meta["tokenizer.ggml.add_bos_token"] is False
    for text in TEXTS + [f"one{EOS_TOKEN}two"]:
        assert gguf_ids(meta, text) == hf(text).input_ids, text


def test_pre_tokenizer_mapping():
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

    def split(regex: str) -> dict:
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}

    assert pre_tokenizer({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == ("gpt-2", False)
    assert pre_tokenizer(split(gpt2)) == ("gpt-2", False)
    assert pre_tokenizer(split(LLAMA3_REGEX)) == ("llama-bpe", True)
    assert pre_tokenizer(split(LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}"))) == ("qwen2", False)
    refused = [
        (split(r"\w+|\s+"), "matches none llama.cpp implements"),
        ({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}, "prefix space"),
        ({"type": "Metaspace", "replacement": "▁"}, "Metaspace"),
        (None, "none"),
    ]
    for spec, message in refused:
        with pytest.raises(CheckpointError, match=message):
            pre_tokenizer(spec)


def test_unmappable_tokenizers_are_refused(models, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in models["llama"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    raw = json.loads((src / "tokenizer.json").read_text())
    raw["model"]["ignore_merges"] = True
    (src / "tokenizer.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="ignore_merges"):
        export_gguf(src, tmp_path / "x.gguf")
    (src / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        export_gguf(src, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def cli(*argv) -> int:
    return main(["export-gguf", *map(str, argv)])


def test_cli_writes_and_refuses_clearly(models, tmp_path, capsys):
    out = tmp_path / "d.gguf"
    assert cli("--model", models["sorted"], "--exit", 1, "--out", out, "--dtype", "float32") == 0
    assert "wrote" in capsys.readouterr().err
    assert read_gguf(out)[0]["llama.block_count"] == 1
    cases = [
        (["--model", tmp_path / "no-such-model", "--out", tmp_path / "a.gguf"], "no-such-model"),
        (["--model", models["sorted"], "--exit", 4, "--out", tmp_path / "a.gguf"], "not one of the draft's exits"),
        (["--model", models["llama"], "--exit", 0, "--out", tmp_path / "a.gguf"], "outside the model's 2 layers"),
        (["--model", models["sorted"], "--out", out], "exists; pass --force"),
        (["--model", models["llama"], "--out", models["llama"] / "m.gguf"], "inside the checkpoint directory"),
        (["--model", models["llama"], "--out", tmp_path], "is a directory"),
    ]
    for argv, message in cases:
        assert cli(*argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (message, err)
    assert not (tmp_path / "a.gguf").exists() and not (models["llama"] / "m.gguf").exists()
    # --force replaces, and nothing but the file is left behind.
    assert cli("--model", models["sorted"], "--out", out, "--force") == 0
    assert read_gguf(out)[0]["llama.block_count"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["d.gguf"]


# --- llama.cpp itself (skipped without llama-cpp-python) -------------------------------------------------------

def llama(path: Path, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_batch=512, verbose=False, **kwargs)


@pytest.mark.parametrize("name", ["llama", "qwen2", "bpe", "linear", "llama3"])
def test_llama_cpp_greedy_tokens_equal_ours(models, tmp_path, name):
    from s2d.engine import Engine
    from s2d.model.loading import load_model
    from s2d.sampling import SamplingParams

    path = export_gguf(models[name], tmp_path / "m.gguf", dtype="float32")
    llm = llama(path)
    engine = Engine(load_model(models[name], "float32"), None, eos_token_ids=())
    # The long prompt reaches positions where the RoPE scalings change the frequencies.
    for prompt in ([10, 20, 30, 40], list(range(40, 100, 3)), [(5 * i) % 250 for i in range(90)]):
        ours = engine.generate(prompt, SamplingParams(), 20).output
        theirs: list[int] = []
        llm.reset()
        for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
            theirs.append(token)
            if len(theirs) == 20:
                break
        assert theirs == ours, prompt


@pytest.mark.parametrize("name", ["llama", "tied", "qwen2", "sorted", "linear", "llama3"])
def test_llama_cpp_logits_equal_ours(models, tmp_path, name):
    """Every position's logits, llama.cpp (float32 weights and KV cache) against our runtime: a wrong RoPE
    layout or scaling shows as 1e-2 differences where float rounding leaves 1e-6."""
    from s2d.model.loading import load_model

    layers = 2 if name == "sorted" else None
    path = export_gguf(models[name], tmp_path / "m.gguf", exit_layers=layers, dtype="float32")
    llm = llama(path, logits_all=True, type_k=0, type_v=0)  # 0 = GGML_TYPE_F32 (the default KV cache is f16)
    prompt = [(5 * i) % 250 for i in range(90)]
    llm.eval(prompt)
    theirs = torch.from_numpy(np.array(llm.scores[: len(prompt)]))
    model = load_model(models[name], "float32", num_layers=layers)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]), torch.arange(len(prompt)), model.new_cache())[0]
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["llama", "bpe"])
def test_llama_cpp_tokenizes_like_transformers(models, tmp_path, name):
    llm = llama(export_gguf(models[name], tmp_path / "t.gguf"), vocab_only=True)
    hf = load_tokenizer(models[name])
    for text in TEXTS + [f"one{EOS_TOKEN}two"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf(text).input_ids, text


# --- the llama.cpp bench peers ----------------------------------------------------------------------------------

def test_llamacpp_peers_are_skipped_without_llama_cpp_python(checkpoints, monkeypatch, tmp_path):
    import sys

    from s2d.bench.registry import MethodContext, MethodOptions, MethodSkipped, ModelStore, build_method

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    monkeypatch.setenv("S2D_CACHE", str(tmp_path))
    ctx = MethodContext(checkpoints["target"], None, MethodOptions(dtype="float32"), ModelStore())
    for name in ("llamacpp", "llamacpp-lookup"):
        with pytest.raises(MethodSkipped, match="pip install llama-cpp-python"):
            build_method(name, ctx)


def test_llamacpp_peers_end_to_end(checkpoints, monkeypatch, tmp_path):
    pytest.importorskip("llama_cpp")
    from s2d.bench.metrics import ALL
    from s2d.bench.registry import MethodContext, MethodOptions, ModelStore, build_method
    from s2d.bench.results import read_results
    from s2d.sampling import SamplingParams

    monkeypatch.setenv("S2D_CACHE", str(tmp_path / "cache"))
    rows = [{"question_id": 1, "category": "code", "turns": ["def add(a, b):\n    return a + b\n\ndef add3("]},
            {"question_id": 2, "category": "chat", "turns": ["abcabcabc", "again: abc"]}]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["bench", "--target", str(checkpoints["target"]), "--methods", "ar,llamacpp,llamacpp-lookup",
                 "--questions", str(questions), "--max-new-tokens", "16", "--dtype", "float32",
                 "--out", str(out), "--no-progress"]) == 0
    runs = {r["method"]: r for r in read_results(out)["runs"] if r["category"] == ALL}
    # float32, greedy: llama.cpp computes the same tokens as our engine.
    assert runs["llamacpp"]["greedy_identical"] == 1.0 and runs["llamacpp-lookup"]["greedy_identical"] == 1.0
    assert runs["llamacpp"]["mean_accepted_tokens"] == pytest.approx(1.0)
    assert runs["llamacpp-lookup"]["mean_accepted_tokens"] > 1.0  # "abcabcabc" is made for prompt lookup
    assert runs["llamacpp-lookup"]["acceptance_by_position"]
    # The export is cached, keyed by the checkpoint: one file for both peers and for later runs.
    cached = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("-float32.gguf")
    ctx = MethodContext(checkpoints["target"], None, MethodOptions(dtype="float32", ignore_eos=True), ModelStore())
    method = build_method("llamacpp", ctx)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == cached
    sampled = method.generate([5, 6, 7], SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3), 12)
    again = method.generate([5, 6, 7], SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3), 12)
    assert len(sampled.tokens) == 12 and sampled.tokens == again.tokens and sampled.target_passes == 12


def test_llamacpp_lookup_takes_prompts_longer_than_a_batch(tmp_path, monkeypatch):
    """llama-cpp-python sizes its per-position logits by n_batch unless told logits_all: a 600-token prompt."""
    pytest.importorskip("llama_cpp")
    from s2d.bench.registry import MethodContext, MethodOptions, ModelStore, build_method
    from s2d.engine import Engine
    from s2d.model.loading import load_model
    from s2d.sampling import SamplingParams

    monkeypatch.setenv("S2D_CACHE", str(tmp_path / "cache"))
    target = write_random_checkpoint(tmp_path / "long", num_layers=1, max_positions=1024, seed=9)
    ctx = MethodContext(target, None, MethodOptions(dtype="float32", ignore_eos=True), ModelStore())
    prompt = [(7 * i) % 200 for i in range(600)]
    got = build_method("llamacpp-lookup", ctx).generate(prompt, SamplingParams(), 16)
    ours = Engine(load_model(target, "float32"), None, eos_token_ids=()).generate(prompt, SamplingParams(), 16)
    assert got.tokens == ours.output
