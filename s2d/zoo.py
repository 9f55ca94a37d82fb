"""``s2d zoo build``: a target family and its sorted draft, trained from a corpus every machine has.

The recipe of the project's benchmark family (``../shared/zoo``), made runnable anywhere: by default
the running interpreter's standard library (``*.py``, site-packages excluded, files <= 400 kB).

    s2d zoo build --out zoo                 # zoo-s, zoo-m, zoo-l and draft/ (about 2 hours on 2 cores)
    s2d zoo build --out zoo --minutes 60    # the same within 60 training minutes (fewer steps)
    s2d zoo build --out toy --preset tiny   # a toy family in seconds (the tests)

Stages, each skipped when ``build.json`` says it is done and its artefact is there (re-running the
command resumes; a training stage cut short resumes from its last checkpoint):

1. ``split``: files whose ``int(sha1(relative path), 16) % 20 == 0`` are held out (``split.json``).
2. ``tokenizer``: byte-level BPE (``tokenizers``) on the training files, ``<|endoftext|>`` = id 0 as
   BOS, EOS and PAD (``tokenizer/``).
3. one stage per target (``zoo-s``, ...): a Llama trained from scratch (train-draft with a random
   initialisation and one exit, its last layer; SoFT with one exit is plain next-token training),
   written as a plain checkpoint with ``zoo_info.json`` (tokens seen, held-out loss).
4. ``draft``: the first K layers of the smallest target, SoFT-trained with exits 1..K, then its exit
   gates and its tokens ranked by frequency, as ``benchmarks/build_zoo_draft.py`` does (``draft/``).

Time budget (``--minutes``): training minutes (the trainer's step time; BPE, tokenizing and the exit
gates come on top), split over the training stages in proportion to their estimated compute (steps x
tokens per step x matmul parameters per token, the draft's head counted once per exit), each share
taken from what earlier stages left. A stage first times a few warm-up steps, then trains as many
steps as fit its share (at most the preset's), so its cosine schedule ends within it; the trainer's
time guard stops it at the share in any case. Without a budget every stage trains the preset's steps,
which makes the build reproducible from its seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EOS_TOKEN = "<|endoftext|>"  # id 0: BOS, EOS and PAD
BUILD_FILE = "build.json"  # a folder holding it is a zoo build (ours to resume)
SPLIT_FILE = "split.json"
TOKENIZER_DIR = "tokenizer"
DRAFT_DIR = "draft"
RUNS_DIR = "runs"  # training runs: logs, configs, token caches (checkpoints are removed once a stage is done)
INFO_FILE = "zoo_info.json"
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json")
EXCLUDE_DIRS = ("site-packages", "dist-packages")  # installed packages are not the standard library
PROBE_STEPS = 3  # warm-up steps timed to fit a stage's steps to its share of the budget


@dataclass(frozen=True)
class TargetSize:
    layers: int
    hidden: int
    ffn: int
    heads: int


@dataclass(frozen=True)
class Preset:
    sizes: dict[str, TargetSize]  # smallest first; the draft starts from the smallest one built
    vocab_size: int
    draft_exits: tuple[int, ...]
    seq_len: int
    batch_size: int  # sequences per optimizer step
    micro_batch_size: int
    target_steps: int
    target_lr: float
    draft_steps: int
    draft_lr: float
    warmup_steps: int
    gate_positions: int
    validation_rows: int  # held-out sequences of seq_len tokens scored for zoo_info.json
    max_positions: int
    max_file_bytes: int  # larger files are skipped (generated tables, not code)
    bf16: bool  # bfloat16 autocast where the CPU multiplies bf16 natively (else float32)


PRESETS = {
    # The shapes of ../shared/zoo (its README's table); 8192 tokens per step as it trained.
    "zoo": Preset(sizes={"s": TargetSize(4, 384, 1024, 6), "m": TargetSize(8, 512, 1408, 8),
                         "l": TargetSize(12, 576, 1536, 9)},
                  vocab_size=8192, draft_exits=(1, 2, 3), seq_len=1024, batch_size=8, micro_batch_size=2,
                  target_steps=600, target_lr=6e-4, draft_steps=320, draft_lr=4e-4, warmup_steps=20,
                  gate_positions=200_000, validation_rows=32, max_positions=2048, max_file_bytes=400_000, bf16=True),
    # Seconds on a laptop: for tests and for trying the recipe.
    "tiny": Preset(sizes={"s": TargetSize(3, 32, 64, 2), "m": TargetSize(4, 48, 96, 3),
                          "l": TargetSize(5, 64, 128, 4)},
                   vocab_size=320, draft_exits=(1, 2), seq_len=32, batch_size=4, micro_batch_size=4,
                   target_steps=3, target_lr=3e-3, draft_steps=3, draft_lr=3e-3, warmup_steps=1,
                   gate_positions=256, validation_rows=2, max_positions=256, max_file_bytes=400_000, bf16=False),
}


def default_corpus() -> Path:
    """The running interpreter's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relative_path: str) -> bool:
    """The zoo's rule: a file is held out when int(sha1(its path relative to the corpus), 16) % 20 == 0."""
    return int(hashlib.sha1(relative_path.encode()).hexdigest(), 16) % 20 == 0


