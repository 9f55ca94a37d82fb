"""A loaded draft and the side files stored beside it: the one place that reads them.

A sorted draft is a plain Llama-family checkpoint; what s2d trained for it lives in files beside its
weights (exit gates, the vocabulary ranking, the corpus n-gram model, steering maps, the refine
table). Each is read at most once per loaded draft, when a method first needs it, and a method that
needs a file the draft does not have is refused with a line saying how to make it.
"""

from __future__ import annotations

import weakref
from functools import cached_property
from pathlib import Path

from s2d.drafting.gates import ExitGates
from s2d.drafting.refine import NGRAM_FILE, CorpusNgram, RefineTable, load_corpus_ngram
from s2d.drafting.steer import STEER_FILE, SteeringMaps
from s2d.drafting.vocab import load_vocab
from s2d.model.llama import Transformer


class DraftBundle:
    """A draft model with its side files (``DraftBundle.of(draft)``: one bundle per loaded draft)."""

    _bundles: "weakref.WeakKeyDictionary[Transformer, DraftBundle]" = weakref.WeakKeyDictionary()

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.directory: Path | None = None if model.checkpoint_dir is None else Path(model.checkpoint_dir)

    @classmethod
    def of(cls, draft: "Transformer | DraftBundle | None") -> "DraftBundle | None":
        """The bundle of a loaded draft (made on first use, then shared), or None without a draft."""
        if draft is None or isinstance(draft, DraftBundle):
            return draft
        if (bundle := cls._bundles.get(draft)) is None:
            bundle = cls._bundles[draft] = cls(draft)
        return bundle

    @property
    def exits(self) -> tuple[int, ...]:
        """The draft's exits (config ``s2d_exits``); a plain model has one exit, its last layer."""
        return self.model.cfg.exits or (self.model.cfg.num_layers,)

    @cached_property
    def vocab_ranking(self) -> list[int] | None:
        """Token ids by frequency in the draft's training text (``s2d_draft_vocab.json``), or None."""
        return load_vocab(self.directory, self.model.cfg.vocab_size)

    @cached_property
    def gates(self) -> ExitGates | None:
        """Learned exit gates (``s2d_exit_gates.safetensors``), or None (also for a one-exit draft)."""
        if self.directory is None or len(self.exits) == 1:
            return None
        return ExitGates.load(self.directory, self.model)

    @cached_property
    def refine_table(self) -> RefineTable:
        """Per-target weights of the refined methods (``s2d_refine.json``; empty when absent)."""
        return RefineTable.load(self.directory)

    def ngram(self) -> CorpusNgram:
        """The corpus n-gram model; a ValueError saying how to build it when there is none."""
        corpus = self._corpus_ngram
        if corpus is None:
            raise ValueError(f"refined methods need the corpus n-gram model beside the draft ({NGRAM_FILE}); build "
                             "it with `s2d train-draft --objective ngram --init DRAFT --out NEW --data CORPUS`")
        return corpus

    @cached_property
    def _corpus_ngram(self) -> CorpusNgram | None:
        return load_corpus_ngram(self.directory, self.model.cfg.vocab_size)

    def steering(self) -> SteeringMaps:
        """The steering maps; a ValueError saying how to train them when there are none."""
        maps = self._steering
        if maps is None:
            raise ValueError(f"steered methods need steering maps beside the draft ({STEER_FILE}); train them "
                             "with `s2d train-draft --objective steer --init DRAFT --out NEW --targets T1 T2 ...`")
        return maps

    @cached_property
    def _steering(self) -> SteeringMaps | None:
        return SteeringMaps.load(self.directory, self.model.cfg.hidden_size)
