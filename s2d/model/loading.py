"""Load Hugging Face format checkpoints (a local directory or a hub id) into the s2d runtime, and a family
of them (targets and a draft that share one tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from s2d.model.config import CheckpointError, ModelConfig, foreign_format_hint
from s2d.model.llama import Transformer

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def available_devices() -> list[str]:
    found = ["cpu"]
    for kind in ("cuda", "xpu", "mps"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            count = backend.device_count() if hasattr(backend, "device_count") else 1
            found += [kind] if count == 1 else [f"{kind}:{i}" for i in range(count)]
    return found


def check_device(device: str | torch.device, what: str = "device") -> torch.device:
    """The device named, or a one-line error saying which devices this torch build can use here."""
    if isinstance(device, torch.device) and device.type != "meta":
        return device
    name = str(device)
    options = available_devices()
    where = f"this torch ({torch.__version__}) can use: {', '.join(options)}"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{what} {name!r} is not a device; {where}") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None) if dev.type in ("cuda", "xpu", "mps") else None
    if backend is None or not backend.is_available():
        raise ValueError(f"{what} {name}: not available; {where}")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"{what} {name}: this machine has {count} {dev.type} device(s); {where}")
    return dev


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local checkpoint directory, or a hub id fetched (or found in the local hub cache)."""
    name = str(name_or_path)
    if not name.strip():
        raise CheckpointError("the checkpoint path is empty")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        raise CheckpointError(f"checkpoint {name!r} is a GGUF file (llama.cpp's format), which s2d does not read; "
                              "use the original Hugging Face checkpoint directory (config.json + *.safetensors)")
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"checkpoint {name!r} is not a directory (nor a hub id of the form 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as err:  # offline, unknown repo, no permission: all say the same to the user
        raise CheckpointError(f"checkpoint {name!r} is neither a local directory nor a reachable hub id: {err}") from err


def _weight_files(directory: Path) -> list[str]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    if (directory / "model.safetensors").exists():
        return ["model.safetensors"]
    raise CheckpointError(f"{directory} holds no model.safetensors nor model.safetensors.index.json"
                          f"{foreign_format_hint(directory)}")


def read_safetensors(directory: Path) -> dict[str, Tensor]:
    """All tensors of ``model.safetensors`` or of the shards a ``model.safetensors.index.json`` names."""
    try:
        state: dict[str, Tensor] = {}
        for name in _weight_files(directory):
            state.update(load_file(directory / name))
        return state
    except (SafetensorError, OSError, KeyError, TypeError, AttributeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"corrupt or incomplete weights in {directory}: {err}") from err


def read_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors headers alone (no weights are read)."""
    try:
        shapes: dict[str, tuple[int, ...]] = {}
        for name in _weight_files(directory):
            # safe_open checks that the header describes the whole file: a truncated file fails here.
            with safe_open(directory / name, framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        return shapes
    except (SafetensorError, OSError, KeyError, TypeError, AttributeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"corrupt or incomplete weights in {directory}: {err}") from err


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors (transformers' names) a checkpoint of ``cfg`` must hold, with their shapes."""
    c, v, f = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (v, c), "model.norm.weight": (c,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, c)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (c,), p + "post_attention_layernorm.weight": (c,),
                       p + "self_attn.q_proj.weight": (q, c), p + "self_attn.k_proj.weight": (kv, c),
                       p + "self_attn.v_proj.weight": (kv, c), p + "self_attn.o_proj.weight": (c, q),
                       p + "mlp.gate_proj.weight": (f, c), p + "mlp.up_proj.weight": (f, c),
                       p + "mlp.down_proj.weight": (c, f)})
        if cfg.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (c,)
        if cfg.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (f,), p + "mlp.up_proj.bias": (f,), p + "mlp.down_proj.bias": (c,)})
    return shapes


def check_tensors(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], where: str | Path) -> None:
    """Refuse a checkpoint that lacks a tensor ``cfg`` needs or holds one of another shape."""
    for name, shape in expected_shapes(cfg).items():
        if name not in shapes:
            raise CheckpointError(f"{where}: checkpoint lacks tensor {name!r}")
        if tuple(shapes[name]) != shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(shapes[name])}, config.json implies {shape}")


FINITE_SAMPLE = 1 << 16  # values looked at per tensor by a sampled check


