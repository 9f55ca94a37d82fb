"""Decoding methods: one declarative table that the CLI, the bench, ``calibrate``, the server and the docs read.

A row (``MethodSpec``) is a method or a family of methods: a name pattern, what drafts, its default
knobs, how to build its drafter, its help text. A pattern may take an exit ``{E}`` (a layer count of
the sorted draft: ``sd-exit-{E}``) or another method ``{M}`` (composition: ``lookup+{M}`` drafts by
lookup where the text repeats and by M otherwise; ``overlap+{M}`` overlaps M's drafting with
verification). A row may also compose a fixed method (``s2d`` is lookup, then the draft's default exit:
``lookup+sd-exit-{exit}``, the exit resolved once the draft is known). Rows are matched in order, the
first match wins. Adding a method is adding a row to ``TABLE``.

Measured choices (which exit, how many tokens, which knobs ``s2d`` uses) are in benchmarks/RESULTS.md;
the knobs live in the rows, not in code paths.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from s2d.drafting.base import Drafter
from s2d.drafting.bundle import DraftBundle
from s2d.drafting.hybrid import HybridConfig, HybridDrafter, HybridTreeDrafter
from s2d.drafting.length import DraftLength
from s2d.drafting.lookup import PromptLookupDrafter
from s2d.drafting.model import ModelDrafter
from s2d.drafting.ngram import NgramConfig, NgramDrafter
from s2d.drafting.overlap import OverlapDrafter, OverlapThreads, available_cores
from s2d.drafting.refine import RefinedDrafter
from s2d.drafting.sorted import SortedConfig, SortedDrafter
from s2d.drafting.steer import SteeredDrafter
from s2d.drafting.tree import TreeDrafter, TreeShape
from s2d.model.llama import Transformer

@dataclass(frozen=True)
class DraftOptions:
    """Knobs of one target's drafter (a calibration may set them per target)."""

    num_draft_tokens: int = 5  # model-drafted tokens per step
    schedule: str = "fixed"  # "fixed" | "heuristic" (+2 after full acceptance, -1 otherwise)
    exit_thresholds: tuple[float, ...] = ()  # s2d-*: per exit; () = 0.5, ..., 0.5, 0
    stop_threshold: float = 0.0  # end a draft after a token whose confidence is below this
    # lookup: most tokens copied per step; the best of those tried on the calibration prompts once blocks of
    # 13 rows got cheap (benchmarks/RESULTS.md, "Passes over many rows", longer lookup drafts)
    lookup_tokens: int = 12
    min_lookup: int = 2  # lookup+M: copied tokens needed to skip the model for a step
    lookup_max_n: int = 4  # lookup: longest suffix matched
    lookup_min_match: int = 2  # lookup: shortest match that may back a drafted token
    verify_growth: float = 0.06  # lookup+M: a verification pass's extra cost per drafted token (cost-aware switch)
    draft_window: int = 256  # lookup+M: context tokens the model reads before its first step (0: all; hybrid.py)
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
        self.hybrid  # validates the hybrid's own knobs (draft_window)

    @property
    def tree(self) -> TreeShape:
        return TreeShape(self.tree_top_k, self.tree_depth, self.tree_nodes)

    @property
    def ngram(self) -> NgramConfig:
        return NgramConfig(max_n=self.lookup_max_n, min_n=1, min_match=self.lookup_min_match)

    @property
    def hybrid(self) -> HybridConfig:
        return HybridConfig(self.min_lookup, self.lookup_tokens, self.ngram, gamma=self.verify_growth,
                            draft_window=self.draft_window)


# What `s2d` means besides its drafters: the knobs measured with it (benchmarks/RESULTS.md, "Choosing the default");
# the draft's head over its 2048 most frequent tokens where the draft ships a ranking (vocab.py).
DEFAULT_S2D_OPTIONS = MappingProxyType({"num_draft_tokens": 3, "min_lookup": 1, "verify_growth": 0.12})
DEFAULT_S2D_VOCAB = 2048
DEFAULT_S2D = "lookup+sd-exit-{exit}"  # what `s2d` runs: {exit} is DraftOptions.exit, or the draft's middle exit


