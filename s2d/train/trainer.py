"""The training loop: SoFT and multi-target distillation of a sorted draft, with DDP and resume.

Every random choice of a step (its batch, which sequences are on-policy, their samples) is a pure
function of (seed, step, row), so resuming needs only the weights, the optimizer and the step, and a
global batch computes the same thing whether one process or several share it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as tdist
from torch import Tensor

from s2d.model.llama import CPU_BF16_UPCAST
from s2d.model.loading import DTYPES, load_tokenizer
from s2d.outputs import check_not_input, check_output_dir, swap_in, temporary_sibling
from s2d.train.checkpoint import clean_partial, latest_checkpoint, load_checkpoint, save_checkpoint
from s2d.train.config import TrainConfig
from s2d.train.data import PackedData, global_batch, load_packed, save_packed
from s2d.train.draft import SortedDraft, init_from_checkpoint, init_random, sample_continuations, to_runtime
from s2d.train.export import save_draft
from s2d.train.losses import TeacherMixture, exit_cross_entropies, exit_divergences
from s2d.train.teachers import Teachers, check_tokenizers

Status = Literal["completed", "time_limit", "interrupted"]


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    status: Status
    step: int  # optimizer steps done
    tokens: int  # training tokens seen (all processes)
    elapsed_s: float  # training time, summed over resumed sessions
    loss: float  # the last step's loss


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    owns_group: bool = False  # we initialised the process group, so we tear it down

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def all_reduce(self, t: Tensor, op=tdist.ReduceOp.SUM) -> Tensor:
        if self.world > 1:
            tdist.all_reduce(t, op=op)
        return t


def setup_distributed(device: str) -> Dist:
    """Join the process group torchrun (or a test) describes in the environment; one process otherwise."""
    if tdist.is_available() and tdist.is_initialized():
        return Dist(tdist.get_rank(), tdist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    tdist.init_process_group(backend=backend)
    return Dist(tdist.get_rank(), tdist.get_world_size(), owns_group=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def on_policy_plan(step: int, cfg: TrainConfig) -> tuple[Tensor, int]:
    """For the global batch of ``step``: which rows are on-policy [G] bool, and the exit that samples them.

    One exit per step (drawn at random), not per row: sampling is sequential, token by token, and one
    batched loop per step costs a fraction of one loop per exit.
    """
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step + 1)
    flags = torch.rand(cfg.batch_size, generator=gen) < cfg.on_policy
    exit_layers = cfg.exits[int(torch.randint(len(cfg.exits), (1,), generator=gen))]
    return flags, exit_layers


def row_generator(cfg: TrainConfig, step: int, row: int) -> torch.Generator:
    return torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 65_537 + row) % (2**63))


class JsonlLog:
    """The JSON-lines training log; on resume, lines of steps after the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, path)
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class StopFlag:
    """SIGTERM / SIGINT ask for a clean stop: finish the step, checkpoint, exit."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers, kills still leave complete checkpoints
            pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def train_draft(cfg: TrainConfig) -> TrainResult:
    """Train (or resume training) the sorted draft ``cfg`` describes; the draft is written to cfg.out_dir."""
    dist = setup_distributed(cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        if dist.owns_group:
            tdist.destroy_process_group()


def _load_tokenizer(cfg: TrainConfig):
    source = cfg.tokenizer or cfg.init or cfg.targets[0]
    tokenizer = load_tokenizer(source)
    check_tokenizers(tokenizer, cfg.targets, name=f"the draft's tokenizer ({source})")
    return tokenizer


RUN_FILE = "train_config.json"  # a folder holding it is a train-draft run (ours to resume or restart)


class TrainingDiverged(ValueError):
    """The loss or the gradients stopped being finite; nothing after the last good checkpoint was kept."""


def _check_run_dir(cfg: TrainConfig) -> Path | None:
    """Check the output folder without writing anything; returns the checkpoint to resume from, if any.

    The folder must be new, empty, or a train-draft run. A run with checkpoints resumes only under
    the same config; a run without any (it failed before its first checkpoint) is simply restarted,
    so a corrected command is never refused because of the failed one.
    """
    out = cfg.out_dir
    inputs = [("--init", cfg.init), ("--tokenizer", cfg.tokenizer), *(("--targets", t) for t in cfg.targets),
              *(("--data", p) for p in cfg.data.paths)]
    check_not_input(out, inputs)
    if not check_output_dir(out, lambda o: (o / RUN_FILE).is_file(), f"a train-draft run (it has no {RUN_FILE})"):
        return None
    resume = latest_checkpoint(out / "checkpoints")
    if resume is not None:
        try:
            saved = json.loads((out / RUN_FILE).read_text())
        except ValueError as err:
            raise ValueError(f"{out / RUN_FILE} is not valid JSON ({err}); choose another output folder") from None
        cfg.check_resumable(saved if isinstance(saved, dict) else {})
    return resume


def _start_run(cfg: TrainConfig, data: PackedData) -> None:
    """Write the run's record (config, data list, token cache): only once everything was validated.

    A new run is written in a temporary folder renamed into place, so a crash leaves no half run.
    """
    out = cfg.out_dir
    fresh = not out.exists() or not any(out.iterdir())
    folder = temporary_sibling(out) if fresh else out
    try:
        clean_partial(folder / "checkpoints")
        if not data.from_cache:
            save_packed(data, folder / "tokens.pt")
        _write_json(folder / "data_files.json", {"num_documents": len(data.sources), "num_tokens": data.num_tokens,
                                                 "num_sequences": data.rows.shape[0], "documents": data.sources})
        _write_json(folder / RUN_FILE, cfg.to_json())
        if fresh:
            swap_in(folder, out)
    except BaseException:
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _load_data(cfg: TrainConfig, tokenizer) -> PackedData:
    """Rank 0's read of the data (the token cache is reused, not yet written)."""
    data = load_packed(cfg.data, tokenizer, cfg.out_dir / "tokens.pt", save=False)
    _check_rows(cfg, data)
    return data


