"""The transformers-free tokenizer for generation encodes and decodes exactly as transformers does."""

from __future__ import annotations

import json

from s2d.model.loading import load_tokenizer
from s2d.model.tiny import write_random_checkpoint
from s2d.model.tokenizer import FastTokenizer, fast_tokenizer

TEXTS = ["def f(x):\n    return x  # é ü 中文", "", "  leading spaces\tand tabs\n\n", "<|endoftext|>after eos"]


def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["def parse(line):\n    return line.split()\n" * 50], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")


def test_fast_tokenizer_equals_transformers(tmp_path):
    for name, tok in (("byte", None), ("bpe", bpe_tokenizer())):
        path = write_random_checkpoint(tmp_path / name, num_layers=1, tokenizer=tok)
        fast, ref = fast_tokenizer(path), load_tokenizer(path)
        assert isinstance(fast, FastTokenizer)
        assert fast.get_vocab() == ref.get_vocab() and fast.eos_token_id == ref.eos_token_id
        for text in TEXTS:
            ids = fast(text).input_ids
            assert ids == ref(text).input_ids, text
            assert fast(text, add_special_tokens=False).input_ids == ref(text, add_special_tokens=False).input_ids
            for skip in (True, False):
                assert fast.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_fast_tokenizer_steps_aside_where_transformers_acts(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", num_layers=1)
    config = json.loads((path / "tokenizer_config.json").read_text())
    for change in ({"add_bos_token": True}, {"chat_template": "{{ messages }}"}, {"tokenizer_class": "LlamaTokenizer"}):
        (path / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
        assert fast_tokenizer(path) is None, change
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").write_text("{{ messages }}")
    assert fast_tokenizer(path) is None
