"""Hybrid drafting: free lookup tokens where the text repeats, the draft model's tokens where it does not.

Each step first asks the n-gram index (``ngram.py``) for a continuation of the context's tail. When it
offers at least ``min_lookup`` tokens, those are the draft (they cost nothing to propose, and a
repetition tends to go on, so up to ``lookup_tokens`` are drafted); otherwise the model drafter (the
sorted cascade, or one fixed exit) drafts as usual. The model drafter's cache catches up on the
tokens it did not draft the next time it runs, in one pass.

Where lookup has nothing, the model drafts only while that pays for this target: a draft of k
tokens costs about k*c of a target pass to propose (c: a draft token's cost over a target pass,
``cost.py``) and k*gamma more to verify (a pass over k+1 tokens costs ~1 + k*gamma one-token passes),
so model steps continue while their running mean of accepted tokens exceeds that; otherwise the step
is a plain one (no draft), and the model is tried again every ``retry`` such steps. A small target
(zoo-s, where c ~ 0.5) so stops asking the draft; a large one (zoo-l, c ~ 0.1) keeps it. The rule
counts tokens, not seconds, so seeded sampling stays reproducible.

The model drafter reads the context from a window's start on: at its first model-drafted step of a
sequence, the last ``draft_window`` tokens (the prompt's tail, and what follows from then on). Its cache
starts empty, so that step prefills the draft over what it reads; over a whole long prompt that prefill
cost more than the far context gave it (benchmarks/RESULTS.md, fourteenth session). Any window is exact:
only the draft's proposals depend on it, and verification decides every token.

Lookup tokens are deterministic: their q is one-hot, which speculative sampling verifies exactly
(accept with probability p(x)), so sampling stays lossless. They are reported as exit 0 in the
statistics' exit histogram.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from s2d.drafting.base import Draft, Drafter, DrafterWrapper, DraftTree
from s2d.drafting.batch import Proposal, run_alone
from s2d.drafting.ngram import LOOKUP_EXIT, NgramConfig, NgramDrafter
from s2d.model.llama import Transformer
from s2d.sampling import SamplingParams


@dataclass(frozen=True)
class HybridConfig:
    min_lookup: int = 2  # lookup tokens needed to skip the model for this step
    lookup_tokens: int = 12  # most lookup tokens drafted per step
    ngram: NgramConfig = NgramConfig()
    gamma: float = 0.06  # a verification pass's extra cost per drafted token (in one-token passes)
    retry: int = 16  # plain steps before the model is tried again
    cost_aware: bool = True  # False: the model drafts whenever lookup has nothing
    draft_window: int = 256  # context tokens the model drafter reads before its first step (0: all of them)

    def __post_init__(self) -> None:
        if not 1 <= self.min_lookup <= self.lookup_tokens:
            raise ValueError(f"need 1 <= min_lookup <= lookup_tokens, got {self.min_lookup}, {self.lookup_tokens}")
        if not (self.gamma >= 0 and self.retry >= 1):
            raise ValueError("gamma must be >= 0 and retry >= 1")
        if isinstance(self.draft_window, bool) or not isinstance(self.draft_window, int) or self.draft_window < 0:
            raise ValueError(f"draft_window must be an integer >= 0 (0: the whole context), got {self.draft_window!r}")


class HybridDrafter(DrafterWrapper):
    """Lookup where the text repeats, the wrapped model drafter (``inner``) otherwise, while it pays."""

    def __init__(self, inner: Drafter, config: HybridConfig = HybridConfig(),
                 target: Transformer | None = None) -> None:
        """``target``: the target served; its pass cost prices the model's tokens (None: they are free)."""
        super().__init__(inner)
        self.config = config
        self.lookup = NgramDrafter(config.ngram)
        self.last_kind = "none"  # what drafted the last step: "lookup", "model" or "none" (a plain step)
        self.cost = 0.0 if target is None else inner.token_cost(target)  # a model token over a target pass
        self._accepted = self._proposed = None  # running means over model steps (None: none yet)
        self._plain_steps = 0
        self._window_start: int | None = None  # where the model drafter's context begins (None: not chosen yet)

    def reset(self) -> None:
        self.inner.reset()
        self.lookup.reset()
        self._plain_steps = 0  # the running means are about the pair of models, kept across requests
        self._window_start = None

    def _window(self, context: list[int]) -> list[int]:
        """The model drafter's view of ``context``: from the window's start, chosen at its first step (its cache is
        a function of the tokens it is given, and it keeps the prefix they share with what it holds, so a start
        moved later only costs a prefill)."""
        if self._window_start is None or self._window_start >= len(context):
            window = self.config.draft_window
            self._window_start = max(0, len(context) - window) if window else 0
        return context[self._window_start:]

    def forget_history(self) -> None:
        super().forget_history()
        self._accepted = self._proposed = None

    def token_cost(self, target: Transformer) -> float:
        return 0.0  # lookup's tokens are free, and the model's are drafted only while they pay

    def feedback(self, num_proposed: int, num_accepted: int) -> None:
        if self.last_kind != "model":  # lookup steps say nothing about the model's draft length
            return
        self.inner.feedback(num_proposed, num_accepted)
        if self._accepted is None:
            self._accepted, self._proposed = float(num_accepted), float(num_proposed)
        else:
            self._accepted = 0.8 * self._accepted + 0.2 * num_accepted
            self._proposed = 0.8 * self._proposed + 0.2 * num_proposed

    def speculate(self, context: list[int], max_tokens: int, params: SamplingParams,
                  generator: torch.Generator | None) -> AbstractContextManager:
        """Overlapped drafting (``overlap.py``): the model drafter speculates on the next step during the
        target pass, after a step the model drafted (lookup had nothing: the next step likely needs the
        model too). After lookup steps it does not: their target pass then keeps every core (RESULTS.md,
        overlapped drafting)."""
        if self.last_kind != "model":
            return nullcontext()
        return self.inner.speculate(self._window(context), max_tokens, params, generator)

    def model_pays(self) -> bool:
        """Whether model drafts have been accepted often enough to be worth their cost here."""
        if not self.config.cost_aware or self._accepted is None:
            return True
        return self._accepted >= self._proposed * (self.cost + self.config.gamma)

    def propose(self, context: list[int], max_tokens: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        if self.grows_trees:
            raise NotImplementedError("lookup+ a tree method drafts trees: call propose_tree")
        tree = run_alone(self.proposal(context, params, generator, max_tokens))
        return Draft(tree.tokens, tree.probs, tree.exits)

    def propose_tree(self, context: list[int], params: SamplingParams, generator: torch.Generator | None,
                     max_nodes: int | None = None) -> DraftTree:
        return run_alone(self.proposal(context, params, generator, max_nodes))

    def proposal(self, context: list[int], params: SamplingParams, generator: torch.Generator | None,
                 max_nodes: int | None = None) -> Proposal:
        """Lookup's tokens, or the model drafter's proposal (its calls batch with the other sequences'), or
        nothing; ``max_nodes`` is the engine's cap (room left in the output; build_drafter sizes it to allow
        lookup_tokens), while the model drafter keeps its own draft length."""
        if max_nodes is None and not self.grows_trees:
            raise ValueError(f"{type(self).__name__} drafts chains: its proposal needs max_nodes")
        cap = self.config.lookup_tokens if max_nodes is None else min(max_nodes, self.config.lookup_tokens)
        tokens = self._choose(context, cap)
        if self.last_kind == "lookup":
            return self._lookup_tree(tokens, params)
        if self.last_kind == "model":
            tree = yield from self.inner.proposal(self._window(context), params, generator, max_nodes)
            self._drafted(tree)
            return tree
        return DraftTree.empty()

    def _lookup_tree(self, tokens: list[int], params: SamplingParams) -> DraftTree:
        """Lookup's tokens as a chain (deterministic: no q, which the chain rules read as one-hot)."""
        return DraftTree.chain(Draft(torch.tensor(tokens, dtype=torch.long), exits=[LOOKUP_EXIT] * len(tokens)))

    def _drafted(self, tree: DraftTree) -> None:
        """Told the model drafter's tree (the tree hybrid prices its shape)."""

    def _choose(self, context: list[int], cap: int) -> list[int]:
        """Decide what drafts this step (``last_kind``): lookup's tokens (returned), the model, or nothing."""
        tokens, _ = self.lookup.lookup(context, cap)
        if len(tokens) >= self.config.min_lookup:
            self.last_kind = "lookup"
        elif self.model_pays() or self._plain_steps >= self.config.retry:
            self.last_kind, self._plain_steps = "model", 0
        else:
            self.last_kind = "none"
            self._plain_steps += 1
        return tokens


class HybridTreeDrafter(HybridDrafter):
    """``lookup+s2d-tree`` / ``lookup+rsd``: lookup's copied tokens as a one-branch tree where the text
    repeats, the draft's token tree otherwise (by the same cost-aware rule as the chain hybrid).

    A lookup branch is a chain: verifying it in the tree pass is exactly a chain step. Under sampling
    its nodes carry a one-hot q, which recursive rejection sampling accepts with probability p(x), as
    speculative sampling does, so the output distribution stays the target's.

    The cost-aware rule weighs a tree as what it costs: one draft call per level (``depth * cost``)
    and one verification row per node (``nodes * gamma``), against the tokens its accepted path gave.
    """

    def __init__(self, inner: Drafter, config: HybridConfig = HybridConfig(),
                 target: Transformer | None = None) -> None:
        super().__init__(inner, config, target)
        self._shape = (0, 0)  # (depth, nodes) of the last model tree
        self._tree_cost: float | None = None  # running mean, in target passes

    def forget_history(self) -> None:
        super().forget_history()
        self._tree_cost = None

    def feedback(self, num_proposed: int, num_accepted: int) -> None:
        if self.last_kind != "model":
            return
        depth, nodes = self._shape
        cost = depth * self.cost + nodes * self.config.gamma
        if self._accepted is None or self._tree_cost is None:
            self._accepted, self._tree_cost = float(num_accepted), cost
        else:
            self._accepted = 0.8 * self._accepted + 0.2 * num_accepted
            self._tree_cost = 0.8 * self._tree_cost + 0.2 * cost

    def model_pays(self) -> bool:
        if not self.config.cost_aware or self._accepted is None or self._tree_cost is None:
            return True
        return self._accepted >= self._tree_cost

    def _lookup_tree(self, tokens: list[int], params: SamplingParams) -> DraftTree:
        """A one-branch tree; under sampling its nodes carry a one-hot q (recursive rejection sampling reads it)."""
        ids = torch.tensor(tokens, dtype=torch.long)
        probs = None
        if not params.greedy:
            vocab = self.inner.draft_model.cfg.vocab_size
            probs = torch.zeros(len(tokens), vocab).index_put_((torch.arange(len(tokens)), ids), torch.ones(len(tokens)))
        return DraftTree(ids, list(range(-1, len(tokens) - 1)), probs, [LOOKUP_EXIT] * len(tokens))

    def _drafted(self, tree: DraftTree) -> None:
        self._shape = (max(tree.depths, default=0), len(tree))