def _check_rows(cfg: TrainConfig, data: PackedData) -> None:
    if data.rows.shape[0] < cfg.batch_size:
        raise ValueError(f"the training data packs into {data.rows.shape[0]} sequences of {cfg.data.seq_len} tokens, "
                         f"fewer than one batch of {cfg.batch_size}")


def _build_draft(cfg: TrainConfig, tokenizer) -> SortedDraft:
    if cfg.init is not None:
        model = init_from_checkpoint(cfg.init, cfg.depth)
    else:
        model = init_random(cfg.shape, cfg.depth, tokenizer, cfg.seed)
    if model.config.max_position_embeddings < cfg.data.seq_len:
        raise ValueError(f"seq_len {cfg.data.seq_len} exceeds the draft's context of {model.config.max_position_embeddings}")
    return SortedDraft(model.to(cfg.device), cfg.exits)


def _finite_weights(draft: SortedDraft) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in draft.parameters())


def build_optimizer(draft: SortedDraft, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norms (1-D): decaying them toward 0 fights the normalisation.
    params = [p for p in draft.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def _local_rows(cfg: TrainConfig, data: PackedData, batch_rows: Tensor, mine: range, flags: Tensor,
                exit_layers: int, draft: SortedDraft, step: int) -> tuple[Tensor, Tensor]:
    """This process's rows [L, T+1] of the global batch (on-policy ones with a draft-sampled tail) and
    the mask [L, T] of labels that are data, not the draft's own samples."""
    ids = data.rows[batch_rows[mine.start:mine.stop]].long().to(cfg.device)
    seq_len, n_new = cfg.data.seq_len, cfg.on_policy_tokens
    ce_mask = torch.ones(ids.shape[0], seq_len, dtype=torch.bool, device=cfg.device)
    local = [i for i, g in enumerate(mine) if flags[g]]
    if local:
        keep = seq_len + 1 - n_new  # data prefix length of an on-policy row
        gens = [row_generator(cfg, step, mine[i]) for i in local]
        ids[local, keep:] = sample_continuations(to_runtime(draft.model), exit_layers, ids[local, :keep], n_new,
                                                 cfg.on_policy_temperature, gens)
        ce_mask[local, keep - 1:] = False  # labels from index keep-1 on are the draft's own samples
    return ids, ce_mask


def _accumulate_gradients(cfg: TrainConfig, model: torch.nn.Module, teachers: Teachers | None, step_ids: Tensor,
                          step_mask: Tensor, n_ce: int, n_kd: int, world: int, autocast) -> Tensor:
    """Forward + backward over this process's rows in micro-batches; gradients add up in the parameters.

    step_ids [L, T+1]; step_mask [L, T] (True = the label is data). The loss of each micro-batch is
    its token sum over the *global* counts n_ce, n_kd, times ``world`` because DDP averages gradients.
    Returns [2E + 1]: per-exit CE sums, per-exit divergence sums, and the loss (for the log).
    """
    n_exits = len(cfg.exits)
    micro_steps = step_ids.shape[0] // cfg.micro_batch_size
    sums = torch.zeros(2 * n_exits + 1)
    for m in range(micro_steps):
        rows = slice(m * cfg.micro_batch_size, (m + 1) * cfg.micro_batch_size)
        inputs, labels = step_ids[rows, :-1], step_ids[rows, 1:].reshape(-1)
        mask = step_mask[rows].reshape(-1).float()
        teacher = TeacherMixture(teachers.logits(inputs), cfg.divergence) if teachers else None
        # Gradients are all-reduced once per step, on the last micro-batch.
        sync = nullcontext() if world == 1 or m == micro_steps - 1 else model.no_sync()
        with sync:
            with autocast:
                exit_logits = [z.reshape(-1, z.shape[-1]) for z in model(inputs)]  # E x [b*T, V]
            with torch.set_grad_enabled(cfg.ce_weight > 0):  # CE is always logged, differentiated if weighted
                ce = exit_cross_entropies(exit_logits, labels)  # [E, b*T]; soft_loss = ce.mean(0)
                loss = cfg.ce_weight * (ce.mean(0) * mask).sum() / n_ce
            sums[:n_exits] += (ce.detach() * mask).sum(-1).cpu()
            if teacher is not None:
                kd = exit_divergences(exit_logits, teacher)  # [E, b*T]; distill_loss = kd.mean(0)
                loss = loss + cfg.distill_weight * kd.mean(0).sum() / n_kd
                sums[n_exits:2 * n_exits] += kd.detach().sum(-1).cpu()
            (loss * world).backward()
        sums[-1] += float(loss.detach())
    return sums


def _diverged(cfg: TrainConfig, log: "JsonlLog | None", bar, step: int, what: str) -> None:
    """Stop the run: non-finite numbers are never trained on, saved or exported."""
    if bar is not None:
        bar.close()
    if log is not None:
        log.write({"event": "diverged", "step": step, "detail": what})
    last = latest_checkpoint(cfg.out_dir / "checkpoints")
    kept = f"the last good checkpoint, {last.name}, is kept" if last else "no checkpoint was saved before it"
    raise TrainingDiverged(f"training diverged at step {step} ({what}): stopped, {kept}; lower --lr, check "
                           "--init's weights and the data, or train in float32 (--no-autocast); to start over "
                           f"with other settings, delete {cfg.out_dir / 'checkpoints'} or choose another --out")


def _train(cfg: TrainConfig, dist: Dist) -> TrainResult:
    torch.manual_seed(cfg.seed)
    # Everything is validated before anything is written: a refused command leaves no trace in out_dir.
    if cfg.batch_size % (cfg.micro_batch_size * dist.world):
        raise ValueError(f"batch_size {cfg.batch_size} must split into micro-batches of {cfg.micro_batch_size} "
                         f"over {dist.world} processes")
    tokenizer = _load_tokenizer(cfg)
    resume = _check_run_dir(cfg)
    dist.barrier()  # every rank has read the old run before rank 0 rewrites it
    draft = _build_draft(cfg, tokenizer)
    teachers = None
    if cfg.distill_weight > 0:
        teachers = Teachers(cfg.targets, cfg.teacher_dtype, cfg.device, draft.model.config.vocab_size, cfg.data.seq_len)
    if dist.rank == 0:
        data = _load_data(cfg, tokenizer)
        _start_run(cfg, data)
    dist.barrier()
    if dist.rank != 0:
        data = load_packed(cfg.data, tokenizer, cfg.out_dir / "tokens.pt", save=False)  # rank 0 wrote the cache
        _check_rows(cfg, data)
    optimizer = build_optimizer(draft, cfg)
    state: dict[str, Any] = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    if resume is not None:
        state = load_checkpoint(resume, draft, optimizer)
    start = int(state["step"])
    draft.train()  # from_pretrained leaves models in eval mode
    model: torch.nn.Module = draft
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(draft)
    main = dist.rank == 0
    log = JsonlLog(cfg.out_dir / "train_log.jsonl", start if resume else None) if main else None
    if log and resume:
        log.write({"event": "resume", "step": start, "checkpoint": resume.name})

    seq_len, n_exits = cfg.data.seq_len, len(cfg.exits)
    per_rank = cfg.batch_size // dist.world
    autocast = torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.autocast)
    if main and cfg.autocast and torch.device(cfg.device).type == "cpu" and CPU_BF16_UPCAST:
        # On an AVX2-only EPYC one SoFT step of the zoo draft took minutes under autocast
        # (benchmarks/RESULTS.md, "Measurements behind the code").
        warnings.warn("bfloat16 autocast on a CPU without native bfloat16 (no AVX512-BF16/AMX) is very slow; "
                      "train in float32 with --no-autocast (autocast=False)", stacklevel=2)
    status: Status = "completed"
    loss_value = float(state.get("loss", math.nan))  # a finished run resumed has no step left to run
    bar = None
    if main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train-draft", unit="step", dynamic_ncols=True)
    elapsed = float(state["elapsed_s"])
    tokens = int(state["tokens"])
    step = start
    with StopFlag() as stop:
        while step < cfg.steps:
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            batch_rows = global_batch(step, data.rows.shape[0], cfg.batch_size, cfg.seed)
            flags, policy_exit = on_policy_plan(step, cfg)
            # Normalisers over the whole global batch, known before any forward: the loss is a global
            # token mean however the batch is split (DDP averages gradients, hence the * world below).
            n_ce = cfg.batch_size * seq_len - int(flags.sum()) * cfg.on_policy_tokens
            n_kd = cfg.batch_size * seq_len
            mine = range(dist.rank * per_rank, (dist.rank + 1) * per_rank)
            step_ids, step_mask = _local_rows(cfg, data, batch_rows, mine, flags, policy_exit, draft, step)
            sums = _accumulate_gradients(cfg, model, teachers, step_ids, step_mask, n_ce, n_kd, dist.world, autocast)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(draft.parameters(), cfg.grad_clip or float("inf")))
            dist.all_reduce(sums)
            loss_value = float(sums[-1])
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                # Stop before the update: the weights are still those of the last finite step.
                _diverged(cfg, log, bar, step + 1, f"loss {loss_value}, gradient norm {grad_norm}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += cfg.batch_size * seq_len
            dt = time.perf_counter() - t0
            elapsed += dt
            flag = torch.tensor([float(stop.requested), float(cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes)])
            dist.all_reduce(flag, op=tdist.ReduceOp.MAX)
            state = {"step": step, "tokens": tokens, "elapsed_s": elapsed, "loss": loss_value}
            if main:
                tok_s = cfg.batch_size * seq_len / dt
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:.0f}")
                    bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    record = {"step": step, "loss": loss_value, "lr": lr_at(step - 1, cfg), "grad_norm": grad_norm,
                              "tokens": tokens, "tokens_per_s": tok_s, "elapsed_s": round(elapsed, 3),
                              "ce": {str(e): float(sums[i]) / n_ce for i, e in enumerate(cfg.exits)},
                              "on_policy_rows": int(flags.sum()), "on_policy_exit": policy_exit}
                    if teachers:
                        record[f"{cfg.divergence.kind}"] = {str(e): float(sums[n_exits + i]) / n_kd
                                                            for i, e in enumerate(cfg.exits)}
                    log.write(record)
            stopping = bool(flag[0]) or bool(flag[1])
            if step % cfg.save_every == 0 or step == cfg.steps or stopping:
                if not _finite_weights(draft):  # a huge learning rate can overflow weights with a finite loss
                    _diverged(cfg, log, bar, step, "the weights after the update hold NaN or inf")
            if main and (step % cfg.save_every == 0 or step == cfg.steps or stopping):
                save_checkpoint(cfg.out_dir / "checkpoints", step, draft, optimizer, state, cfg.keep_checkpoints)
            if stopping:
                status = "interrupted" if flag[0] else "time_limit"
                break
    if bar is not None:
        bar.close()
    if main:
        if status != "interrupted":
            save_draft(draft.model, cfg.exits, tokenizer, cfg.out_dir, DTYPES[cfg.save_dtype])
        log.write({"event": status, "step": step, "tokens": tokens, "elapsed_s": round(elapsed, 3)})
    dist.barrier()
    return TrainResult(cfg.out_dir, status, step, tokens, elapsed, loss_value)