@dataclass(frozen=True)
class Recipe:
    """What a row's builder gets: the draft (with its side files), the target served, the knobs."""

    method: "ParsedMethod"
    draft: DraftBundle | None
    target: Transformer | None
    options: DraftOptions
    behind_lookup: bool = False  # the model part of lookup+M: drafts only where lookup has nothing

    @property
    def model(self) -> Transformer:
        if self.draft is None:
            raise ValueError(f"method {self.method.name!r} needs a draft model (--draft)")
        return self.draft.model

    @property
    def exit(self) -> int:
        """The row's {E}, checked against the draft's layers."""
        n, e = self.model.cfg.num_layers, self.method.exit
        if e is None or not 1 <= e <= n:
            raise ValueError(f"{self.method.name}: the draft has {n} layer{'s' if n != 1 else ''} (exits 1..{n})")
        return e

    @property
    def length(self) -> DraftLength:
        o = self.options
        return DraftLength(o.num_draft_tokens, o.schedule, maximum=max(16, o.num_draft_tokens))

    @property
    def vocab(self) -> list[int] | None:
        """The first ``options.draft_vocab`` tokens of the draft's ranking, or None (the whole vocabulary)."""
        if not self.options.draft_vocab:
            return None
        ranked = self.draft.vocab_ranking if self.draft is not None else None
        if ranked is None:
            raise ValueError("draft_vocab needs s2d_draft_vocab.json beside the draft; write it with "
                             "`s2d train-draft --objective vocab`")
        return ranked[:self.options.draft_vocab]

    def inner(self, **changes) -> "Recipe":
        """The recipe of the composed method (``{M}`` or the row's fixed inner method)."""
        assert self.method.inner is not None
        inner = self.method.inner
        if "{exit}" in inner.name:  # s2d's family: the draft's default exit, or a plain draft as a whole
            inner = parse_method(resolve_exit(inner.name, self.model, self.options))
        return replace(self, method=inner, **changes)


Drafts = Literal["nothing", "lookup", "model", "tree", "inner"]


@dataclass(frozen=True)
class MethodSpec:
    """One row of the method table (a method, or a family by its pattern)."""

    pattern: str  # "sd-exit-{E}": {E} an exit layer count; "lookup+{M}": {M} another method
    help: str
    drafts: Drafts  # what proposes: nothing (plain decoding), lookup (no draft model), the draft as a chain or a
    #                 tree; "inner": what the composed method drafts
    build: Callable[[Recipe], Drafter | None]
    inner: str | None = None  # a fixed composed method ({exit}: the default exit), for rows without {M}
    accepts: Callable[["ParsedMethod"], bool] | None = None  # {M}: which methods may fill it
    lookup: bool = False  # the n-gram index drafts (alone, or first: the row composes lookup+)
    overlaps: bool = False  # the row runs its method overlapped with verification
    knobs: Mapping[str, float | int] = field(default_factory=dict)  # DraftOptions defaults measured for it
    ranked_head: bool = False  # score the draft's DEFAULT_S2D_VOCAB most frequent tokens where it ships a ranking
    composable: bool = False  # may fill lookup+{M} (a model drafter of its own, not a composition)

    @property
    def regex(self) -> re.Pattern[str]:
        text = re.escape(self.pattern).replace(r"\{E\}", r"(?P<E>\d+)").replace(r"\{M\}", r"(?P<M>.+)")
        return re.compile(text)

    @property
    def shown(self) -> str:
        """The pattern as help texts write it: sd-exit-E, lookup+M."""
        return self.pattern.replace("{E}", "E").replace("{M}", "M")


@dataclass(frozen=True)
class ParsedMethod:
    """A method name matched to its row (and its {E} or composed method)."""

    name: str
    spec: MethodSpec
    exit: int | None = None
    inner: "ParsedMethod | None" = None

    @property
    def drafts(self) -> Drafts:
        if self.spec.drafts == "inner":
            return "model" if self.inner is None or "{exit}" in self.inner.name else self.inner.drafts
        return self.spec.drafts

    @property
    def needs_draft(self) -> bool:
        return self.drafts in ("model", "tree")

    @property
    def lookup(self) -> bool:
        """Lookup drafts (alone, or before a model)."""
        return self.spec.lookup or (self.inner is not None and self.inner.lookup)

    @property
    def overlaps(self) -> bool:
        return self.spec.overlaps or (self.inner is not None and self.inner.overlaps)

    @property
    def model(self) -> str | None:
        """The model-drafting part's name (``lookup+sd-exit-2`` -> ``sd-exit-2``); None: no draft model."""
        if not self.needs_draft:
            return None
        if self.inner is not None and "{exit}" not in self.inner.name:
            return self.inner.model
        return self.name


# --- builders: one per kind of drafter -------------------------------------------------------------------

def _lookup_only(recipe: Recipe) -> Drafter:
    return NgramDrafter(recipe.options.ngram)


