"""Token trees: a draft that proposes several continuations at once, verified in one target pass.

A tree is its nodes in topological order (every parent before its children, siblings in the order
they were drawn); the root is the last committed token, which the verification pass runs first.
Three ways to grow one from a sorted draft (one exit, the s2d default's):

- ``dynamic`` (EAGLE-2's rule, greedy): expand the ``top_k`` best frontier nodes by cumulative draft
  log-probability, each into its ``top_k`` most likely children; after ``depth`` levels keep the
  ``nodes`` best nodes overall. The kept set is closed under "parent" and "earlier sibling".
- ``fixed`` (recursive speculative decoding; always under sampling): a fixed shape (``branching[d]``
  children per node at depth d), each node's children drawn *without replacement* from the draft's
  q (Gumbel-top-k), in draw order (under greedy: its top tokens). A shape fixed before any draw keeps
  recursive rejection sampling exact (``verify_tree_stochastic``).
- ``beam`` (RSD's stochastic-beam-search variant, "RSD-S"; Kool et al. 2019): ``top_k`` beams per
  level. Every node carries phi (its path's cumulative log q) and a perturbed value G (the root: 0,
  0); a frontier node's children get Gumbel-perturbed values phi + log q + noise, conditioned so
  that their maximum is the parent's G (``conditioned_gumbel``), and the ``top_k`` largest G over all
  frontier nodes' children become the next level (``select_beams``). Under greedy: a plain beam
  search over phi.

Why a beam tree keeps recursive rejection sampling lossless although its shape is random: the
children a parent keeps are a prefix of its own Gumbel order (G is increasing in the perturbed
value within one parent), i.e. draws without replacement from q, listed in draw order. How long
that prefix is depends on the other beams and on the value of the parent's next draw, never on
its token: for Gumbels truncated below the earlier draws, the maximum and the argmax are
independent. So "is another sibling drafted" is a stopping rule independent of which token that
sibling would be, given the earlier ones, which is all the verifier needs (the same argument
covers the node cap, which keeps the best values of the last level). Each node's ``probs`` row is
its parent's q, as in ``fixed``, so ``verify_tree_stochastic`` verifies it unchanged.

All are laid out depth-first (``DraftTree.preorder``): the path of first children (the draft's greedy
chain, under greedy decoding, except where a beam search dropped it) lies in consecutive slots.

The draft runs each level as one block: all expanded nodes so far on top of its cached context,
with the tree's ancestor mask, then its cache is cut back to the context. Re-running earlier levels
costs a few rows of a small model; it keeps the draft's cache a plain prefix (no tree in it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from s2d.drafting.base import Drafter, DraftTree, ancestor_mask, common_prefix, row_depths
from s2d.drafting.batch import Head, Layers, Proposal, run_alone
from s2d.drafting.cost import draft_cost_ratio
from s2d.drafting.vocab import subset_head
from s2d.model.config import CheckpointError
from s2d.model.llama import Transformer
from s2d.sampling import NONFINITE, SamplingParams, probabilities


@dataclass(frozen=True)
class TreeShape:
    top_k: int = 2  # dynamic: children per expanded node and nodes expanded per level; beam: the beam width
    depth: int = 6  # levels below the root
    nodes: int = 12  # nodes kept in the end (the verification block is nodes + 1 rows)
    branching: tuple[int, ...] = ()  # fixed: children per node at each depth (default from top_k, depth)

    def __post_init__(self) -> None:
        for name in ("top_k", "depth", "nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"tree {name} must be an integer >= 1, got {value!r}")
        if self.nodes > 63:
            raise ValueError(f"tree nodes must be <= 63 (one verification pass of at most 64 rows), got {self.nodes}")
        if any(b < 1 for b in self.branching):
            raise ValueError(f"tree branching must be >= 1 per level, got {self.branching}")

    def fixed_branching(self) -> tuple[int, ...]:
        """Children per node at each depth of a fixed tree: top_k, then halving, capped by ``nodes``."""
        levels = self.branching or tuple(max(1, self.top_k >> d) for d in range(self.depth))
        kept, width, total = [], 1, 0
        for b in levels:
            if total + width * b > self.nodes:
                b = (self.nodes - total) // width
                if b < 1:
                    break
            kept.append(b)
            width *= b
            total += width
        return tuple(kept)


TreeMode = Literal["dynamic", "fixed", "beam"]
TREE_MODES: tuple[TreeMode, ...] = ("dynamic", "fixed", "beam")


class TreeDrafter(Drafter):
    """Grows a token tree with one exit of a sorted draft (dynamic, of a fixed shape, or by beams)."""

    grows_trees = True

    def __init__(self, model: Transformer, exit_layers: int, shape: TreeShape = TreeShape(),
                 vocab: list[int] | None = None, mode: TreeMode = "dynamic") -> None:
        """``mode`` "dynamic": EAGLE-2's tree under greedy decoding, the fixed shape under sampling;
        "fixed": always the fixed shape; "beam": (stochastic) beam search (see the module's docstring)."""
        if not 1 <= exit_layers <= model.cfg.num_layers:
            raise ValueError(f"exit {exit_layers} is not a layer count of the draft (1..{model.cfg.num_layers})")
        if mode not in TREE_MODES:
            raise ValueError(f"unknown tree mode {mode!r} ({', '.join(TREE_MODES)})")
        self.model, self.exit, self.shape, self.mode = model, exit_layers, shape, mode
        self.head, self.head_ids = subset_head(model, vocab) if vocab else (None, None)
        self.cache = model.new_cache(num_layers=exit_layers)
        self.cached: list[int] = []

    def reset(self) -> None:
        self.cache.truncate(0)
        self.cached = []

    @property
    def draft_model(self) -> Transformer:
        return self.model

    def token_cost(self, target: Transformer) -> float:
        """One level of the tree: one pass of the exit's layers and (subset) head, over a target pass."""
        return draft_cost_ratio(self.model, self.exit, target, None if self.head is None else self.head.shape[0])

    def _sync(self, context: list[int]) -> Proposal:
        """The draft's cache holds exactly ``context`` (the root included)."""
        keep = common_prefix(self.cached, context)
        self.cache.truncate(keep)
        del self.cached[keep:]
        if keep < len(context):
            new = context[keep:]
            device = self.model.device
            yield Layers(self.model, self.model.embed_tokens(torch.tensor([new], device=device))[0],
                         torch.arange(keep, len(context), device=device), self.cache, 0, self.exit)
            self.cached.extend(new)

    def _level_logits(self, grow: _Growth) -> Proposal:
        """Run the growth's block over the cached context; returns logits [len(frontier), V'] at its frontier.

        V' is the draft's vocabulary subset where it has one (``self.head_ids`` maps back to token ids):
        scoring a few thousand tokens instead of the whole vocabulary is most of a level's cost.
        """
        tokens, parents, rows = grow.block_tokens, grow.block_parents, grow.frontier_rows()
        base = self.cache.length
        device = self.model.device
        hidden = yield Layers(self.model, self.model.embed_tokens(torch.tensor([tokens], device=device))[0],
                              torch.tensor(row_depths(parents), device=device) + base, self.cache, 0, self.exit,
                              ancestor_mask(parents).to(device))
        self.cache.truncate(base)
        logits = (yield Head(self.model, hidden[rows], self.head)).float()
        if not torch.isfinite(logits).all():
            raise CheckpointError(NONFINITE.format(model="draft"))
        return logits

    def _token_ids(self, indices: list[int]) -> list[int]:
        return indices if self.head_ids is None else self.head_ids[indices].tolist()

    def _full(self, q: Tensor) -> Tensor:
        """q over the subset [R, V'] -> over the vocabulary [R, V] (exactly 0 outside the subset)."""
        if self.head_ids is None:
            return q
        return q.new_zeros(q.shape[0], self.model.cfg.vocab_size).index_copy_(1, self.head_ids, q)

    def propose_tree(self, context: list[int], params: SamplingParams, generator: torch.Generator | None,
                     max_nodes: int | None = None) -> DraftTree:
        """A tree to follow ``context``; ``max_nodes`` caps its size (room left in the output or cache)."""
        return run_alone(self.proposal(context, params, generator, max_nodes))

    def proposal(self, context: list[int], params: SamplingParams, generator: torch.Generator | None,
                 max_nodes: int | None = None) -> Proposal:
        nodes = min(self.shape.nodes, max_nodes if max_nodes is not None else self.shape.nodes,
                    self.cache.capacity - len(context) - 1)
        if nodes < 1:
            return DraftTree.empty()
        if self.mode == "beam":
            return (yield from self._beam(context, params, generator, nodes))
        if self.mode == "dynamic" and params.greedy:
            return (yield from self._dynamic(context, nodes))
        return (yield from self._fixed(context, params, generator, nodes))

    def _dynamic(self, context: list[int], max_nodes: int) -> Proposal:
        k = self.shape.top_k
        yield from self._sync(context[:-1])
        grow = _Growth(context[-1])
        scores: list[float] = []  # cumulative log q of each node
        for level in range(self.shape.depth):
            # Scored in numpy: a torch op between two runtime calls wakes torch's thread team, which
            # then competes with the runtime's (RESULTS.md, "Measurements behind the code").
            logits = (yield from self._level_logits(grow)).cpu().numpy()
            top = top_indices(logits, k)
            values = (np.take_along_axis(logits, top, -1) - log_normaliser(logits)).tolist()
            born = []
            for r, parent in enumerate(grow.frontier()):
                base = scores[parent] if parent >= 0 else 0.0
                for value, token in zip(values[r], self._token_ids(top[r].tolist())):
                    if math.isfinite(value):
                        born.append(grow.add(token, parent))
                        scores.append(base + value)
            if level + 1 == self.shape.depth or not born:
                break
            grow.expand(sorted(sorted(born, key=lambda i: -scores[i])[:k]))  # the best k, in tree order
        return self._keep_best(grow.tokens, grow.parents, scores, max_nodes)

    def _keep_best(self, tokens: list[int], parents: list[int], scores: list[float], n: int) -> DraftTree:
        """The ``n`` best nodes, closed under parent and earlier sibling (a node never outranks either)."""
        rank = list(scores)
        last_child: dict[int, int] = {}
        for i, parent in enumerate(parents):
            if parent >= 0:
                rank[i] = min(rank[i], rank[parent])
            if parent in last_child:
                rank[i] = min(rank[i], rank[last_child[parent]])
            last_child[parent] = i
        keep = sorted(sorted(range(len(tokens)), key=lambda i: (-rank[i], i))[:n])
        new_index = {old: new for new, old in enumerate(keep)}
        return DraftTree(torch.tensor([tokens[i] for i in keep], dtype=torch.long),
                         [new_index[parents[i]] if parents[i] >= 0 else -1 for i in keep],
                         exits=[self.exit] * len(keep)).preorder()

    def _fixed(self, context: list[int], params: SamplingParams, generator: torch.Generator | None,
               max_nodes: int) -> Proposal:
        branching = TreeShape(self.shape.top_k, self.shape.depth, max_nodes, self.shape.branching).fixed_branching()
        yield from self._sync(context[:-1])
        grow = _Growth(context[-1])
        dists: list[Tensor] = []
        for level, b in enumerate(branching):
            logits = yield from self._level_logits(grow)
            if params.greedy:  # the top tokens, scored in numpy (see _dynamic)
                drawn = top_indices(logits.cpu().numpy(), b).tolist()
            else:  # one call per level: torch ops between runtime calls are costly (see _dynamic)
                q_sub = probabilities(logits, params)
                drawn = gumbel_top_k(q_sub, b, generator)
                q_rows = self._full(q_sub)
            born = []
            for r, parent in enumerate(grow.frontier()):
                for token in self._token_ids(drawn[r]):
                    born.append(grow.add(token, parent))
                    if not params.greedy:
                        dists.append(q_rows[r])
            if level + 1 == len(branching):
                break
            grow.expand(born)
        probs = torch.stack(dists) if dists else None
        return DraftTree(torch.tensor(grow.tokens, dtype=torch.long), grow.parents, probs,
                         [self.exit] * len(grow.tokens)).preorder()


    def _beam(self, context: list[int], params: SamplingParams, generator: torch.Generator | None,
              max_nodes: int) -> Proposal:
        yield from self._sync(context[:-1])
        grow = _Growth(context[-1])
        # One torch draw seeds numpy's generator for the whole tree: the noise then costs no torch op
        # between the draft's runtime calls (see _dynamic), and seeded runs still repeat.
        rng = None if params.greedy else np.random.default_rng(_draw_seed(generator))
        phi, g = np.zeros(1), np.zeros(1)  # the root's cumulative log q and perturbed value
        dists: list[Tensor] = []  # [V'] the q each node was drawn from (its parent's row)
        for _ in range(self.shape.depth):
            width = min(self.shape.top_k, max_nodes - len(grow.tokens))
            if width < 1:
                break
            logits = yield from self._level_logits(grow)
            if rng is None:  # greedy: beam search over the draft's own log-probabilities
                x = logits.cpu().numpy().astype(np.float64)
                log_q = x - log_normaliser(x)
            else:  # q exactly as the verifier will see it (temperature, top-k, top-p)
                q_sub = probabilities(logits, params)
                with np.errstate(divide="ignore"):
                    log_q = np.log(q_sub.double().cpu().numpy())
            beams = select_beams(phi, g, log_q, width, rng)
            frontier = grow.frontier()
            born = []
            for row, token in zip(beams.parents.tolist(), self._token_ids(beams.indices.tolist())):
                born.append(grow.add(token, frontier[row]))
                if rng is not None:
                    dists.append(q_sub[row])
            phi, g = beams.phi, beams.g
            grow.expand(born)
        probs = self._full(torch.stack(dists)) if dists else None
        return DraftTree(torch.tensor(grow.tokens, dtype=torch.long), grow.parents, probs,
                         [self.exit] * len(grow.tokens)).preorder()


def _draw_seed(generator: torch.Generator | None) -> int:
    """A seed for numpy from ``generator`` (torch's default one when None)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(2**62, (), generator=generator, device=device))


class _Growth:
    """A tree being grown, and the block the draft runs at each level: the root (row 0) and every
    expanded node, each row's parent given as a block row; the frontier = the rows last expanded."""

    def __init__(self, root: int) -> None:
        self.tokens: list[int] = []  # tree nodes, in the order they were born
        self.parents: list[int] = []  # parent node of each (-1: the root)
        self.block_tokens, self.block_parents = [root], [-1]
        self.row_of = {-1: 0}  # tree node -> its block row
        self.frontier_nodes = [-1]

    def add(self, token: int, parent: int) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        return len(self.tokens) - 1

    def frontier(self) -> list[int]:
        """The nodes whose children the last level's logits give, in the order of their rows."""
        return self.frontier_nodes

    def frontier_rows(self) -> list[int]:
        return [self.row_of[n] for n in self.frontier_nodes]

    def expand(self, nodes: list[int]) -> None:
        """Nodes (in tree order) the draft runs at the next level."""
        for node in nodes:
            self.row_of[node] = len(self.block_tokens)
            self.block_tokens.append(self.tokens[node])
            self.block_parents.append(self.row_of[self.parents[node]])
        self.frontier_nodes = list(nodes)


def log_normaliser(logits: np.ndarray) -> np.ndarray:
    """log sum exp over the last axis of logits [R, V], kept as [R, 1] (max-shifted: no overflow)."""
    peak = logits.max(-1, keepdims=True)
    return peak + np.log(np.exp(logits - peak).sum(-1, keepdims=True))


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """scores [R, V] -> the indices of each row's k largest, best first [R, k] (ties: lower index first)."""
    k = min(k, scores.shape[-1])
    part = np.argpartition(-scores, k - 1, axis=-1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(scores, part, -1)), axis=-1)
    return np.take_along_axis(part, order, -1)


