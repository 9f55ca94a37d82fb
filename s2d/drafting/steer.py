"""Steering the sorted draft with the target's hidden state (after Berdoz, Rheinboldt, Wattenhofer).

Every verification pass already computes the target's last hidden state at the row that produced
the token it emitted last. A small map per target turns that state into a vector that is added to
the draft's residual stream for every token of the next block: at the exit the draft reads out, just
before its final norm and head, ``h_exit + A_t rmsnorm(h_target)`` (A_t: [draft hidden, target
hidden], one per target and exit). One sorted draft then bends toward whichever target it serves.

Why at the exit, not at the layers' input: measured on the zoo, a map at the input of the draft's
layers had not yet beaten the unsteered draft after the training a user can afford on a CPU (its
vector also enters the draft's KV cache, so a block's steering would outlive the block), while the
map at the exit raised teacher-forced agreement with the target's argmax at once (benchmarks/RESULTS.md,
"`s2d-steer`" and "Measurements behind the code"); and there the draft's cache stays exactly the
unsteered draft's, so a zero map reproduces the plain exit bit for bit.

The maps are trained with the draft frozen (``s2d train-draft --objective steer``, ``train/steer.py``)
and stored beside the draft in ``s2d_steer.safetensors``; the draft itself still loads as a plain
``LlamaForCausalLM``. A map is found by the target's fingerprint (a sample of its LM head), not its
name, so a renamed or re-downloaded target still finds its map and a different model never does.
Sampling stays lossless: the draft samples from the steered q and verification uses that q.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from s2d.drafting.length import DraftLength
from s2d.model import native
from s2d.drafting.sorted import SortedConfig, SortedDrafter
from s2d.model.llama import Transformer

STEER_FILE = "s2d_steer.safetensors"
_FINGERPRINTS: "weakref.WeakKeyDictionary[Transformer, str]" = weakref.WeakKeyDictionary()  # computed once per model


def target_fingerprint(target: Transformer) -> str:
    """A short id of a target's weights: its shape and a strided sample of its LM head (dtype-independent)."""
    if (cached := _FINGERPRINTS.get(target)) is not None:
        return cached
    cfg = target.cfg
    sample = target.lm_head.weight.detach().flatten()[::61].to(torch.bfloat16).view(torch.int16).cpu().numpy()
    h = hashlib.sha1(f"{cfg.vocab_size}:{cfg.hidden_size}:{cfg.num_layers}:".encode())
    h.update(sample.tobytes())
    _FINGERPRINTS[target] = fingerprint = h.hexdigest()[:16]
    return fingerprint


def steering_vector(matrix: Tensor, hidden: Tensor, eps: float = 1e-6) -> Tensor:
    """matrix [Cd, Ct] float32, the target's hidden state(s) [..., Ct] -> steering vector(s) [..., Cd] float32."""
    return F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=eps) @ matrix.T


def decode_steering_vector(matrix: Tensor, hidden: Tensor, eps: float) -> Tensor:
    """``steering_vector`` for one row [Ct] in the decode loop: [Cd] float32.

    On CPU the product goes through the native runtime's own kernel: torch's matrix-vector product
    opens an OpenMP region between two runtime passes, and on 2 cores the thread contention cost more
    than the whole zoo-s pass (benchmarks/RESULTS.md, "Measurements behind the code").
    """
    u = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=eps)[None]
    if matrix.device.type == "cpu" and native.library() is not None:
        return native.linear(u, matrix)[0]
    return (u @ matrix.T)[0]