def _whole_draft(recipe: Recipe) -> Drafter:
    return ModelDrafter(recipe.model, recipe.length)


def _one_exit(recipe: Recipe) -> Drafter:
    config = SortedConfig((recipe.exit,), (0.0,), recipe.options.stop_threshold)
    return SortedDrafter(recipe.model, config, recipe.length, vocab=recipe.vocab)


def _cascade(gated: bool) -> Callable[[Recipe], Drafter]:
    def build(recipe: Recipe) -> Drafter:
        assert recipe.draft is not None
        o = recipe.options
        config = SortedConfig(recipe.draft.exits, o.exit_thresholds, o.stop_threshold)
        gates = recipe.draft.gates if gated else None
        if gated and gates is None:
            raise ValueError("method s2d-gate needs exit gates beside the draft (s2d_exit_gates.safetensors); "
                             "train them with `s2d train-draft --objective gates`")
        return SortedDrafter(recipe.model, config, recipe.length, gates, vocab=recipe.vocab)

    return build


def _steered(recipe: Recipe) -> Drafter:
    assert recipe.draft is not None
    return SteeredDrafter(recipe.model, recipe.exit, recipe.draft.steering(), recipe.length,
                          recipe.options.stop_threshold, recipe.vocab, target=recipe.target)


def _refined(recipe: Recipe) -> Drafter:
    assert recipe.draft is not None
    return RefinedDrafter(recipe.model, recipe.exit, recipe.draft.ngram(), recipe.draft.refine_table, recipe.length,
                          recipe.options.stop_threshold, recipe.vocab, target=recipe.target,
                          behind_lookup=recipe.behind_lookup)


def _tree(mode: Literal["dynamic", "fixed", "beam"]) -> Callable[[Recipe], Drafter]:
    def build(recipe: Recipe) -> Drafter:
        return TreeDrafter(recipe.model, default_exit(recipe.model, recipe.options), recipe.options.tree,
                           recipe.vocab, mode)

    return build


def _lookup_then(recipe: Recipe) -> Drafter:
    """lookup+M: lookup's tokens where the text repeats, M's chain or tree otherwise."""
    inner = build(recipe.inner(behind_lookup=True))
    assert inner is not None
    hybrid = HybridTreeDrafter if inner.grows_trees else HybridDrafter
    return hybrid(inner, recipe.options.hybrid, recipe.target)


def _overlapped(recipe: Recipe) -> Drafter:
    """overlap+M: M's model drafting overlapped with verification (a hybrid keeps its lookup as is)."""
    drafter = build(recipe.inner())
    threads = OverlapThreads.for_cores(available_cores())
    if isinstance(drafter, HybridDrafter):
        return HybridDrafter(OverlapDrafter(drafter.inner, threads), drafter.config, recipe.target)
    assert drafter is not None  # the row accepts only methods with a draft model
    return OverlapDrafter(drafter, threads)


def _is_model_method(m: ParsedMethod) -> bool:
    return m.spec.composable


def _is_chain_with_model(m: ParsedMethod) -> bool:
    return m.drafts == "model" and not m.overlaps


_S2D = DEFAULT_S2D_OPTIONS

