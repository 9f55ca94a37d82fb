"""Decoding methods by name: the one place the CLI, the bench, ``calibrate`` and the server read.

A method is a drafter (or none) plus the number of tokens the engine lets it draft per step. Names:

- ``ar``: plain decoding, no draft.
- ``sd``: the whole ``--draft`` model drafts (vanilla speculative decoding).
- ``sd-exit-E``: exit E of a sorted draft alone (its first E layers and the shared head).
- ``s2d-softmax``: the paper's cascade: each exit's softmax confidence against its threshold.
- ``s2d-gate``: the cascade decided by learned exit gates (``gates.py``): the head runs only at the
  exit that answers. Needs ``s2d_exit_gates.safetensors`` beside the draft.
- ``pld``: prompt lookup (the seed papers' n-gram copy, a backward scan).
- ``lookup``: the n-gram index drafter (``ngram.py``): longest earlier match, several orders.
- ``lookup+M``: hybrid: lookup tokens where the text repeats, model method M otherwise
  (``lookup+sd-exit-1``, ``lookup+s2d-gate``, ...).
- ``steer-exit-E``: exit E of the sorted draft, steered by the served target's hidden state through
  the map trained for that target (``steer.py``; ``s2d_steer.safetensors`` beside the draft).
- ``s2d-steer``: ``s2d`` with its model part steered (lookup, else the steered default exit).
- ``s2d``: the default configuration, whichever measured best across the zoo's targets on the
  calibration prompts (benchmarks/choose_default.py; RESULTS.md): lookup where the text repeats,
  otherwise one exit of the sorted draft while it pays for the target (cost-aware), 3 tokens per
  step, its head over the draft's 2048 most frequent tokens where the draft ships a ranking
  (``vocab.py``); the exit is the draft's middle one unless a calibration (``s2d calibrate``, per
  target) chose another. On the zoo the per-token exit choice (``s2d-softmax``, ``s2d-gate``) measured
  slower than a fixed exit, so the default does not use it; both stay available by name.
- ``refine-exit-E``: exit E of the sorted draft, each token chosen among its top-k by a score that adds
  n-gram log-probabilities (the sequence's own and the training corpus's, ``refine.py``; weights
  calibrated per target); ``s2d-refine`` is ``s2d`` with its model part so refined.
- ``overlap+M``: chain method M with drafting overlapped with verification (``overlap.py``): while the
  target verifies, the model drafter drafts the next step on its own core in a background thread;
  ``s2d-overlap`` is ``s2d`` so run. Sequential (M itself) where torch has one thread (one core).
- ``s2d-tree``, ``rsd``, ``rsd-sbs``: token trees from the s2d exit (``tree.py``): EAGLE-2's dynamic tree
  (greedy; under sampling the rsd tree), recursive speculative decoding's fixed-shape tree, and its
  stochastic-beam-search tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from s2d.drafting.base import Drafter
from s2d.drafting.gates import ExitGates
from s2d.drafting.hybrid import HybridConfig, HybridDrafter, HybridTreeDrafter
from s2d.drafting.length import DraftLength
from s2d.drafting.lookup import PromptLookupDrafter
from s2d.drafting.model import ModelDrafter
from s2d.drafting.ngram import NgramConfig, NgramDrafter
from s2d.drafting.overlap import OverlapDrafter, OverlapThreads, available_cores
from s2d.drafting.refine import NGRAM_FILE, RefinedDrafter, RefineTable, load_corpus_ngram
from s2d.drafting.sorted import SortedConfig, SortedDrafter
from s2d.drafting.steer import STEER_FILE, SteeredDrafter, SteeringMaps
from s2d.drafting.tree import TreeDrafter, TreeMode, TreeShape
from s2d.drafting.vocab import load_vocab
from s2d.model.llama import Transformer

LOOKUP_PREFIX = "lookup+"
OVERLAP_PREFIX = "overlap+"
_EXIT = re.compile(r"sd-exit-(\d+)$")
_REFINE = re.compile(r"refine-exit-(\d+)$")
_STEER = re.compile(r"steer-exit-(\d+)$")
METHOD_HELP = {
    "ar": "plain autoregressive decoding (the speedup baseline)",
    "s2d": "the default: lookup, else one exit of the sorted draft while it pays (measured best; RESULTS.md)",
    "sd": "speculative decoding with the whole --draft model",
    "sd-exit-E": "exit E of a sorted --draft alone (its first E layers and the head)",
    "s2d-softmax": "the paper's cascade: the first exit whose softmax confidence reaches its threshold answers",
    "s2d-gate": "the cascade decided by learned exit gates (the head runs once, at the answering exit)",
    "pld": "prompt lookup: copy what followed the latest earlier n-gram (backward scan)",
    "lookup": "n-gram index drafting: the longest earlier match of the context's tail, several orders",
    "lookup+M": "lookup tokens where the text repeats, model method M otherwise (e.g. lookup+sd-exit-1; "
                "lookup+s2d-tree, lookup+rsd, lookup+rsd-sbs: the draft's token tree otherwise)",
    "steer-exit-E": "exit E of a sorted --draft, steered by the target's hidden state (maps trained with "
                    "`s2d train-draft --objective steer`)",
    "s2d-steer": "s2d with its model part steered toward the served target (needs the draft's steering maps)",
    "s2d-tree": "a token tree from the s2d exit, verified in one pass: dynamic (EAGLE-2) when greedy, "
                "sampled without replacement (RSD) when sampling",
    "refine-exit-E": "exit E of a sorted --draft, its top-k rescored with n-gram models of the text so far and "
                     "of the training corpus (needs `s2d train-draft --objective ngram`)",
    "s2d-refine": "s2d with its model part refined (lookup, else the refined default exit)",
    "s2d-overlap": "s2d with drafting overlapped with verification: the draft drafts the next step on its own "
                   "core while the target verifies (2+ cores; sequential s2d on one)",
    "overlap+M": "chain method M overlapped with verification (e.g. overlap+sd-exit-2, overlap+lookup+sd-exit-1)",
    "rsd": "recursive speculative decoding: a fixed-shape tree, children drawn without replacement, "
           "recursive rejection sampling",
    "rsd-sbs": "recursive speculative decoding's stochastic beam search: --tree-top-k beams per level (Gumbel "
               "values conditioned on the parent's), recursive rejection sampling; a beam search when greedy",
}
METHODS = tuple(METHOD_HELP)
# Token-tree methods and the TreeDrafter mode each runs.
TREE_METHODS: dict[str, TreeMode] = {"s2d-tree": "dynamic", "rsd": "fixed", "rsd-sbs": "beam"}
# What `s2d` means: measured best on the calibration prompts (benchmarks/choose_default.json).
DEFAULT_S2D = "lookup+sd-exit-E"  # E: DraftOptions.exit, or the draft's middle exit


@dataclass(frozen=True)
class DraftOptions:
    """Knobs of one target's drafter (a calibration may set them per target)."""

    num_draft_tokens: int = 5  # model-drafted tokens per step
    schedule: str = "fixed"  # "fixed" | "heuristic" (+2 after full acceptance, -1 otherwise)
    exit_thresholds: tuple[float, ...] = ()  # s2d-*: per exit; () = 0.5, ..., 0.5, 0
    stop_threshold: float = 0.0  # end a draft after a token whose confidence is below this
    # lookup: most tokens copied per step; 12 was best of 8, 12, 16, 24 on the calibration prompts once
    # blocks of 13 rows got cheap (benchmarks/choose_lookup_tokens.json)
    lookup_tokens: int = 12
    min_lookup: int = 2  # lookup+M: copied tokens needed to skip the model for a step
    lookup_max_n: int = 4  # lookup: longest suffix matched
    lookup_min_match: int = 2  # lookup: shortest match that may back a drafted token
    verify_growth: float = 0.06  # lookup+M: a verification pass's extra cost per drafted token (cost-aware switch)
    exit: int = 0  # s2d: the sorted draft's exit that drafts where lookup has nothing; 0 = its middle exit
    draft_vocab: int = 0  # sorted drafters: score only the N most frequent tokens (vocab.py); 0 = all
    tree_top_k: int = 2  # trees: children per expanded node (and nodes expanded per level, dynamic; beams, rsd-sbs)
    tree_depth: int = 6  # trees: levels below the root
    tree_nodes: int = 12  # trees: nodes verified per pass (<= 63); bigger ones cost more than they win here (RESULTS)

    def __post_init__(self) -> None:
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}")
        if self.schedule not in ("fixed", "heuristic"):
            raise ValueError(f"unknown draft schedule {self.schedule!r} (fixed, heuristic)")
        if not all(0.0 <= t <= 1.0 for t in (*self.exit_thresholds, self.stop_threshold)):
            raise ValueError("exit and stop thresholds must lie in [0, 1]")
        if not 1 <= self.min_lookup <= self.lookup_tokens:
            raise ValueError(f"need 1 <= min_lookup <= lookup_tokens, got {self.min_lookup}, {self.lookup_tokens}")
        NgramConfig(self.lookup_max_n, 1, self.lookup_min_match)  # validates the lookup orders
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0 (0: the whole vocabulary), got {self.draft_vocab}")
        TreeShape(self.tree_top_k, self.tree_depth, self.tree_nodes)  # validates the tree knobs
        if self.exit < 0:
            raise ValueError(f"exit must be a layer count >= 1 (0: the draft's middle exit), got {self.exit}")

    @property
    def tree(self) -> TreeShape:
        return TreeShape(self.tree_top_k, self.tree_depth, self.tree_nodes)

    @property
    def ngram(self) -> NgramConfig:
        return NgramConfig(max_n=self.lookup_max_n, min_n=1, min_match=self.lookup_min_match)

    @property
    def hybrid(self) -> HybridConfig:
        return HybridConfig(self.min_lookup, self.lookup_tokens, self.ngram, gamma=self.verify_growth)


