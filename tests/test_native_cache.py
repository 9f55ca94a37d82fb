"""The native runtime's build cache (issue 28, class 2): a damaged library is rebuilt, never loaded; a
compiler that hangs (or a build lock held forever) times out to the torch path with one line on stderr.

Every case runs in a subprocess on a temporary ``$S2D_CACHE`` with a stand-in compiler script, so the
real cache is never touched and no case compiles anything (the stand-in copies the library this test
process already loaded).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from s2d.model import native

REAL = native.library()
pytestmark = pytest.mark.skipif(REAL is None, reason="the native runtime does not run on this machine")

PROBE = "from s2d.model import native; print('loaded' if native.library() is not None else 'fallback')"


def _compiler(tmp_path: Path, body: str) -> Path:
    """A stand-in $CXX: ``body`` runs with $OUT set to the path after -o."""
    script = tmp_path / "fake-cxx"
    script.write_text(f'#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\nOUT="$2"\n{body}\n')
    script.chmod(0o755)
    return script


def _run(tmp_path: Path, compiler: Path, timeout: str = "20") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "S2D_CACHE": str(tmp_path / "cache"), "CXX": str(compiler),
           "S2D_NATIVE_BUILD_TIMEOUT": timeout, "S2D_NATIVE": "1"}
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60, check=False)


def _copying(tmp_path: Path) -> Path:
    return _compiler(tmp_path, f'cp "{REAL._name}" "$OUT"')


def _fallback_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "fallback"
    lines = [ln for ln in result.stderr.splitlines() if "unavailable" in ln]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_damaged_library_is_rebuilt(tmp_path: Path) -> None:
    compiler = _copying(tmp_path)
    first = _run(tmp_path, compiler)
    assert first.stdout.strip() == "loaded", first.stderr
    lib = next((tmp_path / "cache" / "native").glob("*.so"))
    good = hashlib.sha256(lib.read_bytes()).hexdigest()
    for damage in ("truncate", "garbage", "no-record"):
        if damage == "truncate":  # what a full disk or a killed copy leaves: loading it raised SIGBUS
            lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 3])
        elif damage == "garbage":
            lib.write_bytes(b"\x7fELF" + os.urandom(4096))
        else:  # a library cached before records existed, or one whose record was lost
            lib.with_name(lib.name + ".sha256").unlink()
        again = _run(tmp_path, compiler)
        assert again.returncode == 0 and again.stdout.strip() == "loaded", (damage, again.stderr)
        assert "building the native CPU runtime" in again.stderr, damage
        assert hashlib.sha256(lib.read_bytes()).hexdigest() == good, damage
    third = _run(tmp_path, compiler)  # verified now: loaded without building
    assert third.stdout.strip() == "loaded" and "building" not in third.stderr


def test_hung_compiler_times_out_to_torch(tmp_path: Path) -> None:
    result = _run(tmp_path, _compiler(tmp_path, "sleep 600"), timeout="1")
    line = _fallback_line(result)
    assert "did not finish building within 1 s" in line and "torch" in line
    assert not list((tmp_path / "cache" / "native").glob("*.so"))


def test_failing_compiler_falls_back_in_one_line(tmp_path: Path) -> None:
    result = _run(tmp_path, _compiler(tmp_path, "echo 'error: one\nerror: two' >&2; exit 1"))
    assert "failed (exit 1) on runtime.cpp: error: one error: two" in _fallback_line(result)
    garbage = _run(tmp_path, _compiler(tmp_path, 'echo garbage > "$OUT"'))  # built, but no library
    _fallback_line(garbage)


def test_build_lock_held_forever_times_out(tmp_path: Path) -> None:
    compiler = _copying(tmp_path)
    lock_dir = tmp_path / "cache" / "native"
    lock_dir.mkdir(parents=True)
    with open(lock_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a process stuck in its build
        line = _fallback_line(_run(tmp_path, compiler, timeout="1"))
    assert "build lock" in line


def test_bad_timeout_setting_falls_back(tmp_path: Path) -> None:
    assert "S2D_NATIVE_BUILD_TIMEOUT" in _fallback_line(_run(tmp_path, _copying(tmp_path), timeout="soon"))