TABLE: tuple[MethodSpec, ...] = (
    MethodSpec("ar", "plain autoregressive decoding (the speedup baseline)", "nothing", lambda r: None),
    MethodSpec("s2d", "the default: lookup, else one exit of the sorted draft while it pays (measured best; "
               "RESULTS.md)", "inner", _lookup_then, inner="sd-exit-{exit}", lookup=True, knobs=_S2D, ranked_head=True),
    MethodSpec("sd", "speculative decoding with the whole --draft model", "model", _whole_draft, composable=True),
    MethodSpec("sd-exit-{E}", "exit E of a sorted --draft alone (its first E layers and the head)", "model",
               _one_exit, composable=True),
    MethodSpec("s2d-softmax", "the paper's cascade: the first exit whose softmax confidence reaches its threshold "
               "answers", "model", _cascade(gated=False), composable=True),
    MethodSpec("s2d-gate", "the cascade decided by learned exit gates (the head runs once, at the answering exit)",
               "model", _cascade(gated=True), composable=True),
    MethodSpec("pld", "prompt lookup: copy what followed the latest earlier n-gram (backward scan)", "lookup",
               lambda r: PromptLookupDrafter()),
    MethodSpec("lookup", "n-gram index drafting: the longest earlier match of the context's tail, several orders",
               "lookup", _lookup_only, lookup=True),
    MethodSpec("lookup+s2d-tree", "lookup's chain where the text repeats, else the s2d-tree (with s2d's knobs)",
               "inner", _lookup_then, inner="s2d-tree", lookup=True, knobs=_S2D, ranked_head=True),
    MethodSpec("lookup+{M}", "lookup tokens where the text repeats, model method M otherwise (e.g. lookup+sd-exit-1; "
               "lookup+rsd, lookup+rsd-sbs: the draft's token tree otherwise)", "inner", _lookup_then,
               accepts=_is_model_method, lookup=True),
    MethodSpec("steer-exit-{E}", "exit E of a sorted --draft, steered by the target's hidden state (maps trained "
               "with `s2d train-draft --objective steer`)", "model", _steered, composable=True),
    MethodSpec("s2d-steer", "s2d with its model part steered toward the served target (needs the draft's steering "
               "maps)", "inner", _lookup_then, inner="steer-exit-{exit}", lookup=True, knobs=_S2D, ranked_head=True),
    MethodSpec("s2d-tree", "a token tree from the s2d exit, verified in one pass: dynamic (EAGLE-2) when greedy, "
               "sampled without replacement (RSD) when sampling", "tree", _tree("dynamic"), ranked_head=True,
               composable=True),
    MethodSpec("refine-exit-{E}", "exit E of a sorted --draft, its top-k rescored with n-gram models of the text so "
               "far and of the training corpus (needs `s2d train-draft --objective ngram`)", "model", _refined,
               composable=True),
    MethodSpec("s2d-refine", "s2d with its model part refined (lookup, else the refined default exit)", "inner",
               _lookup_then, inner="refine-exit-{exit}", lookup=True, knobs=_S2D, ranked_head=True),
    MethodSpec("s2d-overlap", "s2d with drafting overlapped with verification: the draft drafts the next step on its "
               "own core while the target verifies (2+ cores; sequential s2d on one)", "inner", _overlapped,
               inner="s2d", overlaps=True),
    MethodSpec("overlap+{M}", "chain method M overlapped with verification (e.g. overlap+sd-exit-2, "
               "overlap+lookup+sd-exit-1)", "inner", _overlapped, accepts=_is_chain_with_model, overlaps=True),
    MethodSpec("rsd", "recursive speculative decoding: a fixed-shape tree, children drawn without replacement, "
               "recursive rejection sampling", "tree", _tree("fixed"), composable=True),
    MethodSpec("rsd-sbs", "recursive speculative decoding's stochastic beam search: --tree-top-k beams per level "
               "(Gumbel values conditioned on the parent's), recursive rejection sampling; a beam search when greedy",
               "tree", _tree("beam"), composable=True),
)

METHOD_HELP: dict[str, str] = {spec.shown: spec.help for spec in TABLE}
METHODS = tuple(METHOD_HELP)


def parse_method(name: str) -> ParsedMethod:
    """Match a method name to its row (before any model is loaded); a ValueError for unknown names."""
    if not isinstance(name, str):
        raise TypeError(f"a method name is a string, not {type(name).__name__}")
    for spec in TABLE:
        match = spec.regex.fullmatch(name)
        if match is None:
            continue
        groups = match.groupdict()
        inner = None
        if groups.get("M") is not None:
            try:
                inner = parse_method(groups["M"])
            except ValueError:
                inner = None
            if inner is None or spec.accepts is None or not spec.accepts(inner):
                continue  # a later row may take the name; else it is refused below
        elif spec.inner is not None:
            inner = ParsedMethod(spec.inner, _placeholder(spec.inner)) if "{exit}" in spec.inner \
                else parse_method(spec.inner)
        exit_layers = int(groups["E"]) if groups.get("E") is not None else None
        return ParsedMethod(name, spec, exit_layers, inner)
    if name.startswith("overlap+") or name == "s2d-overlap":
        raise ValueError(f"{name}: overlap runs a chain method with a draft model (s2d, sd, sd-exit-E, lookup+M, ...), "
                         f"not {name.removeprefix('overlap+')!r}")
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)} "
                     "(E = an exit layer count, M = a model method)")


def _placeholder(template: str) -> MethodSpec:
    """The row a default-exit template (``sd-exit-{exit}``) will resolve to, for what it needs and drafts."""
    return parse_method(template.replace("{exit}", "1")).spec


def check_method(method: str) -> None:
    parse_method(method)


def needs_draft_model(method: str) -> bool:
    return parse_method(method).needs_draft