@dataclass(frozen=True)
class ZooBuild:
    out: Path
    preset: str = "zoo"
    sizes: tuple[str, ...] = ()  # keys of the preset's sizes; () = all
    corpus: Path = field(default_factory=default_corpus)
    seed: int = 0
    vocab_size: int | None = None  # default: the preset's
    draft_exits: tuple[int, ...] = ()  # default: the preset's
    steps: int | None = None  # optimizer steps of every training stage; default: the preset's
    minutes: float | None = None  # training-time budget of the whole build; None: the preset's steps
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "corpus", Path(self.corpus))
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        known = PRESETS[self.preset].sizes
        unknown = [s for s in self.sizes if s not in known]
        if unknown or len(set(self.sizes)) != len(self.sizes):
            raise ValueError(f"--sizes must name distinct sizes of preset {self.preset!r} ({', '.join(known)}), "
                             f"got {','.join(self.sizes)}")
        object.__setattr__(self, "sizes", tuple(s for s in known if s in self.sizes) if self.sizes else tuple(known))
        if self.vocab_size is not None and self.vocab_size < 257:
            raise ValueError(f"--vocab-size must be >= 257 (256 bytes and {EOS_TOKEN}), got {self.vocab_size}")
        exits = tuple(self.draft_exits) or PRESETS[self.preset].draft_exits
        object.__setattr__(self, "draft_exits", exits)
        smallest = known[self.sizes[0]].layers
        if len(exits) < 2 or list(exits) != sorted(set(exits)) or exits[0] < 1:
            raise ValueError(f"--draft-exits must be at least two ascending layer counts, got {list(exits)}")
        if exits[-1] >= smallest:
            raise ValueError(f"the draft's deepest exit ({exits[-1]}) must be shallower than the smallest target "
                             f"(zoo-{self.sizes[0]}, {smallest} layers): a draft as deep as a target is that target")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}")
        if isinstance(self.seed, bool) or not 0 <= self.seed < 2**32 - len(known):
            raise ValueError(f"--seed must be an integer in [0, 2**32 - {len(known)}), got {self.seed!r}")
        if not self.corpus.is_dir():
            raise ValueError(f"--corpus {self.corpus} is not a directory of Python sources")

    @property
    def recipe(self) -> Preset:
        return PRESETS[self.preset]

    def settings(self) -> dict[str, Any]:
        """What shapes the family: a resumed build must repeat it (the budget and progress may change)."""
        return {"preset": self.preset, "sizes": list(self.sizes), "corpus": str(self.corpus.resolve()),
                "seed": self.seed, "vocab_size": self.vocab_size or self.recipe.vocab_size,
                "draft_exits": list(self.draft_exits), "steps": self.steps}


