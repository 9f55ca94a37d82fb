"""The proposer side of speculative decoding: the one contract every drafting method speaks.

A drafter proposes tokens to follow a context; the engine verifies them in one target pass. What a
drafter may do is all written here, as methods of ``Drafter``: two it must have (``propose`` a chain,
or ``propose_tree`` a tree; ``reset``) and hooks that do nothing unless a drafter needs them
(``feedback`` after each verification, ``observe`` the target's hidden state, ``speculate`` during the
target pass, ``proposal``: the draft as a generator of draft-model calls, which a batch of sequences runs
together, ``batch.py``). The engine calls every hook on every drafter and never asks what a drafter can do.

A drafter is bound to the target it serves when it is built (``methods.build_drafter``): drafters that
weigh their cost against the target, or read a map trained for it, take it in their constructor.

``DrafterWrapper`` is the base of drafters that wrap another (the lookup hybrid, overlapped drafting):
it forwards every part of the contract to the inner drafter, so a wrapper overrides only what it
changes and a new hook can never be dropped on the way through.

The engine always verifies a ``DraftTree``: a chain is the tree with one path (``DraftTree.chain``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from s2d.sampling import SamplingParams

if TYPE_CHECKING:
    from s2d.drafting.batch import Proposal
    from s2d.model.llama import Transformer


@dataclass
class Draft:
    """A chain of draft tokens."""

    tokens: Tensor  # [k] long, the proposed continuation (k may be 0)
    probs: Tensor | None = None  # [k, V] the q each token was drawn from; None = deterministic (one-hot)
    exits: list[int] = field(default_factory=list)  # per token, the exit (layer count) that produced it

    def __len__(self) -> int:
        return self.tokens.numel()

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> Draft:
        return cls(torch.empty(0, dtype=torch.long, device=device))


_NO_TOKENS = torch.empty(0, dtype=torch.long)  # every empty tree's (plain decoding builds one each step)


@dataclass
class DraftTree:
    """A token tree; the root is the last committed token (not stored), which the verification runs first."""

    tokens: Tensor  # [N] long, node tokens in topological order
    parents: list[int]  # [N] parent node index, -1 for a child of the root
    probs: Tensor | None = None  # [N, V] the q each node was drawn from (its parent's); None = greedy/one-hot
    exits: list[int] = field(default_factory=list)  # [N] the exit that drafted each node

    def __len__(self) -> int:
        return self.tokens.numel()

    @classmethod
    def empty(cls) -> DraftTree:
        return cls(_NO_TOKENS, [])  # shared: a tensor of no elements has nothing to change

    @classmethod
    def chain(cls, draft: Draft) -> DraftTree:
        """A chain as the tree of one path: node i's parent is node i-1."""
        return cls(draft.tokens, list(range(-1, len(draft) - 1)), draft.probs, list(draft.exits))

    @property
    def is_chain(self) -> bool:
        """One path (node i the child of node i-1): verified as a chain, with no tree mask."""
        return all(parent == i - 1 for i, parent in enumerate(self.parents))

    @property
    def depths(self) -> list[int]:
        """Each node's depth below the root (a child of the root: 1)."""
        return [d + 1 for d in row_depths(self.parents)]

    def children(self, node: int) -> list[int]:
        """Children of ``node`` (-1: the root), in draw order."""
        return [i for i, parent in enumerate(self.parents) if parent == node]

    def preorder(self) -> DraftTree:
        """The same tree in depth-first order, first children first.

        Why: the path of first children (the draft's own greedy chain) then lies in consecutive
        cache slots right after the root, exactly where a chain pass puts it, so the most likely path
        is verified in the layout the chain method is known to reproduce bit for bit.
        """
        kids: dict[int, list[int]] = {}
        for i, parent in enumerate(self.parents):
            kids.setdefault(parent, []).append(i)
        order: list[int] = []
        stack = list(reversed(kids.get(-1, [])))
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(kids.get(node, [])))
        new_index = {old: new for new, old in enumerate(order)}
        parents = [new_index[self.parents[i]] if self.parents[i] >= 0 else -1 for i in order]
        return DraftTree(self.tokens[order], parents,
                         None if self.probs is None else self.probs[order], [self.exits[i] for i in order])

    def block_mask(self) -> Tensor:
        """[N+1, N+1] bool for the verification block (root first): True where a row may attend."""
        return ancestor_mask([-1] + [p + 1 for p in self.parents])


def row_depths(parents: list[int]) -> list[int]:
    """parents [T] (-1: none; each before its children) -> each row's distance from its top ancestor."""
    depth: list[int] = []
    for parent in parents:
        depth.append(0 if parent < 0 else depth[parent] + 1)
    return depth


def ancestor_mask(parents: list[int]) -> Tensor:
    """parents [T] (-1: none; each before its children) -> [T, T] bool: ancestor-or-self."""
    t = len(parents)
    mask = torch.eye(t, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] |= mask[parent]
    return mask


