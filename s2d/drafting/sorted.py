"""The S2D drafter: one sorted multi-exit draft, exit chosen token by token from its confidence.

For each draft token the shallowest exit runs first; the token is taken there if the exit's top
probability reaches that exit's threshold (the paper's softmax cascade), or, with learned exit gates
(``gates.py``), if the gate's probability does (no vocabulary head until an exit answers); otherwise
the hidden state continues through the next layers to the next exit; the last exit always answers.

Lazy KV catch-up: a token that left at a shallow exit has no KV entries in deeper layers. We keep
every position's latest hidden state; when a deeper exit is next needed, the missing positions
run through the missing layers in the same pass as the current token, so shallow layers are never
recomputed and deep layers are computed only when some token needs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from s2d.drafting.base import Draft, Drafter, DraftTree, common_prefix
from s2d.drafting.batch import Head, Layers, Proposal, run_alone
from s2d.drafting.cost import draft_cost_ratio
from s2d.drafting.gates import ExitGates, GateRunner
from s2d.drafting.length import DraftLength
from s2d.drafting.vocab import subset_head
from s2d.model.cache import lazy_zeros
from s2d.model.config import CheckpointError
from s2d.model.llama import Transformer
from s2d.sampling import NONFINITE, SamplingParams, check_finite_logits, probabilities, sample


@dataclass(frozen=True)
class SortedConfig:
    exits: tuple[int, ...]  # layer counts after which an exit reads out, ascending
    thresholds: tuple[float, ...] = ()  # per exit, the confidence needed to answer; default 0.5, ..., 0
    stop_threshold: float = 0.0  # end the draft after a token whose confidence is below this

    def __post_init__(self) -> None:
        if not self.exits or list(self.exits) != sorted(set(self.exits)) or self.exits[0] < 1:
            raise ValueError(f"exits must be distinct ascending layer counts >= 1, got {self.exits}")
        if not self.thresholds:
            object.__setattr__(self, "thresholds", (0.5,) * (len(self.exits) - 1) + (0.0,))
        if len(self.thresholds) != len(self.exits):
            raise ValueError(f"{len(self.exits)} exits need {len(self.exits)} thresholds, got {self.thresholds}")
        if not all(0.0 <= t <= 1.0 for t in (*self.thresholds, self.stop_threshold)):
            raise ValueError("thresholds must lie in [0, 1]")


def confidence_and_q(logits: Tensor, params: SamplingParams) -> tuple[float, Tensor]:
    """logits [V] -> (confidence, q [V]).

    Confidence is the top probability after the verification's own processing; under greedy
    that processing is a one-hot argmax, so the model's plain softmax measures confidence instead.
    """
    q = probabilities(logits, params)
    conf = logits.float().softmax(-1).max() if params.greedy else q.max()
    return float(conf), q


class SortedDrafter(Drafter):
    def __init__(self, model: Transformer, config: SortedConfig, length: DraftLength | None = None,
                 gates: ExitGates | None = None, vocab: list[int] | None = None) -> None:
        if config.exits[-1] > model.cfg.num_layers:
            raise ValueError(f"exit {config.exits[-1]} is beyond the draft's {model.cfg.num_layers} layers")
        self.model = model
        self.config = config
        self.length = length or DraftLength()
        if gates is not None and (missing := [e for e in config.exits[:-1] if e not in gates.weights]):
            raise ValueError(f"the exit gates have no gate for exit(s) {missing}")
        # thresholds then apply to the gates' probabilities instead of the exits' softmax confidence
        self.gates = GateRunner(gates, model) if gates is not None else None
        # a head over a vocabulary subset (vocab.py): cheaper draft tokens, never a token outside it
        self.head, self.head_ids = subset_head(model, vocab) if vocab else (None, None)
        self.cache = model.new_cache(num_layers=config.exits[-1])
        # hidden[s]: position s's hidden state after the deepest layer it has been through.
        self.hidden = lazy_zeros((self.cache.capacity, model.cfg.hidden_size), model.dtype, model.device)
        self.cached: list[int] = []  # tokens that have entered layer 0, in order

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
        """A token from the first exit (the one most tokens leave at), over a target pass."""
        return draft_cost_ratio(self.model, self.config.exits[0], target,
                                None if self.head is None else self.head.shape[0])

    def _enter(self, tokens: list[int]) -> Proposal:
        """Run new tokens through the layers of the first exit."""
        start = self.cache.lengths[0]
        device = self.model.device
        h = yield Layers(self.model, self.model.embed_tokens(torch.tensor([tokens], device=device))[0],
                         torch.arange(start, start + len(tokens), device=device), self.cache, 0, self.config.exits[0])
        self.hidden[start:start + len(tokens)] = h
        self.cached.extend(tokens)

    def _deepen(self, j: int, upto: int) -> Proposal:
        """Bring positions [.., upto] through the layers of exit j: lazy catch-up plus the current token."""
        first, last = self.config.exits[j - 1], self.config.exits[j]
        start = self.cache.lengths[first]
        if start > upto:
            return
        device = self.model.device
        h = yield Layers(self.model, self.hidden[start:upto + 1], torch.arange(start, upto + 1, device=device),
                         self.cache, first, last)
        self.hidden[start:upto + 1] = h

    def readout(self, pos: int) -> Tensor:
        """The hidden state [C] the head reads at ``pos`` (a steered drafter adds its vector here)."""
        return self.hidden[pos]

    def catch_up(self) -> None:
        """Bring every entered position through all layers (tests compare this with full recomputation)."""
        for j in range(1, len(self.config.exits)):
            run_alone(self._deepen(j, self.cache.lengths[0] - 1))

    def reconcile(self, context: list[int], max_tokens: int) -> Proposal:
        """Reconcile the cache with ``context`` (keep the common prefix, enter the rest, always the last
        token); returns how many tokens this step may draft; 0: none (nothing is entered)."""
        max_tokens = min(max_tokens, self.length.current, self.cache.capacity - len(context))
        if max_tokens <= 0:
            return 0
        keep = min(common_prefix(self.cached, context), len(context) - 1)
        self.cache.truncate(keep)
        del self.cached[keep:]
        yield from self._enter(context[keep:])
        return max_tokens

    def propose(self, context: list[int], max_tokens: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        return run_alone(self.drafting(context, max_tokens, params, generator))

    def proposal(self, context: list[int], params: SamplingParams, generator: torch.Generator | None,
                 max_nodes: int | None = None) -> Proposal:
        if max_nodes is None:
            raise ValueError(f"{type(self).__name__} drafts chains: its proposal needs max_nodes")
        return DraftTree.chain((yield from self.drafting(context, max_nodes, params, generator)))

    def drafting(self, context: list[int], max_tokens: int, params: SamplingParams,
                 generator: torch.Generator | None) -> Proposal:
        """``propose``'s chain as a generator of draft-model calls (``batch.py``); returns the Draft."""
        max_tokens = yield from self.reconcile(context, max_tokens)
        if not max_tokens:
            return Draft.empty(self.model.device)
        pos = len(context) - 1
        cfg = self.config
        tokens: list[int] = []
        dists: list[Tensor] = []
        exits: list[int] = []
        last = len(cfg.exits) - 1
        for i in range(max_tokens):
            for j, threshold in enumerate(cfg.thresholds):
                if j:
                    yield from self._deepen(j, pos)
                if self.gates is not None and j < last and self.gates(cfg.exits[j], self.hidden[pos]) < threshold:
                    continue  # deeper, without having paid for this exit's head
                if params.greedy:  # the argmax and its probability, without a [V] tensor
                    token, conf = yield Head(self.model, self.readout(pos), self.head, top1=True)
                    if not math.isfinite(conf):
                        raise CheckpointError(NONFINITE.format(model="draft"))
                    if self.head_ids is not None:
                        token = int(self.head_ids[token])
                else:
                    logits = yield Head(self.model, self.readout(pos), self.head)
                    check_finite_logits(logits, "draft")
                    if self.head_ids is not None:  # q over the subset, exactly 0 elsewhere
                        full = logits.new_full((self.model.cfg.vocab_size,), -math.inf)
                        logits = full.index_copy_(0, self.head_ids, logits.float())
                    conf, q = confidence_and_q(logits, params)
                if self.gates is not None or conf >= threshold or j == last:
                    break
            if not params.greedy:
                token = int(sample(q, generator))
                dists.append(q)
            tokens.append(token)
            exits.append(cfg.exits[j])
            if conf < cfg.stop_threshold or i + 1 == max_tokens:
                break
            yield from self._enter([token])
            pos += 1
        probs = None if params.greedy else torch.stack(dists)
        return Draft(torch.tensor(tokens, device=self.model.device), probs, exits)
