"""Where commands write: never over what they did not write themselves.

Every command that writes a folder checks it before any work: it must be new, empty, or an output
of that same command (each command recognises its own: a train-draft run by its train_config.json,
an export by its marker file, a benchmark by its results.json); it must not be one of the
command's inputs. Writes then go to a temporary sibling that is renamed into place, so a failure
leaves either the old state or the new one, never half of it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

# The file an export-style command leaves in its output folder: which command wrote it, and what.
MARKER = ".s2d-output.json"


def _listing(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_not_input(out: Path, inputs: Iterable[tuple[str, Path | str | None]], flag: str = "--out") -> None:
    """Refuse an output folder that is, or holds, one of the inputs (``(flag, path)`` pairs)."""
    target = Path(out).expanduser().resolve()
    for name, path in inputs:
        if path is None:
            continue
        source = Path(path).expanduser().resolve()
        if source == target:
            raise ValueError(f"{flag} {out} is also {name}: writing there would overwrite an input; "
                             f"choose another {flag}")
        if target in source.parents:
            raise ValueError(f"{flag} {out} holds {name} {path}: choose an output folder of its own")


def check_output_dir(out: Path, owned: Callable[[Path], bool], what: str, flag: str = "--out") -> bool:
    """Refuse ``out`` unless it is absent, empty, or (``owned(out)``) an earlier output of this command.

    Returns True when ``out`` holds an earlier output (which the caller may replace or continue).
    """
    out = Path(out)
    if not out.exists():
        if out.is_symlink():
            raise ValueError(f"{flag} {out} is a broken symbolic link")
        return False
    if not out.is_dir():
        raise ValueError(f"{flag} {out} is a file, not a folder; choose a folder (it is created if missing)")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return False
    if owned(out):
        return True
    raise ValueError(f"{flag} {out} is not empty and is not {what}: it holds {_listing(names)}; choose a new or "
                     "empty folder (s2d never writes over files it did not write)")


def marked_by(command: str) -> Callable[[Path], bool]:
    """``owned`` for folders written whole by ``command``: its marker lists every entry of the folder."""

    def owned(out: Path) -> bool:
        try:
            marker = json.loads((out / MARKER).read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(marker, dict) or marker.get("command") != command:
            return False
        written = set(marker.get("files", ())) | {MARKER}
        foreign = sorted(p.name for p in out.iterdir() if p.name not in written)
        if foreign:  # replacing the folder would delete what the user added to it
            raise ValueError(f"{out} is an earlier {command} output but also holds {_listing(foreign)}, which "
                             f"{command} did not write; move it away or choose another folder")
        return True

    return owned


def write_marker(folder: Path, command: str, **details) -> None:
    files = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    (folder / MARKER).write_text(json.dumps({"command": command, **details, "files": files}, indent=1) + "\n")


def _real(out: Path) -> Path:
    # A symbolic link (runs/ -> /scratch/runs) is the user's: the folder it points to is replaced, not it.
    return out.resolve() if out.is_symlink() else out


def temporary_sibling(out: Path) -> Path:
    """A fresh hidden folder beside ``out`` (same filesystem, so renaming it into place is atomic)."""
    out = _real(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def swap_in(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` in the place of ``out`` (absent, empty, or an earlier output
    the caller checked is entirely its own): the old one is renamed away first, then deleted."""
    out = _real(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
