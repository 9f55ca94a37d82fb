"""llama.cpp as a peer, through llama-cpp-python: the CPU engine our users would otherwise pick.

The target is exported once to GGUF (``s2d export-gguf``, in the run's dtype) and cached under
``$S2D_CACHE/gguf`` (default ``~/.cache/s2d/gguf``), keyed by the checkpoint's files. Prompts are our
token ids, so both sides see the same input; timing is the whole generate call, prefill included,
loading excluded, as for every method. Target passes are ``Llama.eval`` calls (one per decode step;
the prefill yields the first token, so plain decoding has MAT 1.0 as ours does).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch

from s2d.bench.base import Generation, MethodContext, MethodSkipped
from s2d.model.config import CheckpointError, ModelConfig
from s2d.model.loading import resolve_checkpoint
from s2d.sampling import SamplingParams

LOOKUP_MAX_NGRAM = 2  # llama-cpp-python's LlamaPromptLookupDecoding default (transformers' PLD uses 2 as well)


def gguf_cache_dir() -> Path:
    return Path(os.environ.get("S2D_CACHE", Path.home() / ".cache" / "s2d")) / "gguf"


def cached_gguf(checkpoint: Path, dtype: str) -> Path:
    """The checkpoint as GGUF, exported on first use; a changed checkpoint (or exporter) gets a new file."""
    from s2d.export_gguf import FORMAT_VERSION, export_gguf

    directory = resolve_checkpoint(checkpoint).resolve()
    key = hashlib.sha256(f"{directory}\n{FORMAT_VERSION}\n".encode())
    for f in sorted(directory.iterdir()):
        if f.suffix in (".json", ".safetensors"):
            st = f.stat()
            key.update(f"{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    path = gguf_cache_dir() / f"{directory.name}-{key.hexdigest()[:16]}-{dtype}.gguf"
    if not path.exists():
        export_gguf(directory, path, dtype=dtype, force=True)  # atomic: a concurrent run never reads half a file
    return path


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as err:
        raise MethodSkipped(f"llama-cpp-python is not installed ({err}); pip install llama-cpp-python "
                            "(it compiles llama.cpp: minutes)") from None
    return llama_cpp


class LlamaCppMethod:
    """llama-cpp-python's ``Llama.generate`` on the target's GGUF, optionally with its prompt-lookup drafter."""

    def __init__(self, ctx: MethodContext, lookup_tokens: int | None = None) -> None:
        llama_cpp = import_llama_cpp()
        o = ctx.options
        if o.device != "cpu":
            raise MethodSkipped(f"llama.cpp peers run on the CPU; this run is on {o.device}")
        if o.dtype not in ("bfloat16", "float16", "float32"):
            raise MethodSkipped(f"no GGUF export for dtype {o.dtype}")
        try:
            path = cached_gguf(ctx.target, o.dtype)
        except CheckpointError as err:
            raise MethodSkipped(f"cannot export the target to GGUF: {err}") from None
        cfg = ModelConfig.from_file(resolve_checkpoint(ctx.target) / "config.json")
        self.eos = set() if o.ignore_eos else set(cfg.eos_token_ids)
        draft = None
        if lookup_tokens is not None:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(max_ngram_size=LOOKUP_MAX_NGRAM, num_pred_tokens=lookup_tokens)
        self.draft = draft
        threads = torch.get_num_threads()  # the same threads our methods get
        # The prompt budget leaves max_new_tokens of the model's context, so its whole context is enough.
        # With a draft model Llama keeps logits of every position (it verifies drafts from them) but sizes
        # that buffer from the logits_all argument: False would give it n_batch rows and fail on any
        # context longer than 512 tokens (llama-cpp-python 0.3.36), so say True where it applies anyway.
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=cfg.max_positions, n_threads=threads,
                                   n_threads_batch=threads, n_batch=512, verbose=False,
                                   logits_all=draft is not None, draft_model=draft)
        self.steps: list[list[int]] = []  # per target pass: [draft tokens it verified, tokens it emitted]
        evaluate = self.llm.eval

        def counted_eval(tokens) -> None:
            self.steps.append([len(tokens) - 1 if self.steps else 0, 0])  # the first pass is the prefill
            evaluate(tokens)

        self.llm.eval = counted_eval  # Llama.generate calls self.eval once per target pass

    def generate(self, prompt: list[int], params: SamplingParams, max_new_tokens: int) -> Generation:
        if params.greedy:
            sampling: dict[str, Any] = {"temp": 0.0}
        else:
            # llama.cpp's own defaults (min_p 0.05, top_k 40, top_p 0.95) would change the distribution.
            sampling = {"temp": params.temperature, "top_k": params.top_k, "top_p": params.top_p, "min_p": 0.0,
                        "typical_p": 1.0}
            if params.seed is not None:
                self.llm.set_seed(params.seed)
        self.llm.reset()  # no KV reuse from the previous call: every method prefills its whole prompt
        self.steps = []
        tokens: list[int] = []
        t0 = time.perf_counter()
        for token in self.llm.generate(prompt, reset=True, repeat_penalty=1.0, **sampling):
            tokens.append(int(token))
            self.steps[-1][1] += 1
            if token in self.eos or len(tokens) >= max_new_tokens:
                break  # leaving the generator before it evaluates the token: no wasted pass
        elapsed = time.perf_counter() - t0
        proposed_at, accepted_at = self._acceptance()
        return Generation(tokens, elapsed, len(self.steps), proposed_at, accepted_at)

    def _acceptance(self) -> tuple[list[int], list[int]]:
        """Per draft position: passes that verified a draft token there, and passes that accepted it."""
        if self.draft is None:
            return [], []
        proposed_at = [0] * max((p for p, _ in self.steps), default=0)
        accepted_at = [0] * len(proposed_at)
        for proposed, emitted in self.steps:
            for i in range(proposed):
                proposed_at[i] += 1
            for i in range(min(proposed, emitted - 1)):  # the last emitted token is the target's own
                accepted_at[i] += 1
        return proposed_at, accepted_at


def llamacpp(ctx: MethodContext) -> LlamaCppMethod:
    return LlamaCppMethod(ctx)


def llamacpp_lookup(ctx: MethodContext) -> LlamaCppMethod:
    return LlamaCppMethod(ctx, lookup_tokens=ctx.options.prompt_lookup_num_tokens)
