"""A tokenizer without importing transformers, for commands that only encode and decode.

Importing transformers takes over a second, most of ``s2d generate``'s start-up on a small model.
Where a checkpoint's tokenizer is a plain ``tokenizer.json`` (transformers' generic fast tokenizer
classes, no settings that change encoding in Python), the ``tokenizers`` library alone encodes and
decodes exactly as transformers would; everywhere else, and for chat templates, transformers is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from s2d.model.config import CheckpointError

# tokenizer_config.json classes whose encoding is exactly tokenizer.json's
GENERIC_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}
# settings transformers applies in Python on top of tokenizer.json
PYTHON_SIDE_SETTINGS = ("add_bos_token", "add_eos_token", "add_prefix_space", "clean_up_tokenization_spaces",
                        "legacy", "do_lower_case")


@dataclass
class Encoding:
    input_ids: list[int]


class FastTokenizer:
    """The subset of a transformers tokenizer that generation uses: call, decode, get_vocab, eos_token_id."""

    chat_template = None  # chat templates need transformers: load_tokenizer

    def __init__(self, path: Path, eos_token: str | None) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self.eos_token_id = self._tok.token_to_id(eos_token) if eos_token else None

    def __call__(self, text: str, add_special_tokens: bool = True) -> Encoding:
        return Encoding(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)


def fast_tokenizer(directory: Path) -> FastTokenizer | None:
    """A FastTokenizer for the checkpoint in ``directory``, or None where only transformers is exact."""
    config_path, json_path = directory / "tokenizer_config.json", directory / "tokenizer.json"
    if not (config_path.is_file() and json_path.is_file()) or (directory / "chat_template.jinja").exists():
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(config, dict) or config.get("tokenizer_class") not in GENERIC_CLASSES
            or any(config.get(k) for k in PYTHON_SIDE_SETTINGS) or config.get("chat_template")):
        return None
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    try:
        return FastTokenizer(json_path, eos if isinstance(eos, str) else None)
    except Exception as err:  # a malformed tokenizer.json: the same one-line error transformers' path gives
        raise CheckpointError(f"cannot load a tokenizer from {directory}: {' '.join(str(err).split())}") from err
