"""One sequence's decoding, stateless: prefill, then steps of draft -> verify (one target pass) -> accept.

Everything a sequence changes lives in its ``DecodeState`` (its cache, drafter, generator, statistics);
the target's weights are only read. So whoever owns caches (the ``Engine`` its one, a server's
scheduler one per slot) calls ``prefill`` and ``decode_step`` here, and the step itself is one function
(plain greedy decoding, whose draft is always empty, takes a fast path with the same result).

A step always verifies a tree (``DraftTree``): a chain is the tree of one path, which is verified with
the chain rules and no tree mask (the same pass, and the same random draws, as plain speculative
decoding), and a branching tree with its ancestor mask and recursive rejection sampling. Then, the
same for both: the cache keeps the accepted path (a truncate for a chain, one gather for a tree), the
statistics count the pass, and the drafter hears the verdict and sees the target's hidden state.
"""

from __future__ import annotations

import operator
import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from s2d.drafting.base import Drafter, DraftTree, common_prefix
from s2d.drafting.batch import Proposal, run_alone, run_together
from s2d.goodput import Allocation, allocate, pass_cost
from s2d.model import native
from s2d.model.cache import KVCache
from s2d.model.config import CheckpointError
from s2d.model.llama import SequenceRows, Transformer
from s2d.sampling import SamplingParams, check_finite_logits, probabilities, sample
from s2d.verify import verify_greedy, verify_stochastic, verify_tree_greedy, verify_tree_stochastic


class InputError(ValueError):
    """A request the engine refuses (empty or too-long prompt, bad limits); nothing was changed."""


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

    def merge(self, other: DecodeStats) -> None:
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

    @property
    def unprefilled(self) -> int:
        """Prompt tokens still to run into the cache before the first step (a chunked prefill); 0 once it may step."""
        return 0 if self.output else max(len(self.tokens) - 1 - self.cache.length, 0)