class Build:
    """The record of a build (``build.json``): its settings and, per stage, what it produced."""

    def __init__(self, cfg: ZooBuild) -> None:
        from s2d.outputs import check_not_input, check_output_dir

        self.cfg, self.out = cfg, cfg.out
        check_not_input(self.out, [("--corpus", cfg.corpus)])
        resumed = check_output_dir(self.out, lambda o: (o / BUILD_FILE).is_file(), f"an s2d zoo build (no {BUILD_FILE})")
        self.record: dict[str, Any] = {"recipe": "s2d zoo build", "settings": cfg.settings(), "stages": {}}
        if resumed:
            try:
                saved = json.loads((self.out / BUILD_FILE).read_text())
                stages, settings = saved["stages"], saved["settings"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{self.out / BUILD_FILE} is damaged ({err}); choose another --out") from None
            diffs = [f"{k}: {settings.get(k)!r} -> {v!r}" for k, v in cfg.settings().items() if settings.get(k) != v]
            if diffs:
                raise ValueError(f"--out {self.out} holds a build with other settings ({'; '.join(diffs)}); repeat "
                                 "its options to resume it, or choose another --out")
            self.record["stages"] = stages
        self.ran: list[str] = []

    def done(self, stage: str, artefact: Path) -> bool:
        finished = self.record["stages"].get(stage, {}).get("done", False) and artefact.exists()
        if finished:
            say(f"{stage}: done ({artefact.relative_to(self.out)}), skipped")
        return finished

    def update(self, stage: str, **values: Any) -> None:
        self.record["stages"].setdefault(stage, {}).update(values)
        self.save()

    def save(self) -> None:
        """Write build.json (first of all files: a folder holding it is a build this command resumes)."""
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / (BUILD_FILE + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=1) + "\n")
        os.replace(tmp, self.out / BUILD_FILE)

    def finish(self, stage: str, **values: Any) -> None:
        """Record a stage as done; the stages after it were built from what it replaced: they run again."""
        names = list(self.record["stages"])
        for later in names[names.index(stage) + 1:] if stage in names else ():
            del self.record["stages"][later]
        self.update(stage, **values, done=True)
        self.ran.append(stage)

    def training_minutes(self) -> float:
        return sum(s.get("minutes", 0.0) for s in self.record["stages"].values() if s.get("done"))


def say(message: str) -> None:
    print(f"s2d zoo build: {message}", file=sys.stderr)


def corpus_files(cfg: ZooBuild) -> list[str]:
    """The corpus's documents (relative paths, sorted), filtered as training data is."""
    from s2d.train.data import DataConfig, walk_files

    data = DataConfig(paths=(cfg.corpus,), exclude_dirs=EXCLUDE_DIRS, max_file_bytes=cfg.recipe.max_file_bytes)
    files = sorted(p.relative_to(cfg.corpus).as_posix() for p in walk_files(cfg.corpus, data))
    if not files:
        raise ValueError(f"--corpus {cfg.corpus} holds no *.py files (outside {', '.join(EXCLUDE_DIRS)})")
    return files


def training_data(cfg: ZooBuild, split: dict[str, Any]):
    """The corpus minus its held-out files, packed in rows of the preset's sequence length."""
    from s2d.train.data import DataConfig

    return DataConfig(paths=(cfg.corpus,), glob="*.py", exclude_dirs=EXCLUDE_DIRS,
                      exclude_files=tuple(split["validation_files"]), max_file_bytes=cfg.recipe.max_file_bytes,
                      seq_len=cfg.recipe.seq_len)