def sorted_exits(draft: Transformer) -> tuple[int, ...]:
    """The draft's exits (config ``s2d_exits``); a plain model has one exit, its last layer."""
    return draft.cfg.exits or (draft.cfg.num_layers,)


def default_exit(draft: Transformer, options: DraftOptions | None = None) -> int:
    """The exit s2d (and its trees) draft with: ``options.exit``, else the middle exit (a plain draft: its depth)."""
    exits = sorted_exits(draft)
    if len(exits) == 1:
        return exits[0]
    chosen = options.exit if options is not None and options.exit else exits[len(exits) // 2]
    if chosen not in exits:
        raise ValueError(f"exit {chosen} is not one of the draft's exits {list(exits)}")
    return chosen


def resolve_exit(template: str, draft: Transformer, options: DraftOptions | None = None) -> str:
    """A default-exit template as the method it runs with this draft: ``sd-exit-{exit}`` -> ``sd-exit-2``;
    a plain (one-exit) draft has nothing to choose between and drafts whole (``sd``)."""
    if len(sorted_exits(draft)) == 1 and template.endswith("sd-exit-{exit}"):
        return template.replace("sd-exit-{exit}", "sd")
    return template.replace("{exit}", str(default_exit(draft, options)))


def resolve_default(draft: Transformer | None, options: DraftOptions | None = None) -> str:
    """What ``s2d`` runs with this draft: lookup, then exit ``options.exit`` (or the middle exit)."""
    if draft is None:
        raise ValueError("method 's2d' needs a draft model (--draft)")
    return resolve_exit(DEFAULT_S2D, draft, options)


# How dear a verification row is decides how long drafts should be:
# with AMX tiles (or on a GPU, or on torch's path) a pass over many new tokens costs little more than one, and
# the knobs above were measured there; the native runtime's vector products (AVX512-BF16, AVX2) are
# compute-bound past a few rows, so there lookup copies fewer tokens and, on AVX2, the cost-aware switch
# charges more per drafted token (chosen with benchmarks/choose_default.py; RESULTS.md, "Defaults by instruction set").
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


def default_options(method: str, draft: "Transformer | DraftBundle | None" = None) -> DraftOptions:
    """A method's drafting knobs before any flag or calibration: its row's measured knobs, else the defaults;
    lookup's length and the switch's cost per drafted token by the instruction set (``ROW_COST_KNOBS``)."""
    m = parse_method(method)
    while m.spec.overlaps and m.inner is not None:  # overlap changes when drafts are made, not the knobs
        m = m.inner
    bundle = DraftBundle.of(draft)
    row_costs = {k: v for k, v in row_cost_knobs(None if bundle is None else bundle.model).items()
                 if (k == "lookup_tokens" and m.lookup) or (k == "verify_growth" and m.lookup and m.needs_draft)}
    ranked = m.spec.ranked_head and bundle is not None and bundle.vocab_ranking is not None
    return DraftOptions(**{**m.spec.knobs, **row_costs}, draft_vocab=DEFAULT_S2D_VOCAB if ranked else 0)


def engine_draft_tokens(method: str, options: DraftOptions) -> int:
    """The most tokens the engine lets the method draft per step (a tree's nodes included)."""
    m = parse_method(method)
    cap = options.tree_nodes if m.drafts == "tree" else options.num_draft_tokens
    if options.schedule == "heuristic":
        cap = max(cap, DraftLength(options.num_draft_tokens, "heuristic", maximum=max(16, cap)).maximum)
    if m.lookup:
        cap = max(cap, options.lookup_tokens)
    return cap


def build(recipe: Recipe) -> Drafter | None:
    return recipe.method.spec.build(recipe)


def build_drafter(method: str, draft: "Transformer | DraftBundle | None", options: DraftOptions = DraftOptions(),
                  target: Transformer | None = None) -> Drafter | None:
    """A fresh drafter for ``target`` (bound to it now: cost-aware switches price its passes, steered and
    refined drafters read its maps). Drafters built from the same ``draft`` share its weights and side files."""
    m = parse_method(method)
    bundle = DraftBundle.of(draft)
    if m.needs_draft and bundle is None:
        raise ValueError(f"method {method!r} needs a draft model (--draft)")
    if m.needs_draft and target is not None and bundle.model.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"method {method!r}: draft vocab_size {bundle.model.cfg.vocab_size} != target vocab_size "
                         f"{target.cfg.vocab_size}; speculative decoding needs the same vocabulary")
    return build(Recipe(m, bundle if m.needs_draft else None, target, options))
