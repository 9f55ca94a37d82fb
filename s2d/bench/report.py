"""``report.md`` (tables) and PNG plots from the run summaries."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s2d.bench.metrics import ALL, BASELINE, RunSummary


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "target"


def ordered(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def overall_rows(runs: Sequence[RunSummary]) -> list[RunSummary]:
    return [r for r in runs if r.category == ALL]


def render_markdown(doc: dict[str, Any], runs: Sequence[RunSummary], plots: Sequence[Path]) -> str:
    cfg, env = doc["config"], doc["environment"]
    targets = ordered([r.target for r in runs])
    categories = ordered([r.category for r in runs])
    overall = overall_rows(runs)
    by_key = {(r.target, r.method, r.category): r for r in runs}
    counts = ", ".join(f"{c} {by_key[next(k for k in by_key if k[2] == c)].num_questions}"
                       for c in categories if c != ALL)
    mode = "greedy (T=0)" if cfg["temperature"] == 0 else (
        f"sampling T={cfg['temperature']}, top-k {cfg['top_k'] or 'off'}, top-p {cfg['top_p']}, seed {cfg['seed']}")
    opts = cfg["options"]
    out = [
        "# Benchmark report", "",
        f"- questions: `{Path(cfg['questions']).name}` ({counts} questions per category)",
        f"- targets: {', '.join(f'`{t}`' for t in targets)}; draft: `{Path(cfg['draft']).name if cfg['draft'] else '–'}`",
        f"- {mode}, max {cfg['max_new_tokens']} new tokens{' (EOS ignored)' if opts['ignore_eos'] else ''}, "
        f"{opts['dtype']} on {opts['device']}, {cfg['warmup']} warm-up question(s), {cfg['repeats']} repeat(s); "
        f"our draft length {opts['num_draft_tokens'] or 'the methods own (5; s2d 3)'}"
        + (f"; trees {opts['tree'][0]},{opts['tree'][1]},{opts['tree'][2]} (top-k, depth, nodes)" if opts.get('tree') else ""),
        f"- torch {env['torch']}, transformers {env['transformers']}, {env['torch_threads']} threads, "
        f"{env['processor']}" + (f" (native runtime: {env['native_isa']})" if env.get("native_isa") else "")
        + f"; s2d {env.get('s2d_commit') or '?'}; {doc['created']}",
        "",
        f"tokens/s: mean over questions of new tokens / seconds of the whole generate call (prefill included). "
        f"Speedup: tokens/s over `{BASELINE}`'s on the same target (Spec-Bench's definition); `vs hf-ar`: over "
        "transformers' plain decoding. MAT: new tokens per target forward pass. Greedy identical: fraction of "
        f"questions whose output is token-identical to `{BASELINE}`'s.",
        "", "## Overall", "",
    ]
    out += table(["target", "method", "tokens/s", "speedup", "vs hf-ar", "MAT", "draft accept", "greedy identical"],
                 [[r.target, r.method, fmt(r.tokens_per_s, ".1f"), fmt(r.speedup, ".2f", "x"),
                   fmt(r.speedup_vs_hf_ar, ".2f", "x"), fmt(r.mean_accepted_tokens), fmt(r.draft_acceptance_rate, ".0%"),
                   fmt(r.greedy_identical, ".0%")] for r in overall])
    if len(categories) > 2:  # one category + ALL repeats the overall table
        for title, attr, spec, suffix in (("Speedup", "speedup", ".2f", "x"), ("MAT", "mean_accepted_tokens", ".2f", "")):
            out += ["", f"## {title} by category", ""]
            for t in targets:
                methods = ordered([r.method for r in runs if r.target == t])
                out += [f"### {t}", ""]
                out += table(["method", *categories], [
                    [m, *(fmt(getattr(by_key[(t, m, c)], attr), spec, suffix) if (t, m, c) in by_key else "–"
                          for c in categories)] for m in methods])
                out.append("")
    drafted = [r for r in overall if r.acceptance_by_position]
    if drafted:
        width = max(len(r.acceptance_by_position) for r in drafted)
        out += ["", "## Acceptance rate by draft position", "",
                "P(draft token i is accepted | it was proposed), over all questions.", ""]
        out += table(["target", "method", *map(str, range(1, width + 1))],
                     [[r.target, r.method, *(fmt(a, ".0%") for a in r.acceptance_by_position),
                       *["–"] * (width - len(r.acceptance_by_position))] for r in drafted])
    exited = [r for r in overall if r.exit_histogram]
    if exited:
        out += ["", "## Exits", "", "Draft tokens produced by each exit (layer count) of the draft; exit 0: "
                "tokens copied by lookup.", ""]
        out += table(["target", "method", "tokens by exit"], [
            [r.target, r.method, ", ".join(f"{e}: {n} ({n / sum(r.exit_histogram.values()):.0%})"
                                           for e, n in r.exit_histogram.items())] for r in exited])
    timed = [r for r in overall if getattr(r, "draft_share", None) is not None and r.method != "ar"]
    if timed:
        out += ["", "## Draft vs verify", "", "Of the decoding time after the prefill, the share spent proposing "
                "drafts; the rest is target passes.", ""]
        out += table(["target", "method", "drafting", "verifying"],
                     [[r.target, r.method, fmt(r.draft_share, ".0%"), fmt(1 - r.draft_share, ".0%")] for r in timed])
    truncated = [r for r in overall if r.truncated_turns]
    if truncated:
        out += ["", "Prompts cut to their last tokens to fit the context: "
                + "; ".join(f"{r.target} {r.method}: {r.truncated_turns} turn(s)" for r in truncated) + "."]
    if doc["skipped"]:
        out += ["", "## Skipped", ""] + [f"- {s['target']} `{s['method']}`: {s['reason']}" for s in doc["skipped"]]
    if plots:
        out += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(out) + "\n"


def plot_all(runs: Sequence[RunSummary], out: Path) -> list[Path]:
    """Speedup by category per target, MAT against speedup, tokens/s overall; returns the files."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    files: list[Path] = []
    targets = ordered([r.target for r in runs])
    methods = ordered([r.method for r in runs])
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    by_key = {(r.target, r.method, r.category): r for r in runs}

    for t in targets:
        cats = ordered([r.category for r in runs if r.target == t])
        ms = [m for m in methods if any(by_key.get((t, m, c)) and by_key[(t, m, c)].speedup is not None for c in cats)
              and m != BASELINE]
        if not ms:
            continue
        fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.22 * len(cats) * len(ms) + 2)), 4.5))
        w = 0.8 / len(ms)
        for i, m in enumerate(ms):
            xs = [k + (i - (len(ms) - 1) / 2) * w for k in range(len(cats))]
            ys = [(by_key[(t, m, c)].speedup or 0.0) if (t, m, c) in by_key else 0.0 for c in cats]
            ax.bar(xs, ys, w, label=m, color=colors[m])
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(cats)), cats, rotation=30 if len(cats) > 5 else 0, ha="right" if len(cats) > 5 else "center")
        ax.set_ylabel(f"speedup over {BASELINE}")
        ax.set_title(f"{t}: speedup by category")
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        files.append(out / f"speedup_{slug(t)}.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    points = [r for r in overall_rows(runs)  # the baseline is the dashed line at (1, 1)
              if r.mean_accepted_tokens is not None and r.speedup is not None and r.method != BASELINE]
    if points:
        markers = "osD^vP*X"
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for r in points:
            ax.scatter(r.mean_accepted_tokens, r.speedup, color=colors[r.method],
                       marker=markers[targets.index(r.target) % len(markers)], s=50)
            ax.annotate(f"{r.method} ({r.target})", (r.mean_accepted_tokens, r.speedup), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xlabel("mean accepted tokens per target pass (MAT)")
        ax.set_ylabel(f"speedup over {BASELINE}")
        ax.set_title("MAT against speedup (all questions)")
        fig.tight_layout()
        files.append(out / "mat_vs_speedup.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    overall = overall_rows(runs)
    fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 0.4 * len(targets) * len(methods) + 2)), 4))
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [k + (i - (len(methods) - 1) / 2) * w for k in range(len(targets))]
        ys = [next((r.tokens_per_s for r in overall if r.target == t and r.method == m), 0.0) for t in targets]
        ax.bar(xs, ys, w, label=m, color=colors[m])
    ax.set_xticks(range(len(targets)), targets)
    ax.set_ylabel("tokens/s")
    ax.set_title("throughput (all questions)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    files.append(out / "tokens_per_s.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def write_report(doc: dict[str, Any], runs: Sequence[RunSummary], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_all(runs, out) if runs else []
    path = out / "report.md"
    path.write_text(render_markdown(doc, runs, plots))
    return path
