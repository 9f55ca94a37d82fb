"""Learned exit decisions for a sorted draft: answer at an exit without running the vocabulary head.

The paper's cascade computes each exit's full softmax to read its confidence, so a token that falls
through to the last exit pays the 8192-way head at every exit. A gate instead predicts, from the
exit's hidden state alone, whether going deeper would change the token: a logistic probe
``sigmoid(w . norm(h) + b)`` per non-last exit (CALM's "small trained classifier"), trained on the
draft's own activations over training text, with the label "this exit's argmax equals the deepest
exit's". No target is involved, so one set of gates serves every target. A token then pays the head
once, at the exit that answers.

Stored beside the draft as ``s2d_exit_gates.safetensors`` (the draft still loads as a plain
``LlamaForCausalLM``); tensors ``exit{E}.weight`` [C] and ``exit{E}.bias`` [1] for each non-last exit E.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from s2d.model.llama import Transformer, rms_norm

GATES_FILE = "s2d_exit_gates.safetensors"


@dataclass
class ExitGates:
    """Per non-last exit E: weight [C] and bias, applied to the final-normed hidden state."""

    weights: dict[int, Tensor]  # exit -> [C] float32
    biases: dict[int, float]

    def folded(self, norm_weight: Tensor) -> dict[int, Tensor]:
        """Weights with the final norm's scale folded in: w . (g * x) == (w * g) . x."""
        return {e: (w * norm_weight.float()).contiguous() for e, w in self.weights.items()}

    def save(self, directory: Path, meta: dict | None = None) -> Path:
        tensors = {}
        for e, w in self.weights.items():
            tensors[f"exit{e}.weight"] = w.float().contiguous()
            tensors[f"exit{e}.bias"] = torch.tensor([self.biases[e]], dtype=torch.float32)
        path = Path(directory) / GATES_FILE
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp, metadata={"s2d": json.dumps(meta or {})})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: Path, draft: Transformer) -> "ExitGates | None":
        """The gates stored beside a draft, or None; a malformed file is a CheckpointError naming it."""
        from s2d.side_files import side_file

        path = Path(directory) / GATES_FILE
        if not path.exists():
            return None
        with side_file(path, "exit gates", "retrain them with `s2d train-draft --objective gates`"):
            tensors = load_file(path)
            weights, biases = {}, {}
            for e in draft.cfg.exits[:-1]:
                w, b = tensors.get(f"exit{e}.weight"), tensors.get(f"exit{e}.bias")
                # A NaN gate never (or always) lets a token exit early: refused like a missing one.
                if (w is None or b is None or w.shape != (draft.cfg.hidden_size,) or b.numel() != 1
                        or not (w.is_floating_point() and b.is_floating_point())
                        or not (torch.isfinite(w).all() and torch.isfinite(b).all())):
                    raise ValueError(f"no well-formed gate for exit {e} (finite float weight "
                                     f"[{draft.cfg.hidden_size}], bias [1])")
                weights[e], biases[e] = w.float(), float(b)
            return cls(weights, biases)


class GateRunner:
    """Evaluates gates on one hidden state with a few vector ops (no vocabulary head)."""

    def __init__(self, gates: ExitGates, draft: Transformer) -> None:
        self.weights = gates.folded(draft.norm.detach())
        self.biases = gates.biases
        self.eps = draft.cfg.rms_norm_eps

    def __call__(self, exit_layers: int, hidden: Tensor) -> float:
        """P(exit ``exit_layers`` already gives the deepest exit's token) for hidden [C]."""
        x = hidden.float()
        r = torch.rsqrt(x.pow(2).mean() + self.eps)
        z = float(r * (x @ self.weights[exit_layers])) + self.biases[exit_layers]
        return 1.0 / (1.0 + math.exp(-z)) if z > -60 else 0.0


@torch.no_grad()
def gate_features(draft: Transformer, ids: Tensor) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """ids [B, L] -> per non-last exit: features [B*L, C] (final-normed hidden) and labels [B*L] (0/1)."""
    exits = draft.cfg.exits
    cache = draft.new_cache(batch=ids.shape[0], capacity=ids.shape[1], num_layers=exits[-1])
    h = draft.embed_tokens(ids)
    positions = torch.arange(ids.shape[1], device=ids.device)
    feats, tops = {}, {}
    start = 0
    for e in exits:
        h = draft.run_layers(h, positions, cache, start, e)
        start = e
        normed = rms_norm(h, draft.norm, draft.cfg.rms_norm_eps)
        tops[e] = draft.lm_head(normed).argmax(-1).reshape(-1)
        feats[e] = normed.float().reshape(-1, normed.shape[-1])
    deepest = tops[exits[-1]]
    return ({e: feats[e] for e in exits[:-1]},
            {e: (tops[e] == deepest).float() for e in exits[:-1]})


def fit_gates(features: dict[int, Tensor], labels: dict[int, Tensor], steps: int = 200,
              weight_decay: float = 1e-4) -> tuple[ExitGates, dict[int, dict[str, float]]]:
    """Logistic regression per exit (full-batch L-BFGS) on final-normed hidden states (norm weight applied,
    as ``gate_features`` gives them; ``GateRunner`` applies the stored w the same way)."""
    weights, biases, report = {}, {}, {}
    for e, u in features.items():
        y = labels[e]
        w = torch.zeros(u.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(u @ w + b, y) + weight_decay * w.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            p = torch.sigmoid(u @ w + b)
            acc = float(((p >= 0.5).float() == y).float().mean())
        weights[e], biases[e] = w.detach().clone(), float(b.detach())
        report[e] = {"samples": int(y.numel()), "agree_with_deepest": float(y.mean()), "train_accuracy": acc}
    return ExitGates(weights, biases), report
