"""The embedded default family: generate with no --target, and s2d demo (offline, float32: outputs equal)."""

from __future__ import annotations

import json

from s2d.cli import main
from s2d.model.loading import EMBEDDED, embedded_family


def test_the_embedded_family_is_installed_and_within_budget():
    family, draft = embedded_family()
    weights = [p / "model.safetensors" for p in (*family.values(), draft)]
    assert sum(w.stat().st_size for w in weights) <= 130_000_000
    assert json.loads((draft / "config.json").read_text())["s2d_exits"] == [1, 2, 3]
    assert len((EMBEDDED / "prompts.jsonl").read_text().splitlines()) == 4


def test_generate_without_target_uses_the_embedded_family(capsys):
    assert main(["generate", "--prompt", "def fibonacci(n):", "--max-new-tokens", "12", "--json"]) == 0
    out = capsys.readouterr()
    assert "embedded default" in out.err and "method s2d" in out.err
    doc = json.loads(out.out)
    assert doc["method"] == "s2d" and doc["target"] == "zoo-l" and doc["num_new_tokens"] == 12


def test_demo_runs_and_speculative_output_equals_plain_in_float32(capsys):
    assert main(["demo", "--dtype", "float32", "--prompts", "2", "--max-new-tokens", "24", "--no-stream"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("zoo-l")]
    assert [r[1] for r in rows] == ["ar", "s2d"] and rows[1][-1] == "yes"
