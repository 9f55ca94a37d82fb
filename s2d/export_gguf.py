"""``s2d export-gguf``: write a checkpoint, or one exit of a sorted draft, as a GGUF file for llama.cpp.

llama.cpp users can then run our drafts as their ``-md`` draft model (and our targets as ``-m``).
The file follows llama.cpp's own converter (``convert_hf_to_gguf.py``): its tensor names, q/k rows
permuted for its RoPE layout (arch ``llama``), 1-D tensors in float32, and the tokenizer as a
GPT-2-style byte-level BPE vocabulary with the pre-tokenizer llama.cpp implements for its regex.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from s2d.model.config import CheckpointError, ModelConfig
from s2d.model.loading import check_finite, expected_shapes, read_safetensors, resolve_checkpoint
from s2d.train.export import check_exit

GGUF_DTYPES = ("bfloat16", "float16", "float32")
FORMAT_VERSION = 1  # bump when the files this module writes change: cached exports are keyed by it
ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}

# Pre-tokenizer regexes as tokenizer.json spells them -> the llama.cpp pre-tokenizer that implements
# them (src/llama-vocab.cpp), and whether llama.cpp then skips BPE merges for whole in-vocabulary words
# (its ``ignore_merges``), which must agree with the BPE model's flag for the ids to agree.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    GPT2_REGEX: ("gpt-2", False),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        ("llama-bpe", True),  # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        ("qwen2", False),
}


@dataclass(frozen=True)
class Vocab:
    """A byte-level BPE tokenizer as GGUF holds it."""

    tokens: list[str]  # [vocab_size], GPT-2 byte-to-unicode text; ids the model has no token for: "[PAD{i}]"
    token_types: list[int]  # [vocab_size], gguf.TokenType
    merges: list[str]  # "left right", by rank
    pre: str  # tokenizer.ggml.pre
    special_ids: dict[str, int]  # "bos", "eos", "pad", ... -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def read_vocab(directory: Path, vocab_size: int) -> Vocab:
    """The checkpoint's ``tokenizer.json`` as a GGUF vocabulary; refuses what llama.cpp would tokenize differently."""
    import gguf

    path = directory / "tokenizer.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"no tokenizer.json in {directory}: only byte-level BPE tokenizers "
                              "from tokenizer.json can be exported to GGUF") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    model = raw.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"tokenizer model {model.get('type')!r} is not BPE; only byte-level BPE exports to GGUF")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise CheckpointError("tokenizer is a SentencePiece-style BPE (byte fallback or subword affixes), "
                              "not byte-level BPE; it cannot be exported to GGUF here")
    if (raw.get("decoder") or {}).get("type") != "ByteLevel":
        raise CheckpointError(f"tokenizer decoder {(raw.get('decoder') or {}).get('type')!r} is not ByteLevel; "
                              "only byte-level BPE exports to GGUF")
    normalizer = (raw.get("normalizer") or {}).get("type")
    # llama.cpp does not normalise; NFC (Qwen's tokenizers) changes nothing on text that is already NFC,
    # which is why llama.cpp's own converter maps those tokenizers the same way.
    if normalizer not in (None, "NFC"):
        raise CheckpointError(f"tokenizer normalizer {normalizer!r} has no llama.cpp equivalent")
    pre, ignore_merges = pre_tokenizer(raw.get("pre_tokenizer"))
    if bool(model.get("ignore_merges", False)) != ignore_merges:
        raise CheckpointError(f"tokenizer has ignore_merges={bool(model.get('ignore_merges'))}, but llama.cpp's "
                              f"{pre!r} pre-tokenizer uses {ignore_merges}: ids would differ")

    tokens: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in model.get("vocab", {}).items()}
    for added in raw.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        tokens[int(added["id"])] = (added["content"], kind)
    if tokens and max(tokens) >= vocab_size:
        raise CheckpointError(f"tokenizer has token id {max(tokens)}, outside the model's vocab_size {vocab_size}")
    # Embedding rows no token maps to (vocabularies padded to a round size) get placeholders, as llama.cpp expects.
    texts = [tokens.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab_size)]

    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    add_bos, add_eos = adds_special_tokens(directory)
    template = special.chat_template if isinstance(special.chat_template, str) else None
    return Vocab([t for t, _ in texts], [int(k) for _, k in texts], list(special.merges), pre,
                 dict(special.special_token_ids), add_bos, add_eos, template)


