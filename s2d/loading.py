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


EMBEDDED = Path(__file__).with_name("data") / "default"  # s2d/data/default/README.md


def embedded_family() -> tuple[dict[str, Path], Path]:
    """The family used when no --target is given: ({name: target dir}, the sorted draft's dir)."""
    target, draft = EMBEDDED / "zoo-l", EMBEDDED / "draft"
    if not (target / "model.safetensors").exists() or not (draft / "model.safetensors").exists():
        raise CheckpointError(f"the embedded default models are missing from {EMBEDDED} (a partial install?); "
                              "reinstall s2d or pass --target DIR")
    return {"zoo-l": target}, draft


def default_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """A tiny random Llama written on first use (tests and quick checks; the CLI uses embedded_family)."""
    from s2d.model.tiny import write_random_checkpoint

    root = Path(cache_dir or Path.home() / ".cache" / "s2d") / "tiny-random-llama"
    if not (root / "config.json").exists():
        write_random_checkpoint(root, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                intermediate_size=256, max_positions=1024)
    return root


__all__ = ["check_same_tokenizer", "check_same_vocab", "default_checkpoint", "embedded_family", "load_model",
           "load_tokenizer"]


def parse_targets(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` (named by its last path component) -> {name: path}."""
    targets: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or "/" in name:
            name, path = Path(spec.rstrip("/")).name or spec, spec
        if name in targets:
            raise ValueError(f"two targets are named {name!r}; name them with NAME=PATH")
        targets[name] = path
    return targets


def load_family(targets: dict[str, str], draft: str | None, dtype: str, device: str, fast_tokenizer: bool = False):
    """Load targets (and a draft) that must share one tokenizer. Returns (tokenizer, {name: model}, draft).

    ``fast_tokenizer``: encode/decode without importing transformers where that is exact
    (s2d.model.tokenizer); for commands that need nothing else of the tokenizer.
    """
    models = {}
    tokenizer = None

    def load_tokenizer(path):
        from s2d.model import loading
        from s2d.model.tokenizer import fast_tokenizer as fast

        if fast_tokenizer and (tok := fast(loading.resolve_checkpoint(path))) is not None:
            return tok
        return loading.load_tokenizer(path)

    for name, path in targets.items():
        models[name] = load_model(path, dtype=dtype, device=device)
        tok = load_tokenizer(path)
        if tokenizer is None:
            tokenizer, first = tok, name
        else:
            check_same_tokenizer(tokenizer, tok, first, name)
    draft_model = None
    if draft is not None:
        draft_model = load_model(draft, dtype=dtype, device=device)
        check_same_tokenizer(tokenizer, load_tokenizer(draft), first, "draft")
        for model in models.values():
            check_same_vocab(model, draft_model)
    return tokenizer, models, draft_model
