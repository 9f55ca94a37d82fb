"""The trainable sorted draft: a K-layer transformers causal LM whose exits share the final norm and head.

Why transformers' model and not s2d's runtime for training: the runtime is built for inference (its
KV cache is written in place, its parameters are frozen, q/k/v are fused), while transformers'
``LlamaForCausalLM`` gives a plain differentiable forward and ``save_pretrained`` writes exactly the
checkpoint the issue asks for (loadable as a plain K-layer model). The runtime is still used where it
is the better tool: the teachers' forward passes and the draft's on-policy sampling (KV cache).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from s2d.model.config import CheckpointError, ModelConfig
from s2d.model.llama import Transformer
from s2d.model.loading import build_model, check_checkpoint, check_finite, hf_to_s2d
from s2d.train.config import DraftShape


class SortedDraft(nn.Module):
    """Wraps a transformers causal LM; ``forward`` returns the logits of every exit."""

    def __init__(self, model: nn.Module, exits: tuple[int, ...]) -> None:
        super().__init__()
        depth = model.config.num_hidden_layers
        if not exits or exits[-1] > depth or exits[0] < 1:
            raise ValueError(f"exits {list(exits)} do not fit a {depth}-layer draft")
        self.model = model
        self.exits = exits
        model.config.s2d_exits = list(exits)  # recorded in every checkpoint written from it

    @property
    def depth(self) -> int:
        return self.model.config.num_hidden_layers

    def forward(self, ids: Tensor) -> list[Tensor]:
        """ids [B, T] -> per exit logits [B, T, V], shallowest exit first."""
        out = self.model(input_ids=ids, output_hidden_states=True, use_cache=False)
        # hidden_states[e] is the output of layer e (index 0: the embeddings). The last entry may or may
        # not already be normed depending on the transformers version, so the deepest exit reads the
        # model's own logits, which are norm + head of the last layer either way.
        norm, head = self.model.model.norm, self.model.lm_head
        return [out.logits if e == self.depth else head(norm(out.hidden_states[e])) for e in self.exits]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and its expected 'weights not used' warning (first K layers)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def init_from_checkpoint(path: Path, depth: int) -> nn.Module:
    """The first ``depth`` layers of ``path`` with its embeddings, final norm and head, in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source_depth = ModelConfig.from_file(path / "config.json").num_layers  # validates the architecture too
    if depth > source_depth:
        raise CheckpointError(f"cannot take {depth} layers from {path}, which has {source_depth}")
    # transformers would fill a missing tensor with fresh random values and say so only in a log line:
    # check names, shapes and the file's integrity first, as every s2d checkpoint reader does.
    check_checkpoint(path, num_layers=depth)
    config = AutoConfig.from_pretrained(path)
    config.num_hidden_layers = depth
    if hasattr(config, "s2d_exits"):  # a sorted draft as init: its exits need not fit the new depth
        del config.s2d_exits
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    check_finite(dict(model.named_parameters()), path, sample=False)  # training on NaN only spreads it
    return model


def init_random(shape: DraftShape, depth: int, tokenizer, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden_size, num_hidden_layers=depth,
                         num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                         intermediate_size=shape.intermediate_size, max_position_embeddings=shape.max_positions,
                         tie_word_embeddings=shape.tie_word_embeddings, bos_token_id=eos, eos_token_id=eos,
                         pad_token_id=eos)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def to_runtime(model: nn.Module) -> Transformer:
    """A float32 copy of the draft in s2d's runtime (for fast KV-cached sampling)."""
    raw = model.config.to_dict()
    raw.setdefault("architectures", [type(model).__name__])
    raw["dtype"] = "float32"
    raw.pop("s2d_exits", None)  # sampling picks its exit itself
    cfg = ModelConfig.from_dict(raw)
    # Clone: the runtime fuses and owns its tensors and must not alias the parameters being trained.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return build_model(cfg, hf_to_s2d(state, cfg), torch.float32, next(model.parameters()).device)


@torch.inference_mode()
def sample_continuations(model: Transformer, exit_layers: int, prefix: Tensor, num_new: int, temperature: float,
                         generators: list[torch.Generator]) -> Tensor:
    """Sample ``num_new`` tokens after each row of prefix [B, P] from exit ``exit_layers`` -> [B, num_new].

    Each row draws its randomness from its own generator (Gumbel-max), so a row's sample does not
    depend on which other rows share its batch, nor on how a global batch is split over processes.
    """
    bsz, plen = prefix.shape
    device = prefix.device
    cache = model.new_cache(batch=bsz, capacity=plen + num_new, num_layers=exit_layers)
    hidden = model.run_layers(model.embed_tokens(prefix), torch.arange(plen, device=device), cache, 0, exit_layers)
    out = torch.empty(bsz, num_new, dtype=torch.long, device=device)
    vocab = model.cfg.vocab_size
    for i in range(num_new):
        logits = model.logits(hidden[:, -1]).float() / temperature  # [B, V]
        u = torch.stack([torch.rand(vocab, generator=g) for g in generators]).to(device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)).clamp_min(1e-20))
        out[:, i] = (logits + gumbel).argmax(-1)
        if i + 1 < num_new:
            hidden = model.run_layers(model.embed_tokens(out[:, i:i + 1]), torch.tensor([plen + i], device=device),
                                      cache, 0, exit_layers)
    return out