def gumbel_top_k(q: Tensor, k: int, generator: torch.Generator | None) -> list[list[int]]:
    """Per row of q [R, V], up to ``k`` distinct indices in draw order: sampling without replacement.

    Gumbel-top-k: the k largest log q + Gumbel noise are k draws without replacement, in order; an
    index q gives no mass is never drawn. The noise comes from ``generator`` (seeded runs repeat).
    """
    u = torch.rand(q.shape, generator=generator, device=q.device, dtype=torch.float64).cpu().numpy()
    probs = q.double().cpu().numpy()
    with np.errstate(divide="ignore"):
        keys = np.log(probs) - np.log(-np.log(np.maximum(u, 1e-300)))
    support = (probs > 0).sum(-1)
    top = top_indices(keys, k)
    return [row[:min(k, int(n))].tolist() for row, n in zip(top, support)]


def draw_without_replacement(q: Tensor, k: int, generator: torch.Generator | None) -> list[int]:
    """Up to ``k`` distinct tokens from q [V], in draw order (``gumbel_top_k`` of one row)."""
    return gumbel_top_k(q[None], k, generator)[0]


@dataclass(frozen=True)
class Beams:
    """One level of a beam tree: the kept children, grouped by parent (frontier order), each parent's
    in draw order (their G, best first)."""

    parents: np.ndarray  # [K] int, the frontier row each child extends
    indices: np.ndarray  # [K] int, the child's column of log q (its token, or its index in a subset)
    phi: np.ndarray  # [K] float64, cumulative log q of each child's path
    g: np.ndarray  # [K] float64, each child's perturbed value (greedy: phi)


