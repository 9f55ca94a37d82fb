"""Load Hugging Face format checkpoints (a local directory or a hub id) into the s2d runtime."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from s2d.model.config import CheckpointError, ModelConfig
from s2d.model.llama import Transformer

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local checkpoint directory, or a hub id fetched (or found in the local hub cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"checkpoint {name!r} is not a directory (nor a hub id of the form 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as err:  # offline, unknown repo, no permission: all say the same to the user
        raise CheckpointError(f"checkpoint {name!r} is neither a local directory nor a reachable hub id: {err}") from err


def read_safetensors(directory: Path) -> dict[str, Tensor]:
    """All tensors of ``model.safetensors`` or of the shards a ``model.safetensors.index.json`` names."""
    index = directory / "model.safetensors.index.json"
    try:
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (directory / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{directory} holds no model.safetensors nor model.safetensors.index.json")
        state: dict[str, Tensor] = {}
        for name in files:
            state.update(load_file(directory / name))
        return state
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"corrupt or incomplete weights in {directory}: {err}") from err


def hf_to_s2d(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename transformers' parameter names to ours, fusing q/k/v and gate/up."""

    def take(name: str) -> Tensor:
        if name not in state:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}")
        return state[name]

    out = {"embed.weight": take("model.embed_tokens.weight"), "norm": take("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attn_norm"] = take(p + "input_layernorm.weight")
        out[f"layers.{i}.mlp_norm"] = take(p + "post_attention_layernorm.weight")
        out[f"layers.{i}.qkv.weight"] = torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        if cfg.qkv_bias:
            out[f"layers.{i}.qkv.bias"] = torch.cat([take(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
        out[f"layers.{i}.o.weight"] = take(p + "self_attn.o_proj.weight")
        if cfg.o_bias:
            out[f"layers.{i}.o.bias"] = take(p + "self_attn.o_proj.bias")
        for ours, theirs in (("gate_up", ("gate", "up")), ("down", ("down",))):
            out[f"layers.{i}.{ours}.weight"] = torch.cat([take(p + f"mlp.{x}_proj.weight") for x in theirs])
            if cfg.mlp_bias:
                out[f"layers.{i}.{ours}.bias"] = torch.cat([take(p + f"mlp.{x}_proj.bias") for x in theirs])
    return out


def build_model(cfg: ModelConfig, state: dict[str, Tensor], dtype: torch.dtype, device: str | torch.device) -> Transformer:
    """A Transformer holding ``state`` (our names), without spending time on random init."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(state[name].shape)}, config implies {tuple(shape)}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.reset_rope()
    return model.eval().requires_grad_(False)


def load_model(name_or_path: str | Path, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", num_layers: int | None = None) -> Transformer:
    """Load a Llama/Mistral/Qwen2 checkpoint; ``num_layers`` keeps only the first layers."""
    directory = resolve_checkpoint(name_or_path)
    cfg = ModelConfig.from_file(directory / "config.json")
    if num_layers is not None:
        if not 1 <= num_layers <= cfg.num_layers:
            raise CheckpointError(f"cannot keep {num_layers} layers of a {cfg.num_layers}-layer model")
        from dataclasses import replace

        cfg = replace(cfg, num_layers=num_layers, exits=tuple(e for e in cfg.exits if e <= num_layers))
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    state = hf_to_s2d(read_safetensors(directory), cfg)
    model = build_model(cfg, state, dtype or cfg.torch_dtype, device)
    model.checkpoint_dir = directory
    return model


def load_tokenizer(name_or_path: str | Path):
    """The checkpoint's tokenizer through transformers' AutoTokenizer."""
    from transformers import AutoTokenizer

    directory = resolve_checkpoint(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as err:
        raise CheckpointError(f"cannot load a tokenizer from {directory}: {err}") from err
