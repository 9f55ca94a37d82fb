"""Training the steering maps (``s2d/drafting/steer.py``): one per target and exit, the draft frozen.

For a training sequence, the draft's exit hidden state at position t (which predicts token t+1) is
steered by the target's last hidden state at t-1-j: at decoding time a block that starts right
after the target emitted token n drafts position n+j with the state of the row that chose token n,
j = 0, 1, ... A random j in [0, offsets) per position covers the block's positions. The loss is the
cross-entropy of the steered draft against the target's full distribution (distillation toward the
target through the map alone).

Why frozen: the draft is shared by every target and still loads as a plain checkpoint; a map per
target is all that differs, and training it needs the draft's hidden states only once per batch
(no backward through the draft), so three targets train in minutes on a CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from s2d.drafting.steer import SteeringMaps, steering_vector
from s2d.model.llama import Transformer
from s2d.train.data import global_batch


@dataclass(frozen=True)
class SteerTraining:
    steps: int = 150
    batch_size: int = 8  # sequences per step
    seq_len: int = 256
    offsets: int = 4  # block positions trained for: j in [0, offsets)
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.offsets < 1 or not self.lr > 0:
            raise ValueError("steer training needs steps, batch_size and offsets >= 1 and lr > 0")
        if self.seq_len < self.offsets + 2:
            raise ValueError(f"seq_len must exceed offsets + 1, got {self.seq_len}")


@torch.no_grad()
def draft_exit_states(draft: Transformer, ids: Tensor, exits: tuple[int, ...]) -> dict[int, Tensor]:
    """ids [B, T] -> {exit: the draft's hidden state there, before the final norm [B, T, C] float32}."""
    bsz, length = ids.shape
    cache = draft.new_cache(batch=bsz, capacity=length, num_layers=max(exits))
    positions = torch.arange(length, device=ids.device)
    hidden, done, out = draft.embed_tokens(ids), 0, {}
    for e in sorted(exits):
        hidden = draft.run_layers(hidden, positions, cache, done, e)
        done = e
        out[e] = hidden.float()
    return out


@torch.no_grad()
def target_states(target: Transformer, ids: Tensor) -> tuple[Tensor, Tensor]:
    """ids [B, T] -> (last hidden states [B, T, Ct] float32, probabilities [B, T, V] float32)."""
    bsz, length = ids.shape
    cache = target.new_cache(batch=bsz, capacity=length)
    hidden = target.run_layers(target.embed_tokens(ids), torch.arange(length, device=ids.device), cache)
    return hidden.float(), target.logits(hidden).float().softmax(-1)


def steered_loss(draft: Transformer, matrix: Tensor, draft_h: Tensor, target_h: Tensor, target_p: Tensor,
                 offsets: Tensor) -> Tensor:
    """Cross-entropy of the steered draft against the target at positions J..T-1.

    draft_h [B, T, Cd]; target_h [B, T, Ct]; target_p [B, T, V]; offsets [T] (j per position, < J).
    """
    length = draft_h.shape[1]
    first = int(offsets.max()) + 1
    t = torch.arange(first, length, device=draft_h.device)
    steer = steering_vector(matrix, target_h[:, t - 1 - offsets[first:]], draft.cfg.rms_norm_eps)
    logits = draft.logits((draft_h[:, first:] + steer).to(draft.lm_head.weight.dtype)).float()
    return -(target_p[:, first:] * logits.log_softmax(-1)).sum(-1).mean()


@torch.no_grad()
def agreement(draft: Transformer, matrix: Tensor | None, draft_h: Tensor, target_h: Tensor, target_p: Tensor,
              offset: int) -> float:
    """How often the (steered) draft's argmax equals the target's, every position at block offset ``offset``."""
    length = draft_h.shape[1]
    h = draft_h[:, offset + 1:]
    if matrix is not None:
        h = h + steering_vector(matrix, target_h[:, : length - 1 - offset], draft.cfg.rms_norm_eps)
    logits = draft.logits(h.to(draft.lm_head.weight.dtype))
    return float((logits.argmax(-1) == target_p[:, offset + 1:].argmax(-1)).float().mean())


def train_maps(draft: Transformer, targets: dict[str, Transformer], rows: Tensor, exits: tuple[int, ...],
               cfg: SteerTraining, held_out: Tensor | None = None, progress: bool = True) -> tuple[SteeringMaps, dict]:
    """Fit one map per (target, exit) on ``rows`` [R, >= seq_len] token ids; report agreement on ``held_out``.

    ``draft`` is used as it is (frozen); training runs its head in float32 for stable gradients.
    """
    if rows.shape[1] < cfg.seq_len:
        raise ValueError(f"training rows hold {rows.shape[1]} tokens, fewer than seq_len {cfg.seq_len}")
    for name, target in targets.items():
        if target.cfg.vocab_size != draft.cfg.vocab_size:
            raise ValueError(f"target {name} has vocab_size {target.cfg.vocab_size}, the draft {draft.cfg.vocab_size}")
    head_model = draft.float() if draft.dtype != torch.float32 else draft
    for p in head_model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    matrices = {(name, e): torch.zeros(draft.cfg.hidden_size, t.cfg.hidden_size, requires_grad=True)
                for name, t in targets.items() for e in exits}
    opt = torch.optim.Adam(list(matrices.values()), lr=cfg.lr)
    losses: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc="steering maps", unit="step", disable=not progress):
        ids = rows[global_batch(step, rows.shape[0], cfg.batch_size, cfg.seed), : cfg.seq_len].long()
        draft_h = draft_exit_states(head_model, ids, exits)
        offsets = torch.randint(0, cfg.offsets, (cfg.seq_len,), generator=gen)
        opt.zero_grad()
        for name, target in targets.items():
            target_h, target_p = target_states(target, ids)
            for e in exits:
                loss = steered_loss(head_model, matrices[name, e], draft_h[e], target_h, target_p, offsets)
                loss.backward()
                losses[f"{name}.exit{e}"] = round(float(loss.detach()), 4)
        opt.step()
    maps = SteeringMaps(draft.cfg.hidden_size)
    for (name, e), matrix in matrices.items():
        maps.add(targets[name], name, e, matrix)
    report: dict = {"steps": cfg.steps, "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
                    "elapsed_s": round(time.perf_counter() - t0, 1), "final_loss": losses}
    if held_out is not None:
        report["held_out_agreement"] = evaluate(head_model, targets, maps, held_out[:, : cfg.seq_len].long(), exits,
                                                cfg.offsets)
    return maps, report