def stage_split(build: Build) -> dict[str, Any]:
    cfg, path = build.cfg, build.out / SPLIT_FILE
    if build.done("split", path):
        from s2d.side_files import read_json, side_file

        with side_file(path, "zoo split", "delete it to redo the split (and every stage after it)"):
            split = read_json(path)
            if not isinstance(split, dict) or not isinstance(split.get("validation_files"), list):
                raise ValueError("no 'validation_files' list")
            return split
    files = corpus_files(cfg)
    held = [f for f in files if is_held_out(f)]
    if len(held) == len(files):
        raise ValueError(f"--corpus {cfg.corpus}: all {len(files)} files are held out by the split rule; give more files")
    split = {"corpus": f"{cfg.corpus} (*.py, {', '.join(EXCLUDE_DIRS)} excluded, files <= "
                       f"{cfg.recipe.max_file_bytes} bytes)", "python": sys.version.split()[0],
             "rule": "validation if int(sha1(relative_path), 16) % 20 == 0",
             "num_training_files": len(files) - len(held), "validation_files": held}
    build.save()
    _write_json(path, split)
    build.finish("split", training_files=len(files) - len(held), validation_files=len(held))
    say(f"split: {len(files) - len(held)} training files, {len(held)} held out ({SPLIT_FILE})")
    return split


def stage_tokenizer(build: Build, split: dict[str, Any]) -> Path:
    """Byte-level BPE trained on the training files; loads with AutoTokenizer and s2d's fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from s2d.outputs import swap_in, temporary_sibling
    from s2d.train.data import read_documents

    cfg, out = build.cfg, build.out / TOKENIZER_DIR
    if build.done("tokenizer", out / "tokenizer.json"):
        return out
    docs = read_documents(training_data(cfg, split))
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    vocab_size = cfg.vocab_size or cfg.recipe.vocab_size
    # The special token first (id 0), then the 256 bytes, then merges: every byte string can be encoded.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=cfg.progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator((d.text for d in docs), trainer, length=len(docs))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                        pad_token=EOS_TOKEN, model_max_length=cfg.recipe.max_positions)
    tmp = temporary_sibling(out)
    tokenizer.save_pretrained(tmp)
    keep_user_files(build, TOKENIZER_DIR, tmp, out)
    swap_in(tmp, out)
    build.finish("tokenizer", vocab_size=len(tokenizer), documents=len(docs))
    say(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens ({TOKENIZER_DIR}/)")
    return out


def keep_user_files(build: Build, stage: str, tmp: Path, dest: Path) -> None:
    """Before the rebuilt stage folder ``tmp`` replaces ``dest``: put in it what the user added to ``dest``.

    A stage's files are those it writes now and those its last build recorded (build.json's ``files``);
    anything else in ``dest`` is the user's and is kept, as every other command keeps it. Entries are
    hard-linked (copied across filesystems), never moved, so a failure before the swap loses nothing.
    """
    written = sorted(p.name for p in tmp.iterdir())
    ours = set(written) | set(build.record["stages"].get(stage, {}).get("files", ()))
    if dest.is_dir():
        for entry in sorted(dest.iterdir()):
            if entry.name in ours:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry, tmp / entry.name)
            say(f"{stage}: kept {entry.name}, which s2d did not write there")
    build.record["stages"].setdefault(stage, {})["files"] = written  # saved when the stage finishes


def _link_or_copy(src: Path | str, dst: Path | str) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def matmul_params(layers: int, size: TargetSize, vocab: int, heads_applied: int = 1) -> int:
    """Weights multiplied per token: the layers (full multi-head attention) and the head once per exit read."""
    return layers * (4 * size.hidden ** 2 + 3 * size.hidden * size.ffn) + heads_applied * vocab * size.hidden


def plan_costs(cfg: ZooBuild, vocab: int) -> dict[str, float]:
    """Each training stage's estimated compute, for splitting the budget (tokens per step are equal)."""
    sizes = cfg.recipe.sizes
    costs = {f"zoo-{s}": float(matmul_params(sizes[s].layers, sizes[s], vocab) * stage_steps(cfg, False))
             for s in cfg.sizes}
    smallest = sizes[cfg.sizes[0]]
    costs[DRAFT_DIR] = float(matmul_params(cfg.draft_exits[-1], smallest, vocab, len(cfg.draft_exits))
                             * stage_steps(cfg, True))
    return costs


def stage_steps(cfg: ZooBuild, draft: bool) -> int:
    return cfg.steps or (cfg.recipe.draft_steps if draft else cfg.recipe.target_steps)