class Drafter:
    """Proposes tokens to follow ``context`` (the full token sequence so far: prompt + output).

    Required: ``propose`` (chain drafters) or ``propose_tree`` (tree drafters), and ``reset`` where the
    drafter keeps per-sequence state. Drafters that keep a cache reconcile it with ``context``
    themselves, so rejected tokens need no rollback call. Every other method is an optional hook.
    """

    grows_trees = False  # True: propose_tree may branch (such drafters cannot be overlapped)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.propose is Drafter.propose and cls.propose_tree is Drafter.propose_tree:
            raise TypeError(f"{cls.__name__} must implement propose (a chain) or propose_tree (a tree)")
        # A class that changes propose or propose_tree but not proposal drafts through its own propose, in a
        # batch too: a proposal inherited from a batching drafter would skip the override.
        if ("propose" in cls.__dict__ or "propose_tree" in cls.__dict__) and "proposal" not in cls.__dict__:
            cls.proposal = Drafter.proposal

    @property
    def draft_model(self) -> Transformer | None:
        """The model whose token ids it proposes (None: it copies tokens of the context); the engine
        refuses a drafter whose model has another vocabulary than the target's."""
        return None

    def propose(self, context: list[int], max_tokens: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        """A chain of at most ``max_tokens`` tokens (fewer, or none, is fine)."""
        raise NotImplementedError(f"{type(self).__name__} drafts trees: call propose_tree")

    def propose_tree(self, context: list[int], params: SamplingParams, generator: torch.Generator | None,
                     max_nodes: int | None = None) -> DraftTree:
        """A tree of at most ``max_nodes`` nodes; a chain drafter's is its chain (one path)."""
        if max_nodes is None:
            raise ValueError(f"{type(self).__name__} drafts chains: propose_tree needs max_nodes")
        return DraftTree.chain(self.propose(context, max_nodes, params, generator))

    def proposal(self, context: list[int], params: SamplingParams, generator: torch.Generator | None,
                 max_nodes: int | None = None) -> Proposal:
        """The tree ``propose_tree`` gives, as a generator of this drafter's draft-model calls (``batch.py``):
        it yields each call, is sent the call's result, and returns the tree. A batched step drives the
        proposals of all its sequences together, so their calls share one pass per level.

        Drafters that batch write their drafting here (and ``propose``/``propose_tree`` drive it alone with
        ``batch.run_alone``). This default makes no call of its own: it drafts alone, in one go; a subclass
        that overrides ``propose`` or ``propose_tree`` without ``proposal`` gets this default back."""
        return self.propose_tree(context, params, generator, max_nodes)
        yield  # unreachable: makes this function a generator that yields no call

    def reset(self) -> None:
        """Forget all per-sequence state (a new sequence begins)."""

    def forget_history(self) -> None:
        """Forget what is kept across sequences too (the running means of a cost-aware switch): called before
        a seeded sampled request, whose draws must not depend on what the engine decoded before it."""

    def feedback(self, num_proposed: int, num_accepted: int) -> None:
        """Told after each verification (adaptive draft lengths, cost-aware switches tune here)."""

    def observe(self, hidden: Tensor) -> None:
        """The target's last hidden state [C] at the row that chose the latest token (after the prefill
        and each verification): steered drafters read the next block's vector from it."""

    def speculate(self, context: list[int], max_tokens: int, params: SamplingParams,
                  generator: torch.Generator | None) -> AbstractContextManager:
        """Entered around the target pass that verifies ``context``'s drafted tail: overlapped drafting
        drafts the next step meanwhile (``overlap.py``). ``max_tokens``: the next step's cap."""
        return nullcontext()

    def token_cost(self, target: Transformer) -> float:
        """What one drafted token costs, in one-token passes of ``target`` (0: free, as lookup's are)."""
        return 0.0


class DrafterWrapper(Drafter):
    """A drafter around another: every part of the contract goes to ``inner`` unless overridden.

    Except ``proposal``: it stays ``Drafter``'s, which drafts through this wrapper's own ``propose_tree``
    (forwarded, it would skip whatever the wrapper changes there). A wrapper whose drafting is the inner
    drafter's model calls (the lookup hybrid) overrides it to let them batch."""

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner

    @property
    def grows_trees(self) -> bool:  # type: ignore[override]
        return self.inner.grows_trees

    @property
    def draft_model(self) -> Transformer | None:
        return self.inner.draft_model

    def propose(self, context: list[int], max_tokens: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        return self.inner.propose(context, max_tokens, params, generator)

    def propose_tree(self, context: list[int], params: SamplingParams, generator: torch.Generator | None,
                     max_nodes: int | None = None) -> DraftTree:
        if self.grows_trees:
            return self.inner.propose_tree(context, params, generator, max_nodes)
        return super().propose_tree(context, params, generator, max_nodes)  # this wrapper's own propose

    def reset(self) -> None:
        self.inner.reset()

    def forget_history(self) -> None:
        self.inner.forget_history()

    def feedback(self, num_proposed: int, num_accepted: int) -> None:
        self.inner.feedback(num_proposed, num_accepted)

    def observe(self, hidden: Tensor) -> None:
        self.inner.observe(hidden)

    def speculate(self, context: list[int], max_tokens: int, params: SamplingParams,
                  generator: torch.Generator | None) -> AbstractContextManager:
        return self.inner.speculate(context, max_tokens, params, generator)

    def token_cost(self, target: Transformer) -> float:
        return self.inner.token_cost(target)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo = 0
    while a[lo] == b[lo]:
        lo += 1
    return lo
