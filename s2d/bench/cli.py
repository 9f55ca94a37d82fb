"""``s2d bench`` (run a benchmark), ``s2d bench make-suite`` and ``s2d bench report``.

``s2d bench --target DIR ... --methods LIST --questions FILE --out DIR`` runs; the two
sub-subcommands are optional positionals of the same parser, so the issue's form needs no ``run``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from s2d.args import add_sampling_args
from s2d.bench.errors import BenchError

EXAMPLE = """examples:
  s2d bench --target ../shared/zoo/zoo-l --draft ../shared/zoo/zoo-s --methods ar,sd,pld,hf-ar,hf-assisted \\
      --questions ../shared/zoo/code_suite.jsonl --out runs/code
  s2d bench make-suite --split ../shared/zoo/split.json --source-root /usr/lib/python3.11 \\
      --tokenizer ../shared/zoo/zoo-s --out runs/code_suite.jsonl
  s2d bench report runs/code        # re-render report.md and plots from results.json
"""


def method_help() -> str:
    from s2d.bench.registry import method_specs
    from s2d.drafting import METHOD_HELP, parse_method

    lines = ["methods (--methods, comma-separated; E = a layer count, M = a model method):"]
    for name, text in METHOD_HELP.items():
        needs = parse_method(name.replace("-E", "-1").replace("+M", "+sd")).needs_draft
        lines.append(f"  {name:<14} {text}{'  [needs --draft]' if needs else ''}")
    for spec in method_specs():
        lines.append(f"  {spec.pattern:<16} {spec.help}{'  [needs --draft]' if spec.needs_draft else ''}")
    return "\n".join(lines)


def tree_shape(text: str) -> tuple[int, int, int]:
    """argparse type: TOPK,DEPTH,NODES, checked as the drafting options check them."""
    import argparse

    from s2d.drafting.tree import TreeShape

    try:
        top_k, depth, nodes = (int(x) for x in text.split(","))
        TreeShape(top_k, depth, nodes)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected TOPK,DEPTH,NODES (integers >= 1, nodes <= 63), got {text!r}"
                                         + (f": {err}" if "tree" in str(err) else "")) from None
    return top_k, depth, nodes


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark decoding methods and their peers: transformers, llama.cpp (Spec-Bench format)",
                       description=__doc__, epilog=method_help() + "\n\n" + EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", type=Path, default=[], help="target checkpoint (repeatable)")
    p.add_argument("--draft", type=Path, help="draft checkpoint for sd, sd-exit-E, hf-assisted, ...")
    p.add_argument("--methods", help="comma-separated method names (see below), e.g. ar,sd,pld,hf-ar")
    p.add_argument("--questions", type=Path, help="a Spec-Bench question.jsonl (question_id, category, turns)")
    p.add_argument("--categories", help="comma-separated categories to keep (default: all)")
    p.add_argument("--limit-per-category", type=int, help="first N questions of each category")
    add_sampling_args(p)
    p.set_defaults(seed=0)  # sampled benchmark runs should be reproducible
    p.add_argument("--warmup", type=int, default=1, help="untimed questions per target and method (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per turn; the median counts (default 1)")
    p.add_argument("--num-draft-tokens", type=int, default=None,
                   help="draft tokens per step of our methods (default: each method's own: 5, s2d 3)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--tree", type=tree_shape, default=None, metavar="TOPK,DEPTH,NODES",
                   help="s2d-tree / rsd / rsd-sbs: the tree's shape (rsd-sbs: TOPK beams; default 2,6,12)")
    peers = p.add_argument_group("peers (transformers, llama.cpp)")
    peers.add_argument("--assistant-exit", type=int, help="hf-assisted: exit (layer count) of a sorted draft to "
                       "use as the assistant (default: the deepest)")
    peers.add_argument("--num-assistant-tokens", type=int, help="hf-assisted: default: transformers'")
    peers.add_argument("--assistant-confidence-threshold", type=float, help="hf-assisted: default: transformers'")
    peers.add_argument("--prompt-lookup-num-tokens", type=int, default=10,
                       help="hf-pld, and llamacpp-lookup's num_pred_tokens (default 10)")
    p.add_argument("--out", type=Path, help="output directory: results.json, records.jsonl, report.md, *.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_bench_command)

    bsub = p.add_subparsers(dest="bench_command", title="other actions", metavar="{make-suite,report}")
    ms = bsub.add_parser("make-suite", help="cut a code suite (body / continue / long) from held-out source files",
                         description="Cut a Spec-Bench-format code suite from held-out source files.")
    ms.add_argument("--split", type=Path, required=True,
                    help="split.json with 'validation_files' (e.g. ../shared/zoo/split.json) or a list of paths")
    ms.add_argument("--source-root", type=Path, required=True, help="directory the listed paths are relative to")
    ms.add_argument("--out", type=Path, required=True, help="the suite .jsonl to write")
    ms.add_argument("--per-kind", type=int, default=20, help="prompts of each kind (default 20)")
    ms.add_argument("--kinds", default="body,continue,long")
    ms.add_argument("--tokenizer", type=Path, help="checkpoint whose tokenizer enforces --max-prompt-tokens")
    ms.add_argument("--max-prompt-tokens", type=int, default=1700, help="longer prompts lose leading lines")
    ms.add_argument("--body-context-lines", type=int, default=40)
    ms.add_argument("--continue-lines", type=int, default=30)
    ms.add_argument("--long-chars", type=int, default=5000)
    ms.add_argument("--seed", type=int, default=0)
    ms.set_defaults(func=run_make_suite)

    rp = bsub.add_parser("report", help="re-render report.md and plots from a results.json")
    rp.add_argument("results", type=Path, help="a bench --out directory (or its results.json)")
    rp.set_defaults(func=run_report)


def split_list(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())


def run_bench_command(args: argparse.Namespace) -> int:
    from s2d.bench.metrics import BASELINE, aggregate
    from s2d.bench.registry import MethodOptions
    from s2d.bench.report import fmt, write_report
    from s2d.bench.results import results_document, write_results
    from s2d.bench.runner import BenchConfig, run_bench

    from s2d.model.loading import check_checkpoint, check_device
    from s2d.outputs import check_not_input, check_output_dir

    missing = [flag for flag, value in (("--target", args.target), ("--methods", args.methods),
                                        ("--questions", args.questions), ("--out", args.out)) if not value]
    if missing:
        raise BenchError(f"missing {', '.join(missing)} (see s2d bench --help)")
    # Refuse now what would otherwise fail after the whole benchmark ran (and lose its results).
    check_device(args.device, "--device")
    check_not_input(args.out, [("--questions", args.questions), ("--draft", args.draft),
                               *(("--target", t) for t in args.target)])
    check_output_dir(args.out, lambda o: (o / "results.json").is_file(), "an earlier bench output (no results.json)")
    for path in (*args.target, *([args.draft] if args.draft else [])):
        check_checkpoint(path)
    options = MethodOptions(args.dtype, args.device, args.num_draft_tokens, args.ignore_eos, args.assistant_exit,
                            args.num_assistant_tokens, args.assistant_confidence_threshold,
                            args.prompt_lookup_num_tokens, args.tree)
    cfg = BenchConfig(tuple(args.target), split_list(args.methods) or (), args.questions, args.draft,
                      split_list(args.categories), args.limit_per_category, args.max_new_tokens, args.temperature,
                      args.top_k, args.top_p, args.seed, args.warmup, args.repeats, options)
    outcome = run_bench(cfg, progress=not args.no_progress)
    runs = aggregate(outcome.records, sorted(cfg.methods, key=lambda m: m != BASELINE))
    doc = results_document(cfg, outcome, runs)
    write_results(args.out, doc, outcome.records)
    try:
        report = write_report(doc, runs, args.out)
    except Exception as err:  # the measurements are saved: say so, and how to render the report again
        raise BenchError(f"the results are saved in {args.out / 'results.json'}, but writing the report failed "
                         f"({type(err).__name__}: {err}); retry with: s2d bench report {args.out}") from err
    for r in runs:
        if r.category == "all":
            print(f"{r.target:>12} {r.method:<14} {r.tokens_per_s:8.1f} tok/s  speedup {fmt(r.speedup, '.2f', 'x'):>6}"
                  f"  MAT {fmt(r.mean_accepted_tokens):>5}  greedy identical {fmt(r.greedy_identical, '.0%')}")
    print(f"wrote {args.out / 'results.json'}, {report}", file=sys.stderr)
    return 0


def run_make_suite(args: argparse.Namespace) -> int:
    from s2d.bench.suites import SuiteConfig, held_out_files, make_suite, write_suite

    if not args.source_root.is_dir():
        raise BenchError(f"--source-root {args.source_root} is not a directory")
    cfg = SuiteConfig(args.source_root, held_out_files(args.split), args.per_kind, split_list(args.kinds) or (),
                      args.body_context_lines, args.continue_lines, args.long_chars, args.max_prompt_tokens, args.seed)
    count = None
    if args.tokenizer is not None:
        from s2d.model.loading import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        count = lambda text: len(tok(text).input_ids)  # noqa: E731
    else:
        print("s2d bench make-suite: no --tokenizer: --max-prompt-tokens is not enforced", file=sys.stderr)
    rows = make_suite(cfg, count)
    write_suite(rows, args.out)
    per = {k: sum(r["category"] == k for r in rows) for k in cfg.kinds}
    print(f"wrote {len(rows)} prompts to {args.out}: " + ", ".join(f"{k} {n}" for k, n in per.items()), file=sys.stderr)
    short = [k for k, n in per.items() if n < cfg.per_kind]
    if short:
        print(f"s2d bench make-suite: the files ran out before {', '.join(short)} reached {cfg.per_kind}",
              file=sys.stderr)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from s2d.bench.report import write_report
    from s2d.bench.results import read_results, summaries_from

    doc = read_results(args.results)
    out = args.results if args.results.is_dir() else args.results.parent
    print(f"wrote {write_report(doc, summaries_from(doc), out)}", file=sys.stderr)
    return 0