@dataclass(frozen=True)
class Method:
    """A parsed method name."""

    name: str  # as given
    model: str | None  # the model-drafting part ("sd", "sd-exit-2", "s2d-gate", ...); None: no model
    lookup: bool  # n-gram lookup drafts (alone, or before the model)
    overlap: str | None = None  # the chain method run overlapped with verification (overlap+M, s2d-overlap)

    @property
    def needs_draft(self) -> bool:
        return self.model is not None


# What `s2d` means besides its drafters: the knobs measured with it (benchmarks/choose_default.json);
# the draft's head over its 2048 most frequent tokens where the draft ships a ranking (vocab.py).
DEFAULT_S2D_OPTIONS = {"num_draft_tokens": 3, "min_lookup": 1, "verify_growth": 0.12}
DEFAULT_S2D_VOCAB = 2048


# How dear a verification row is decides how long drafts should be. With AMX tiles (or on a GPU, or
# on torch's path) a pass over 13 new tokens costs ~1.3x a one-token pass, and the knobs above were
# measured there. The native runtime's vector products (AVX512-BF16, AVX2) are compute-bound past a
# few rows (zoo-l, 6 tokens: ~2.2x and ~2.6x one token), so there lookup copies fewer tokens and, on
# AVX2, the cost-aware switch charges more per drafted token. Measured on the calibration prompts with the
# runtime held to each instruction set (benchmarks/choose_default_avx2.json, _avx512.json).
ROW_COST_KNOBS: dict[str, dict[str, float | int]] = {
    "AVX2": {"lookup_tokens": 6, "verify_growth": 0.3},
    "AVX512-BF16": {"lookup_tokens": 8},
}


