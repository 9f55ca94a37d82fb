"""Drafting several sequences at once: one draft-model pass per level, carrying a row of every sequence.

A model drafter writes its drafting as a *proposal* (``Drafter.proposal``): a generator that yields each
draft-model call it needs and is sent the call's result, returning its ``DraftTree``. The calls are
``Layers`` (run a range of layers over new rows and append them to the drafter's cache) and ``Head``
(read rows out through the vocabulary head: logits, or the top token and its probability). The drafter's
logic, and every piece of its per-sequence state (cache, hidden states, generator, draft length), stays in
the drafter; only the model calls leave it.

- ``run_alone`` drives one proposal, running each call as it is made: exactly the plain function.
- ``run_together`` drives the proposals of several sequences in lockstep. Each round it takes the call
  every unfinished proposal waits on, groups them by kind (the same model and layer range; the same head),
  and runs each group as one pass over all its rows (``Transformer.run_layers_multi``: the weights read
  once; one head call over every row), at most ``native.MAX_ROWS`` rows a pass. On the native runtime a
  row's result in such a pass is bit-identical to the same row run alone, so each sequence proposes exactly
  what it proposes alone (greedy and sampling: each draws from its own generator). Elsewhere (torch,
  CUDA) the calls of a group run one by one, which is the same as alone by construction.

A proposal that fails (non-finite logits, a cache overflow) gets its error thrown in where the call was
made (a group that fails is rerun call by call, so the error lands on its own sequence), and ends with it;
the others go on.

Which drafters batch: those that make their model calls through ``proposal`` (the sorted drafters: one exit
``sd-exit-E``, the cascades ``s2d-softmax`` and ``s2d-gate``, the steered and refined exits; the whole draft
``sd``; the trees ``s2d-tree``, ``rsd``, ``rsd-sbs``) and the lookup hybrids around them (``s2d``,
``lookup+M``). Lookup and prompt lookup make no model call; overlapped drafting (``overlap+M``,
``s2d-overlap``) drafts on its own thread and runs alone, as does any drafter that implements only
``propose``/``propose_tree`` (``Drafter.proposal``'s default).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from s2d.model import native
from s2d.model.cache import KVCache
from s2d.model.llama import SequenceRows, Transformer


@dataclass
class Layers:
    """Run layers ``start .. end-1`` of ``model`` over new rows, appended to ``cache``; sent back: hidden [T, C]."""

    model: Transformer
    hidden: Tensor  # [T, C] the rows' inputs
    positions: Tensor  # [T] their RoPE positions
    cache: KVCache  # this sequence's draft cache
    start: int
    end: int
    block_mask: Tensor | None = None  # [T, T] bool among the rows (a tree level); None: causal

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    def key(self) -> tuple:
        return ("layers", id(self.model), self.start, self.end)

    def run(self) -> Tensor:
        return self.model.run_layers(self.hidden[None], self.positions, self.cache, self.start, self.end,
                                     self.block_mask)[0]


@dataclass
class Head:
    """Read ``hidden`` out through ``model``'s final norm and head (``head`` [V', C]: a vocabulary subset's).

    ``top1``: sent back (token, probability), as ``Transformer.top1`` gives them (hidden [C]); else the logits
    [..., V'] of hidden [..., C], as ``Transformer.logits`` gives them."""

    model: Transformer
    hidden: Tensor  # [C] (top1) or [..., C]
    head: Tensor | None = None  # [V', C]
    top1: bool = False

    @property
    def rows(self) -> int:
        return self.hidden.numel() // self.hidden.shape[-1]

    def key(self) -> tuple:
        return ("top1" if self.top1 else "logits", id(self.model), None if self.head is None else id(self.head))

    def run(self) -> Any:
        if self.top1:
            return self.model.top1(self.hidden, self.head)
        return self.model.logits(self.hidden, self.head)


Call = Layers | Head
# What ``Drafter.proposal`` returns: yields calls, is sent their results, returns its tree.
Proposal = Generator[Call, Any, Any]


def run_alone(proposal: Proposal) -> Any:
    """Drive one proposal to its end, running each call as it is made; returns what the proposal returns and
    raises what it raises."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            call = proposal.throw(error) if error is not None else proposal.send(result)
        except StopIteration as stop:
            return stop.value
        try:
            result, error = call.run(), None
        except Exception as err:  # noqa: BLE001 - thrown into the proposal, where the call was made
            result, error = None, err


def run_together(proposals: list[Proposal]) -> list[Any]:
    """Drive several sequences' proposals together (their calls batched by kind, round by round); per
    proposal, what it returns, or the exception that ended it."""
    if len(proposals) == 1:  # nothing to batch with: the plain drive, without the rounds' bookkeeping
        try:
            return [run_alone(proposals[0])]
        except Exception as err:  # noqa: BLE001 - as in a batch: the error is this sequence's outcome
            return [err]
    outcomes: dict[int, Any] = {}
    waiting: dict[int, Call] = {}  # proposal -> the call it waits on

    def advance(i: int, result: Any, error: BaseException | None) -> None:
        try:
            waiting[i] = proposals[i].throw(error) if error is not None else proposals[i].send(result)
        except StopIteration as stop:
            outcomes[i] = stop.value
        except Exception as err:  # noqa: BLE001 - this sequence's drafter failed; the others go on
            outcomes[i] = err

    for i in range(len(proposals)):
        advance(i, None, None)
    while waiting:
        groups: dict[tuple, list[int]] = {}
        for i, call in waiting.items():
            groups.setdefault(call.key(), []).append(i)
        calls, waiting = waiting, {}
        for members in groups.values():
            for part in _passes([calls[i] for i in members], members):
                for i, (result, error) in zip(part, _run_group([calls[i] for i in part])):
                    advance(i, result, error)
    return [outcomes[i] for i in range(len(proposals))]


def _passes(calls: list[Call], members: list[int]) -> list[list[int]]:
    """``members`` (one call each, in order) cut into passes of at most ``native.MAX_ROWS`` rows; a call with more
    rows than a pass takes runs alone, as it would alone."""
    parts: list[list[int]] = []
    rows = 0
    for i, call in zip(members, calls):
        if parts and rows + call.rows <= native.MAX_ROWS:
            parts[-1].append(i)
            rows += call.rows
        else:
            parts.append([i])
            rows = call.rows
    return parts


def _run_group(calls: list[Call]) -> list[tuple[Any, BaseException | None]]:
    """Each call's (result, error): one pass for the group where it can be, else call by call; a failed pass
    is rerun call by call so that its error reaches only the sequence it belongs to."""
    if len(calls) > 1:
        try:
            batched = _batched(calls)
        except Exception:  # noqa: BLE001 - rerun alone below: each call gets its own result or error
            batched = None
        if batched is not None:
            return [(r, None) for r in batched]
    out: list[tuple[Any, BaseException | None]] = []
    for call in calls:
        try:
            out.append((call.run(), None))
        except Exception as err:  # noqa: BLE001 - this call's sequence fails, the others go on
            out.append((None, err))
    return out


def _batched(calls: list[Call]) -> list[Any] | None:
    """One pass for calls of one kind, or None where no pass gives each row exactly what it gets alone."""
    first = calls[0]
    model = first.model
    if isinstance(first, Layers):
        # run_layers_multi runs each sequence alone wherever one native pass cannot carry them all
        seqs = [SequenceRows(c.hidden, c.positions, c.cache, c.block_mask) for c in calls]
        return model.run_layers_multi(seqs, first.start, first.end)
    fast = _native_head(model, calls)
    if fast is None:
        return None
    rows = torch.cat([c.hidden.reshape(-1, c.hidden.shape[-1]) for c in calls]).contiguous()
    if first.top1:
        tokens = torch.empty(rows.shape[0], dtype=torch.int64)
        probs = torch.empty(rows.shape[0], dtype=torch.float32)
        # the runtime's head over many rows: each row's argmax and probability, as top1 gives them for one
        fast._head(rows, first.head, None, tokens.data_ptr(), probs.data_ptr())
        return list(zip(tokens.tolist(), probs.tolist()))
    logits = fast.logits(rows, first.head)
    out, at = [], 0
    for c in calls:
        n = c.rows
        # a fresh tensor per call, as its own head call gives it (no view into the others' rows)
        out.append(logits[at:at + n].reshape(*c.hidden.shape[:-1], logits.shape[-1]).clone())
        at += n
    return out


def _native_head(model: Transformer, calls: list[Head]) -> native.NativeRuntime | None:
    """The native runtime where ``Transformer.top1``/``logits`` would use it for every call, else None."""
    if torch.is_grad_enabled() or sum(c.rows for c in calls) > native.MAX_ROWS:
        return None
    if any(c.hidden.device.type != "cpu" or c.hidden.dtype != model.dtype for c in calls):
        return None
    return model.native_runtime()
