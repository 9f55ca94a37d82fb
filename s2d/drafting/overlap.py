"""Overlapped drafting and verification (PEARL, Liu et al. 2024; "speculative speculative decoding").

Sequential speculative decoding alternates: the draft drafts, then the target verifies, each idle while
the other runs. Here, while the target verifies a block [last, d1..dk] (on all cores but one), the
drafter runs in a background thread on the remaining core and drafts the step *after* it as if all k
tokens will be accepted: it guesses the target's bonus token e1 (the draft's own argmax after dk) and
drafts e2..em from context + d + [e1]. When the verdict accepts all k and its bonus token is e1, the
next step's draft e2..em is ready at once (and the draft's cache already holds it); otherwise the
speculation is dropped and the next draft is made as usual (the inner drafter reconciles its cache
with the context itself, see ``common_prefix``). Only the full-acceptance branch is speculated (PEARL's
"post-verify"): it is the one that ends a step with the draft model's own guess still standing.

Lossless: a speculated draft is used only for the exact context it was drafted after, and its tokens
carry the q they were drawn from; their draws come from the drafter's own generator, independent of the
target's acceptance draws, so conditioned on being used they are draws from q given that context,
which is all speculative sampling needs.

Deterministic: the speculation is the same work whatever the timing. It always runs to completion (the
step joins it after the target pass), it reads only the context it was given, and every draft draw
(speculated or not) comes from one generator seeded from the sequence's own generator at its first use,
so a seeded sequence gives the same tokens on every run. (Its tokens differ from the sequential
method's under sampling, which draws the draft from the sequence's generator; the distribution is the
target's either way. Greedy outputs equal plain decoding's, as for every method.)

Threads: the draft's native passes run on ``OverlapThreads.draft`` threads, the target's on
``.target`` while a speculation runs (``native.threads``), each on its own core (two cores: one each).
With one core there is nothing to overlap: the drafter then runs sequentially, as its inner method.
The background thread lives for one target pass: it is started before the pass and joined after it
(also when the pass raises), so no thread outlives a step, a finished request or a cancelled one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from s2d.drafting.base import Draft, Drafter, DrafterWrapper
from s2d.model import native
from s2d.sampling import SamplingParams

GUESS = SamplingParams()  # greedy: the bonus-token guess is the draft's argmax (its likeliest token)


@dataclass(frozen=True)
class OverlapThreads:
    """Native threads of the two concurrent passes (their sum should not exceed the cores)."""

    target: int  # the target's verification pass, while the draft speculates
    draft: int  # the draft's speculation

    def __post_init__(self) -> None:
        if min(self.target, self.draft) < 1:
            raise ValueError(f"overlap thread counts must be >= 1, got target={self.target}, draft={self.draft}")

    @classmethod
    def for_cores(cls, cores: int) -> "OverlapThreads | None":
        """The split for ``cores`` cores: one for the draft (a small model gains little from more), the rest
        for the target; None (sequential) on one core."""
        return cls(cores - 1, 1) if cores >= 2 else None


def available_cores() -> int:
    """The cores this process computes on: torch's thread count (what the native runtimes use too)."""
    return torch.get_num_threads()


@dataclass
class Speculation:
    context: list[int]  # the context the draft follows: the verified block's context + d + [guess]
    draft: Draft  # the next step's draft, should the verdict reach exactly ``context``


def truncated(draft: Draft, n: int) -> Draft:
    """The first ``n`` tokens of a draft (a prefix of a draft is a draft, with the same q)."""
    if len(draft) <= n:
        return draft
    probs = None if draft.probs is None else draft.probs[:n]
    return Draft(draft.tokens[:n], probs, draft.exits[:n])


class OverlapDrafter(DrafterWrapper):
    """Runs a chain drafter (a model drafter: ``SortedDrafter``, ``ModelDrafter``) overlapped with verification.

    The engine calls ``speculate(context_with_draft, ...)`` around its target pass; ``propose`` then
    returns the speculated draft when the verdict reached the speculated context.
    """

    def __init__(self, inner: Drafter, threads: OverlapThreads | None) -> None:
        if inner.grows_trees:
            raise ValueError("overlap drafts chains; a tree drafter cannot be overlapped")
        super().__init__(inner)
        self.threads = threads  # None: sequential (one core)
        self._ready: Speculation | None = None
        self._generator: torch.Generator | None = None  # the draft's draws (sampling), seeded per sequence
        self.speculations = 0  # speculations run (kept across requests: measurements read them)
        self.used = 0  # speculated drafts that became the next step's draft

    @property
    def overlapped(self) -> bool:
        return self.threads is not None

    def reset(self) -> None:
        self.inner.reset()
        self._ready = None
        self._generator = None

    def _draft_generator(self, params: SamplingParams, generator: torch.Generator | None) -> torch.Generator | None:
        """The generator of every draft draw of this sequence (None under greedy: nothing is drawn).

        Seeded from the sequence's generator at its first use (on the calling thread, at the same point
        of every run), so seeded sampling stays reproducible while the draft draws in another thread.
        """
        if params.greedy:
            return None
        if self._generator is None:
            device = generator.device if generator is not None else torch.device("cpu")
            self._generator = torch.Generator(device)
            if generator is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(int(torch.randint(0, 2 ** 62, (), generator=generator, device=device)))
        return self._generator

    def propose(self, context: list[int], max_tokens: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        if self.threads is None:
            return self.inner.propose(context, max_tokens, params, generator)
        ready, self._ready = self._ready, None
        if ready is not None and len(ready.context) == len(context) and ready.context == context:
            self.used += 1
            return truncated(ready.draft, max_tokens)
        return self.inner.propose(context, max_tokens, params, self._draft_generator(params, generator))

    def _speculate(self, context: list[int], max_tokens: int, params: SamplingParams,
                   generator: torch.Generator | None) -> Speculation | None:
        """Guess the bonus token after ``context``, then draft the step that would follow it."""
        guess = self.inner.propose(context, 1, GUESS, None)
        if not len(guess):
            return None
        after = context + [int(guess.tokens[0])]
        draft = self.inner.propose(after, max_tokens, params, generator)
        return Speculation(after, draft) if len(draft) else None

    @contextmanager
    def speculate(self, context: list[int], max_tokens: int, params: SamplingParams,
                  generator: torch.Generator | None) -> Iterator[None]:
        """Around the target pass that verifies ``context``'s drafted tail: draft the next step meanwhile.

        ``context``: the sequence so far plus this step's draft; ``max_tokens``: the next step's cap
        should all of it be accepted. Sequential (one core): does nothing.
        """
        if self.threads is None:
            yield
            return
        draw = self._draft_generator(params, generator)
        self._ready = None
        result: list[Speculation | None] = []
        threads = self.threads

        def run() -> None:
            # Grad mode and the native thread count are per thread: set both here.
            with torch.inference_mode(), native.threads(threads.draft):
                try:
                    result.append(self._speculate(context, max_tokens, params, draw))
                except Exception:  # noqa: BLE001 - dropped: the next draft, made as usual, meets it again
                    result.append(None)

        worker = threading.Thread(target=run, name="s2d-overlap-draft", daemon=True)
        worker.start()
        self.speculations += 1
        try:
            with native.threads(threads.target):
                yield
        finally:
            worker.join()  # always the whole speculation: what the next step sees never depends on timing
        self._ready = result[0] if result else None