def check_finite(state: dict[str, Tensor], where: str | Path, sample: bool = True) -> None:
    """Refuse weights holding NaN or inf (a diverged training run, a bad conversion).

    ``sample``: look at ~64k evenly spaced values of each tensor, so a 7B model costs milliseconds,
    not seconds. A run that diverged leaves NaN nearly everywhere, which a sample finds; an isolated
    bad value spreads to every logit it touches, which the engine's check of each pass's logits finds.
    """
    for name, t in state.items():
        if not t.is_floating_point():
            continue
        flat = t.reshape(-1)
        if sample and flat.numel() > FINITE_SAMPLE:
            flat = flat[:: flat.numel() // FINITE_SAMPLE]
        if not bool(torch.isfinite(flat).all()):
            raise CheckpointError(f"{where}: tensor {name} holds NaN or inf values")


def check_checkpoint(name_or_path: str | Path, num_layers: int | None = None) -> tuple[Path, ModelConfig]:
    """Validate a checkpoint without reading its weights: config.json, every tensor's presence and shape.

    ``num_layers`` checks only the first layers (a draft cut from a deeper model). Returns the
    directory and its config.
    """
    directory = resolve_checkpoint(name_or_path)
    cfg = _config(directory, num_layers)
    check_tensors(cfg, read_shapes(directory), directory)
    return directory, cfg


def _config(directory: Path, num_layers: int | None) -> ModelConfig:
    cfg = ModelConfig.from_file(directory / "config.json")
    if num_layers is not None:
        if not 1 <= num_layers <= cfg.num_layers:
            raise CheckpointError(f"cannot keep {num_layers} layers of a {cfg.num_layers}-layer model")
        from dataclasses import replace

        cfg = replace(cfg, num_layers=num_layers, exits=tuple(e for e in cfg.exits if e <= num_layers))
    return cfg


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
    cfg = _config(directory, num_layers)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    device = check_device(device)
    raw = read_safetensors(directory)
    check_tensors(cfg, {k: tuple(v.shape) for k, v in raw.items()}, directory)
    check_finite({k: raw[k] for k in expected_shapes(cfg)}, directory)
    model = build_model(cfg, hf_to_s2d(raw, cfg), dtype or cfg.torch_dtype, device)
    model.checkpoint_dir = directory  # files stored beside the weights (exit gates, calibration)
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(name_or_path: str | Path):
    """The checkpoint's tokenizer through transformers' AutoTokenizer."""
    from transformers import AutoTokenizer

    directory = resolve_checkpoint(name_or_path)
    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{directory} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # transformers' messages span lines: one line for the CLI
        raise CheckpointError(f"cannot load a tokenizer from {directory}: {' '.join(str(err).split())}") from err


# ---------------------------------------------------------------- a family: targets and a draft, one vocabulary


def check_same_tokenizer(target_tok, draft_tok, target_name: str = "target", draft_name: str = "draft") -> None:
    """Refuse a draft whose tokenizer differs from the target's: its token ids would mean other text."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise CheckpointError(f"{draft_name} and {target_name} have different tokenizers; "
                              "speculative decoding needs the same vocabulary")


def check_same_vocab(target: Transformer, draft: Transformer) -> None:
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise CheckpointError(f"draft vocab_size {draft.cfg.vocab_size} != target vocab_size {target.cfg.vocab_size}")


EMBEDDED = Path(__file__).parent.parent / "data" / "default"  # s2d/data/default/README.md


def embedded_family() -> tuple[dict[str, Path], Path]:
    """The family used when no --target is given: ({name: target dir}, the sorted draft's dir)."""
    target, draft = EMBEDDED / "zoo-l", EMBEDDED / "draft"
    if not (target / "model.safetensors").exists() or not (draft / "model.safetensors").exists():
        raise CheckpointError(f"the embedded default models are missing from {EMBEDDED} (a partial install?); "
                              "reinstall s2d or pass --target DIR")
    return {"zoo-l": target}, draft


def load_family(targets: dict[str, str], draft: str | None, dtype: str, device: str, fast_tokenizer: bool = False):
    """Load targets (and a draft) that must share one tokenizer. Returns (tokenizer, {name: model}, draft).

    ``fast_tokenizer``: encode/decode without importing transformers where that is exact
    (s2d.model.tokenizer); for commands that need nothing else of the tokenizer.
    """
    from s2d.model.tokenizer import fast_tokenizer as fast

    def tokenizer_of(path: str):
        if fast_tokenizer and (tok := fast(resolve_checkpoint(path))) is not None:
            return tok
        return load_tokenizer(path)

    models = {}
    tokenizer = None
    for name, path in targets.items():
        models[name] = load_model(path, dtype=dtype, device=device)
        tok = tokenizer_of(path)
        if tokenizer is None:
            tokenizer, first = tok, name
        else:
            check_same_tokenizer(tokenizer, tok, first, name)
    draft_model = None
    if draft is not None:
        draft_model = load_model(draft, dtype=dtype, device=device)
        check_same_tokenizer(tokenizer, tokenizer_of(draft), first, "draft")
        for model in models.values():
            check_same_vocab(model, draft_model)
    return tokenizer, models, draft_model
