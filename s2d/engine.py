"""The decode loop: draft -> verify (one target pass) -> accept -> commit, streaming token ids."""

from __future__ import annotations

import operator
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from s2d.drafting.base import Draft, Drafter
from s2d.drafting.tree import DraftTree
from s2d.model.cache import KVCache
from s2d.model.config import CheckpointError
from s2d.model.llama import Transformer
from s2d.sampling import SamplingParams, check_finite_logits, probabilities, sample
from s2d.verify import TreeVerdict, Verdict, verify_greedy, verify_stochastic, verify_tree_greedy, \
    verify_tree_stochastic

if TYPE_CHECKING:
    from s2d.drafting import DraftOptions


class InputError(ValueError):
    """A request the engine refuses (empty or too-long prompt, bad limits); nothing was changed."""


class EngineBusyError(RuntimeError):
    """A second sequence on an Engine whose cache another unfinished sequence is using."""


def as_token_ids(prompt: object) -> list[int]:
    """A prompt as a list of ints: a list/tuple of ints or a 1-D integer tensor; anything else is refused."""
    if isinstance(prompt, torch.Tensor):
        if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise TypeError(f"prompt tensor must hold integer token ids, not {prompt.dtype}")
        if prompt.dim() != 1:
            raise InputError(f"prompt tensor must be 1-D (one sequence of token ids), got shape {tuple(prompt.shape)}")
        return prompt.tolist()
    if isinstance(prompt, (str, bytes)):
        raise TypeError("prompt must be token ids, not text: pass tokenizer(text).input_ids")
    if not isinstance(prompt, (list, tuple)):
        hint = " (pass its .input_ids)" if hasattr(prompt, "input_ids") else ""
        raise TypeError(f"prompt must be a list of token ids or a 1-D tensor, not {type(prompt).__name__}{hint}")
    ids = []
    for token in prompt:
        try:
            if isinstance(token, bool):
                raise TypeError
            ids.append(operator.index(token))  # ints, numpy ints, 0-d integer tensors; not floats
        except TypeError:
            raise TypeError(f"prompt must hold integer token ids, found {token!r} ({type(token).__name__})") from None
    return ids


def add_by_position(into: list[int], add: list[int]) -> None:
    """into[i] += add[i], growing ``into`` as needed: per-draft-position counts, merged one way everywhere."""
    into.extend([0] * (len(add) - len(into)))
    for i, v in enumerate(add):
        into[i] += v


def add_histogram(into: dict, add: dict) -> None:
    """into[k] += add[k] for every key: exit histograms, merged one way everywhere."""
    for k, v in add.items():
        into[k] = into.get(k, 0) + v


@dataclass
class DecodeStats:
    target_passes: int = 0  # verification passes (prefill excluded)
    new_tokens: int = 0
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    accepted_at: list[int] = field(default_factory=list)  # [i]: times draft position i was accepted
    proposed_at: list[int] = field(default_factory=list)  # [i]: times draft position i was proposed
    exit_counts: dict[int, int] = field(default_factory=dict)  # exit layer -> draft tokens it produced (0: lookup)
    elapsed_s: float = 0.0
    draft_s: float = 0.0  # time spent proposing drafts
    verify_s: float = 0.0  # time spent in target passes (prefill excluded)

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens emitted per target pass (1.0 for plain decoding)."""
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.elapsed_s if self.elapsed_s else 0.0

    def record(self, proposed_at: list[int], num_accepted: int, exits: list[int]) -> None:
        """One target pass: draft tokens proposed per position (a chain: 1 each; a tree: nodes per
        depth), how many were accepted (a prefix, or a root-to-leaf path), each token's exit."""
        self.target_passes += 1
        self.proposed += sum(proposed_at)
        self.accepted += num_accepted
        add_by_position(self.proposed_at, proposed_at)
        add_by_position(self.accepted_at, [1] * num_accepted)
        add_histogram(self.exit_counts, {e: exits.count(e) for e in set(exits)})

    def merge(self, other: "DecodeStats") -> None:
        """Add another run's statistics to these (totals across requests)."""
        for attr in ("target_passes", "new_tokens", "proposed", "accepted", "elapsed_s", "draft_s", "verify_s"):
            setattr(self, attr, getattr(self, attr) + getattr(other, attr))
        add_by_position(self.proposed_at, other.proposed_at)
        add_by_position(self.accepted_at, other.accepted_at)
        add_histogram(self.exit_counts, other.exit_counts)


