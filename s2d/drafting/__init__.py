"""Drafting: the Drafter contract (base.py), the drafters, and the table of decoding methods (methods.py)."""

from __future__ import annotations

from s2d.drafting.base import Draft, Drafter, DrafterWrapper, DraftTree
from s2d.drafting.bundle import DraftBundle
from s2d.drafting.gates import ExitGates
from s2d.drafting.hybrid import HybridConfig, HybridDrafter
from s2d.drafting.length import DraftLength
from s2d.drafting.lookup import PromptLookupDrafter
from s2d.drafting.methods import (DEFAULT_S2D, METHOD_HELP, METHODS, TABLE, DraftOptions, MethodSpec, ParsedMethod,
                                  build_drafter, check_method, default_options, engine_draft_tokens, needs_draft_model,
                                  parse_method, resolve_default, sorted_exits)
from s2d.drafting.model import ModelDrafter
from s2d.drafting.ngram import NgramConfig, NgramDrafter
from s2d.drafting.sorted import SortedConfig, SortedDrafter

__all__ = ["DEFAULT_S2D", "Draft", "DraftBundle", "DraftLength", "DraftOptions", "DraftTree", "Drafter",
           "DrafterWrapper", "ExitGates", "HybridConfig", "HybridDrafter", "METHOD_HELP", "METHODS", "MethodSpec",
           "ModelDrafter", "NgramConfig", "NgramDrafter", "ParsedMethod", "PromptLookupDrafter", "SortedConfig",
           "SortedDrafter", "TABLE", "build_drafter", "check_method", "default_options", "engine_draft_tokens",
           "needs_draft_model", "parse_method", "resolve_default", "sorted_exits"]
