"""What ``s2d-refine`` reads beside the draft: the corpus n-gram model and the per-target refine weights.

``s2d train-draft --objective ngram --init DRAFT --out NEW --data ...`` copies the draft with
``s2d_ngram.npz`` beside it (orders 1-3 of its training text, pruned below ``--ngram-min-count``);
with ``--targets`` and ``--calibration`` it calibrates the weights too. ``s2d calibrate-refine``
calibrates (or re-calibrates) a draft that already has its n-gram file, in place, like ``s2d calibrate``.

Calibration: each target greedily continues each calibration prompt (plain decoding, EOS ignored);
along that continuation a greedy chain drafted at position t is accepted exactly as long as the
draft's choices equal the next tokens of the continuation (the draft's context is then the target's
own), so teacher-forcing the draft over prompt + continuation and recording, per position, its top-k
with their n-gram scores lets a grid search measure, for every (w_ctx, w_corpus, k), the tokens a
chain of ``chain`` tokens gets accepted. The best per (target, exit) is stored, with the best pooled
over the targets (used for targets without an entry).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from s2d.drafting.refine import (NGRAM_FILE, ORDER, REFINE_FILE, ContextNgram, CorpusNgram, RefineTable,
                                 RefineWeights, load_corpus_ngram, save_refine_table, top_candidates)
from s2d.drafting.ngram import NgramConfig
from s2d.model.llama import Transformer
from s2d.train.data import DataConfig

W_GRID = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
K_GRID = (4, 8, 16, 32)
CHAIN = 3  # draft tokens per model step of the s2d default (DEFAULT_S2D_OPTIONS)
LOOKUP = NgramConfig(max_n=4, min_n=1, min_match=2)  # the s2d default's lookup (DraftOptions().ngram)


def count_corpus(folder: Path, data: DataConfig, min_count: int = 2) -> dict:
    """In place: the n-gram model of ``data`` tokenized by the draft in ``folder`` (s2d_ngram.npz)."""
    from s2d.model.config import ModelConfig
    from s2d.model.loading import load_tokenizer
    from s2d.train.data import read_documents, tokenize

    if min_count < 1:
        raise ValueError(f"--ngram-min-count must be >= 1, got {min_count}")
    vocab_size = ModelConfig.from_file(folder / "config.json").vocab_size
    tokenizer = load_tokenizer(folder)
    docs = read_documents(data)
    stream = tokenize(docs, tokenizer, tokenizer.eos_token_id).numpy()
    model = CorpusNgram.build(stream, vocab_size, min_count)
    report = {"documents": len(docs), "tokens": int(stream.size), "min_count": min_count,
              "bigrams": int(model.bi_keys.size), "trigrams": int(model.tri_keys.size)}
    path = model.save(folder / NGRAM_FILE, report)
    return {**report, "bytes": path.stat().st_size}


# ----------------------------------------------------------------------------------------------- calibration


@dataclass
class Positions:
    """Per calibrated position (P of them): the draft's top-K and their features, and the target's token."""

    ids: np.ndarray  # [P, K] int64 candidate tokens, best draft logit first
    logq: np.ndarray  # [P, K] float64 draft log-probabilities
    lp_ctx: np.ndarray  # [P, K] float64 log p_ctx
    lp_corpus: np.ndarray  # [P, K] float64 log p_corpus
    truth: np.ndarray  # [P] int64 the target's greedy next token
    seq: np.ndarray  # [P] int64 which continuation the position belongs to (chains do not cross them)
    free: np.ndarray  # [P] bool: lookup (s2d's defaults) has nothing here, so behind lookup the model drafts

    @staticmethod
    def concat(parts: list["Positions"]) -> "Positions":
        return Positions(*(np.concatenate([getattr(p, f) for p in parts]) for f in Positions.__dataclass_fields__))


def continuations(target: Transformer, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """prompt + the target's own greedy continuation of ``tokens`` tokens (EOS ignored), per prompt."""
    from s2d.engine import Engine
    from s2d.sampling import SamplingParams

    engine = Engine(target, eos_token_ids=())
    return [p + engine.generate(p, SamplingParams(), tokens).output for p in prompts]


