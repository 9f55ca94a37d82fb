"""From what a command line chose to loaded models: the prologue generate, serve, calibrate and demo share.

``choose`` settles, before any weights are read, what to load: the targets by name (the embedded family
when none is given), the draft, the method, the device; everything it refuses is refused in one line
while nothing has been spent. ``load`` then reads the family once (one tokenizer, the targets, the draft)
and ``Family.options`` gives each target its drafting knobs: flags over a stored calibration over the
method's defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from s2d.args import DraftFlags, parse_targets
from s2d.drafting import DraftOptions, check_method, default_options, needs_draft_model
from s2d.model import loading
from s2d.model.llama import Transformer


@dataclass(frozen=True)
class Choice:
    """What to load, checked: nothing is read yet."""

    targets: dict[str, str]  # name -> checkpoint directory or hub id, in command-line order
    draft: str | None  # the draft to load; None: none given, or one the method does not use
    method: str | None  # None: the draft's default (default_method)
    device: str
    embedded: bool  # no target was given: the embedded family (s2d/data/default)


def choose(command: str, targets: list[str] | None, draft: str | None, method: str | None, device: str,
           every_method: bool = False) -> Choice:
    """Check a command line's choices. ``command`` (``s2d generate``) starts the error messages;
    ``every_method``: keep a draft that ``method`` does not use (the server's requests pick their own)."""
    embedded = not targets
    if embedded:
        family, embedded_draft = loading.embedded_family()
        targets = [f"{name}={path}" for name, path in family.items()]
        draft = str(embedded_draft) if draft is None else draft
    if method:
        check_method(method)
        if needs_draft_model(method) and not draft:
            raise SystemExit(f"{command}: --method {method} needs --draft DIR")
    loading.check_device(device, "--device")
    named = parse_targets(targets)
    if method and not every_method and not needs_draft_model(method):
        draft = None
    return Choice(named, draft, method, device, embedded)


def default_method(method: str | None, draft: Transformer | None) -> str:
    if method:
        return method
    if draft is None:
        return "ar"
    return "s2d" if draft.cfg.exits else "sd"


def target_options(method: str, flags: DraftFlags, draft: Transformer | None, draft_path: str | None,
                   target: Transformer | None, target_name: str) -> DraftOptions:
    """One target's drafting knobs: explicit flags win over a stored calibration (``target``'s, else the one
    stored under ``target_name``), which wins over the method's defaults."""
    from s2d.calibrate import calibration_entry, load_calibration, stored_options

    use = draft_path and method == "s2d"
    entry = calibration_entry(load_calibration(draft_path), target, target_name) if use else {}
    stored = stored_options(entry, base=default_options(method, draft))
    given = {k: v for k, v in asdict(flags).items() if k != "schedule" and v is not None}
    return replace(stored, schedule=flags.schedule or "fixed", **given)


NO_FLAGS = DraftFlags()


@dataclass
class Family:
    """The targets and the draft of one command, loaded once, sharing one tokenizer."""

    choice: Choice
    tokenizer: Any
    models: dict[str, Transformer]
    draft: Transformer | None
    method: str  # the method chosen, or the draft's default

    def options(self, target: str, method: str | None = None, flags: DraftFlags = NO_FLAGS) -> DraftOptions:
        """``target``'s drafting knobs for ``method`` (default: the family's)."""
        return target_options(method or self.method, flags, self.draft, self.choice.draft, self.models[target],
                              target)


def load(choice: Choice, dtype: str, fast_tokenizer: bool = False) -> Family:
    """Read the chosen family. ``fast_tokenizer``: encode and decode without transformers where exact (for
    commands that need nothing else of the tokenizer, such as a chat template)."""
    # Through the module: tests replace loading.load_family to interrupt a start-up.
    tokenizer, models, draft = loading.load_family(choice.targets, choice.draft, dtype, choice.device,
                                                   fast_tokenizer=fast_tokenizer)
    return Family(choice, tokenizer, models, draft, default_method(choice.method, draft))


__all__ = ["Choice", "Family", "choose", "default_method", "load", "target_options"]
