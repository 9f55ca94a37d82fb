"""Training text: read documents (files, directories of sources, JSONL), tokenize, pack, batch.

Packing is the usual one for causal LM training: every document's tokens followed by EOS, all
concatenated, cut into rows of ``seq_len + 1`` tokens (inputs and shifted labels) with stride
``seq_len``, so no token is padding and the loss needs no mask.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class DataConfig:
    paths: tuple[Path, ...]  # text files, JSONL files, or directories walked for ``glob``
    glob: str = "*.py"  # which files of a directory are documents
    exclude_dirs: tuple[str, ...] = ()  # directory names skipped anywhere below a directory (e.g. site-packages)
    exclude_files: tuple[str, ...] = ()  # paths relative to a given directory, never read (held-out files)
    max_file_bytes: int | None = None  # larger files are skipped (generated tables, not code)
    seq_len: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(Path(p) for p in self.paths))
        if not self.paths:
            raise ValueError("no training data given")
        for p in self.paths:
            if not p.exists():
                raise ValueError(f"training data path {p} does not exist")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.max_file_bytes is not None and self.max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be >= 1, got {self.max_file_bytes}")


@dataclass(frozen=True)
class Document:
    source: str  # file path (relative to its directory when walked), with ':line' for JSONL records
    text: str


def exclusion_list(path: str | Path) -> tuple[str, ...]:
    """Relative paths to leave out, read from a zoo-style ``split.json`` or a file of one path per line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"exclusion list {path} does not exist")
    if path.suffix == ".json":
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or not isinstance(raw.get("validation_files"), list):
            raise ValueError(f"{path} holds no 'validation_files' list")
        return tuple(str(p) for p in raw["validation_files"])
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


def walk_files(root: Path, cfg: DataConfig) -> Iterator[Path]:
    """The files below ``root`` that ``cfg`` reads as documents, in a deterministic (sorted) order."""
    excluded = set(cfg.exclude_files)
    # os.walk in sorted order: the file order (hence the token stream) must not depend on the filesystem.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in cfg.exclude_dirs)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel in excluded or not path.match(cfg.glob):
                continue
            if cfg.max_file_bytes is not None and path.stat().st_size > cfg.max_file_bytes:
                continue
            yield path


def within_context(data: DataConfig, max_positions: int) -> DataConfig:
    """``data`` packed into rows a model of ``max_positions`` positions can run (a row is seq_len + 1 tokens).

    For objectives that only read positions (gates, steering): a shorter row gives as many positions.
    """
    return data if data.seq_len < max_positions else replace(data, seq_len=max(2, max_positions - 1))


def read_text_file(path: Path, strict: bool = False) -> str:
    """A training file's text. A binary file (a NUL byte in its first 8 KiB, as git and grep decide) is
    refused rather than trained on as mojibake; other undecodable bytes become U+FFFD (``strict``: refused)."""
    data = path.read_bytes()
    if (nul := data.find(b"\0", 0, 8192)) >= 0:
        raise ValueError(f"training data {path} is a binary file (a NUL byte at offset {nul}), not text; "
                         "give text files, JSONL, or folders of them")
    try:
        return data.decode("utf-8", errors="strict" if strict else "replace")
    except UnicodeDecodeError as err:
        raise ValueError(f"training data {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _jsonl_documents(path: Path) -> Iterator[Document]:
    for n, line in enumerate(read_text_file(path, strict=True).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n} is not valid JSON: {err}") from err
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            texts = [record["text"]]
        elif isinstance(record, dict) and isinstance(record.get("turns"), list):  # Spec-Bench questions
            texts = [t for t in record["turns"] if isinstance(t, str)]
        else:
            raise ValueError(f"{path}:{n} has neither a 'text' string nor a 'turns' list")
        for text in texts:
            yield Document(f"{path}:{n}", text)


def read_documents(cfg: DataConfig) -> list[Document]:
    """All documents the config names, in a deterministic order; empty ones are dropped."""
    docs: list[Document] = []
    for root in cfg.paths:
        if root.is_dir():
            for path in walk_files(root, cfg):
                text = read_text_file(path)
                docs.append(Document(path.relative_to(root).as_posix(), text))
        elif root.suffix in JSONL_SUFFIXES:
            docs.extend(_jsonl_documents(root))
        else:
            docs.append(Document(root.name, read_text_file(root)))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"no training text found in {', '.join(map(str, cfg.paths))} (glob {cfg.glob!r})")
    return docs


