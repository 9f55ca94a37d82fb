"""Model configuration parsed from a Hugging Face ``config.json`` (transformers 4.x and 5.x)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or of an architecture s2d cannot run."""


# Our field name -> the config.json key it comes from, for error messages that name what the user can see.
CONFIG_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
               "num_kv_heads": "num_key_value_heads", "max_positions": "max_position_embeddings"}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # rope_type + its parameters
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"  # the checkpoint's own dtype
    exits: tuple[int, ...] = ()  # sorted drafts: layer counts after which an exit reads out

    def __post_init__(self) -> None:
        # A zero or negative size would only fail later, deep inside the runtime (an empty layer stack).
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_positions"):
            if getattr(self, name) < 1:
                raise CheckpointError(f"config.json: {CONFIG_KEYS.get(name, name)} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise CheckpointError(
                f"rope scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
            )
        for e in self.exits:
            if not 1 <= e <= self.num_layers:
                raise CheckpointError(f"exit {e} is outside the model's {self.num_layers} layers")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                        "qwen2": "Qwen2ForCausalLM"}.get(raw.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported architecture {arch or raw.get('model_type')!r}; "
                f"s2d runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            # transformers 5.x: rope_parameters holds theta and scaling; 4.x: rope_theta + rope_scaling.
            rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
            if "type" in rope and "rope_type" not in rope:
                rope["rope_type"] = rope.pop("type")
            theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
            rope.setdefault("rope_type", "default")
            max_positions = int(raw.get("max_position_embeddings", 2048))
            window = raw.get("sliding_window")
            if window and raw.get("use_sliding_window", arch == "MistralForCausalLM"):
                # Within the window, sliding-window attention equals full attention: cap the context.
                max_positions = min(max_positions, int(window))
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            qwen = arch == "Qwen2ForCausalLM"
            attention_bias = bool(raw.get("attention_bias", False))
            dtype = str(raw.get("dtype") or raw.get("torch_dtype") or "float32")
            if dtype not in ("float32", "bfloat16", "float16"):
                dtype = "float32"
            return cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                max_positions=max_positions,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=rope,
                qkv_bias=qwen or attention_bias,
                o_bias=attention_bias and not qwen,
                mlp_bias=bool(raw.get("mlp_bias", False)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                eos_token_ids=eos_ids,
                dtype=dtype,
                exits=tuple(int(e) for e in raw.get("s2d_exits", ())),
            )
        except KeyError as err:
            raise CheckpointError(f"config.json lacks {err.args[0]!r}") from err
        except (TypeError, ValueError, ZeroDivisionError) as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"malformed config.json: {err}") from err

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Parse ``config.json``; stop tokens come from ``generation_config.json`` beside it when it names them."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise CheckpointError(f"no config.json at {path}{foreign_format_hint(path.parent)}") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path} is not valid JSON: {err}") from err
        except OSError as err:
            raise CheckpointError(f"cannot read {path}: {err.strerror}") from err
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} does not hold a JSON object")
        try:
            cfg = cls.from_dict(raw)
        except CheckpointError as err:
            raise CheckpointError(f"{path.parent}: {err}") from None
        eos = generation_eos(path.parent / "generation_config.json")
        return cfg if eos is None else replace(cfg, eos_token_ids=eos)


def generation_eos(path: Path) -> tuple[int, ...] | None:
    """The ``eos_token_id`` of a ``generation_config.json`` (None: no file, or it names none).

    As in transformers' ``generate``, these stop tokens take precedence over config.json's: chat
    models often list their end-of-turn token only here (an instruct model would otherwise run on
    past the end of its answer).
    """
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
    if eos is None:
        return None
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise CheckpointError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return tuple(ids)


def foreign_format_hint(directory: Path) -> str:
    """A hint for folders that hold a model in a format s2d does not read (GGUF, pickled PyTorch)."""
    if not directory.is_dir():
        return ""
    names = sorted(p.name for p in directory.iterdir())
    gguf = [n for n in names if n.endswith(".gguf")]
    if gguf:
        return (f" (it holds {gguf[0]}: GGUF is llama.cpp's format, which s2d does not read; use the original "
                "Hugging Face checkpoint: config.json, tokenizer files and *.safetensors)")
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
        return " (s2d reads Hugging Face checkpoints: config.json, tokenizer files and *.safetensors)"
    return ""