def row_cost_knobs(draft: Transformer | None = None) -> dict[str, float | int]:
    """The lookup length and verification growth for the instruction set passes run on here ({}: the
    defaults). A draft on a GPU means the targets are there too; without a draft, the CPU is assumed."""
    if draft is not None and draft.device.type != "cpu":
        return {}
    from s2d.model import native

    return ROW_COST_KNOBS.get(native.isa(), {})


def default_options(method: str, draft: Transformer | None = None) -> DraftOptions:
    """A method's drafting knobs before any flag or calibration: ``s2d``'s measured ones, else the defaults;
    lookup's length and the switch's cost per drafted token by the instruction set (``ROW_COST_KNOBS``)."""
    if (inner := overlapped_method(method)) is not None:
        return default_options(inner, draft)  # overlap changes when drafts are made, not the knobs
    m = parse_method(method)
    row_costs = {k: v for k, v in row_cost_knobs(draft).items()
                 if (k == "lookup_tokens" and m.lookup) or (k == "verify_growth" and m.lookup and m.model)}
    if method not in ("s2d", "s2d-tree", "lookup+s2d-tree", "s2d-refine", "s2d-steer"):
        return DraftOptions(**row_costs)
    # s2d-tree shares the s2d default's cheaper head (a tree scores many candidates per level), and
    # lookup+s2d-tree its lookup knobs too.
    ranked = draft is not None and load_vocab(getattr(draft, "checkpoint_dir", None), draft.cfg.vocab_size)
    knobs = DEFAULT_S2D_OPTIONS if method in ("s2d", "lookup+s2d-tree", "s2d-refine", "s2d-steer") else {}
    return DraftOptions(**{**knobs, **row_costs}, draft_vocab=DEFAULT_S2D_VOCAB if ranked else 0)


def overlapped_method(name: str) -> str | None:
    """The chain method an overlapped one runs (``overlap+M`` -> M, ``s2d-overlap`` -> s2d), else None."""
    if name == "s2d-overlap":
        return "s2d"
    return name[len(OVERLAP_PREFIX):] if name.startswith(OVERLAP_PREFIX) else None