@torch.inference_mode()
def draft_logits(draft: Transformer, seq: list[int], exits: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Teacher-forced logits [T, V] float32 of each exit over ``seq``."""
    cache = draft.new_cache(num_layers=exits[-1])
    h = draft.embed_tokens(torch.tensor([seq]))
    positions = torch.arange(len(seq))
    out, start = {}, 0
    for e in exits:
        h = draft.run_layers(h, positions, cache, start, e)
        out[e] = draft.logits(h[0]).float().numpy()
        start = e
    return out


def features(seq: list[int], first: int, logits: np.ndarray, corpus: CorpusNgram, k: int, seq_id: int,
             vocab: np.ndarray | None) -> Positions:
    """Positions ``first .. len(seq)-2`` of one sequence: logits [T, V] of the draft at each."""
    from s2d.drafting.ngram import NgramIndex

    ctx = ContextNgram(logits.shape[1])
    ctx.sync(seq[:first])
    index = NgramIndex(LOOKUP)
    rows = []
    for t in range(first, len(seq) - 1):
        ctx.sync(seq[:t + 1])
        index.sync(seq[:t + 1])
        found = index.follow(seq[max(0, t + 1 - LOOKUP.max_n):t + 1])
        row = logits[t].astype(np.float64)
        if vocab is not None:  # the s2d default's head over the most frequent tokens
            sub = row[vocab]
            top = vocab[top_candidates(sub, k)]
        else:
            sub, top = row, top_candidates(row, k)
        peak = sub.max()
        logq = row[top] - (peak + np.log(np.exp(sub - peak).sum()))
        history = seq[max(0, t + 2 - ORDER):t + 1]
        free = found is None or found[1] < LOOKUP.min_match
        rows.append((top, logq, ctx.logprob(history, top.tolist()), corpus.logprob(history, top), seq[t + 1], free))
    ids, logq, lp_ctx, lp_corpus, truth, free = (np.array(col) for col in zip(*rows))
    return Positions(ids, logq, lp_ctx, lp_corpus, truth, np.full(len(truth), seq_id), free)


def accepted(pos: Positions, w: RefineWeights, chain: int = CHAIN, behind_lookup: bool = False) -> tuple[float, float]:
    """(match rate of the refined top choice, mean tokens a greedy chain of ``chain`` starting there gets accepted),
    over every position, or (``behind_lookup``) over those where lookup leaves the drafting to the model."""
    k = min(w.k, pos.ids.shape[1])
    score = pos.logq[:, :k] + w.w_ctx * pos.lp_ctx[:, :k] + w.w_corpus * pos.lp_corpus[:, :k]
    choice = pos.ids[np.arange(len(score)), score.argmax(1)]
    match = choice == pos.truth
    alive = match.copy()  # alive[t]: the chain from t matched at each of its first i+1 tokens
    total = alive.astype(np.int64)
    for i in range(1, chain):  # token i of the chain from t is position t+i, in the same continuation
        nxt = np.zeros_like(alive)
        nxt[:-i] = match[i:] & (pos.seq[i:] == pos.seq[:-i])
        alive &= nxt
        total += alive
    at = pos.free if behind_lookup else slice(None)
    if behind_lookup and not pos.free.any():
        return 0.0, 0.0
    return float(match[at].mean()), float(total[at].mean())


def grid_search(parts: list[Positions], chain: int = CHAIN, behind_lookup: bool = False
                ) -> tuple[RefineWeights, list[dict]]:
    """The weights maximising the summed accepted tokens over ``parts`` (ties: the first, smallest, in grid order)."""
    best, best_value, table = RefineWeights(0.0, 0.0, K_GRID[0]), -1.0, []
    for w_ctx, w_corpus, k in itertools.product(W_GRID, W_GRID, K_GRID):
        w = RefineWeights(w_ctx, w_corpus, k)
        results = [accepted(p, w, chain, behind_lookup) for p in parts]
        value = sum(r[1] for r in results)
        table.append({**asdict(w), "match": [r[0] for r in results], "accepted": [r[1] for r in results]})
        if value > best_value + 1e-12:
            best, best_value = w, value
    return best, table


def calibrate_refine(draft: Transformer, targets: dict[str, Transformer], prompts: list[list[int]],
                     corpus: CorpusNgram, new_tokens: int = 128, prompt_tokens: int = 384,
                     vocab: list[int] | None = None, progress: bool = True
                     ) -> tuple[dict, dict[tuple[int, bool], RefineWeights]]:
    """Per target and exit, the best refine weights alone and behind lookup (at the positions lookup leaves to
    the model): ({fingerprint: entry}, {(exit, behind lookup): weights pooled over the targets})."""
    from s2d.drafting.methods import sorted_exits
    from s2d.drafting.steer import target_fingerprint

    if not prompts:
        raise ValueError("calibrate-refine needs at least one calibration prompt")
    exits = sorted_exits(draft)
    subset = None if vocab is None else np.asarray(vocab, np.int64)
    per_exit: dict[int, list[Positions]] = {e: [] for e in exits}
    entries: dict[str, dict] = {}
    for name, target in targets.items():
        seqs = continuations(target, [p[-prompt_tokens:] for p in prompts], new_tokens)
        collected = {e: [] for e in exits}
        for i, seq in enumerate(seqs):
            logits = draft_logits(draft, seq, exits)
            first = len(seq) - new_tokens - 1  # the last prompt token predicts the first generated one
            for e in exits:
                collected[e].append(features(seq, first, logits[e], corpus, max(K_GRID), i, subset))
        entry = {"name": name, "exits": {}}
        for e in exits:
            pos = Positions.concat(collected[e])
            per_exit[e].append(pos)
            entry["exits"][str(e)] = {kind: measured(pos, behind, f"{name} exit {e} ({kind})", progress)
                                      for kind, behind in (("alone", False), ("behind_lookup", True))}
        entries[target_fingerprint(target)] = entry
    pooled = {(e, behind): grid_search(parts, behind_lookup=behind)[0]
              for e, parts in per_exit.items() for behind in (False, True)}
    return entries, pooled


def measured(pos: Positions, behind_lookup: bool, what: str, progress: bool) -> dict:
    """The best weights for ``pos`` and what they change (positions, top-1 agreement, chain acceptance)."""
    w, _ = grid_search([pos], behind_lookup=behind_lookup)
    base_match, base_acc = accepted(pos, RefineWeights(0.0, 0.0, 1), behind_lookup=behind_lookup)
    match, acc = accepted(pos, w, behind_lookup=behind_lookup)
    if progress:
        print(f"calibrate-refine {what}: w_ctx {w.w_ctx}, w_corpus {w.w_corpus}, k {w.k}: top-1 = target "
              f"{base_match:.3f} -> {match:.3f}, chain of {CHAIN} accepts {base_acc:.3f} -> {acc:.3f}", file=sys.stderr)
    return {"weights": asdict(w), "positions": int(pos.free.sum() if behind_lookup else len(pos.truth)),
            "match": round(match, 4), "base_match": round(base_match, 4), "accepted": round(acc, 4),
            "base_accepted": round(base_acc, 4)}


def store_calibration(folder: Path, entries: dict, pooled: dict[tuple[int, bool], RefineWeights], meta: dict) -> Path:
    """Merge into ``folder/s2d_refine.json``: new targets' entries replace theirs, the pooled default is the new one."""
    old = RefineTable.load(folder).report
    merged = {**old.get("targets", {}), **entries}
    return save_refine_table(folder, merged, pooled, {**{k: v for k, v in old.items()
                                                          if k not in ("targets", "pooled")}, **meta})


def calibrate_into(folder: Path, targets: dict[str, str], prompts: list[str], dtype: str = "bfloat16",
                   new_tokens: int = 128, progress: bool = True) -> dict:
    """Calibrate the draft in ``folder`` (which must hold its n-gram file) for ``targets``, writing beside it."""
    from s2d.drafting.methods import DEFAULT_S2D_VOCAB
    from s2d.drafting.vocab import load_vocab
    from s2d.model.loading import load_family

    tokenizer, models, draft = load_family(targets, str(folder), dtype, "cpu")
    corpus = load_corpus_ngram(folder, draft.cfg.vocab_size)
    if corpus is None:
        raise ValueError(f"{folder} has no {NGRAM_FILE}; write it first with `s2d train-draft --objective ngram`")
    ranked = load_vocab(folder, draft.cfg.vocab_size)
    vocab = ranked[:DEFAULT_S2D_VOCAB] if ranked else None  # calibrated as s2d-refine drafts: its head
    ids = [tokenizer(p).input_ids for p in prompts]
    entries, pooled = calibrate_refine(draft, models, ids, corpus, new_tokens, vocab=vocab, progress=progress)
    meta = {"prompts": len(prompts), "new_tokens": new_tokens, "chain": CHAIN, "dtype": dtype,
            "draft_vocab": len(vocab) if vocab else 0, "grid": {"w": list(W_GRID), "k": list(K_GRID)}}
    store_calibration(folder, entries, pooled, meta)
    return {"targets": {e["name"]: e["exits"] for e in entries.values()},
            "pooled": {f"{e}{'+lookup' if behind else ''}": asdict(w) for (e, behind), w in pooled.items()}}


def ngram_draft(draft: str | Path, out: str | Path, data: DataConfig, min_count: int = 2,
                targets: dict[str, str] | None = None, prompts: list[str] | None = None, dtype: str = "bfloat16",
                progress: bool = True) -> dict:
    """Copy ``draft`` to ``out`` with its corpus n-gram model beside it, calibrated for ``targets`` if given."""
    from s2d.train.beside import write_draft_with

    if targets and not prompts:
        raise ValueError("--objective ngram with --targets needs --calibration (prompts to calibrate the weights on)")

    def add(folder: Path) -> dict:
        report = {"ngram": count_corpus(folder, data, min_count)}
        if targets:
            report["calibration"] = calibrate_into(folder, targets, prompts or [], dtype, progress=progress)
        return report

    return write_draft_with(draft, out, data, "train-draft --objective ngram", add, needs_exits=False)


# ------------------------------------------------------------------------------------------------------ CLI


def read_calibration_prompts(paths: list[Path], limit: int | None = None) -> list[str]:
    from s2d.args import read_prompts

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit must be an integer >= 1 (the prompts to use), got {limit!r}")
    prompts = [p for path in paths for p in read_prompts(path, 2**31)]
    return prompts[:limit]


def add_calibrate_refine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate-refine", help="calibrate s2d-refine's weights per target (stored beside the draft)",
                       description="Grid-search the refine weights (w_ctx, w_corpus, k) per target and exit on the "
                                   "targets' own greedy continuations of --prompts; writes DRAFT/s2d_refine.json "
                                   "(merged: other targets' entries are kept). The draft needs its n-gram file "
                                   "(`s2d train-draft --objective ngram`).")
    p.add_argument("--target", action="append", required=True, help="[NAME=]checkpoint; repeat for several")
    p.add_argument("--draft", type=Path, required=True, help="the sorted draft; the result is stored beside it")
    p.add_argument("--prompts", type=Path, nargs="+", required=True,
                   help="JSONL files (Spec-Bench 'turns' or 'text') or text files: not the benchmark's prompts")
    p.add_argument("--limit", type=int, default=None, help="prompts to use (default all)")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per prompt (default 128)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.set_defaults(func=run_calibrate_refine)


def run_calibrate_refine(args: argparse.Namespace) -> int:
    from s2d.args import parse_targets

    if args.new_tokens < CHAIN + 1:
        raise ValueError(f"--new-tokens must be >= {CHAIN + 1}, got {args.new_tokens}")
    prompts = read_calibration_prompts(args.prompts, args.limit)
    RefineTable.load(args.draft)  # an existing file must be readable: it is merged into
    report = calibrate_into(args.draft, parse_targets(args.target), prompts, args.dtype, args.new_tokens)
    print(json.dumps(report))
    print(f"saved to {args.draft / REFINE_FILE}", file=sys.stderr)
    return 0