def select_beams(phi: np.ndarray, g: np.ndarray, log_q: np.ndarray, width: int,
                 rng: np.random.Generator | None) -> Beams:
    """The next level of a (stochastic) beam search: the ``width`` children with the largest G.

    phi, g [R]: the frontier's cumulative log q and perturbed values; log_q [R, V] float64 (-inf where
    q is 0: never drawn). ``rng`` None: a plain beam search (G = phi, no noise). Ties: the lower
    (row, rank) first. A parent contributes at most ``width`` children, so only each row's ``width``
    best are conditioned.
    """
    scores = phi[:, None] + log_q  # [R, V] each child's phi
    k = min(width, log_q.shape[-1])
    if rng is None:
        top = top_indices(scores, k)  # [R, k]
        child_phi = np.take_along_axis(scores, top, -1)
        child_g = child_phi
    else:
        perturbed = scores + rng.gumbel(size=scores.shape)  # [R, V] G~ = phi + Gumbel
        top = top_indices(perturbed, k)  # [R, k] each row's Gumbel order: draws without replacement
        best = np.take_along_axis(perturbed, top, -1)
        child_phi = np.take_along_axis(scores, top, -1)
        child_g = conditioned_gumbel(g[:, None], best[:, :1], best)
    flat_g = child_g.ravel()
    candidates = np.flatnonzero(np.isfinite(child_phi.ravel()))
    ranked = candidates[np.lexsort((candidates, -flat_g[candidates]))][:width]
    keep = np.sort(ranked)  # row-major: by parent, then by rank within the parent (= draw order)
    return Beams(keep // k, top.ravel()[keep], child_phi.ravel()[keep], flat_g[keep])


def conditioned_gumbel(parent: np.ndarray, z: np.ndarray, perturbed: np.ndarray) -> np.ndarray:
    """-log(exp(-parent) - exp(-z) + exp(-perturbed)), computed stably (Kool et al. 2019, appendix B).

    Shifts a parent's perturbed children (their maximum ``z``) so that their maximum becomes the
    parent's value, monotonically. Written as parent - softplus(v) with
    v = parent - perturbed + log(1 - exp(perturbed - z)); broadcasts, float64.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        v = parent - perturbed + _log1mexp(perturbed - z)
        return parent - (np.maximum(v, 0) + np.log1p(np.exp(-np.abs(v))))


def _log1mexp(a: np.ndarray) -> np.ndarray:
    """log(1 - exp(a)) for a <= 0, accurate at both ends (Maechler 2012); -inf at a = 0."""
    with np.errstate(divide="ignore"):
        return np.where(a > -math.log(2), np.log(-np.expm1(a)), np.log1p(-np.exp(a)))
