"""Loading a target with its drafter: the checks that keep a pair of models compatible."""

from __future__ import annotations

from pathlib import Path

from s2d.model.config import CheckpointError
from s2d.model.loading import load_model, load_tokenizer
from s2d.model.llama import Transformer


def check_same_tokenizer(target_tok, draft_tok, target_name: str = "target", draft_name: str = "draft") -> None:
    """Refuse a draft whose tokenizer differs from the target's: its token ids would mean other text."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise CheckpointError(f"{draft_name} and {target_name} have different tokenizers; "
                              "speculative decoding needs the same vocabulary")


def check_same_vocab(target: Transformer, draft: Transformer) -> None:
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise CheckpointError(f"draft vocab_size {draft.cfg.vocab_size} != target vocab_size {target.cfg.vocab_size}")


def default_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """The model used when no --target is given: for now a tiny random Llama written on first use."""
    from s2d.model.tiny import write_random_checkpoint

    root = Path(cache_dir or Path.home() / ".cache" / "s2d") / "tiny-random-llama"
    if not (root / "config.json").exists():
        write_random_checkpoint(root, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                intermediate_size=256, max_positions=1024)
    return root


__all__ = ["check_same_tokenizer", "check_same_vocab", "default_checkpoint", "load_model", "load_tokenizer"]
