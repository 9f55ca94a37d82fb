"""Tiny random checkpoints in Hugging Face format, for tests and for running with no model at hand.

They are written by transformers itself, so loading them exercises exactly the path real
checkpoints take.
"""

from __future__ import annotations

from pathlib import Path

import torch

EOS_TOKEN = "<|endoftext|>"


def byte_tokenizer():
    """A byte-level tokenizer with 256 byte tokens and ``<|endoftext|>`` (id 256), no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[EOS_TOKEN] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([EOS_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN, model_max_length=512)


def write_random_checkpoint(out_dir: str | Path, arch: str = "llama", *, hidden_size: int = 64,
                            num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                            intermediate_size: int = 128, max_positions: int = 512, seed: int = 0,
                            dtype: torch.dtype = torch.float32, tokenizer=None, **config_overrides) -> Path:
    """Write a randomly initialised Llama / Mistral / Qwen2 checkpoint (with a tokenizer) to ``out_dir``."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    if arch not in classes:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(classes)}")
    tokenizer = tokenizer or byte_tokenizer()
    config_cls, model_cls = classes[arch]
    eos = tokenizer.eos_token_id
    config = config_cls(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                        intermediate_size=intermediate_size, max_position_embeddings=max_positions,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **config_overrides)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    # Random init gives near-uniform logits; scale the head up so outputs have real preferences.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0 if not config.tie_word_embeddings else 1.0)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