@dataclass
class SteeringMaps:
    """Maps by (target fingerprint, exit): [draft hidden, target hidden] float32; ``targets`` names them."""

    draft_hidden: int
    maps: dict[tuple[str, int], Tensor] = field(default_factory=dict)
    targets: dict[str, dict] = field(default_factory=dict)  # fingerprint -> {"name", "hidden_size"}

    def add(self, target: Transformer, name: str, exit_layers: int, matrix: Tensor) -> None:
        if tuple(matrix.shape) != (self.draft_hidden, target.cfg.hidden_size):
            raise ValueError(f"a map for {name} must be [{self.draft_hidden}, {target.cfg.hidden_size}], "
                             f"got {list(matrix.shape)}")
        fp = target_fingerprint(target)
        self.maps[fp, exit_layers] = matrix.detach().float().cpu().contiguous()
        self.targets[fp] = {"name": name, "hidden_size": target.cfg.hidden_size}

    def for_target(self, target: Transformer, exit_layers: int) -> Tensor:
        """The map for ``target`` at ``exit_layers``; a ValueError naming what is stored when there is none."""
        key = (target_fingerprint(target), exit_layers)
        if key not in self.maps:
            have = sorted({f"{self.targets[fp]['name']} (exit {e})" for fp, e in self.maps})
            raise ValueError(f"no steering map for this target at exit {exit_layers} beside the draft (it has: "
                             f"{', '.join(have) or 'none'}); train one with `s2d train-draft --objective steer "
                             f"--init DRAFT --targets TARGET ...`")
        return self.maps[key]

    def save(self, directory: Path) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / STEER_FILE
        tensors = {f"{fp}.exit{e}": m for (fp, e), m in sorted(self.maps.items())}
        meta = {"draft_hidden": self.draft_hidden, "targets": self.targets}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"s2d_steer": json.dumps(meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: Path | None, draft_hidden: int) -> "SteeringMaps | None":
        """The maps stored beside a draft, or None; a malformed file is a CheckpointError naming it."""
        if directory is None or not (Path(directory) / STEER_FILE).exists():
            return None
        path = Path(directory) / STEER_FILE
        from safetensors import safe_open

        from s2d.side_files import side_file

        with side_file(path, "steering maps", "rewrite them with `s2d train-draft --objective steer`"):
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["s2d_steer"])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            targets = meta["targets"]
            if meta["draft_hidden"] != draft_hidden:
                raise ValueError(f"maps for a draft of hidden size {meta['draft_hidden']}, this one has {draft_hidden}")
            out = cls(draft_hidden, targets=targets)
            for name, matrix in tensors.items():
                fp, _, exit_part = name.rpartition(".exit")
                if fp not in targets or not exit_part.isdigit():
                    raise ValueError(f"tensor {name!r} names no stored target")
                want = (draft_hidden, int(targets[fp]["hidden_size"]))
                if tuple(matrix.shape) != want or not matrix.is_floating_point() or not torch.isfinite(matrix).all():
                    raise ValueError(f"tensor {name!r} must be finite floats of shape {list(want)}, got "
                                     f"{matrix.dtype} {list(matrix.shape)}")
                out.maps[fp, int(exit_part)] = matrix.float().contiguous()
            return out


class SteeredDrafter(SortedDrafter):
    """One exit of the sorted draft, its read-out moved by the served target's steering vector."""

    def __init__(self, model: Transformer, exit_layers: int, maps: SteeringMaps, length: DraftLength | None = None,
                 stop_threshold: float = 0.0, vocab: list[int] | None = None,
                 target: Transformer | None = None) -> None:
        """``target``: the target served (its map is looked up now); None: unsteered until ``bind_target``."""
        super().__init__(model, SortedConfig((exit_layers,), (0.0,), stop_threshold), length, vocab=vocab)
        self.maps = maps
        self.exit_layers = exit_layers
        self.matrix: Tensor | None = None  # [Cd, Ct] of the bound target
        self.steer: Tensor | None = None  # [Cd] in the draft's dtype; None: nothing observed yet
        # The last observed target state [Ct], turned into ``steer`` when the draft next reads out: inside
        # s2d most steps are lookup steps that never read the draft, so the product waits until one does.
        self.observed: Tensor | None = None
        if target is not None:
            self.bind_target(target)

    def bind_target(self, target: Transformer) -> None:
        """Serve ``target``: its map (a ValueError when the draft has none for it)."""
        self.matrix = self.maps.for_target(target, self.exit_layers)
        self.steer = self.observed = None

    def observe(self, hidden: Tensor) -> None:
        """The target's last hidden state [Ct] after a verification: the next block's steering vector."""
        if self.matrix is not None:
            self.observed = hidden

    def reset(self) -> None:
        super().reset()
        self.steer = self.observed = None

    def readout(self, pos: int) -> Tensor:
        if self.observed is not None:
            eps = self.model.cfg.rms_norm_eps
            self.steer = decode_steering_vector(self.matrix, self.observed, eps).to(self.model.dtype)
            self.observed = None
        return self.hidden[pos] if self.steer is None else self.hidden[pos] + self.steer