def parse_method(name: str) -> Method:
    """Validate a method name (before any model is loaded); ``s2d`` stays ``s2d`` (resolved with the draft)."""
    if (inner := overlapped_method(name)) is not None:
        m = parse_method(inner)
        if m.model is None or m.model in TREE_METHODS or m.overlap:
            raise ValueError(f"{name}: overlap runs a chain method with a draft model (s2d, sd, sd-exit-E, "
                             f"lookup+M, ...), not {inner!r}")
        return Method(name, m.model, m.lookup, inner)
    if name in ("ar", "pld"):
        return Method(name, None, False)
    if name == "lookup":
        return Method(name, None, True)
    if name == "s2d":
        return Method(name, "s2d", True)
    if name in TREE_METHODS:
        return Method(name, name, False)
    if name in ("s2d-refine", "s2d-steer"):
        return Method(name, name, True)
    lookup = name.startswith(LOOKUP_PREFIX)
    model = name[len(LOOKUP_PREFIX):] if lookup else name
    if model in ("sd", "s2d-softmax", "s2d-gate") or _EXIT.match(model) or _REFINE.match(model) or _STEER.match(model):
        return Method(name, model, lookup)
    if lookup and model in TREE_METHODS:
        return Method(name, model, True)
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)} "
                     "(E = an exit layer count, M = a model method)")


def check_method(method: str) -> None:
    parse_method(method)


def needs_draft_model(method: str) -> bool:
    return parse_method(method).needs_draft


def sorted_exits(draft: Transformer) -> tuple[int, ...]:
    """The draft's exits (config ``s2d_exits``); a plain model has one exit, its last layer."""
    return draft.cfg.exits or (draft.cfg.num_layers,)


def load_gates(draft: Transformer) -> ExitGates | None:
    directory = getattr(draft, "checkpoint_dir", None)
    return ExitGates.load(Path(directory), draft) if directory is not None and len(sorted_exits(draft)) > 1 else None


def resolve_default(draft: Transformer | None, options: DraftOptions | None = None) -> str:
    """What ``s2d`` runs with this draft: lookup, then exit ``options.exit`` (or the middle exit)."""
    if draft is None:
        raise ValueError("method 's2d' needs a draft model (--draft)")
    if len(sorted_exits(draft)) == 1:
        return LOOKUP_PREFIX + "sd"  # a plain draft: nothing to choose between (callers say so)
    return f"{LOOKUP_PREFIX}sd-exit-{default_exit(draft, options)}"


