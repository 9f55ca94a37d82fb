"""Refining the draft's block: rescore its top-k per position with n-gram models (after Kim et al.,
blockwise parallel decoding, where rescoring a drafter's top-k with an n-gram model raised the tokens
accepted per verification by 5-21%).

At every drafted position the exit's top-k candidates (k ~ 8) are rescored:

    score(x) = log q_draft(x) + w_ctx * log p_ctx(x) + w_corpus * log p_corpus(x)

- ``p_ctx``: n-gram statistics of the sequence itself (prompt and output so far; orders 1-3);
- ``p_corpus``: an n-gram model of the draft's training text (orders 1-3), stored beside the draft
  (``s2d_ngram.npz``, written by ``s2d train-draft --objective ngram``).

Both are Witten-Bell interpolated down to a uniform distribution, so no candidate scores log 0.
Greedy drafting takes the best refined score; sampling draws from q' ~ exp(score / T) over the
top-k (0 elsewhere) and returns exactly that q' as the Draft's probs, so verification stays lossless.
The weights (w_ctx, w_corpus, k) are calibrated per target (``s2d/train/refine.py``: the target's own
greedy continuations of calibration prompts, the weights maximising the tokens a greedy chain gets
accepted) and stored beside the draft in ``s2d_refine.json``; the drafter picks its target's entry by
the target's fingerprint when the drafter is built for it, else the file's pooled default, else
``DEFAULT_WEIGHTS``.

All scoring is numpy on the float32 logits the native runtime returns: a torch op between two
runtime calls wakes torch's OpenMP team, which competes with the runtime's threads (what it cost:
benchmarks/RESULTS.md, "Measurements behind the code").
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from s2d.drafting.base import Draft
from s2d.drafting.batch import Head, Proposal
from s2d.drafting.length import DraftLength
from s2d.drafting.sorted import SortedConfig, SortedDrafter
from s2d.model.config import CheckpointError
from s2d.model.llama import Transformer
from s2d.sampling import NONFINITE, SamplingParams

NGRAM_FILE = "s2d_ngram.npz"
REFINE_FILE = "s2d_refine.json"
ORDER = 3  # trigrams: a token given the last two


@dataclass(frozen=True)
class RefineWeights:
    w_ctx: float = 0.0  # weight of log p_ctx (the sequence's own n-grams)
    w_corpus: float = 0.0  # weight of log p_corpus (the training text's n-grams)
    k: int = 8  # candidates rescored per position

    def __post_init__(self) -> None:
        if not (math.isfinite(self.w_ctx) and math.isfinite(self.w_corpus) and self.w_ctx >= 0 and self.w_corpus >= 0):
            raise ValueError(f"refine weights must be finite and >= 0, got {self.w_ctx}, {self.w_corpus}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"refine k must be an integer >= 1, got {self.k!r}")


# Without a calibration: the middle of what calibrations chose on the zoo (benchmarks/RESULTS.md, "`s2d-refine`").
DEFAULT_WEIGHTS = RefineWeights(w_ctx=0.2, w_corpus=0.2, k=8)


def witten_bell(lower: np.ndarray, count: np.ndarray, total: float, types: float) -> np.ndarray:
    """P(x | ctx) = (c(ctx x) + T(ctx) P_lower(x)) / (c(ctx) + T(ctx)); the lower order alone for an unseen ctx."""
    if total <= 0:
        return lower
    return (count + types * lower) / (total + types)


# ---------------------------------------------------------------------------------------------- corpus model


@dataclass
class CorpusNgram:
    """Counts of a token stream's n-grams (orders 1..3), looked up by binary search over sorted int64 keys.

    A key is the n-gram's tokens in base V: bigram a*V+x, trigram (a*V+b)*V+x (V <= 2**20 fits int64).
    Context statistics (c(ctx), T(ctx): occurrences and distinct followers) are counted before
    pruning, so a pruned n-gram's probability falls to the lower orders rather than to 0.
    """

    vocab_size: int
    uni: np.ndarray  # [V] int64, c(x)
    bi_keys: np.ndarray  # [B] int64 sorted, a*V+x, c >= min_count
    bi_counts: np.ndarray  # [B] int64
    bi_total: np.ndarray  # [V] int64, c(a .)
    bi_types: np.ndarray  # [V] int64, distinct x after a
    tri_keys: np.ndarray  # [T] int64 sorted, (a*V+b)*V+x, c >= min_count
    tri_counts: np.ndarray  # [T] int64
    ctx_keys: np.ndarray  # [C] int64 sorted, a*V+b, contexts seen >= min_count times
    ctx_total: np.ndarray  # [C] int64, c(a b .)
    ctx_types: np.ndarray  # [C] int64, distinct x after a b

    @classmethod
    def build(cls, stream: np.ndarray, vocab_size: int, min_count: int = 2) -> CorpusNgram:
        """stream [N] token ids (documents separated by EOS) -> the counted model, n-grams pruned below ``min_count``."""
        if not 1 <= vocab_size <= 2**20:
            raise ValueError(f"vocab_size must lie in [1, 2**20] for int64 trigram keys, got {vocab_size}")
        s = np.asarray(stream, dtype=np.int64).reshape(-1)
        if s.size < ORDER or s.min() < 0 or s.max() >= vocab_size:
            raise ValueError(f"the stream must hold >= {ORDER} token ids in [0, {vocab_size})")
        v = np.int64(vocab_size)
        uni = np.bincount(s, minlength=vocab_size).astype(np.int64)
        bi, bi_c = np.unique(s[:-1] * v + s[1:], return_counts=True)
        bi_total = np.bincount(bi // v, weights=bi_c, minlength=vocab_size).astype(np.int64)
        bi_types = np.bincount(bi // v, minlength=vocab_size).astype(np.int64)
        tri, tri_c = np.unique((s[:-2] * v + s[1:-1]) * v + s[2:], return_counts=True)
        ctx, inverse = np.unique(tri // v, return_inverse=True)
        ctx_total = np.bincount(inverse, weights=tri_c).astype(np.int64)
        ctx_types = np.bincount(inverse).astype(np.int64)
        keep_bi, keep_tri, keep_ctx = bi_c >= min_count, tri_c >= min_count, ctx_total >= min_count
        return cls(vocab_size, uni, bi[keep_bi], bi_c[keep_bi].astype(np.int64), bi_total, bi_types,
                   tri[keep_tri], tri_c[keep_tri].astype(np.int64), ctx[keep_ctx], ctx_total[keep_ctx],
                   ctx_types[keep_ctx])

    @staticmethod
    def _find(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
        """values at ``query``'s positions in the sorted ``keys`` [.], 0 where absent."""
        if keys.size == 0:
            return np.zeros(query.shape, np.int64)
        i = np.minimum(np.searchsorted(keys, query), keys.size - 1)
        return np.where(keys[i] == query, values[i], 0)

    def logprob(self, history: list[int], candidates: np.ndarray) -> np.ndarray:
        """log P(x | the last two tokens of ``history``) [k] float64 for candidates [k] int64."""
        v = self.vocab_size
        p = (self.uni[candidates] + 1.0) / (self.uni.sum() + v)  # add-one unigram: never 0
        if history:
            b = history[-1]
            count = self._find(self.bi_keys, self.bi_counts, b * v + candidates)
            p = witten_bell(p, count, float(self.bi_total[b]), float(self.bi_types[b]))
        if len(history) >= 2:
            ab = history[-2] * v + history[-1]
            j = int(np.searchsorted(self.ctx_keys, ab))
            if j < self.ctx_keys.size and self.ctx_keys[j] == ab:
                count = self._find(self.tri_keys, self.tri_counts, ab * v + candidates)
                p = witten_bell(p, count, float(self.ctx_total[j]), float(self.ctx_types[j]))
        return np.log(p)

    def save(self, path: Path, meta: dict | None = None) -> Path:
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez_compressed(f, vocab_size=np.int64(self.vocab_size), meta=np.array(json.dumps(meta or {})), **arrays)
        tmp.replace(path)
        return Path(path)

    @classmethod
    def load(cls, path: Path, vocab_size: int) -> CorpusNgram:
        """Read and check ``path``; anything malformed is a CheckpointError naming the file."""
        from s2d.side_files import side_file

        with side_file(path, "n-gram file", "rewrite it with `s2d train-draft --objective ngram`"):
            with np.load(path, allow_pickle=False) as z:
                stored = int(z["vocab_size"])
                arrays = {name: np.asarray(z[name]) for name in _ARRAYS}
            if stored != vocab_size:
                raise ValueError(f"counted over a vocabulary of {stored} tokens, the draft has {vocab_size}")
            for name, a in arrays.items():
                if a.dtype != np.int64 or a.ndim != 1 or (a.size and a.min() < 0):
                    raise ValueError(f"{name!r} must be a 1-D int64 array of counts or keys >= 0")
            for name in ("uni", "bi_total", "bi_types"):
                if arrays[name].size != vocab_size:
                    raise ValueError(f"{name!r} must hold {vocab_size} entries, got {arrays[name].size}")
            for keys, *vals in (("bi_keys", "bi_counts"), ("tri_keys", "tri_counts"),
                                ("ctx_keys", "ctx_total", "ctx_types")):
                k = arrays[keys]
                if any(arrays[n].size != k.size for n in vals) or (k.size > 1 and not (np.diff(k) > 0).all()):
                    raise ValueError(f"{keys!r} must be strictly ascending, as long as {', '.join(map(repr, vals))}")
            limit = vocab_size ** 3
            if arrays["tri_keys"].size and arrays["tri_keys"][-1] >= limit or \
                    arrays["bi_keys"].size and arrays["bi_keys"][-1] >= vocab_size ** 2:
                raise ValueError("n-gram keys beyond the vocabulary")
            return cls(vocab_size, **arrays)