def tokenize(docs: list[Document], tokenizer, eos_id: int) -> Tensor:
    """One stream [N] int32: each document's tokens then EOS (the separator the targets saw)."""
    stream: list[int] = []
    batch = 256
    for i in range(0, len(docs), batch):
        ids = tokenizer([d.text for d in docs[i:i + batch]], add_special_tokens=False, verbose=False).input_ids
        for row in ids:
            stream.extend(row)
            stream.append(eos_id)
    return torch.tensor(stream, dtype=torch.int32)


def pack(stream: Tensor, seq_len: int) -> Tensor:
    """stream [N] -> rows [R, seq_len + 1]; row r covers tokens r*seq_len .. (r+1)*seq_len (inclusive)."""
    rows = (stream.numel() - 1) // seq_len
    if rows < 1:
        raise ValueError(f"the training data holds {stream.numel()} tokens, fewer than one sequence of "
                         f"{seq_len + 1}; give more data or a smaller seq_len")
    return stream[: rows * seq_len + 1].unfold(0, seq_len + 1, seq_len).contiguous()


@dataclass
class PackedData:
    rows: Tensor  # [R, seq_len + 1] int32 token ids
    sources: list[str] = field(default_factory=list)  # the documents they came from, for audits
    key: str = ""  # fingerprint of the inputs (see ``fingerprint``), the cache's key
    from_cache: bool = False  # read from an up-to-date cache file (nothing to write back)

    @property
    def num_tokens(self) -> int:
        return self.rows.shape[0] * (self.rows.shape[1] - 1)


def fingerprint(cfg: DataConfig, tokenizer) -> str:
    """A key for the token cache: the files (names, sizes, mtimes), the packing and the vocabulary."""
    h = hashlib.sha1()
    h.update(repr((cfg.glob, cfg.exclude_dirs, cfg.exclude_files, cfg.max_file_bytes, cfg.seq_len)).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for root in cfg.paths:
        files = walk_files(root, cfg) if root.is_dir() else iter([root])
        for path in files:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_packed(cfg: DataConfig, tokenizer, cache_path: Path | None = None, save: bool = True) -> PackedData:
    """Read, tokenize and pack, reusing ``cache_path`` when it was made from the same inputs.

    ``save``: write the cache when it was not up to date (else the caller may ``save_packed`` later).
    """
    key = fingerprint(cfg, tokenizer) if cache_path is not None else ""
    if cache_path is not None and cache_path.exists():
        try:
            cached = torch.load(cache_path, weights_only=True)
        except Exception:  # a damaged cache is only a cache: rebuild it
            cached = {}
        if isinstance(cached, dict) and cached.get("key") == key:
            return PackedData(cached["rows"], list(cached["sources"]), key, from_cache=True)
    docs = read_documents(cfg)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate documents")
    data = PackedData(pack(tokenize(docs, tokenizer, eos), cfg.seq_len), [d.source for d in docs], key)
    if cache_path is not None and save:
        save_packed(data, cache_path)
    return data


def save_packed(data: PackedData, cache_path: Path) -> None:
    """Write the token cache atomically (a reader never sees half a file)."""
    tmp = cache_path.with_suffix(".tmp")
    torch.save({"key": data.key, "rows": data.rows, "sources": data.sources}, tmp)
    os.replace(tmp, cache_path)


def global_batch(step: int, num_rows: int, batch_size: int, seed: int) -> Tensor:
    """Row indices [batch_size] of optimizer step ``step``: consecutive slices of per-epoch permutations.

    A pure function of (step, seed): resuming needs no sampler state, and the global batch does not
    depend on how many processes share it.
    """
    if batch_size > num_rows:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_rows} sequences of the training data")
    per_epoch = num_rows // batch_size  # drop the ragged tail of each epoch
    epoch, index = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_rows, generator=gen)
    return perm[index * batch_size:(index + 1) * batch_size]