def train_stage(build: Build, stage: str, train_cfg, cost: dict[str, float]):
    """Run one training stage (resuming its run), within its share of the budget; returns the TrainResult."""
    from s2d.train import train_draft

    cfg = build.cfg
    plan = build.record["stages"].get(stage, {}).get("plan")
    if plan is None:
        plan = {"steps": train_cfg.steps, "max_minutes": None}
        if cfg.minutes is not None:
            pending = [s for s in cost if not build.record["stages"].get(s, {}).get("done")]
            left = cfg.minutes - build.training_minutes()
            share = max(left, 0.0) * cost[stage] / sum(cost[s] for s in pending)
            probe = min(PROBE_STEPS, train_cfg.warmup_steps, train_cfg.steps)
            steps = train_cfg.steps
            if probe >= 1:  # warm-up learning rates do not depend on the total steps: the probe is the run's start
                timed = _checked(train_draft(train_cfg.with_(steps=probe)), stage)
                per_step = timed.elapsed_s / max(timed.step, 1)
                steps = max(probe, min(train_cfg.steps, int(share * 60 / max(per_step, 1e-9))))
            plan = {"steps": steps, "max_minutes": round(max(share, 1e-3), 3)}
        build.update(stage, plan=plan)
    say(f"{stage}: training {plan['steps']} steps" + (f" within {plan['max_minutes']:.1f} minutes"
                                                      if plan["max_minutes"] else ""))
    return _checked(train_draft(train_cfg.with_(**plan)), stage)


class BuildInterrupted(Exception):
    """Ctrl-C or SIGTERM during training: the run is checkpointed, the command resumes it."""


def _checked(result, stage: str):
    if result.status == "interrupted":
        raise BuildInterrupted(f"stage {stage} stopped at step {result.step}; run the same command again to resume")
    return result


