"""The peers a user would pick instead of s2d: transformers' own decoders on the same checkpoints.

Timed like ours: the whole ``generate`` call (prefill included, loading excluded). Target forward
passes are counted with a forward pre-hook on the target model, so MAT means the same thing: for
plain decoding the prefill pass yields the first token, so MAT is 1.0 as for our ``ar``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from s2d.bench.methods import tokenizer
from s2d.bench.base import Generation, MethodContext, MethodSkipped
from s2d.model.loading import check_same_tokenizer
from s2d.model.config import CheckpointError, ModelConfig
from s2d.model.loading import DTYPES, resolve_checkpoint
from s2d.sampling import SamplingParams


def quiet_transformers() -> None:
    """Loading reports and progress bars would tear the benchmark's own progress bar."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def hf_model(ctx: MethodContext, path: Path, num_layers: int | None = None):
    from transformers import AutoModelForCausalLM

    o = ctx.options

    def load():
        quiet_transformers()
        extra = {} if num_layers is None else {"num_hidden_layers": num_layers}  # keeps the first layers
        model = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(path), dtype=DTYPES[o.dtype], **extra)
        return model.to(o.device).eval()

    return ctx.models.get(("hf", path, o.dtype, num_layers), load)


class HFMethod:
    def __init__(self, ctx: MethodContext, **generate_kwargs: Any) -> None:
        self.model = hf_model(ctx, ctx.target)
        cfg = ModelConfig.from_file(resolve_checkpoint(ctx.target) / "config.json")
        # eos_token_id=None makes transformers ignore EOS; otherwise stop on the same ids as our engine.
        self.eos = None if ctx.options.ignore_eos else list(cfg.eos_token_ids) or None
        tok = tokenizer(ctx, ctx.target)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (cfg.eos_token_ids or (0,))[0]
        self.kwargs = generate_kwargs
        self.passes = 0
        self.model.register_forward_pre_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.passes += 1

    def generate(self, prompt: list[int], params: SamplingParams, max_new_tokens: int) -> Generation:
        x = torch.tensor([prompt], device=self.model.device)
        if params.greedy:
            sampling: dict[str, Any] = {"do_sample": False}
        else:
            # top_k=0 disables transformers' top-k (its default would be 50), matching our 0 = off.
            sampling = {"do_sample": True, "temperature": params.temperature, "top_k": params.top_k,
                        "top_p": params.top_p}
            if params.seed is not None:
                torch.manual_seed(params.seed)
        self.passes = 0
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                      eos_token_id=self.eos, pad_token_id=self.pad, **sampling, **self.kwargs)
        elapsed = time.perf_counter() - t0
        return Generation(out[0, len(prompt):].tolist(), elapsed, self.passes)


def hf_ar(ctx: MethodContext) -> HFMethod:
    return HFMethod(ctx)


def assistant_layers(ctx: MethodContext) -> int | None:
    """Layers of the --draft to export as the assistant: one exit of a sorted draft (the deepest by default)."""
    assert ctx.draft is not None
    cfg = ModelConfig.from_file(resolve_checkpoint(ctx.draft) / "config.json")
    want = ctx.options.assistant_exit
    if want is None:
        return max(cfg.exits) if cfg.exits else None
    if not 1 <= want <= cfg.num_layers:
        raise CheckpointError(f"--assistant-exit {want}: the draft has {cfg.num_layers} layers")
    return want


def hf_assisted(ctx: MethodContext) -> HFMethod:
    assert ctx.draft is not None
    if ctx.draft.resolve() == ctx.target.resolve():
        raise MethodSkipped("the draft is the target itself")
    check_same_tokenizer(tokenizer(ctx, ctx.target), tokenizer(ctx, ctx.draft), "target", "draft")
    assistant = hf_model(ctx, ctx.draft, assistant_layers(ctx))
    o = ctx.options
    # Unset knobs stay unset, so transformers applies its own defaults (20 tokens, threshold 0.4 in 5.x).
    if o.num_assistant_tokens is not None:
        assistant.generation_config.num_assistant_tokens = o.num_assistant_tokens
    if o.assistant_confidence_threshold is not None:
        assistant.generation_config.assistant_confidence_threshold = o.assistant_confidence_threshold
    return HFMethod(ctx, assistant_model=assistant)


def hf_pld(ctx: MethodContext) -> HFMethod:
    return HFMethod(ctx, prompt_lookup_num_tokens=ctx.options.prompt_lookup_num_tokens)
