"""Write what ``s2d-refine`` reads beside a copy of the zoo draft, in place (a few minutes on 2 cores):

    mkdir -p runs/zoo-draft && cp -r s2d/data/default/draft runs/zoo-draft/draft   # or build_zoo_draft.py's output
    python benchmarks/build_zoo_refine.py ../shared/zoo   # --draft runs/zoo-draft/draft (the default)

(The shipped draft carries neither file: they are written into a copy, outside the package.)

1. ``s2d_ngram.npz``: the n-grams (orders 1-3, pruned below 2 occurrences) of the draft's training text,
   the zoo corpus (this interpreter's standard library, site-packages excluded, files <= 400 kB) minus the
   held-out files (``split.json`` and the zoo's rule: ``build_zoo_draft.check_inputs``), tokenized as the
   draft was trained (``s2d.train.data``);
2. ``s2d_refine.json``: the refine weights per target (zoo-s, zoo-m, zoo-l) and exit, calibrated on the
   targets' own greedy continuations (128 tokens) of ``benchmarks/calibration/*.jsonl`` (not the benchmark
   prompts), as ``s2d calibrate-refine`` does.

Equivalent commands: ``s2d train-draft --objective ngram --init s2d/data/default/draft --out NEW --data STDLIB
--exclude-dir site-packages --exclude-from ../shared/zoo/split.json --max-file-bytes 400000`` (into a copy),
then ``s2d calibrate-refine --draft NEW --target ../shared/zoo/zoo-s ... --prompts benchmarks/calibration/*.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_zoo_draft import TARGETS, check_inputs  # noqa: E402  (the zoo's held-out files, checked)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo", type=Path, help="the zoo directory (../shared/zoo)")
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--draft", type=Path, default=Path("runs/zoo-draft/draft"))
    ap.add_argument("--prompts", type=Path, nargs="+",
                    default=sorted(Path("benchmarks/calibration").glob("*.jsonl")))
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    zoo = args.zoo.resolve()
    heldout = check_inputs(zoo, args.stdlib)

    from s2d.train.data import DataConfig
    from s2d.train.refine import calibrate_into, count_corpus, read_calibration_prompts

    t0 = time.time()
    data = DataConfig(paths=(args.stdlib,), glob="*.py", exclude_dirs=("site-packages",),
                      exclude_files=tuple(sorted(heldout)), max_file_bytes=400_000)
    ngram = count_corpus(args.draft, data, min_count=2)
    print(f"ngram: {json.dumps(ngram)} ({time.time() - t0:.0f} s)", file=sys.stderr)
    prompts = read_calibration_prompts(args.prompts)
    report = calibrate_into(args.draft, {t: str(zoo / t) for t in TARGETS}, prompts, "bfloat16", args.new_tokens)
    print(json.dumps({"ngram": ngram, "calibration": report, "minutes": round((time.time() - t0) / 60, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