def begin(target: Transformer, prompt: list[int], params: SamplingParams, max_new_tokens: int, cache: KVCache,
          drafter: Drafter | None, num_draft_tokens: int, keep: int = 0) -> DecodeState:
    """Validate a request and begin its sequence in ``cache`` (``drafter``, this sequence's and bound to
    ``target``, is reset). The cache keeps its first ``keep`` positions (a prompt prefix they already hold:
    ``reusable_prefix``) and drops the rest; ``prefill_chunk`` runs the rest of the prompt, whole or in chunks,
    before the first step."""
    prompt = as_token_ids(prompt)
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, not {type(params).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, not {type(max_new_tokens).__name__}")
    if not prompt:
        raise InputError("the prompt is empty")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = target.cfg.vocab_size
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise InputError(f"prompt holds token ids outside the vocabulary [0, {vocab})")
    limit = cache.capacity
    if len(prompt) + max_new_tokens > limit:
        raise InputError(f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceeds "
                         f"the model's context of {limit} tokens")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= min(cache.length, len(prompt) - 1):
        raise ValueError(f"keep must be an int in [0, {min(cache.length, len(prompt) - 1)}], got {keep!r}")
    cache.truncate(keep)
    if drafter is not None:
        drafter.reset()
        if params.seed is not None and not params.greedy:
            drafter.forget_history()  # a seeded request draws as it would on a fresh engine
    return DecodeState(list(prompt), len(prompt), max_new_tokens, params, cache, params.generator(target.device),
                       drafter, num_draft_tokens)


@torch.inference_mode()
def prefill_chunk(target: Transformer, state: DecodeState, max_tokens: int | None = None) -> int:
    """Run the next ``max_tokens`` (None: all) prompt tokens still outside the cache through the target; returns
    how many remain (0: the sequence may step). The last prompt token is left out: the first step runs it.

    Chunks append to the cache as one whole pass would (the same keys and values up to the kernels' rounding:
    a chunk attends to the cache instead of computing its causal block in one product), so a server can run
    other sequences' steps between the chunks of a long prompt."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise ValueError(f"max_tokens must be an integer >= 1 or None, got {max_tokens!r}")
    start, end = state.cache.length, len(state.tokens) - 1
    if start > end or state.output:
        raise InputError("this sequence's prefill is done")
    stop = end if max_tokens is None else min(end, start + max_tokens)
    if stop > start:
        device = target.device
        ids = torch.tensor([state.tokens[start:stop]], device=device)
        hidden = target.run_layers(target.embed_tokens(ids), torch.arange(start, stop, device=device), state.cache)
        if stop == end and state.drafter is not None:
            state.drafter.observe(hidden[0, -1])  # the row that chose the prompt's last token (s2d-steer)
    return end - stop


# Prompt tokens per prefill pass. Every path cuts a prompt at multiples of this from its start (the
# server's --prefill-chunk by default too): where the cuts fall can change a bf16 cache's last bits (a pass of
# > 64 rows on torch, as models over 512 wide with AMX or S2D_PREFILL_ROWS=0 run it, rounds as its shape
# makes it; where the runtime prefills in its own passes every row is the bits of a one-token pass, wherever it
# is cut), so one rule keeps an output the same through generate, a batch and the server.
PREFILL_CHUNK = 256


def reusable_prefix(target: Transformer, cached: list[int], prompt: list[int], chunk: int = PREFILL_CHUNK) -> int:
    """How many positions of a cache holding ``cached`` (token ids [0, cache length)) a new ``prompt`` can keep:
    their common prefix, short of the prompt's last two tokens (prefill runs at least one, so a drafter that
    reads the prefill's last row sees it; the first step runs the last). Where the target prefills on the
    native runtime every row is the bits of a one-token pass wherever the prompt is cut, so any prefix is
    exact; elsewhere (torch: AMX, wide models, CUDA) the kept part ends on a multiple of ``chunk``, so the
    cuts after it fall where a whole prefill's do."""
    n = common_prefix(cached, prompt[:len(prompt) - 2])
    fast = target.native_runtime() if target.device.type == "cpu" else None
    if fast is None or not fast.prefill_rows:
        n -= n % chunk
    return n


def prefill(target: Transformer, prompt: list[int], params: SamplingParams, max_new_tokens: int, cache: KVCache,
            drafter: Drafter | None, num_draft_tokens: int) -> DecodeState:
    """Validate a request and run all prompt tokens but the last through the target into ``cache`` (``begin``,
    then ``prefill_chunk`` by PREFILL_CHUNK tokens).

    ``drafter`` must be this sequence's (its state is reset) and bound to ``target``.
    """
    state = begin(target, prompt, params, max_new_tokens, cache, drafter, num_draft_tokens)
    while prefill_chunk(target, state, PREFILL_CHUNK):
        pass
    return state


@dataclass
class Step:
    """One sequence's step between drafting and the verdict: its draft and the block the target verifies."""

    state: DecodeState
    tree: DraftTree
    chain: bool  # one path: verified by the chain rules, with no tree mask
    tokens: Tensor  # [N] the draft's tokens, on the target's device (an empty draft's may stay on the CPU)
    block: Tensor  # [N+1] the last committed token, then the draft
    positions: Tensor  # [N+1] RoPE positions (a tree's follow its depths)
    mask: Tensor | None  # [N+1, N+1] a tree's ancestor mask; None: causal
    depths: list[int]  # [N] each node's depth below the root
    draft_s: float  # seconds spent drafting


def draft_cap(state: DecodeState) -> int:
    """The most tokens ``state`` may draft this step: its method's length, within the room left."""
    return min(state.num_draft_tokens, state.max_new_tokens - len(state.output) - 1)  # + the target's token


def draft_step(target: Transformer, state: DecodeState, budget: int | None = None) -> Step:
    """Draft this sequence's step (at most ``budget`` tokens; default its own cap) and lay out the block
    its target pass verifies."""
    t0 = time.perf_counter()
    proposal = _proposal(state, budget)
    tree = DraftTree.empty() if proposal is None else run_alone(proposal)
    return _lay_out(target, state, tree, time.perf_counter() - t0)


def _proposal(state: DecodeState, budget: int | None) -> Proposal | None:
    """The drafter's proposal for this step (``batch.py``: its draft-model calls, to run alone or batched with
    other sequences'); None: no draft this step."""
    _check_steppable(state)
    budget = draft_cap(state) if budget is None else min(budget, draft_cap(state))
    if state.drafter is None or budget <= 0:
        return None
    return state.drafter.proposal(state.tokens, state.params, state.generator, max_nodes=budget)


def _check_steppable(state: DecodeState) -> None:
    if state.finished:
        raise InputError("this sequence is finished")
    if state.unprefilled:
        raise InputError(f"this sequence's prompt has {state.unprefilled} tokens still to prefill (prefill_chunk)")


def _lay_out(target: Transformer, state: DecodeState, tree: DraftTree, draft_s: float) -> Step:
    """The block a drafted ``tree`` makes for the target pass: the last committed token, then the draft."""
    device = target.device
    base = state.cache.length  # == len(state.tokens) - 1
    if not len(tree):  # plain decoding: the last token alone (two torch calls; each costs 10-20 us after a pass)
        block = torch.tensor([state.tokens[-1]], device=device)
        return Step(state, tree, True, tree.tokens, block, torch.arange(base, base + 1, device=device), None, [],
                    draft_s)
    chain = tree.is_chain
    tokens = tree.tokens.to(device)
    block = torch.cat([torch.tensor([state.tokens[-1]], device=device), tokens])
    depths = list(range(1, len(tree) + 1)) if chain else tree.depths
    if chain:
        positions, mask = torch.arange(base, base + block.numel(), device=device), None
    else:
        positions, mask = torch.tensor([0] + depths, device=device) + base, tree.block_mask().to(device)
    return Step(state, tree, chain, tokens, block, positions, mask, depths, draft_s)


def speculation(step: Step) -> AbstractContextManager:
    """Around the target pass: a drafter may draft the next step meanwhile, as if this chain will be accepted
    whole (overlap.py); a no-op for every other drafter."""
    state = step.state
    remaining = state.max_new_tokens - len(state.output)  # tokens the sequence may still emit
    next_cap = min(state.num_draft_tokens, remaining - len(step.tree) - 2)
    if state.drafter is None or not step.chain or next_cap < 1:
        return nullcontext()
    return state.drafter.speculate(state.tokens + step.tokens.tolist(), next_cap, state.params, state.generator)


def commit_step(step: Step, out: Tensor, hidden: Tensor | None, eos: set[int] | frozenset[int]) -> list[int]:
    """The verdict on the target's ``out`` (argmax [N+1] or probabilities [N+1, V]) and ``hidden`` [N+1, C]
    (None where the sequence has no drafter to observe it):
    keep the accepted path in the cache, count the pass, tell the drafter; returns the tokens emitted."""
    state, tree, drafter = step.state, step.tree, step.state.drafter
    base = state.cache.length - step.block.numel()
    ids = step.tokens.tolist()
    path, next_token = _verdict(step, ids, out)
    if step.chain:
        state.cache.truncate(base + 1 + len(path))
    else:  # the accepted path's entries become the contiguous prefix after the root (one gather)
        state.cache.compact(base, torch.tensor([base] + [base + 1 + i for i in path]))
    per_depth = [0] * max(step.depths, default=0)  # draft tokens proposed at each depth (a chain: 1 each)
    for d in step.depths:
        per_depth[d - 1] += 1
    state.stats.record(per_depth, len(path), tree.exits)
    if drafter is not None:
        drafter.feedback(len(tree), len(path))
        drafter.observe(hidden[1 + path[-1] if path else 0])  # the row that chose the step's last token

    return _emit(state, [ids[i] for i in path] + [next_token], eos)


def _emit(state: DecodeState, emitted: list[int], eos: set[int] | frozenset[int]) -> list[int]:
    """Append a step's tokens to the sequence, up to and including its first EOS; returns those appended."""
    for i, token in enumerate(emitted):
        if token in eos:
            emitted = emitted[: i + 1]
            state.finished = True
            break
    state.tokens.extend(emitted)
    state.stats.new_tokens += len(emitted)
    if len(state.tokens) - state.prompt_len >= state.max_new_tokens:
        state.finished = True
    return emitted


def decode_step(target: Transformer, state: DecodeState, eos: set[int] | frozenset[int]) -> list[int]:
    """One target pass: returns the tokens it emitted (accepted draft tokens + one from the target)."""
    if state.drafter is None and state.params.greedy:
        return _plain_greedy_step(target, state, eos)
    return _general_step(target, state, eos)


def _plain_greedy_step(target: Transformer, state: DecodeState, eos: set[int] | frozenset[int]) -> list[int]:
    """Plain greedy decoding's step: the tokens, cache and statistics of ``_general_step`` with an empty draft,
    through ``Transformer.greedy_token``: no Step, tensor or torch call (together ~0.3 ms of a zoo-l step's
    2.6-3.8 ms, on the caches the pass has just flushed)."""
    _check_steppable(state)
    t0 = time.perf_counter()
    try:
        token = target.greedy_token(state.tokens[-1], state.cache.length, state.cache)
    except CheckpointError:
        state.finished = True  # the cache now holds this pass: the sequence cannot go on
        raise
    state.stats.verify_s += time.perf_counter() - t0
    state.stats.target_passes += 1  # what record() counts for a pass with no draft
    return _emit(state, [token], eos)


@torch.inference_mode()
def _general_step(target: Transformer, state: DecodeState, eos: set[int] | frozenset[int]) -> list[int]:
    """Any step: draft (with no drafter, nothing), one target pass over the block, the verdict. The reference
    ``_plain_greedy_step`` is tested against."""
    step = draft_step(target, state)
    t1 = time.perf_counter()
    with speculation(step):
        try:
            if state.params.greedy:  # one native call; a drafter observes the target's hidden states
                out, hidden = target.greedy_hidden(step.block[None], step.positions, state.cache, step.mask)
            else:
                hidden = target.run_layers(target.embed_tokens(step.block[None]), step.positions, state.cache,
                                           block_mask=step.mask)[0]
                out = _read_out(target, state.params, hidden)
        except CheckpointError:
            state.finished = True  # the cache now holds this pass: the sequence cannot go on
            raise
    state.stats.draft_s += step.draft_s
    state.stats.verify_s += time.perf_counter() - t1
    return commit_step(step, out, hidden, eos)


@torch.inference_mode()
def decode_step_batch(target: Transformer, states: list[DecodeState], eos: set[int] | frozenset[int],
                      goodput: "bool | Allocation" = True) -> list[list[int] | Exception]:
    """One step of several sequences of one target: they draft together (the model drafters' calls batched,
    one draft pass per level for all: ``drafting/batch.py``), then one target pass verifies every block
    (``Transformer.run_layers_multi``: the weights read once for all rows), and each accepts and commits on
    its own. Per sequence: the tokens it emitted, or the error that ended it (its drafter failed, or its
    logits were not finite: ``state.finished``), so one sequence's failure never ends the others;
    a sequence's tokens are the ones it would emit stepped alone (greedy: the same rows, bit for bit; sampling:
    its own generator). Passes carry at most ``native.MAX_ROWS`` rows: more sequences take several passes.

    ``goodput``: each sequence's draft length is chosen for the batch (``goodput.allocate``: the slots most
    likely accepted, while they raise the batch's expected tokens per second); a seeded sampling request keeps
    its method's length, so it draws as it does alone. False: every sequence drafts its method's length. Another
    allocation (``allocate``'s signature) may stand in for it: benchmarks compare fixed caps with it this way."""
    budgets: list[int | None] = [None] * len(states)
    if goodput and len(states) > 1:
        free = [i for i, s in enumerate(states) if not (s.params.seed is not None and not s.params.greedy)]
        granted = (allocate if goodput is True else goodput)([max(draft_cap(states[i]), 0) for i in free],
                           [(states[i].stats.accepted_at, states[i].stats.proposed_at) for i in free],
                           pass_cost(target), [states[i].cache.length for i in free])
        for i, k in zip(free, granted):
            budgets[i] = k
    results: dict[int, list[int] | Exception] = {}
    steps: list[tuple[int, Step]] = []
    proposals: dict[int, Proposal] = {}
    t0 = time.perf_counter()
    for i, state in enumerate(states):
        try:
            if (proposal := _proposal(state, budgets[i])) is not None:
                proposals[i] = proposal
        except Exception as err:  # noqa: BLE001 - this sequence cannot step; the others go on
            state.finished = True
            results[i] = err
    # Every sequence's drafting at once: the model drafters' calls share one draft pass per level (batch.py)
    trees = dict(zip(proposals, run_together(list(proposals.values()))))
    draft_s = time.perf_counter() - t0  # each sequence waited for the whole batch's drafting
    for i, state in enumerate(states):
        if i in results:
            continue
        tree = trees.get(i, DraftTree.empty())
        if isinstance(tree, Exception):  # this sequence's drafter failed; the others go on
            state.finished = True
            results[i] = tree
        else:
            steps.append((i, _lay_out(target, state, tree, draft_s)))
    group: list[tuple[int, Step]] = []
    for i, step in steps:
        if group and sum(s.block.numel() for _, s in group) + step.block.numel() > native.MAX_ROWS:
            results.update(zip([j for j, _ in group], _verify_group(target, [s for _, s in group], eos)))
            group = []
        group.append((i, step))
    if group:
        results.update(zip([j for j, _ in group], _verify_group(target, [s for _, s in group], eos)))
    return [results[i] for i in range(len(states))]


def _verify_group(target: Transformer, steps: list[Step], eos: set[int] | frozenset[int]
                  ) -> list[list[int] | CheckpointError]:
    t1 = time.perf_counter()
    seqs = [SequenceRows(target.embed_tokens(s.block[None])[0], s.positions, s.state.cache, s.mask) for s in steps]
    keys = [s.state.cache.length for s in steps]  # before the pass appends this step's rows
    # the runtime times attention apart (its profile, cleared here): goodput's cost model needs it
    fast = target.native_runtime() if target.device.type == "cpu" else None
    if fast is not None:
        fast.profile(True)
    with ExitStack() as stack:
        for s in steps:
            stack.enter_context(speculation(s))
        hidden = target.run_layers_multi(seqs)
        outs: list[Tensor | CheckpointError] = []
        greedy = [s.state.params.greedy for s in steps]
        if all(greedy):
            try:  # one head pass for every row; a non-finite row sends each sequence to its own check
                outs = list(target.argmax(torch.cat(hidden)).split([h.shape[0] for h in hidden]))
            except CheckpointError:
                outs = []
        for s, h in zip(steps[len(outs):], hidden[len(outs):]):
            try:
                outs.append(_read_out(target, s.state.params, h))
            except CheckpointError as err:
                outs.append(err)
    elapsed = time.perf_counter() - t1
    phases = fast.profile() if fast is not None else {}
    rows = [s.block.numel() for s in steps]
    pass_cost(target).observe(sum(rows), elapsed, phases["attention"] if any(phases.values()) else None,
                              sum(keys), sum(r * k for r, k in zip(rows, keys)))
    results: list[list[int] | CheckpointError] = []
    for s, out, h in zip(steps, outs, hidden):
        s.state.stats.draft_s += s.draft_s
        s.state.stats.verify_s += elapsed
        if isinstance(out, CheckpointError):
            s.state.finished = True  # the cache holds this pass: the sequence cannot go on
            results.append(out)
        else:
            results.append(commit_step(s, out, h, eos))
    return results


def _read_out(target: Transformer, params: SamplingParams, hidden: Tensor) -> Tensor:
    """The target's choice after each row of ``hidden`` [T, C]: argmax [T] (greedy) or probabilities [T, V];
    non-finite logits raise CheckpointError (the greedy head checks them itself)."""
    if params.greedy:
        return target.argmax(hidden)
    logits = target.logits(hidden)
    check_finite_logits(logits, "target")
    return probabilities(logits, params)


def _verdict(step: Step, ids: list[int], out: Tensor) -> tuple[list[int], int]:
    """(accepted nodes, root to leaf; the target's next token). ``ids``: the draft's tokens; ``out``: argmax
    [N+1] or probabilities [N+1, V]."""
    tree, tokens, state = step.tree, step.tokens, step.state
    if step.chain:
        if state.params.greedy:
            verdict = verify_greedy(tokens, out)
        elif len(tree):
            verdict = verify_stochastic(tokens, tree.probs, out, state.generator)
        else:  # a plain sampling step
            return [], int(sample(out[-1], state.generator))
        return list(range(verdict.num_accepted)), verdict.next_token
    if state.params.greedy:
        tree_verdict = verify_tree_greedy(ids, tree.parents, out)
    elif tree.probs is not None:
        tree_verdict = verify_tree_stochastic(ids, tree.parents, tree.probs, out, state.generator)
    else:  # a greedy-drafted tree carries no q: sample plainly from the root's row
        return [], int(sample(out[0], state.generator))
    return tree_verdict.path, tree_verdict.next_token
