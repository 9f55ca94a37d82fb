"""Our decoding methods as benchmark entries: every name of s2d.drafting.methods, built as the CLI builds it."""

from __future__ import annotations

from pathlib import Path

from s2d.bench.base import Generation, MethodContext, MethodSkipped
from s2d.drafting.base import Drafter
from s2d.engine import Engine
from s2d.model.loading import check_same_tokenizer, check_same_vocab, load_model, load_tokenizer
from s2d.model.llama import Transformer
from s2d.sampling import SamplingParams


class EngineMethod:
    """Any of our drafters (or none) behind the s2d engine."""

    def __init__(self, target: Transformer, drafter: Drafter | None, num_draft_tokens: int, ignore_eos: bool) -> None:
        # ignore_eos: an empty EOS set makes the engine run to max_new_tokens.
        self.engine = Engine(target, drafter, num_draft_tokens, eos_token_ids=() if ignore_eos else None)

    def generate(self, prompt: list[int], params: SamplingParams, max_new_tokens: int) -> Generation:
        state = self.engine.generate(prompt, params, max_new_tokens)
        s = state.stats
        return Generation(list(state.output), s.elapsed_s, s.target_passes, list(s.proposed_at),
                          list(s.accepted_at), dict(s.exit_counts), s.draft_s, s.verify_s)


def target_model(ctx: MethodContext) -> Transformer:
    o = ctx.options
    return ctx.models.get(("s2d", ctx.target, o.dtype), lambda: load_model(ctx.target, o.dtype, o.device))


def tokenizer(ctx: MethodContext, path: Path):
    return ctx.models.get(("tokenizer", path), lambda: load_tokenizer(path))


def draft_model(ctx: MethodContext, num_layers: int | None = None) -> Transformer:
    """The --draft (optionally only its first ``num_layers`` layers), checked against the target."""
    assert ctx.draft is not None  # parse_methods refused draft methods without --draft
    if ctx.draft.resolve() == ctx.target.resolve():
        raise MethodSkipped("the draft is the target itself")
    o = ctx.options
    draft = ctx.models.get(("s2d", ctx.draft, o.dtype, num_layers),
                           lambda: load_model(ctx.draft, o.dtype, o.device, num_layers=num_layers))
    check_same_tokenizer(tokenizer(ctx, ctx.target), tokenizer(ctx, ctx.draft), "target", "draft")
    check_same_vocab(target_model(ctx), draft)
    return draft


def engine_method(ctx: MethodContext, drafter: Drafter | None, num_draft_tokens: int | None = None) -> EngineMethod:
    """Our engine on the target; ``num_draft_tokens`` defaults to the run's ``--num-draft-tokens`` (or 5)."""
    return EngineMethod(target_model(ctx), drafter, num_draft_tokens or ctx.options.num_draft_tokens or 5,
                        ctx.options.ignore_eos)


def ours(ctx: MethodContext, name: str) -> EngineMethod:
    """One of our decoding methods, built through the one registry (s2d.drafting.methods), as users run it."""
    from dataclasses import replace

    from s2d.drafting import build_drafter, default_options, engine_draft_tokens, parse_method

    # Default knobs and a fixed draft length: a stored calibration is not applied (see s2d-cal), so
    # the number measures the method, not a tuning run.
    draft = draft_model(ctx) if parse_method(name).needs_draft else None
    options = default_options(name, draft)
    if ctx.options.num_draft_tokens is not None:
        options = replace(options, num_draft_tokens=ctx.options.num_draft_tokens)
    if ctx.options.tree is not None:
        top_k, depth, nodes = ctx.options.tree
        options = replace(options, tree_top_k=top_k, tree_depth=depth, tree_nodes=nodes)
    drafter = build_drafter(name, draft, options, target_model(ctx))
    return engine_method(ctx, drafter, engine_draft_tokens(name, options))


def s2d_calibrated(ctx: MethodContext) -> EngineMethod:
    from s2d.calibrate import calibration_entry, load_calibration, stored_options
    from s2d.drafting import build_drafter, default_options, engine_draft_tokens

    assert ctx.draft is not None
    draft = draft_model(ctx)
    entry = calibration_entry(load_calibration(ctx.draft), target_model(ctx), ctx.target.name)
    options = stored_options(entry, ctx.options.num_draft_tokens,
                             base=default_options("s2d", draft))
    drafter = build_drafter("s2d", draft, options, target_model(ctx))
    return engine_method(ctx, drafter, engine_draft_tokens("s2d", options))