_ARRAYS = ("uni", "bi_keys", "bi_counts", "bi_total", "bi_types", "tri_keys", "tri_counts", "ctx_keys",
           "ctx_total", "ctx_types")
_LOADED: dict[tuple[str, int, int], CorpusNgram] = {}  # (path, mtime, vocab) -> model: drafters of one draft share it


def load_corpus_ngram(directory: Path | str | None, vocab_size: int) -> CorpusNgram | None:
    """The n-gram model beside a draft (read once per file), or None when there is none."""
    if directory is None or not (Path(directory) / NGRAM_FILE).is_file():
        return None
    path = (Path(directory) / NGRAM_FILE).resolve()
    key = (str(path), path.stat().st_mtime_ns, vocab_size)
    if key not in _LOADED:
        _LOADED[key] = CorpusNgram.load(path, vocab_size)
    return _LOADED[key]


# --------------------------------------------------------------------------------------------- context model


class ContextNgram:
    """The sequence's own n-gram counts (orders 1..3), kept up to date as it grows (like ``NgramIndex``)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.tokens: list[int] = []
        self.uni: dict[int, int] = {}
        self.bi: dict[int, dict[int, int]] = {}  # a -> {x: c(a x)}
        self.tri: dict[tuple[int, int], dict[int, int]] = {}  # (a, b) -> {x: c(a b x)}

    def reset(self) -> None:
        self.tokens = []
        self.uni.clear()
        self.bi.clear()
        self.tri.clear()

    def sync(self, context: list[int]) -> None:
        """Make the counts describe ``context`` (extends them; recounts after a divergence)."""
        n_old = len(self.tokens)
        if n_old > len(context) or self.tokens != context[:n_old]:
            self.reset()
            n_old = 0
        toks = self.tokens
        for x in context[n_old:]:
            self.uni[x] = self.uni.get(x, 0) + 1
            if toks:
                row = self.bi.setdefault(toks[-1], {})
                row[x] = row.get(x, 0) + 1
            if len(toks) >= 2:
                row = self.tri.setdefault((toks[-2], toks[-1]), {})
                row[x] = row.get(x, 0) + 1
            toks.append(x)

    def logprob(self, history: list[int], candidates: list[int]) -> np.ndarray:
        """log P(x | the last two tokens of ``history``) [k] float64; uniform-based, so never log 0."""
        p = np.array([self.uni.get(x, 0) for x in candidates], np.float64)
        p = (p + 1.0) / (len(self.tokens) + self.vocab_size)
        for table in (self.bi.get(history[-1]) if history else None,
                      self.tri.get((history[-2], history[-1])) if len(history) >= 2 else None):
            if table:
                count = np.array([table.get(x, 0) for x in candidates], np.float64)
                p = witten_bell(p, count, float(sum(table.values())), float(len(table)))
        return np.log(p)


# ------------------------------------------------------------------------------------------ stored weights


def _kind(behind_lookup: bool) -> str:
    return "behind_lookup" if behind_lookup else "alone"


@dataclass
class RefineTable:
    """Calibrated weights by (target fingerprint, exit, kind), pooled defaults by (exit, kind), and the report.

    Two kinds per exit: ``alone`` (refine-exit-E drafts at every step) and ``behind_lookup`` (lookup+refine-exit-E,
    s2d-refine: the model drafts only where lookup has nothing, where the sequence's own n-grams know less).
    """

    weights: dict[tuple[str, int, str], RefineWeights]
    pooled: dict[tuple[int, str], RefineWeights]
    report: dict  # what the calibration measured (kept in the file for readers)

    def lookup(self, fingerprint: str | None, exit_layers: int, behind_lookup: bool = False) -> RefineWeights:
        kind = _kind(behind_lookup)
        if fingerprint is not None and (fingerprint, exit_layers, kind) in self.weights:
            return self.weights[fingerprint, exit_layers, kind]
        return self.pooled.get((exit_layers, kind), DEFAULT_WEIGHTS)

    @classmethod
    def load(cls, directory: Path | str | None) -> RefineTable:
        """The calibration beside a draft; an empty table (the defaults) when there is none."""
        if directory is None or not (Path(directory) / REFINE_FILE).is_file():
            return cls({}, {}, {})
        from s2d.side_files import read_json, side_file

        path = Path(directory) / REFINE_FILE
        with side_file(path, "refine calibration", "rewrite it with `s2d calibrate-refine`"):
            raw = read_json(path)
            if not (isinstance(raw, dict) and isinstance(raw.get("targets"), dict)
                    and all(isinstance(t, dict) and isinstance(t.get("exits"), dict) for t in raw["targets"].values())
                    and isinstance(raw.get("pooled", {}), dict)):
                raise ValueError("expected {\"targets\": {FINGERPRINT: {\"exits\": {...}}}, \"pooled\": {...}}")
            weights = {(fp, int(e), kind): RefineWeights(**w[kind]["weights"])
                       for fp, entry in raw["targets"].items() for e, w in entry["exits"].items()
                       for kind in ("alone", "behind_lookup")}
            pooled = {(int(e.removesuffix("+lookup")), _kind(e.endswith("+lookup"))): RefineWeights(**w)
                      for e, w in raw.get("pooled", {}).items()}
            return cls(weights, pooled, raw)


def save_refine_table(directory: Path, entries: dict[str, dict], pooled: dict[tuple[int, bool], RefineWeights],
                      meta: dict | None = None) -> Path:
    """Write ``s2d_refine.json``: ``entries`` = {fingerprint: {"name", "exits": {E: {kind: {"weights", ...}}}}}
    (kinds ``alone`` and ``behind_lookup``); ``pooled`` by (exit, behind lookup), stored as "E" and "E+lookup"."""
    path = Path(directory) / REFINE_FILE
    body = {"targets": entries, "pooled": {f"{e}{'+lookup' if behind else ''}": asdict(w)
                                           for (e, behind), w in sorted(pooled.items())}, **(meta or {})}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------------ drafter


def top_candidates(logits: np.ndarray, k: int) -> np.ndarray:
    """logits [V'] -> the indices [k] of the k largest, best first (ties: lower index first)."""
    k = min(k, logits.size)
    part = np.argpartition(-logits, k - 1)[:k] if k < logits.size else np.arange(logits.size)
    return part[np.lexsort((part, -logits[part]))]


def refined_scores(logq: np.ndarray, lp_ctx: np.ndarray, lp_corpus: np.ndarray | None,
                   w: RefineWeights) -> np.ndarray:
    """[k] float64: log q + w_ctx log p_ctx + w_corpus log p_corpus (no corpus model: that term is 0)."""
    score = logq + w.w_ctx * lp_ctx
    if lp_corpus is not None and w.w_corpus:
        score = score + w.w_corpus * lp_corpus
    return score


class RefinedDrafter(SortedDrafter):
    """One exit of the sorted draft, each token chosen among its top-k by the refined score."""

    def __init__(self, model: Transformer, exit_layers: int, corpus: CorpusNgram | None,
                 table: RefineTable | None = None, length: DraftLength | None = None, stop_threshold: float = 0.0,
                 vocab: list[int] | None = None, weights: RefineWeights | None = None,
                 target: Transformer | None = None, behind_lookup: bool = False) -> None:
        """``target``: the target served (its calibrated weights); ``behind_lookup``: drafting only where
        lookup has nothing (``lookup+refine-exit-E``), which has weights of its own."""
        super().__init__(model, SortedConfig((exit_layers,), (0.0,), stop_threshold), length, vocab=vocab)
        if corpus is not None and corpus.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"the n-gram model counts {corpus.vocab_size} tokens, the draft has {model.cfg.vocab_size}")
        self.corpus = corpus
        self.exit_layers = exit_layers
        self.table = table or RefineTable({}, {}, {})
        self.fixed = weights  # explicit weights win over the table (tests, calibration)
        self.behind_lookup = behind_lookup
        self.fingerprint: str | None = None  # the bound target's
        self.weights = weights or self.table.lookup(None, exit_layers, behind_lookup)
        self.context_ngram = ContextNgram(model.cfg.vocab_size)
        self._ids = None if self.head_ids is None else self.head_ids.cpu().numpy()  # subset index -> token id
        if target is not None:
            self.bind_target(target)

    def bind_target(self, target: Transformer) -> None:
        """Serve ``target``: its calibrated weights (else the pooled default, else DEFAULT_WEIGHTS)."""
        from s2d.drafting.steer import target_fingerprint

        self.fingerprint = target_fingerprint(target)
        self.serve(self.behind_lookup)

    def serve(self, behind_lookup: bool) -> None:
        """Draft alone or behind lookup (only where it has nothing): that kind's calibrated weights."""
        self.behind_lookup = behind_lookup
        if self.fixed is None:
            self.weights = self.table.lookup(self.fingerprint, self.exit_layers, behind_lookup)

    def reset(self) -> None:
        super().reset()
        self.context_ngram.reset()

    def candidates(self, history: list[int], logits: np.ndarray, params: SamplingParams
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The exit's logits [V'] float32 -> (candidate token ids [k'] int64, refined scores [k'] float64).

        Under sampling the draft's log q is that of its temperature-scaled logits and the n-gram terms
        are divided by the temperature too, so q' ~ exp(score / T) tends to the greedy choice as T -> 0.
        """
        w = self.weights
        k = min(w.k, params.top_k) if params.top_k and not params.greedy else w.k
        top = top_candidates(logits, k)
        scaled = logits.astype(np.float64)  # float64: log q keeps float32's order exactly (zero weights = top1)
        if not params.greedy:
            scaled = scaled / params.temperature
        peak = scaled[top[0]]
        logq = scaled[top] - (peak + math.log(float(np.exp(scaled - peak).sum())))
        ids = top.astype(np.int64) if self._ids is None else self._ids[top]
        lp_ctx = self.context_ngram.logprob(history, ids.tolist()) if w.w_ctx else np.zeros(len(ids))
        lp_corpus = self.corpus.logprob(history, ids) if self.corpus is not None and w.w_corpus else None
        extra = refined_scores(np.zeros(len(ids)), lp_ctx, lp_corpus, w)
        return ids, logq + (extra if params.greedy else extra / params.temperature)

    def drafting(self, context: list[int], max_tokens: int, params: SamplingParams,
                 generator: torch.Generator | None) -> Proposal:
        if not params.greedy and self.fixed is None:
            # The stored weights are calibrated for greedy chains; under sampling they made q' peakier
            # than p and halved the accepted tokens (RESULTS.md), so sample as the plain exit does.
            return (yield from super().drafting(context, max_tokens, params, generator))
        max_tokens = yield from self.reconcile(context, max_tokens)
        if not max_tokens:
            return Draft.empty(self.model.device)
        self.context_ngram.sync(context)  # counts of the committed sequence; drafted tokens only extend the history
        pos = len(context) - 1
        history = context[-(ORDER - 1):]
        tokens: list[int] = []
        dists: list[np.ndarray] = []
        for i in range(max_tokens):
            logits = (yield Head(self.model, self.readout(pos), self.head)).reshape(-1).float().cpu().numpy()
            if not math.isfinite(float(logits.sum())):
                raise CheckpointError(NONFINITE.format(model="draft"))
            ids, score = self.candidates(history, logits, params)
            q = np.exp(score - score.max())
            q /= q.sum()  # q' over the candidates: the draft's refined distribution
            if params.greedy:
                j = int(np.argmax(score))
            else:
                u = float(torch.rand((), generator=generator, dtype=torch.float64))
                j = min(int(np.searchsorted(np.cumsum(q), u * q.sum(), side="right")), len(q) - 1)
                full = np.zeros(self.model.cfg.vocab_size, np.float32)
                full[ids] = q
                dists.append(full)
            token = int(ids[j])
            tokens.append(token)
            history = (history + [token])[-(ORDER - 1):]
            if q[j] < self.config.stop_threshold or i + 1 == max_tokens:
                break
            yield from self._enter([token])
            pos += 1
        probs = None if params.greedy else torch.from_numpy(np.stack(dists)).to(self.model.device)
        return Draft(torch.tensor(tokens, device=self.model.device), probs, [self.exit_layers] * len(tokens))