def common_train_args(cfg: ZooBuild, steps: int) -> dict[str, Any]:
    from s2d.model.llama import CPU_BF16_UPCAST

    r = cfg.recipe
    # bf16 autocast only where the CPU multiplies bf16 natively: elsewhere it is many times slower.
    return dict(steps=steps, batch_size=r.batch_size, micro_batch_size=r.micro_batch_size,
                warmup_steps=r.warmup_steps, save_every=max(1, min(50, steps // 4)), keep_checkpoints=1,
                autocast=r.bf16 and not CPU_BF16_UPCAST, progress=cfg.progress)


def stage_target(build: Build, size: str, index: int, split: dict[str, Any], tokenizer: Path,
                 cost: dict[str, float]) -> Path:
    from s2d.train import DraftShape, TrainConfig

    cfg, name = build.cfg, f"zoo-{size}"
    dest = build.out / name
    if build.done(name, dest / "model.safetensors"):
        return dest
    shape = cfg.recipe.sizes[size]
    train_cfg = TrainConfig(
        out_dir=build.out / RUNS_DIR / name, data=training_data(cfg, split), exits=(shape.layers,),
        shape=DraftShape(shape.hidden, shape.heads, shape.heads, shape.ffn, cfg.recipe.max_positions),
        tokenizer=tokenizer, objective="soft", lr=cfg.recipe.target_lr, weight_decay=0.1, seed=cfg.seed + index,
        **common_train_args(cfg, stage_steps(cfg, False)))
    result = train_stage(build, name, train_cfg, cost)
    info = {"name": name, "layers": shape.layers, "hidden": shape.hidden, "ffn": shape.ffn, "heads": shape.heads}
    info.update(export(build, train_cfg, result, dest, split, info, keep_exits=False))
    build.finish(name, **{k: info[k] for k in ("status", "steps", "minutes", "train_tokens", "val_loss_nats")})
    return dest


def stage_draft(build: Build, split: dict[str, Any], cost: dict[str, float]) -> Path:
    from s2d.train import TrainConfig
    from s2d.train.gates import add_gates_and_vocab

    cfg, dest = build.cfg, build.out / DRAFT_DIR
    if build.done(DRAFT_DIR, dest / "model.safetensors"):
        return dest
    init = build.out / f"zoo-{cfg.sizes[0]}"
    data = training_data(cfg, split)
    train_cfg = TrainConfig(out_dir=build.out / RUNS_DIR / DRAFT_DIR, data=data, exits=cfg.draft_exits, init=init,
                            objective="soft", lr=cfg.recipe.draft_lr, seed=cfg.seed,
                            **common_train_args(cfg, stage_steps(cfg, True)))
    result = train_stage(build, DRAFT_DIR, train_cfg, cost)
    gate_dtype = "bfloat16" if train_cfg.autocast else "float32"
    info = {"name": DRAFT_DIR, "init": init.name, "layers": cfg.draft_exits[-1], "exits": list(cfg.draft_exits)}
    info.update(export(build, train_cfg, result, dest, split, info, keep_exits=True,
                       beside=lambda folder: add_gates_and_vocab(folder, data, cfg.recipe.gate_positions, gate_dtype,
                                                                 cfg.progress)))
    build.finish(DRAFT_DIR, **{k: info[k] for k in ("status", "steps", "minutes", "train_tokens", "val_loss_nats")})
    return dest


def export(build: Build, train_cfg, result, dest: Path, split: dict[str, Any], info: dict[str, Any],
           keep_exits: bool, beside=None) -> dict[str, Any]:
    """Move the trained model out of its run into ``dest`` (atomically) with its zoo_info.json.

    A target's config loses the exit the trainer recorded (``s2d_exits``): it is a plain causal LM.
    """
    from s2d.outputs import swap_in, temporary_sibling
    from s2d.train.export import EXITS_KEY

    run = train_cfg.out_dir
    check_no_heldout(run, set(split["validation_files"]))
    tmp = temporary_sibling(dest)
    try:
        for name in MODEL_FILES:  # the weights are moved: the run keeps its log, config and token cache
            if (run / name).exists():
                (os.replace if name == "model.safetensors" else shutil.copy2)(run / name, tmp / name)
        if not keep_exits:
            raw = json.loads((tmp / "config.json").read_text())
            raw.pop(EXITS_KEY, None)
            (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        info = {**info, "params": count_params(tmp), "train_tokens": result.tokens, "steps": result.step,
                "status": result.status, "minutes": round(result.elapsed_s / 60, 3),
                "val_loss_nats": validation_loss(tmp, build.cfg, split, train_cfg.exits), "seed": train_cfg.seed}
        if beside is not None:
            info.update(beside(tmp))
        _write_json(tmp / INFO_FILE, info)
        keep_user_files(build, dest.name, tmp, dest)
        swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # optimizer state: 12 bytes per parameter
    say(f"{dest.name}: {result.status} after {result.step} steps ({info['minutes']} min), held-out loss "
        f"{info['val_loss_nats']} ({dest.relative_to(build.out)}/)")
    return info


def check_no_heldout(run: Path, heldout: set[str]) -> int:
    """Audit a training run: none of its documents is held out (by the list or by the rule)."""
    used = json.loads((run / "data_files.json").read_text())["documents"]
    leaked = [d for d in used if d in heldout or is_held_out(d)]
    if leaked:
        raise AssertionError(f"held-out files were trained on: {leaked[:5]}")
    return len(used)


def count_params(model_dir: Path) -> int:
    from s2d.model.loading import read_shapes

    total = 0
    for shape in read_shapes(model_dir).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def validation_loss(model_dir: Path, cfg: ZooBuild, split: dict[str, Any], exits: tuple[int, ...]):
    """Mean next-token loss (nats) on the first held-out sequences: one number, or one per exit of a draft.

    None when the held-out files hold less than one sequence.
    """
    import torch

    from s2d.model.loading import load_tokenizer
    from s2d.train.data import DataConfig, load_packed
    from s2d.train.draft import SortedDraft, init_from_checkpoint

    files = tuple(cfg.corpus / f for f in split["validation_files"])
    if not files:
        return None
    try:
        rows = load_packed(DataConfig(paths=files, seq_len=cfg.recipe.seq_len), load_tokenizer(model_dir)).rows
    except ValueError:  # fewer tokens than one sequence
        return None
    rows = rows[:cfg.recipe.validation_rows].long()
    model = SortedDraft(init_from_checkpoint(model_dir, exits[-1]), exits).eval()
    sums = torch.zeros(len(exits))
    with torch.no_grad():
        for i in range(0, rows.shape[0], cfg.recipe.micro_batch_size):
            ids = rows[i:i + cfg.recipe.micro_batch_size]
            for e, logits in enumerate(model(ids[:, :-1])):
                sums[e] += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                             reduction="sum")
    losses = [round(float(s) / (rows.shape[0] * (rows.shape[1] - 1)), 4) for s in sums]
    return losses[0] if len(exits) == 1 else {str(e): v for e, v in zip(exits, losses)}


def build_zoo(cfg: ZooBuild) -> list[str]:
    """Build (or resume building) the family ``cfg`` describes in cfg.out; returns the stages that ran."""
    build = Build(cfg)
    split = stage_split(build)
    tokenizer = stage_tokenizer(build, split)
    vocab = build.record["stages"]["tokenizer"]["vocab_size"]
    cost = plan_costs(cfg, vocab)
    for index, size in enumerate(cfg.sizes):
        stage_target(build, size, index, split, tokenizer, cost)
    stage_draft(build, split, cost)
    say(f"family in {cfg.out}: {', '.join(f'zoo-{s}' for s in cfg.sizes)} and {DRAFT_DIR}/ "
        f"({build.training_minutes():.1f} training minutes)")
    return build.ran


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def add_zoo(sub: argparse._SubParsersAction) -> None:
    from s2d.args import finite_float, ints

    p = sub.add_parser("zoo", help="build a family of targets and their sorted draft from the standard library")
    zoo_sub = p.add_subparsers(dest="zoo_command", required=True)
    b = zoo_sub.add_parser("build", help="train a tokenizer, targets of several sizes and a sorted draft",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--out", type=Path, required=True, help="the family's folder (created; re-run to resume)")
    b.add_argument("--preset", choices=list(PRESETS), default="zoo",
                   help="zoo: the shapes of the benchmark family (hours); tiny: a toy family in seconds")
    b.add_argument("--sizes", type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()), default=(),
                   help="which targets to build, e.g. s,l (default: all of the preset's: s,m,l)")
    b.add_argument("--minutes", type=finite_float, help="training-time budget of the whole build (default: none, "
                                                        "every stage trains the preset's steps)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--corpus", type=Path, default=default_corpus(),
                   help="a directory of *.py files (default: this interpreter's standard library)")
    b.add_argument("--vocab-size", type=int, help="BPE vocabulary (default: the preset's, 8192 for zoo)")
    b.add_argument("--draft-exits", type=ints, default=(),
                   help="the draft's exits, layer counts of the smallest target (default 1,2,3 for zoo)")
    b.add_argument("--steps", type=int, help="optimizer steps of every training stage (default: the preset's, "
                                             "600 per target and 320 for the draft for zoo)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=run_zoo_build)


def run_zoo_build(args: argparse.Namespace) -> int:
    cfg = ZooBuild(out=args.out, preset=args.preset, sizes=args.sizes, corpus=args.corpus, seed=args.seed,
                   vocab_size=args.vocab_size, draft_exits=args.draft_exits, steps=args.steps, minutes=args.minutes,
                   progress=not args.no_progress)
    try:
        ran = build_zoo(cfg)
    except BuildInterrupted as err:
        say(str(err))
        return 130
    print(json.dumps({"out": str(cfg.out), "ran": ran, "settings": cfg.settings()}))
    return 0


__all__ = ["PRESETS", "Preset", "TargetSize", "ZooBuild", "build_zoo", "is_held_out"]
