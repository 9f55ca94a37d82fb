"""Write drafts as plain Hugging Face checkpoints: the whole sorted draft, or one exit of it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from s2d.model.config import CheckpointError, ModelConfig
from s2d.model.loading import check_checkpoint, check_finite, expected_shapes, read_safetensors
from s2d.outputs import check_not_input, check_output_dir, marked_by, swap_in, temporary_sibling, write_marker
from s2d.train.draft import quiet_transformers

COMMAND = "export-exit"
EXITS_KEY = "s2d_exits"  # config.json key of a sorted draft's exits (read by s2d.model.config)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "tokenizer.model", "generation_config.json", "chat_template.jinja")


def save_draft(model: nn.Module, exits: tuple[int, ...], tokenizer, out: Path, dtype: torch.dtype) -> None:
    """Write the transformers model ``model`` (exits recorded in its config) to ``out`` in ``dtype``.

    ``out`` may hold other things (the training run's log and checkpoints), so it cannot be swapped as
    a whole: the files are written to a temporary directory, then moved in one by one, config.json
    last, so a reader never sees a config next to weights it does not describe.
    """
    tmp = out / f".export-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    config = model.config
    setattr(config, EXITS_KEY, list(exits))
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        # A tied head is the embedding matrix; writing it twice would only add a vocab x hidden copy.
        state.pop("lm_head.weight", None)
    with quiet_transformers():
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
    # transformers records the model's in-memory dtype; the weights on disk are ``dtype``.
    raw = json.loads((tmp / "config.json").read_text())
    raw["dtype"] = str(dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    names = sorted(p.name for p in tmp.iterdir())
    for name in sorted(names, key=lambda n: n == "config.json"):
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)


def check_exit(cfg: ModelConfig, exit_layers: int) -> None:
    """Refuse a layer count outside the model, or one that is not an exit of a sorted draft."""
    if cfg.exits and exit_layers not in cfg.exits:
        raise CheckpointError(f"exit {exit_layers} is not one of the draft's exits {list(cfg.exits)}; its head "
                              "was never trained to read that layer")
    if not 1 <= exit_layers <= cfg.num_layers:
        raise CheckpointError(f"exit {exit_layers} is outside the model's {cfg.num_layers} layers")


def export_exit(draft: str | Path, exit_layers: int, out: str | Path) -> Path:
    """Write the first ``exit_layers`` layers of ``draft`` with its shared final norm and head to ``out``.

    The result is a plain checkpoint of the draft's architecture: usable as ``assistant_model`` in
    transformers, as a draft model in vLLM, or as ``--draft`` here. ``out`` must be new, empty, or an
    earlier export (which is replaced whole); the draft is validated before anything is written.
    """
    draft, out = Path(draft), Path(out)
    check_not_input(out, [("--draft", draft)])
    check_output_dir(out, marked_by(COMMAND), "an earlier export-exit output")
    draft, cfg = check_checkpoint(draft)
    check_exit(cfg, exit_layers)
    raw = json.loads((draft / "config.json").read_text())
    raw["num_hidden_layers"] = exit_layers
    raw.pop(EXITS_KEY, None)
    for key in ("layer_types",):  # per-layer lists (newer configs) must shrink with the layers
        if isinstance(raw.get(key), list):
            raw[key] = raw[key][:exit_layers]
    state = read_safetensors(draft)
    # Drafts are small: every value is checked, so a diverged draft is never passed on as a checkpoint.
    check_finite({k: state[k] for k in expected_shapes(cfg)}, draft, sample=False)

    def keep(name: str) -> bool:
        parts = name.split(".")
        return not (len(parts) > 2 and parts[:2] == ["model", "layers"] and int(parts[2]) >= exit_layers)

    tmp = temporary_sibling(out)
    try:
        save_file({k: v.contiguous() for k, v in state.items() if keep(k)}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        for name in SIDE_FILES:
            if (draft / name).exists():
                shutil.copy2(draft / name, tmp / name)
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        write_marker(tmp, COMMAND, draft=str(draft), exit=exit_layers)
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