def default_exit(draft: Transformer, options: DraftOptions | None = None) -> int:
    """The exit s2d (and its trees) draft with: ``options.exit``, else the middle exit (a plain draft: its depth)."""
    exits = sorted_exits(draft)
    if len(exits) == 1:
        return exits[0]
    chosen = options.exit if options is not None and options.exit else exits[len(exits) // 2]
    if chosen not in exits:
        raise ValueError(f"exit {chosen} is not one of the draft's exits {list(exits)}")
    return chosen


def engine_draft_tokens(method: str, options: DraftOptions) -> int:
    """The most tokens the engine lets the method draft per step."""
    m = parse_method(method)
    cap = options.num_draft_tokens
    if options.schedule == "heuristic":
        cap = max(cap, DraftLength(options.num_draft_tokens, "heuristic", maximum=max(16, cap)).maximum)
    if m.lookup:
        cap = max(cap, options.lookup_tokens)
    return cap


def draft_vocab(draft: Transformer, options: DraftOptions) -> list[int] | None:
    """The first ``options.draft_vocab`` tokens of the ranking stored beside the draft, or None (all)."""
    if not options.draft_vocab:
        return None
    ranked = load_vocab(getattr(draft, "checkpoint_dir", None), draft.cfg.vocab_size)
    if ranked is None:
        raise ValueError("draft_vocab needs s2d_draft_vocab.json beside the draft; write it with "
                         "`s2d train-draft --objective vocab`")
    return ranked[:options.draft_vocab]


def load_ngram(draft: Transformer):
    """The corpus n-gram model beside the draft; a ValueError saying how to build it when there is none."""
    corpus = load_corpus_ngram(getattr(draft, "checkpoint_dir", None), draft.cfg.vocab_size)
    if corpus is None:
        raise ValueError(f"refined methods need the corpus n-gram model beside the draft ({NGRAM_FILE}); build it "
                         "with `s2d train-draft --objective ngram --init DRAFT --out NEW --data CORPUS`")
    return corpus


def _exit_layers(model: str, draft: Transformer, exit_layers: int) -> int:
    if not 1 <= exit_layers <= draft.cfg.num_layers:
        n = draft.cfg.num_layers
        raise ValueError(f"{model}: the draft has {n} layer{'s' if n != 1 else ''} (exits 1..{n})")
    return exit_layers


def load_steering(draft: Transformer) -> SteeringMaps:
    """The steering maps beside the draft; a ValueError saying how to train them when there are none."""
    maps = SteeringMaps.load(getattr(draft, "checkpoint_dir", None), draft.cfg.hidden_size)
    if maps is None:
        raise ValueError(f"steered methods need steering maps beside the draft ({STEER_FILE}); train them with "
                         "`s2d train-draft --objective steer --init DRAFT --out NEW --targets T1 T2 ...`")
    return maps


def _model_drafter(model: str, draft: Transformer, options: DraftOptions) -> Drafter:
    if model in TREE_METHODS:
        return TreeDrafter(draft, default_exit(draft, options), options.tree, draft_vocab(draft, options),
                           TREE_METHODS[model])
    length = DraftLength(options.num_draft_tokens, options.schedule, maximum=max(16, options.num_draft_tokens))
    if model == "sd":
        return ModelDrafter(draft, length)
    vocab = draft_vocab(draft, options)
    if match := _STEER.match(model):
        return SteeredDrafter(draft, _exit_layers(model, draft, int(match.group(1))), load_steering(draft), length,
                              options.stop_threshold, vocab)
    if match := _REFINE.match(model):
        exit_layers = _exit_layers(model, draft, int(match.group(1)))
        table = RefineTable.load(getattr(draft, "checkpoint_dir", None))
        return RefinedDrafter(draft, exit_layers, load_ngram(draft), table, length, options.stop_threshold, vocab)
    if match := _EXIT.match(model):
        exit_layers = _exit_layers(model, draft, int(match.group(1)))
        return SortedDrafter(draft, SortedConfig((exit_layers,), (0.0,), options.stop_threshold), length,
                             vocab=vocab)
    exits = sorted_exits(draft)
    config = SortedConfig(exits, options.exit_thresholds, options.stop_threshold)
    if model == "s2d-softmax":
        return SortedDrafter(draft, config, length, vocab=vocab)
    gates = load_gates(draft)
    if gates is None:
        raise ValueError("method s2d-gate needs exit gates beside the draft (s2d_exit_gates.safetensors); "
                         "train them with `s2d train-draft --objective gates`")
    return SortedDrafter(draft, config, length, gates, vocab=vocab)


def build_drafter(method: str, draft: Transformer | None, options: DraftOptions = DraftOptions()) -> Drafter | None:
    """A fresh drafter for one target. Drafters built from the same ``draft`` share its weights."""
    m = parse_method(method)
    if m.overlap is not None:
        return overlapped(build_drafter(m.overlap, draft, options), OverlapThreads.for_cores(available_cores()))
    if m.name == "s2d":
        return build_drafter(resolve_default(draft, options), draft, options)
    if m.name in ("s2d-refine", "s2d-steer"):  # s2d with its model part refined or steered
        if draft is None:
            raise ValueError(f"method {m.name!r} needs a draft model (--draft)")
        return build_drafter(f"{LOOKUP_PREFIX}{m.name[4:]}-exit-{default_exit(draft, options)}", draft, options)
    if m.model is None:
        if m.name == "ar":
            return None
        return PromptLookupDrafter() if m.name == "pld" else NgramDrafter(options.ngram)
    if draft is None:
        raise ValueError(f"method {method!r} needs a draft model (--draft)")
    drafter = _model_drafter(m.model, draft, options)
    if m.lookup and isinstance(drafter, RefinedDrafter):
        drafter.serve(behind_lookup=True)  # weights calibrated where lookup leaves the drafting to the model
    if not m.lookup:
        return drafter
    return (HybridTreeDrafter if isinstance(drafter, TreeDrafter) else HybridDrafter)(drafter, options.hybrid)


def overlapped(drafter: Drafter | None, threads: OverlapThreads | None) -> Drafter:
    """``drafter`` with its model drafting overlapped with verification (a hybrid keeps its lookup as is)."""
    if isinstance(drafter, HybridDrafter):
        return HybridDrafter(OverlapDrafter(drafter.model, threads), drafter.config)
    assert drafter is not None  # parse_method refused methods without a model
    return OverlapDrafter(drafter, threads)