def pre_tokenizer(spec: dict[str, Any] | None) -> tuple[str, bool]:
    """(llama.cpp pre-tokenizer name, its ignore_merges) for a tokenizer.json ``pre_tokenizer``."""
    if spec is None:
        parts = []
    else:
        parts = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    regex, byte_level = None, {}
    if len(parts) == 1 and parts[0].get("type") == "ByteLevel" and parts[0].get("use_regex", True):
        regex, byte_level = GPT2_REGEX, parts[0]  # ByteLevel's built-in split is the GPT-2 regex
    elif (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
          and not parts[1].get("use_regex", True) and parts[0].get("behavior") == "Isolated"
          and not parts[0].get("invert", False)):
        regex, byte_level = (parts[0].get("pattern") or {}).get("Regex"), parts[1]
    if regex is None:
        found = " + ".join(str(p.get("type")) for p in parts) or "none"
        raise CheckpointError(f"tokenizer pre-tokenizer ({found}) is not a byte-level BPE split llama.cpp knows")
    if byte_level.get("add_prefix_space", False):
        raise CheckpointError("tokenizer adds a prefix space (ByteLevel add_prefix_space); llama.cpp's byte-level "
                              "BPE does not")
    if regex not in PRE_TOKENIZERS:
        raise CheckpointError(f"tokenizer's pre-tokenizer regex {regex!r} matches none llama.cpp implements "
                              f"(known: {', '.join(name for name, _ in PRE_TOKENIZERS.values())})")
    return PRE_TOKENIZERS[regex]


def adds_special_tokens(directory: Path) -> tuple[bool, bool]:
    """Whether s2d's tokenizer (transformers) puts a BOS before / an EOS after a text: llama.cpp must do the same."""
    from s2d.model.loading import load_tokenizer

    tok = load_tokenizer(directory)
    plain = tok("a", add_special_tokens=False).input_ids
    full = tok("a").input_ids
    return full[:1] != plain[:1], full[-1:] != plain[-1:]


