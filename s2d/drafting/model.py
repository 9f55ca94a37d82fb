"""Vanilla speculative decoding: a separate small model with the target's tokenizer drafts."""

from __future__ import annotations

import torch

from s2d.drafting.base import Draft, Drafter, DraftTree, common_prefix
from s2d.drafting.batch import Head, Layers, Proposal, run_alone
from s2d.drafting.cost import draft_cost_ratio
from s2d.drafting.length import DraftLength
from s2d.model.llama import Transformer
from s2d.sampling import SamplingParams, check_finite_logits, probabilities, sample


class ModelDrafter(Drafter):
    """The plain reference: every token through every layer. ``SortedDrafter`` with one exit must agree."""

    def __init__(self, model: Transformer, length: DraftLength | None = None) -> None:
        self.model = model
        self.length = length or DraftLength()
        self.cache = model.new_cache()
        self.cached: list[int] = []  # tokens whose KV entries are in self.cache, in order

    def reset(self) -> None:
        self.cache.truncate(0)
        self.cached = []
        self.length.reset()

    def feedback(self, num_proposed: int, num_accepted: int) -> None:
        self.length.update(num_proposed, num_accepted)

    @property
    def draft_model(self) -> Transformer:
        return self.model

    def token_cost(self, target: Transformer) -> float:
        return draft_cost_ratio(self.model, self.model.cfg.num_layers, target)

    def _feed(self, tokens: list[int]) -> Proposal:
        """Append tokens to the cache; returns logits [V] after the last one."""
        start = self.cache.length
        device = self.model.device
        ids = torch.tensor([tokens], device=device)
        positions = torch.arange(start, start + len(tokens), device=device)
        hidden = yield Layers(self.model, self.model.embed_tokens(ids)[0], positions, self.cache, 0,
                              self.model.cfg.num_layers)
        logits = yield Head(self.model, hidden[-1:])
        self.cached.extend(tokens)
        check_finite_logits(logits, "draft")
        return logits[-1]

    def propose(self, context: list[int], max_tokens: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        return run_alone(self.drafting(context, max_tokens, params, generator))

    def proposal(self, context: list[int], params: SamplingParams, generator: torch.Generator | None,
                 max_nodes: int | None = None) -> Proposal:
        if max_nodes is None:
            raise ValueError("ModelDrafter drafts chains: its proposal needs max_nodes")
        return DraftTree.chain((yield from self.drafting(context, max_nodes, params, generator)))

    def drafting(self, context: list[int], max_tokens: int, params: SamplingParams,
                 generator: torch.Generator | None) -> Proposal:
        """``propose``'s chain as a generator of draft-model calls (``batch.py``); returns the Draft."""
        max_tokens = min(max_tokens, self.length.current, self.cache.capacity - len(context))
        if max_tokens <= 0:
            return Draft.empty(self.model.device)
        # Keep the longest valid cached prefix, but always re-feed at least the last token for its logits.
        keep = min(common_prefix(self.cached, context), len(context) - 1)
        self.cache.truncate(keep)
        del self.cached[keep:]
        logits = yield from self._feed(context[keep:])
        tokens: list[int] = []
        dists = []
        for i in range(max_tokens):
            if params.greedy:
                token = int(logits.argmax())
            else:
                q = probabilities(logits, params)
                token = int(sample(q, generator))
                dists.append(q)
            tokens.append(token)
            if i + 1 < max_tokens:
                logits = yield from self._feed([token])
        return Draft(torch.tensor(tokens, device=self.model.device), torch.stack(dists) if dists else None)
