"""Reading the files s2d keeps beside a draft (n-gram model, refine table, steering maps, exit gates,
vocabulary ranking, calibration): whatever is wrong with one is one line naming the file.

A side file may be truncated (a full disk, a copy cut short), overwritten, or edited by hand; its
parser then fails in ways no loader lists in full (``zipfile.BadZipFile``, ``zlib.error``,
``RecursionError`` from deeply nested JSON, a shape that does not broadcast). Each loader parses and
checks its file inside ``side_file``, which turns any such failure into a ``CheckpointError`` naming
the file and how to rewrite it, instead of a traceback from deep inside the parser.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from s2d.model.config import CheckpointError


@contextmanager
def side_file(path: Path | str, what: str, remedy: str = "") -> Iterator[None]:
    """Parse and check the side file ``path`` (a ``what``) in this block; any failure is one line naming it."""
    try:
        yield
    except CheckpointError:
        raise
    # The block only reads and checks this file, so every failure in it is the file's.
    except Exception as err:  # noqa: BLE001
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        hint = f"; {remedy}" if remedy else ""
        raise CheckpointError(f"malformed {what} {path}: {reason}{hint}") from None


def read_json(path: Path | str) -> Any:
    """A side file's JSON (call inside ``side_file``); its fields are the loader's to check."""
    return json.loads(Path(path).read_bytes().decode("utf-8"))