def permute_rope(w: Tensor, n_heads: int) -> Tensor:
    """q/k rows [n_heads * head_dim, ...] from transformers' rotate-half order to llama.cpp's interleaved pairs.

    transformers rotates dimension i with i + head_dim/2; llama.cpp's arch ``llama`` rotates 2i with 2i+1.
    Permuting the projection's output rows turns one into the other (llama.cpp's converter does the same).
    """
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: Tensor, n_heads: int) -> Tensor:
    """The inverse of ``permute_rope``."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, Tensor], cfg: ModelConfig, arch: str) -> dict[str, Tensor]:
    """transformers' tensors -> llama.cpp's names (and q/k layout), for ``cfg.num_layers`` layers."""
    import gguf

    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    h, q_dim, kv_dim = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    f = cfg.intermediate_size

    def take(name: str, shape: tuple[int, ...]) -> Tensor:
        if name not in state:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}")
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(state[name].shape)}, config implies {shape}")
        return state[name]

    out = {names[T.TOKEN_EMBD] + ".weight": take("model.embed_tokens.weight", (cfg.vocab_size, h))}
    biases = {"q": cfg.qkv_bias, "k": cfg.qkv_bias, "v": cfg.qkv_bias, "o": cfg.o_bias}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[names[T.ATTN_NORM].format(bid=i) + ".weight"] = take(p + "input_layernorm.weight", (h,))
        out[names[T.FFN_NORM].format(bid=i) + ".weight"] = take(p + "post_attention_layernorm.weight", (h,))
        for x, kind, rows in (("q", T.ATTN_Q, q_dim), ("k", T.ATTN_K, kv_dim), ("v", T.ATTN_V, kv_dim),
                              ("o", T.ATTN_OUT, h)):
            for suffix, shape in (("weight", (rows, q_dim if x == "o" else h)), ("bias", (rows,))):
                if suffix == "bias" and not biases[x]:
                    continue
                w = take(p + f"self_attn.{x}_proj.{suffix}", shape)
                if arch == "llama" and x in "qk":
                    w = permute_rope(w, cfg.num_heads if x == "q" else cfg.num_kv_heads)
                out[names[kind].format(bid=i) + "." + suffix] = w
        for x, kind, shape in (("gate", T.FFN_GATE, (f, h)), ("up", T.FFN_UP, (f, h)), ("down", T.FFN_DOWN, (h, f))):
            out[names[kind].format(bid=i) + ".weight"] = take(p + f"mlp.{x}_proj.weight", shape)
            if cfg.mlp_bias:
                out[names[kind].format(bid=i) + ".bias"] = take(p + f"mlp.{x}_proj.bias", shape[:1])
    out[names[T.OUTPUT_NORM] + ".weight"] = take("model.norm.weight", (h,))
    if not cfg.tie_word_embeddings:  # tied: llama.cpp reads the head from token_embd when output is absent
        out[names[T.OUTPUT] + ".weight"] = take("lm_head.weight", (cfg.vocab_size, h))
    if cfg.rope_scaling.get("rope_type") == "llama3":
        # llama.cpp divides each RoPE frequency by this per-dimension factor (rope_freqs.weight [head_dim/2]).
        from s2d.model.llama import rope_inv_freq

        plain = rope_inv_freq(replace(cfg, rope_scaling={"rope_type": "default"}))
        out[names[T.ROPE_FREQS] + ".weight"] = plain / rope_inv_freq(cfg)
    return out


def _writer_class():
    import gguf

    class Writer(gguf.GGUFWriter):
        """GGUFWriter that can write an empty array: a byte-level BPE without merges still needs its (empty)
        ``tokenizer.ggml.merges`` key, which llama.cpp's loader requires and the GGUF format allows."""

        def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                      sub_type: gguf.GGUFValueType | None = None) -> bytes:
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def _numpy(t: Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) for the writer: matrices in ``dtype``, 1-D tensors in float32 as llama.cpp wants."""
    import gguf

    if dtype == "float32" or t.ndim == 1:
        return t.detach().to(torch.float32).contiguous().numpy(), None
    if dtype == "float16":
        return t.detach().to(torch.float16).contiguous().numpy(), None
    # numpy has no bfloat16: hand the writer the raw 16-bit patterns and say what they are.
    return t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16


def export_gguf(model: str | Path, out: str | Path, exit_layers: int | None = None, dtype: str = "bfloat16",
                force: bool = False) -> Path:
    """Write ``model`` (a checkpoint directory or hub id; for a sorted draft, exit ``exit_layers``) to ``out``.

    A sorted draft without ``exit_layers`` is written at its deepest exit. The file is written to a
    temporary name beside ``out`` and renamed into place, so a reader never sees half a file.
    """
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(GGUF_DTYPES)}")
    directory = resolve_checkpoint(model)
    out = Path(out)
    if out.resolve().is_relative_to(directory.resolve()):
        raise CheckpointError(f"--out {out} lies inside the checkpoint directory {directory}; write it elsewhere")
    if out.is_dir():
        raise CheckpointError(f"--out {out} is a directory; give a file name such as model.gguf")
    if out.exists() and not force:
        raise CheckpointError(f"--out {out} exists; pass --force to replace it")
    cfg = ModelConfig.from_file(directory / "config.json")
    arch = ARCHS[cfg.architecture]
    if exit_layers is None:
        exit_layers = max(cfg.exits) if cfg.exits else cfg.num_layers
    check_exit(cfg, exit_layers)
    if arch == "qwen2" and (cfg.num_heads * cfg.head_dim != cfg.hidden_size or cfg.mlp_bias):
        raise CheckpointError("llama.cpp's qwen2 needs num_heads * head_dim == hidden_size and no MLP bias")
    name = directory.name + (f"-exit{exit_layers}" if cfg.exits else "")
    cfg = replace(cfg, num_layers=exit_layers, exits=())
    vocab = read_vocab(directory, cfg.vocab_size)
    state = read_safetensors(directory)
    # Every value of every tensor written (those of the exit's layers): a NaN exported is garbage later.
    check_finite({k: state[k] for k in expected_shapes(cfg) if k in state}, directory, sample=False)
    tensors = gguf_tensors(state, cfg, arch)
    if dtype == "float16":  # finite weights beyond float16's range would be written as inf
        limit = torch.finfo(torch.float16).max
        for tensor_name, t in tensors.items():
            if t.ndim > 1 and (big := float(t.detach().abs().max())) > limit:
                raise CheckpointError(f"{directory}: tensor {tensor_name} holds {big:g}, beyond float16's range "
                                      f"({limit:g}); export with --dtype bfloat16 or float32")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = _writer_class()(tmp, arch)
    try:
        write_metadata(writer, cfg, arch, name, dtype, vocab)
        for tensor_name, t in tensors.items():
            array, raw_dtype = _numpy(t, dtype)
            writer.add_tensor(tensor_name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out


def write_metadata(w, cfg: ModelConfig, arch: str, name: str, dtype: str, vocab: Vocab) -> None:
    """Hyper-parameters under llama.cpp's keys (those its converter writes for these architectures)."""
    import gguf

    w.add_name(name)
    w.add_file_type({"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                     "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_positions)  # a Mistral sliding window caps it: within it, attention is full
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_layers)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_key_value(gguf.Keys.Tokenizer.MERGES, vocab.merges, gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.STRING)
    for kind, token_id in vocab.special_ids.items():
        add = getattr(w, f"add_{kind}_token_id", None)  # GGUF has no key for some kinds (cls): llama.cpp ignores them
        if add is not None:
            add(token_id)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def add_export_gguf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-gguf", help="write a checkpoint (or one exit of a sorted draft) as a llama.cpp GGUF file",
                       description="Write a Llama/Mistral/Qwen2 checkpoint with a byte-level BPE tokenizer as a GGUF "
                                   "file llama.cpp loads (e.g. as its -md draft model).")
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (a target, or a sorted draft)")
    p.add_argument("--exit", type=int, default=None, dest="exit_layers", metavar="E",
                   help="sorted draft: the exit (layer count) to keep (default: the deepest)")
    p.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    p.add_argument("--dtype", choices=GGUF_DTYPES, default="bfloat16",
                   help="matrices' type (norms stay float32); default bfloat16")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run_export_gguf)


def run_export_gguf(args: argparse.Namespace) -> int:
    out = export_gguf(args.model, args.out, args.exit_layers, args.dtype, args.force)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB, {args.dtype})", file=sys.stderr)
    return 0