def evaluate(draft: Transformer, targets: dict[str, Transformer], maps: SteeringMaps, ids: Tensor,
             exits: tuple[int, ...], offsets: int) -> dict:
    """{target.exitE: {"plain": [per offset], "steered": [per offset]}}: teacher-forced argmax agreement."""
    draft_h = draft_exit_states(draft, ids, exits)
    out = {}
    for name, target in targets.items():
        target_h, target_p = target_states(target, ids)
        for e in exits:
            matrix = maps.for_target(target, e)
            out[f"{name}.exit{e}"] = {
                kind: [round(agreement(draft, m, draft_h[e], target_h, target_p, j), 4) for j in range(offsets)]
                for kind, m in (("plain", None), ("steered", matrix))}
    return out


def train_steering_into(draft_dir: str | Path, out: str | Path, target_paths: tuple[Path, ...], data,
                        exits: tuple[int, ...] | None, cfg: SteerTraining, target_dtype: str = "bfloat16",
                        progress: bool = True) -> dict:
    """``s2d train-draft --objective steer``: the draft copied to ``out`` with its steering maps beside it."""
    from dataclasses import replace

    from s2d.drafting.methods import default_exit
    from s2d.model.loading import load_model, load_tokenizer
    from s2d.train.beside import write_draft_with
    from s2d.train.data import load_packed, within_context
    from s2d.train.teachers import check_tokenizers

    if not target_paths:
        raise ValueError("--objective steer needs --targets: the targets to train a map for")

    def add(folder: Path) -> dict:
        draft = load_model(folder, dtype="float32")
        chosen = exits or (default_exit(draft),)
        if bad := [e for e in chosen if not 1 <= e <= draft.cfg.num_layers]:
            raise ValueError(f"exits {bad} are outside the draft's 1..{draft.cfg.num_layers} layers")
        tokenizer = load_tokenizer(folder)
        check_tokenizers(tokenizer, target_paths)
        targets = {Path(p).name: load_model(p, dtype=target_dtype) for p in target_paths}
        if len(targets) != len(target_paths):
            raise ValueError("two --targets share a directory name; the maps are reported by name")
        # Rows every model can run: a draft or target whose context is shorter than seq_len sets it.
        context = min(m.cfg.max_positions for m in (draft, *targets.values()))
        packing = within_context(replace(data, seq_len=cfg.seq_len), context)
        rows = load_packed(packing, tokenizer).rows
        fit = replace(cfg, seq_len=packing.seq_len)
        held = rows[-min(16, max(1, rows.shape[0] // 10)):]
        train = rows[: rows.shape[0] - held.shape[0]] if rows.shape[0] > held.shape[0] else rows
        cfg_fit = replace(fit, batch_size=min(fit.batch_size, train.shape[0]))
        maps, report = train_maps(draft, targets, train, tuple(chosen), cfg_fit, held, progress)
        maps.save(folder)
        return {"exits": list(chosen), **report}

    return write_draft_with(draft_dir, out, data, "s2d train-draft --objective steer", add, needs_exits=False)
