"""Model-free drafting from an n-gram index of the sequence itself (prompt and output).

What prompt lookup (``pld``) does with a backward scan, this does with an index kept up to date as
the sequence grows: for every order n in [min_n, max_n], the position after the latest occurrence
of each n-gram. A draft continues the longest suffix of the context that occurred before, token by
token (llama.cpp's n-gram cache and SAM-decoding's longest match work alike):

- follow the latest occurrence of the longest matching suffix (what code that repeats itself does
  next), re-matching after each drafted token, so a draft can cross from one earlier passage to
  another;
- a drafted token must be backed by a match of at least ``min_match`` tokens, so one common token
  does not start a long, wrong copy.

Nothing is kept across requests: a sequence's own text is the evidence, as in prompt lookup. The
index costs O(max_n) dictionary updates per new token and O(max_n) lookups per drafted token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from s2d.drafting.base import Draft, Drafter
from s2d.sampling import SamplingParams


LOOKUP_EXIT = 0  # the exit histogram's entry for tokens copied by lookup (no layer ran)


@dataclass(frozen=True)
class NgramConfig:
    max_n: int = 4  # longest suffix matched
    min_n: int = 1  # shortest suffix matched
    min_match: int = 2  # a drafted token needs an earlier occurrence of at least this many context tokens

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {self.min_n}, {self.max_n}")
        if not self.min_n <= self.min_match <= self.max_n:
            raise ValueError(f"min_match must lie in [min_n, max_n], got {self.min_match}")


class NgramIndex:
    """For each n-gram of the indexed tokens (orders min_n..max_n): where it last ended."""

    def __init__(self, config: NgramConfig) -> None:
        self.config = config
        self.tokens: list[int] = []
        # last[n][ngram] = index just after the latest occurrence of ngram whose follower is known
        self.last: list[dict[tuple[int, ...], int]] = [{} for _ in range(config.max_n + 1)]

    def reset(self) -> None:
        self.tokens = []
        for table in self.last:
            table.clear()

    def sync(self, context: list[int]) -> None:
        """Make the index describe ``context`` (extends it; rebuilds after a divergence)."""
        n_old = len(self.tokens)
        if n_old > len(context) or self.tokens != context[:n_old]:
            self.reset()
            n_old = 0
        self.tokens.extend(context[n_old:])
        toks = self.tokens
        # An n-gram ending at position p-1 is followed by toks[p]: index it once toks[p] exists.
        for p in range(max(n_old, 1), len(toks)):
            for n in range(self.config.min_n, self.config.max_n + 1):
                if p - n < 0:
                    break
                self.last[n][tuple(toks[p - n:p])] = p

    def follow(self, suffix: list[int]) -> tuple[int, int] | None:
        """(next token, match length) for the longest suffix of ``suffix`` seen before, or None."""
        cfg = self.config
        for n in range(min(cfg.max_n, len(suffix)), cfg.min_n - 1, -1):
            p = self.last[n].get(tuple(suffix[-n:]))
            if p is not None:
                return self.tokens[p], n
        return None


class NgramDrafter(Drafter):
    """Drafts by copying what followed the longest earlier match of the context's tail (one-hot q)."""

    def __init__(self, config: NgramConfig = NgramConfig()) -> None:
        self.config = config
        self.index = NgramIndex(config)

    def reset(self) -> None:
        self.index.reset()

    def lookup(self, context: list[int], max_tokens: int) -> tuple[list[int], int]:
        """Up to ``max_tokens`` copied tokens and the match length behind the first (0: none)."""
        self.index.sync(context)
        tail = context[-self.config.max_n:]
        out: list[int] = []
        first_match = 0
        for _ in range(max_tokens):
            found = self.index.follow(tail)
            if found is None or found[1] < self.config.min_match:
                break
            token, match = found
            first_match = first_match or match
            out.append(token)
            tail = (tail + [token])[-self.config.max_n:]
        return out, first_match

    def propose(self, context: list[int], max_tokens: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        tokens, _ = self.lookup(context, max_tokens)
        return Draft(torch.tensor(tokens, dtype=torch.long), exits=[LOOKUP_EXIT] * len(tokens))