@dataclass
class DecodeState:
    """Everything one sequence's decoding needs between steps."""

    tokens: list[int]  # prompt + output so far; the target cache holds all but the last
    prompt_len: int
    max_new_tokens: int
    params: SamplingParams
    cache: KVCache  # this sequence's target cache (the Engine's own, or a slot of a pool)
    generator: torch.Generator
    drafter: Drafter | None = None  # this sequence's drafter: its cache and adaptive state are per sequence
    num_draft_tokens: int = 1  # the most tokens the drafter may propose per step
    stats: DecodeStats = field(default_factory=DecodeStats)
    finished: bool = False

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len:]


class Engine:
    """One target model, optionally a drafter; plain decoding when the drafter is None."""

    def __init__(self, target: Transformer, drafter: Drafter | None = None, num_draft_tokens: int = 5,
                 eos_token_ids: tuple[int, ...] | None = None) -> None:
        if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}")
        # Drafters that run a model expose it as ``.model``: its token ids must mean the target's.
        draft_model = getattr(drafter, "model", None)
        if isinstance(draft_model, Transformer) and draft_model.cfg.vocab_size != target.cfg.vocab_size:
            raise ValueError(f"draft vocab_size {draft_model.cfg.vocab_size} != target vocab_size "
                             f"{target.cfg.vocab_size}; speculative decoding needs the same vocabulary")
        self.target = target
        self.drafter = drafter
        if drafter is not None and hasattr(drafter, "bind_target"):
            drafter.bind_target(target)  # drafters that weigh their cost against this target's
        self.num_draft_tokens = num_draft_tokens
        self.eos = set(target.cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self._cache: KVCache | None = None  # reused across requests: allocation is not free for big models
        # One sequence at a time: the cache (and the drafter's state) hold one sequence. An open
        # stream() holds this lock until it ends or is closed; ``owner`` is the state the cache holds.
        self._streaming = threading.Lock()
        self._owner: DecodeState | None = None

    @property
    def cache(self) -> KVCache:
        """The cache of start()/stream()/generate(), allocated on first use (a server's slots bring their own)."""
        if self._cache is None:
            self._cache = self.target.new_cache()
        return self._cache

    @property
    def context(self) -> int:
        """The most tokens (prompt + output) one sequence may hold."""
        return self.target.cfg.max_positions

    def start(self, prompt: list[int], params: SamplingParams, max_new_tokens: int) -> DecodeState:
        """Validate the request and prefill the target with all prompt tokens but the last.

        A later start() on this Engine takes its cache over: stepping an earlier state then raises.
        """
        if self._streaming.locked():
            raise EngineBusyError(self._busy_message())
        return self._start(prompt, params, max_new_tokens)

    @staticmethod
    def _busy_message() -> str:
        return ("this Engine is already decoding a sequence (an unfinished stream()): finish it or close() it "
                "first; one Engine decodes one sequence at a time (use one Engine per concurrent sequence)")

    def _start(self, prompt: list[int], params: SamplingParams, max_new_tokens: int) -> DecodeState:
        state = self.begin(prompt, params, max_new_tokens, self.cache, self.drafter, self.num_draft_tokens)
        self._owner = state
        return state

    @torch.inference_mode()
    def begin(self, prompt: list[int], params: SamplingParams, max_new_tokens: int, cache: KVCache,
              drafter: Drafter | None, num_draft_tokens: int) -> DecodeState:
        """A sequence on a cache and drafter the caller owns (a scheduler's slot): validate, prefill.

        The target's weights are shared; everything the sequence changes lives in ``cache``, ``drafter``
        and the returned state, so a scheduler may step several such sequences in turn. A drafter
        built for another target must first be ``bind_target``-ed to this one (``TargetPool.drafter`` does).
        """
        prompt = as_token_ids(prompt)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, not {type(params).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, not {type(max_new_tokens).__name__}")
        if not prompt:
            raise InputError("the prompt is empty")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        vocab = self.target.cfg.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise InputError(f"prompt holds token ids outside the vocabulary [0, {vocab})")
        limit = cache.capacity
        if len(prompt) + max_new_tokens > limit:
            raise InputError(f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceeds "
                             f"the model's context of {limit} tokens")
        cache.truncate(0)
        if drafter is not None:
            drafter.reset()
        if len(prompt) > 1:
            device = self.target.device
            ids = torch.tensor([prompt[:-1]], device=device)
            hidden = self.target.run_layers(self.target.embed_tokens(ids), torch.arange(len(prompt) - 1, device=device),
                                            cache)
            if (observe := getattr(drafter, "observe", None)) is not None:
                observe(hidden[0, -1])  # the row that chose the prompt's last token (s2d-steer)
        return DecodeState(list(prompt), len(prompt), max_new_tokens, params, cache,
                           params.generator(self.target.device), drafter, num_draft_tokens)

    @torch.inference_mode()
    def step(self, state: DecodeState) -> list[int]:
        """One target pass: returns the tokens it emitted (accepted drafts + one from the target)."""
        if state.cache is self._cache and state is not self._owner:
            raise EngineBusyError("this sequence no longer owns the Engine's cache: another one was started on "
                                  "the same Engine since; one Engine decodes one sequence at a time")
        if state.finished:
            raise InputError("this sequence is finished")
        if state.drafter is not None and hasattr(state.drafter, "propose_tree"):
            emitted = self._tree_step(state)
        else:
            emitted = self._chain_step(state)
        for i, token in enumerate(emitted):
            if token in self.eos:
                emitted = emitted[: i + 1]
                state.finished = True
                break
        state.tokens.extend(emitted)
        state.stats.new_tokens += len(emitted)
        if len(state.output) >= state.max_new_tokens:
            state.finished = True
        return emitted

    def _pass(self, state: DecodeState, block: Tensor, positions: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """One target pass over ``block`` [T]: (the argmax after each row [T] (greedy) or probabilities
        [T, V], the last layer's hidden states [T, C], which a steered drafter reads)."""
        try:  # non-finite logits raise CheckpointError (the greedy pass checks them itself)
            hidden = self.target.run_layers(self.target.embed_tokens(block[None]), positions, state.cache,
                                            block_mask=mask)[0]
            if state.params.greedy:
                return self.target.argmax(hidden), hidden
            logits = self.target.logits(hidden)
            check_finite_logits(logits, "target")
            return probabilities(logits, state.params), hidden
        except CheckpointError:
            state.finished = True  # the cache now holds this pass: the sequence cannot go on
            raise

    def _chain_step(self, state: DecodeState) -> list[int]:
        remaining = state.max_new_tokens - len(state.output)
        base = state.cache.length  # == len(state.tokens) - 1
        k = min(state.num_draft_tokens, remaining - 1)
        draft = Draft.empty(self.target.device)
        t0 = time.perf_counter()
        if state.drafter is not None and k > 0:
            draft = state.drafter.propose(state.tokens, k, state.params, state.generator)
        t1 = time.perf_counter()
        device = self.target.device
        block = torch.cat([torch.tensor([state.tokens[-1]], device=device), draft.tokens.to(device)])
        positions = torch.arange(base, base + block.numel(), device=device)
        with self._speculation(state, draft, remaining):
            out, hidden = self._pass(state, block, positions, None)
        state.stats.draft_s += t1 - t0
        state.stats.verify_s += time.perf_counter() - t1
        if state.params.greedy:
            verdict = verify_greedy(draft.tokens.to(device), out)
        elif len(draft):
            verdict = verify_stochastic(draft.tokens.to(device), draft.probs, out, state.generator)
        else:  # a plain sampling step
            verdict = Verdict(0, int(sample(out[-1], state.generator)))
        num_accepted = verdict.num_accepted
        state.cache.truncate(base + 1 + num_accepted)
        state.stats.record([1] * len(draft), num_accepted, draft.exits)
        if state.drafter is not None:
            state.drafter.feedback(len(draft), num_accepted)
            if (observe := getattr(state.drafter, "observe", None)) is not None:
                observe(hidden[num_accepted])  # the row that chose the step's last token (s2d-steer)
        return draft.tokens[:num_accepted].tolist() + [verdict.next_token]

    @staticmethod
    def _speculation(state: DecodeState, draft: Draft, remaining: int) -> AbstractContextManager:
        """Around the target pass: a drafter with a ``speculate`` hook drafts the next step meanwhile, as if
        this draft will be accepted whole (overlapped drafting, s2d/drafting/overlap.py); else nothing."""
        speculate = getattr(state.drafter, "speculate", None)
        next_cap = min(state.num_draft_tokens, remaining - len(draft) - 2)  # k of the next step, all accepted
        if speculate is None or next_cap < 1:
            return nullcontext()
        return speculate(state.tokens + draft.tokens.tolist(), next_cap, state.params, state.generator)

    def _tree_step(self, state: DecodeState) -> list[int]:
        """Draft a token tree, verify every branch in one pass (tree mask), keep the accepted path."""
        remaining = state.max_new_tokens - len(state.output)
        base = state.cache.length
        t0 = time.perf_counter()
        tree = state.drafter.propose_tree(state.tokens, state.params, state.generator, max_nodes=remaining - 1) \
            if remaining > 1 else DraftTree.empty()
        t1 = time.perf_counter()
        device = self.target.device
        tokens, parents, depths = tree.tokens.tolist(), tree.parents, tree.depths
        block = torch.tensor([state.tokens[-1]] + tokens, device=device)
        positions = torch.tensor([0] + depths, device=device) + base
        out, _ = self._pass(state, block, positions, tree.block_mask().to(device) if tokens else None)
        state.stats.draft_s += t1 - t0
        state.stats.verify_s += time.perf_counter() - t1
        if state.params.greedy:
            verdict = verify_tree_greedy(tokens, parents, out)
        elif tree.probs is not None:
            verdict = verify_tree_stochastic(tokens, parents, tree.probs, out, state.generator)
        else:  # no tree, or a greedy-drafted one (it carries no q): sample plainly from the root's row
            verdict = TreeVerdict([], int(sample(out[0], state.generator)))
        # The accepted path's cache entries become the contiguous prefix after the root (one gather).
        state.cache.compact(base, torch.tensor([base] + [base + 1 + i for i in verdict.path]))
        per_depth = [0] * max(depths, default=0)
        for d in depths:
            per_depth[d - 1] += 1
        state.stats.record(per_depth, len(verdict.path), tree.exits)
        state.drafter.feedback(len(tokens), len(verdict.path))  # a hybrid's cost-aware switch reads it
        return [tokens[i] for i in verdict.path] + [verdict.next_token]

    def stream(self, prompt: list[int], params: SamplingParams, max_new_tokens: int,
               state_out: list[DecodeState] | None = None) -> Iterator[list[int]]:
        """Yield the tokens of each step; the final state (with stats) is appended to ``state_out``."""
        if not self._streaming.acquire(blocking=False):
            raise EngineBusyError(self._busy_message())
        try:
            t0 = time.perf_counter()
            state = self._start(prompt, params, max_new_tokens)
            if state_out is not None:
                state_out.append(state)
            while not state.finished:
                emitted = self.step(state)
                state.stats.elapsed_s = time.perf_counter() - t0
                yield emitted
        finally:  # also when the caller stops iterating: close() (or garbage collection) runs this
            self._streaming.release()

    def generate(self, prompt: list[int], params: SamplingParams = SamplingParams(),
                 max_new_tokens: int = 128) -> DecodeState:
        states: list[DecodeState] = []
        for _ in self.stream(prompt, params, max_new_tokens, states):
            pass
        return states[0]


class MultiTargetEngine:
    """Several targets sharing a tokenizer and one draft model in memory.

    Each target gets its own Engine: its own KV cache, its own drafter state (cache, adaptive draft
    length) and its own running statistics, so one target's tuning never leaks into another's.
    """

    def __init__(self, targets: dict[str, Transformer], draft: Transformer | None = None, method: str = "s2d",
                 options: "DraftOptions | dict[str, DraftOptions] | None" = None,
                 eos_token_ids: tuple[int, ...] | None = None) -> None:
        """``eos_token_ids``: stop tokens of every target (default: each target's own; () never stops)."""
        from s2d.drafting import build_drafter, default_options, engine_draft_tokens

        if not targets:
            raise ValueError("MultiTargetEngine needs at least one target")
        self.method = method
        self.engines: dict[str, Engine] = {}
        self.totals: dict[str, DecodeStats] = {}
        for name, target in targets.items():
            if draft is not None and draft.cfg.vocab_size != target.cfg.vocab_size:
                raise ValueError(f"draft vocab_size {draft.cfg.vocab_size} != target {name!r} vocab_size "
                                 f"{target.cfg.vocab_size}")
            base = default_options(method, draft)
            opts = options.get(name, base) if isinstance(options, dict) else (options or base)
            drafter = build_drafter(method, draft, opts)
            self.engines[name] = Engine(target, drafter, engine_draft_tokens(method, opts), eos_token_ids)
            self.totals[name] = DecodeStats()

    def engine(self, name: str) -> Engine:
        if name not in self.engines:
            raise KeyError(f"unknown target {name!r}; loaded: {', '.join(self.engines)}")
        return self.engines[name]

    def stream(self, name: str, prompt: list[int], params: SamplingParams, max_new_tokens: int,
               state_out: list[DecodeState] | None = None) -> Iterator[list[int]]:
        states: list[DecodeState] = [] if state_out is None else state_out
        yield from self.engine(name).stream(prompt, params, max_new_tokens, states)
        self._accumulate(name, states[-1].stats)

    def generate(self, name: str, prompt: list[int], params: SamplingParams = SamplingParams(),
                 max_new_tokens: int = 128) -> DecodeState:
        state = self.engine(name).generate(prompt, params, max_new_tokens)
        self._accumulate(name, state.stats)
        return state

    def _accumulate(self, name: str, stats: DecodeStats) -> None:
        self.totals[name].merge(stats)
