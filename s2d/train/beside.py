"""Files stored beside a draft (exit gates, a vocabulary ranking): written into a copy, never the input.

``s2d train-draft --objective gates|vocab --init DRAFT --out NEW`` copies the draft's files to a
temporary sibling of ``NEW``, adds what the objective computes, and renames it into place, with the
same checks every writing command makes (``s2d/outputs.py``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from s2d.model.config import CheckpointError
from s2d.train.data import DataConfig


def write_draft_with(draft: str | Path, out: str | Path, data: DataConfig, command: str,
                     add: Callable[[Path], dict], needs_exits: bool = True) -> dict:
    """Copy ``draft`` to ``out`` and let ``add(folder)`` write beside it; returns what ``add`` returns."""
    from s2d.model.loading import check_checkpoint, check_finite, read_safetensors
    from s2d.outputs import check_not_input, check_output_dir, marked_by, swap_in, temporary_sibling, write_marker

    draft, out = Path(draft), Path(out)
    check_not_input(out, [("--init", draft), *(("--data", p) for p in data.paths)])
    check_output_dir(out, marked_by(command), f"an earlier `{command}` output")
    draft, cfg = check_checkpoint(draft)
    if needs_exits and len(cfg.exits) < 2:
        raise CheckpointError(f"{draft} is not a sorted draft with several exits (config 's2d_exits')")
    # Every value, before anything is written: a diverged draft copied to --out would read as completed.
    check_finite(read_safetensors(draft), draft, sample=False)
    tmp = temporary_sibling(out)
    try:
        for f in draft.iterdir():
            if f.is_file() and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)
        result = add(tmp)
        write_marker(tmp, command, draft=str(draft))
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def rank_vocab(folder: Path, data: DataConfig) -> dict:
    """In place: the tokens of the draft in ``folder`` ranked by frequency in ``data`` (s2d_draft_vocab.json)."""
    from s2d.drafting.vocab import rank_tokens, save_vocab
    from s2d.model.config import ModelConfig
    from s2d.model.loading import load_tokenizer
    from s2d.train.data import load_packed

    vocab_size = ModelConfig.from_file(folder / "config.json").vocab_size
    stream = load_packed(data, load_tokenizer(folder)).rows[:, 1:].reshape(-1)
    ranked = rank_tokens(stream, vocab_size)
    counts = stream.bincount(minlength=vocab_size)
    coverage = {str(n): round(float(counts[ranked[:n]].sum()) / stream.numel(), 4)
                for n in (1024, 2048, 4096) if n < vocab_size}
    save_vocab(folder, ranked, {"tokens_counted": stream.numel(), "coverage": coverage})
    return {"tokens_counted": stream.numel(), "coverage": coverage}


def rank_draft_vocab(draft: str | Path, out: str | Path, data: DataConfig) -> dict:
    """Copy ``draft`` to ``out`` with its tokens ranked by frequency in ``data`` (s2d_draft_vocab.json)."""
    return write_draft_with(draft, out, data, "train-draft --objective vocab", lambda folder: rank_vocab(folder, data),
                            needs_exits=False)
