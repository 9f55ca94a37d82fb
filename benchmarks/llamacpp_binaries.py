"""llama.cpp's own binaries on the bench's prompts: plain decoding (llama-completion) and llama-lookup.

    python benchmarks/llamacpp_binaries.py --tool ../shared/tools/llamacpp.sh --zoo ../shared/zoo \
        --questions ../shared/zoo/code_suite.jsonl --limit-per-category 5 --out runs/llamacpp_code.json

The bench's ``llamacpp``/``llamacpp-lookup`` peers go through llama-cpp-python, whose per-token
Python (sampling, logits copies) makes it slower than llama.cpp itself; users who pick llama.cpp run
its binaries. This runs them through the shared helper script (``llamacpp.sh``: build, convert to
bf16 GGUF, and ``tps`` = tokens/s over prefill + decode of 128 greedy tokens, 2 threads; lookup with
5 draft tokens) on the same prompts, for RESULTS.md beside the bench's numbers. Not a CI requirement.

Its numbers are llama.cpp's alone, taken apart from ours: on a host whose speed drifts between minutes
they cannot be set beside the bench's. Its successor, ``llamacpp_same_run.py``, runs both engines
interleaved in rounds on the same weights (decode, prefill, end to end, with the memory floor).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path


def questions(path: Path, limit: int | None) -> list[dict]:
    rows, seen = [], defaultdict(int)
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if limit is None or seen[row["category"]] < limit:
                seen[row["category"]] += 1
                rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tool", type=Path, required=True, help="../shared/tools/llamacpp.sh")
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--targets", default="zoo-s,zoo-m,zoo-l")
    ap.add_argument("--questions", type=Path, required=True)
    ap.add_argument("--limit-per-category", type=int)
    ap.add_argument("--gguf-dir", type=Path, default=Path(tempfile.gettempdir()) / "s2d-gguf")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    for path in (args.tool, args.questions, args.zoo):
        if not path.exists():
            sys.exit(f"llamacpp_binaries: {path} not found")
    rows = questions(args.questions, args.limit_per_category)
    args.gguf_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"questions": str(args.questions), "num_prompts": len(rows), "targets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets.split(","):
            gguf = args.gguf_dir / f"{target}.gguf"
            if not gguf.exists():
                subprocess.run(["bash", str(args.tool), "gguf", str(args.zoo / target), str(gguf)], check=True,
                               capture_output=True)
            speeds: dict[str, list[float]] = {"plain": [], "lookup": []}
            for i, row in enumerate(rows):
                prompt = Path(tmp) / f"p{i}.txt"
                prompt.write_text(row["turns"][0])
                for kind, runs in speeds.items():
                    run = subprocess.run(["bash", str(args.tool), "tps", kind, str(gguf), str(prompt), "128"],
                                         capture_output=True, text=True, check=False)  # a failed prompt is skipped
                    if run.returncode == 0 and run.stdout.strip():
                        runs.append(float(run.stdout.strip().splitlines()[-1]))
            report["targets"][target] = {k: {"mean_tokens_per_s": statistics.fmean(v) if v else None, "runs": v}
                                         for k, v in speeds.items()}
            print(f"{target}: llama-completion {report['targets'][target]['plain']['mean_tokens_per_s']:.1f} "
                  f"tok/s, llama-lookup {report['targets'][target]['lookup']['mean_tokens_per_s']:.1f} tok/s "
                  f"({len(rows)} prompts)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)  # runs/ by default: records stay out of the tree
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
