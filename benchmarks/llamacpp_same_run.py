"""s2d against llama.cpp's own binaries in one run, interleaved, on the same weights: decode, prefill, end to end.

    flock /tmp/s2d-heavy.lock python benchmarks/llamacpp_same_run.py --rounds 3 --out runs/same_run.json
    python benchmarks/llamacpp_same_run.py --models ../shared/zoo/zoo-l --gguf zoo-l=/tmp/zoo-l.gguf --isa avx512

The successor of ``llamacpp_binaries.py`` (issue 27, item 4). This host's memory bandwidth drifts 2-3x
between minutes, so numbers taken minutes apart compare the minutes, not the engines. Here every
measure runs both engines back to back, ours then theirs, in each of ``--rounds`` rounds, and each
round's ratio compares times taken within the same seconds; the table gives the medians over rounds and
every round's ratio. Per model (a Hugging Face directory; llama.cpp reads the same weights converted to
bf16 GGUF by ``llamacpp.sh gguf``, checked tensor by tensor against the checkpoint):

- decode alone at depth N (``--depth``, 400): llama-bench ``-p 0 -n 128 -d N`` (tg128 @ dN: 128 tokens
  after N cached ones, ``--reps`` repetitions) against ours decoding the same way: 128 greedy one-token
  passes in a row after N cached tokens, each feeding its argmax to the next (the cache grows from N to
  N+128, as llama-bench's does), ``--reps`` runs. Both: the median run's time / 128, ms per token. With
  them, in the same round, the memory floor (``costs.py``: one read of the bytes a pass streams, with
  ``torch.amax`` over a DRAM-sized buffer, same threads) and the ratio ours / floor.
- prefill alone: llama-bench ``-p 300,1000 -n 0`` against ours as the Engine does it (``Engine.start``
  runs all prompt tokens but the last through the target; the first ``step`` runs the last one and
  emits the first token): the same N tokens processed and one token's logits, random token ids
  (as llama-bench's). Tokens/s of the median repetition.
- end to end: ``../shared/data/foreign_code.jsonl`` prompts (``--prompts`` of them, evenly spread over
  the file's packages) cut to ~1,500 characters at a line end, 128 greedy new tokens, EOS ignored on
  both sides (so both always emit 128): llama-completion with ``llamacpp.sh tps plain``'s flags (plus
  ``--ignore-eos``; its timings parsed here, so the token counts are checked, not assumed) against our
  ``ar`` method (``Engine.generate``, plain decoding). Tokens/s over prefill + decode, model loading
  excluded on both sides; prompt by prompt, ours then theirs. Summed tokens over summed seconds.

Instruction sets: ``--isa avx2|avx512f|avx512|amx`` holds our side (the native runtime: S2D_NATIVE_ISA, and
S2D_NATIVE_WIDE=0 for avx2, =1 for avx512f, AVX-512 without BF16; torch's prefill: ONEDNN_MAX_CPU_ISA = AVX2 /
AVX512_CORE / AVX512_CORE_BF16 / AVX512_CORE_AMX, and ATEN_CPU_CAPABILITY=avx2 for avx2), set in this process
before torch loads. llama.cpp's instruction set is fixed when it is
built; the one used is read from its own ``system_info`` line and printed. ``llamacpp.sh build`` builds
for this host only (GGML_NATIVE=ON), so it cannot hold llama.cpp below the host's best: a comparison
whose two sides differ is printed as NOT HELD, never as held (pass ``--llamacpp-bin`` a build made with
-DGGML_NATIVE=OFF and the wanted GGML_AVX* flags to hold it). Without ``--isa`` each engine runs its best.

Progress goes to stderr; the tables and the CPU kind to stdout. Not a CI requirement (the pure parts are
tested in tests/test_llamacpp_same_run.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# light modules (no torch: --isa caps the instruction set before torch loads)
from s2d.bench.cpu import cpu_flags, cpu_kind
from s2d.bench.questions import cut_prompt, spread

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
DEFAULT_MODELS = (SHARED / "zoo" / "zoo-l", REPO / "runs" / "llama-1b-shape")  # the 1B shape: write_1b.py
DEFAULT_TOOL = SHARED / "tools" / "llamacpp.sh"
DEFAULT_BIN = Path(os.environ.get("DIR", Path.home() / ".cache" / "llamacpp-peer")) / "bin"  # llamacpp.sh's DIR
NEW_TOKENS = 128  # tg128, and the end-to-end run's new tokens

# --isa: our runtime's S2D_NATIVE_ISA, oneDNN's cap (torch's prefill products), ATen's kernels' cap.
ISA_ENV = {"avx2": {"S2D_NATIVE_ISA": "avx2", "S2D_NATIVE_WIDE": "0", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "ATEN_CPU_CAPABILITY": "avx2"},
           "avx512": {"S2D_NATIVE_ISA": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
           "amx": {"S2D_NATIVE_ISA": "amx", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"},
           # AVX-512 without BF16 (Skylake to Ice Lake): our AVX2 level with its products on 512-bit vectors
           "avx512f": {"S2D_NATIVE_ISA": "avx2", "S2D_NATIVE_WIDE": "1", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}}
# Instruction-set kinds, weakest first, named as native.isa_kind() names ours; AVX512 is AVX-512 without BF16
# (ours: the AVX2 level with 512-bit products, native.wide_products).
KINDS = ("none", "AVX2", "AVX512", "AVX512-BF16", "AMX")


class SameRunError(Exception):
    """Bad input or a failed peer run: one line for the user."""


# ---------------------------------------------------------------- pure parts (tests/test_llamacpp_same_run.py)


@dataclass
class BenchRow:
    """One llama-bench test: ``n_prompt`` prompt tokens or ``n_gen`` generated ones after ``n_depth``."""

    n_prompt: int
    n_gen: int
    n_depth: int
    tokens_per_s: float  # of the median sample where llama-bench gives samples (JSON), else its mean

    @property
    def test(self) -> str:
        name = f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"
        return name + (f" @ d{self.n_depth}" if self.n_depth else "")


def parse_llama_bench(text: str) -> list[BenchRow]:
    """llama-bench's stdout, JSON (``-o json``) or its default markdown table, as rows."""
    text = text.strip()
    if text.startswith("["):
        rows = []
        for r in json.loads(text):
            tokens = r["n_prompt"] + r["n_gen"]
            samples = r.get("samples_ns") or [r["avg_ns"]]
            rows.append(BenchRow(r["n_prompt"], r["n_gen"], r.get("n_depth", 0),
                                 tokens / (statistics.median(samples) / 1e9)))
        return rows
    rows, header = [], None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "test" in cells and "t/s" in cells:
            header = cells
        elif header and len(cells) == len(header) and not set(cells[0]) <= set("-: "):
            test, speed = cells[header.index("test")], cells[header.index("t/s")]
            m = re.fullmatch(r"(pp|tg)(\d+)(?: @ d(\d+))?", test)
            if not m:
                raise SameRunError(f"llama-bench: cannot read the test {test!r}")
            n = int(m.group(2))
            rows.append(BenchRow(n if m.group(1) == "pp" else 0, n if m.group(1) == "tg" else 0,
                                 int(m.group(3) or 0), float(speed.split("±")[0])))
    if not rows:
        raise SameRunError(f"llama-bench printed no results: {text[-300:]!r}")
    return rows


def parse_system_info(text: str) -> dict[str, bool]:
    """The CPU features a llama.cpp build was compiled for, from its ``system_info`` line (stderr)."""
    m = re.search(r"system_info:.*?CPU : (.*)", text)
    if not m:
        raise SameRunError("llama.cpp printed no system_info line: cannot tell which instruction set it was built for")
    return {k.strip(): v.strip() == "1" for k, v in re.findall(r"([A-Z0-9_]+) = (\d)", m.group(1))}


def build_kind(flags: dict[str, bool]) -> str:
    """The best instruction-set kind (KINDS) a llama.cpp build's flags use."""
    if flags.get("AMX_INT8") or flags.get("AMX_BF16"):
        return "AMX"
    if flags.get("AVX512_BF16"):
        return "AVX512-BF16"
    if flags.get("AVX512"):
        return "AVX512"
    return "AVX2" if flags.get("AVX2") else "none"


@dataclass
class Completion:
    prompt_tokens: int
    new_tokens: int
    seconds: float  # prompt eval + eval + sampling: prefill and decode, loading excluded


def parse_completion(stderr: str) -> Completion:
    """llama-completion's timings (its perf print on stderr), as ``llamacpp.sh tps plain`` reads them."""
    pe = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", stderr)
    ev = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", stderr)
    if not pe or not ev:
        raise SameRunError(f"llama-completion printed no timings: {stderr[-400:]!r}")
    sm = re.search(r"sampling time =\s*([\d.]+) ms", stderr)
    ms = float(pe.group(1)) + float(ev.group(1)) + (float(sm.group(1)) if sm else 0.0)
    # The prompt's evaluation yields the first token; each eval run one more.
    return Completion(int(pe.group(2)), int(ev.group(2)) + 1, ms / 1000)


@dataclass
class Measure:
    """One measure of one model: each engine's value per round, in the unit named, ``higher`` if better."""

    unit: str
    higher_is_better: bool
    values: dict[str, list[float]] = field(default_factory=dict)  # engine -> one value per round

    def add(self, engine: str, value: float) -> None:
        self.values.setdefault(engine, []).append(value)

    def median(self, engine: str) -> float | None:
        v = self.values.get(engine)
        return statistics.median(v) if v else None

    def ratios(self, ours: str = "s2d", theirs: str = "llama.cpp") -> list[float]:
        """Per round, how many times faster ours is (speed ours / speed theirs; > 1: ours is ahead)."""
        pairs = zip(self.values.get(ours, []), self.values.get(theirs, []))
        return [a / b if self.higher_is_better else b / a for a, b in pairs]

    def to_floor(self) -> list[float]:
        """Per round, ours / the floor (times; 1.0 would be at the floor)."""
        return [a / f for a, f in zip(self.values.get("s2d", []), self.values.get("floor", []))]

    def to_json(self) -> dict:
        out = {"unit": self.unit, "per_round": self.values,
               "median": {k: self.median(k) for k in self.values}, "ratio_per_round": self.ratios()}
        if "floor" in self.values:
            out["s2d_to_floor_per_round"] = self.to_floor()
        return out


def busy_seconds(stat_line: str, hz: int) -> float:
    """CPU seconds spent busy (user, nice, system, irq, softirq) or stolen by the hypervisor, all CPUs
    together, from /proc/stat's first ("cpu") line."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in stat_line.split()[1:9])
    return (user + nice + system + irq + softirq + steal) / hz


class OthersCpu:
    """The share of this machine's CPUs that others (not this process or its children) used since it was
    made: the lock keeps only cooperating runs out, and a neighbour's burst slows whichever engine it
    hits, so each measure says how clean its round was."""

    def __init__(self) -> None:
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float]:
        t = os.times()  # children: the llama.cpp runs, waited for
        stat = Path("/proc/stat").read_text().splitlines()[0]
        return (busy_seconds(stat, os.sysconf("SC_CLK_TCK")), t.user + t.system + t.children_user + t.children_system,
                time.perf_counter())

    def share(self) -> float:
        (b0, o0, w0), (b1, o1, w1) = self.start, self._now()
        return max(0.0, ((b1 - b0) - (o1 - o0)) / ((w1 - w0) * (os.cpu_count() or 1)))


def table(models: dict[str, dict[str, Measure]]) -> str:
    """The markdown table: per model and measure, the medians, ours vs theirs per round and its median,
    and the CPU share others used in each round's measure."""
    lines = [("| model | measure | s2d | llama.cpp | floor | s2d vs llama.cpp (median; per round) | s2d / floor "
             "| others' CPU |"), "|---|---|---|---|---|---|---|---|"]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:,.2f}" if v < 100 else f"{v:,.0f}"

    for name, measures in models.items():
        for label, m in measures.items():
            r, f = m.ratios(), m.to_floor()
            ratio = f"{statistics.median(r):.2f}x ({', '.join(f'{x:.2f}' for x in r)})" if r else "-"
            floor = f"{statistics.median(f):.2f} ({', '.join(f'{x:.2f}' for x in f)})" if f else "-"
            others = ", ".join(f"{100 * x:.0f}%" for x in m.values.get("others", [])) or "-"
            lines.append(f"| {name} | {label} ({m.unit}) | {fmt(m.median('s2d'))} | {fmt(m.median('llama.cpp'))} "
                         f"| {fmt(m.median('floor'))} | {ratio} | {floor} | {others} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- llama.cpp's side


def run_peer(cmd: list[str], what: str, timeout: float = 600) -> subprocess.CompletedProcess:
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SameRunError(f"{what} ran over {timeout:.0f} s: {' '.join(cmd)}") from None
    if run.returncode != 0:
        raise SameRunError(f"{what} failed ({run.returncode}): {' '.join(cmd)}\n{run.stderr[-800:]}")
    return run


def llama_bench(bin_dir: Path, gguf: Path, threads: int, reps: int, prompt: str = "0", gen: int = 0,
                depth: int = 0) -> list[BenchRow]:
    run = run_peer([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", prompt, "-n", str(gen),
                    "-d", str(depth), "-r", str(reps), "-o", "json"], "llama-bench")
    return parse_llama_bench(run.stdout)


def llama_completion(bin_dir: Path, gguf: Path, prompt_file: Path, threads: int, n: int) -> tuple[Completion, str]:
    # llamacpp.sh tps plain's flags, plus --ignore-eos: both engines then always emit n tokens.
    run = run_peer([str(bin_dir / "llama-completion"), "-m", str(gguf), "-f", str(prompt_file), "-t", str(threads),
                    "-tb", str(threads), "-c", "4096", "--temp", "0", "--no-escape", "-n", str(n), "-no-cnv",
                    "--no-display-prompt", "--ignore-eos"], "llama-completion")
    return parse_completion(run.stderr), run.stderr


def weights_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def same_weights(gguf: Path, model) -> str | None:
    """None when the GGUF holds the model's weights (its token embedding and last FFN down projection,
    which the converter stores unpermuted), else what differs."""
    import numpy as np
    import torch
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(gguf).tensors}
    last = len(model.layers) - 1
    pairs = {"token_embd.weight": model.embed.weight, f"blk.{last}.ffn_down.weight": model.layers[last].down.weight}
    for name, ours in pairs.items():
        t = tensors.get(name)
        if t is None:
            return f"it has no tensor {name} (another architecture or layer count)"
        data = np.asarray(t.data)
        theirs = (torch.from_numpy(data.copy().view(np.int16)).view(torch.bfloat16) if data.dtype == np.uint8
                  else torch.from_numpy(data.copy()))
        if theirs.numel() != ours.numel() or not torch.allclose(theirs.float().reshape(ours.shape), ours.float(),
                                                                rtol=1e-2, atol=1e-3):
            return f"its {name} differs from the checkpoint's"
    return None


def gguf_for(name: str, model_dir: Path, given: Path | None, gguf_dir: Path, tool: Path, model) -> Path:
    """The model's bf16 GGUF: the one given (checked), else a cached conversion of these exact weights."""
    if given is not None:
        if not given.exists():
            raise SameRunError(f"--gguf {name}={given}: no such file")
        if why := same_weights(given, model):
            raise SameRunError(f"--gguf {name}={given} is not {model_dir}'s weights: {why}")
        return given
    gguf_dir.mkdir(parents=True, exist_ok=True)
    out, stamp = gguf_dir / f"{name}.gguf", gguf_dir / f"{name}.gguf.sha256"
    digest = weights_digest(model_dir)
    if out.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return out
    if not tool.exists():
        raise SameRunError(f"{tool} not found (converts checkpoints to GGUF): pass --tool or --gguf {name}=PATH")
    print(f"converting {model_dir} to bf16 GGUF ({out}) ...", file=sys.stderr, flush=True)
    run_peer(["bash", str(tool), "gguf", str(model_dir), str(out)], "llamacpp.sh gguf (pip install sentencepiece "
             "if it asks)", timeout=1800)
    if why := same_weights(out, model):
        raise SameRunError(f"the conversion {out} does not hold {model_dir}'s weights: {why}")
    stamp.write_text(digest + "\n")
    return out


# ---------------------------------------------------------------- our side


def median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Ours:
    """Our engine on one model: decode at a depth, prefill, end to end, and the floor, each callable per round."""

    def __init__(self, model, tokenizer, depth: int) -> None:
        import torch

        if str(HERE) not in sys.path:  # costs.py beside this file (already there when run as a script)
            sys.path.insert(0, str(HERE))
        from costs import Floor, streamed_bytes

        from s2d.engine import Engine

        self.torch, self.model, self.tokenizer, self.depth = torch, model, tokenizer, depth
        self.engine = Engine(model, None, eos_token_ids=())  # ar; no EOS: always NEW_TOKENS, like --ignore-eos
        self.floor = Floor(streamed_bytes(model))
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, model.cfg.vocab_size, (1, depth + 1), generator=gen)
        self.cache = model.new_cache(capacity=depth + NEW_TOKENS + 1)
        with torch.inference_mode():
            model(self.ids[:, :depth], torch.arange(depth), self.cache, logits_at=None)
        self.decode_run()  # warm-up, as llama-bench's

    def decode_run(self) -> float:
        """Seconds of NEW_TOKENS greedy one-token passes in a row after ``depth`` cached tokens."""
        torch, model, cache, depth = self.torch, self.model, self.cache, self.depth
        with torch.inference_mode():
            cache.truncate(depth)
            token = int(self.ids[0, depth])
            t0 = time.perf_counter()
            for i in range(NEW_TOKENS):  # as the Engine's plain greedy step runs it
                token = model.greedy_token(token, depth + i, cache)
            return time.perf_counter() - t0

    def decode_ms(self, reps: int) -> float:
        return 1000 * statistics.median(self.decode_run() for _ in range(reps)) / NEW_TOKENS

    def floor_ms(self, reps: int) -> float:
        return 1000 * self.floor.seconds(median_seconds(self.floor, reps))

    def prefill_tps(self, n: int, reps: int) -> float:
        """Tokens/s of the Engine's prefill of ``n`` random tokens through the first token."""
        from s2d.sampling import SamplingParams

        prompt = self.torch.randint(1, self.model.cfg.vocab_size, (n,),
                                    generator=self.torch.Generator().manual_seed(n)).tolist()

        def run() -> None:
            self.engine.step(self.engine.start(prompt, SamplingParams(), 1))

        run()  # warm-up: the first pass of a new length allocates
        return n / median_seconds(run, reps)

    def generate(self, text: str) -> tuple[int, int, float]:
        """(prompt tokens, new tokens, seconds) of ``ar`` on ``text``, prefill included."""
        from s2d.sampling import SamplingParams

        # llama-completion -f drops the file's final newline: ours gets the same text, so the same tokens.
        prompt = self.tokenizer(text.removesuffix("\n")).input_ids  # as `s2d generate` encodes a prompt
        state = self.engine.generate(prompt, SamplingParams(), NEW_TOKENS)
        return len(prompt), state.stats.new_tokens, state.stats.elapsed_s


# ---------------------------------------------------------------- the run


def check_inputs(args: argparse.Namespace) -> tuple[list[Path], dict[str, Path]]:
    for tool in ("llama-bench", "llama-completion"):
        if not (args.llamacpp_bin / tool).exists():
            raise SameRunError(f"{args.llamacpp_bin / tool} not found: build llama.cpp with `{DEFAULT_TOOL} build` "
                               "or pass --llamacpp-bin DIR")
    if not args.prompts_file.exists():
        raise SameRunError(f"{args.prompts_file} not found (--prompts-file)")
    if args.models:
        models = [Path(p) for p in args.models.split(",")]
    else:  # zoo-l, and the 1B shape where write_1b.py has written it
        models = [p for i, p in enumerate(DEFAULT_MODELS) if i == 0 or p.exists()]
    for m in models:
        if not (m / "config.json").exists():
            raise SameRunError(f"unknown model {m}: not a Hugging Face checkpoint directory (no config.json)")
    ggufs = {}
    for spec in args.gguf:
        name, sep, path = spec.partition("=")
        if not sep or name not in {m.name for m in models}:
            raise SameRunError(f"--gguf {spec!r}: expected NAME=PATH with NAME one of the models' directory names "
                               f"({', '.join(m.name for m in models)})")
        ggufs[name] = Path(path)
    if len({m.name for m in models}) != len(models):
        raise SameRunError("two --models share a directory name: the tables name models by it")
    return models, ggufs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated Hugging Face model directories (default: ../shared/zoo/zoo-l, "
                                     "and runs/llama-1b-shape where benchmarks/write_1b.py wrote it)")
    ap.add_argument("--gguf", action="append", default=[], metavar="NAME=PATH",
                    help="a model's bf16 GGUF (checked against its weights); otherwise converted into --gguf-dir")
    ap.add_argument("--gguf-dir", type=Path, default=Path(tempfile.gettempdir()) / "s2d-gguf")
    ap.add_argument("--tool", type=Path, default=DEFAULT_TOOL, help="llamacpp.sh (GGUF conversion)")
    ap.add_argument("--llamacpp-bin", type=Path, default=DEFAULT_BIN, help="llama-bench and llama-completion's folder")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each timed run within a round (llama-bench -r)")
    ap.add_argument("--depth", type=int, default=400, help="cached tokens before decoding (tg128 @ dN)")
    ap.add_argument("--prefill", default="300,1000", help="prefill lengths")
    ap.add_argument("--prompts-file", type=Path, default=SHARED / "data" / "foreign_code.jsonl")
    ap.add_argument("--prompts", type=int, default=10, help="end-to-end prompts, spread over the file (0: skip)")
    ap.add_argument("--prompt-chars", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", choices=sorted(ISA_ENV), help="hold both engines to this instruction set (see above)")
    ap.add_argument("--out", type=Path, help="the JSON record")
    args = ap.parse_args()
    if args.rounds < 1 or args.reps < 1 or args.depth < 1 or args.threads < 1 or args.prompts < 0:
        ap.error("--rounds, --reps, --depth and --threads must be >= 1, --prompts >= 0")
    try:
        prefill_lengths = [int(n) for n in args.prefill.split(",") if n]
    except ValueError:
        ap.error(f"--prefill: comma-separated token counts, got {args.prefill!r}")
    if args.isa:  # before torch (and oneDNN inside it) loads: they read these once
        os.environ.update(ISA_ENV[args.isa])
    try:
        run(args, prefill_lengths)
    except SameRunError as err:
        sys.exit(f"llamacpp_same_run: {err}")


def run(args: argparse.Namespace, prefill_lengths: list[int]) -> None:
    models, ggufs = check_inputs(args)
    import torch
    from tqdm import tqdm

    import s2d
    from s2d.bench.results import cpu_name, source_version
    from s2d.model import native
    from s2d.model.loading import load_model, load_tokenizer

    torch.set_num_threads(args.threads)  # before any model: a runtime keeps the thread count it was created with
    flags = cpu_flags()
    rows = [json.loads(line) for line in args.prompts_file.read_text().splitlines() if line.strip()]
    prompts = [cut_prompt(r["turns"][0], args.prompt_chars) for r in spread(rows, args.prompts)]

    report: dict = {"cpu": cpu_name(), "cpu_kind": cpu_kind(flags), "threads": args.threads,
                    "isa_requested": args.isa, "s2d_commit": source_version(),
                    "s2d_source": str(Path(s2d.__file__).parent), "depth": args.depth,
                    "rounds": args.rounds, "reps": args.reps, "prompts_file": str(args.prompts_file),
                    "prompts": len(prompts), "prompt_chars": args.prompt_chars, "new_tokens": NEW_TOKENS,
                    "ours": {"native_isa": native.isa_kind(), "native_products": native.product_kind(),
                             "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                             "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA", "(unset: oneDNN's best)")},
                    "models": {}}
    results: dict[str, dict[str, Measure]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, text in enumerate(prompts):
            files.append(Path(tmp) / f"p{i}.txt")
            files[-1].write_text(text)
        for model_dir in models:
            name = model_dir.name
            model = load_model(model_dir, dtype="bfloat16")
            gguf = gguf_for(name, model_dir, ggufs.get(name), args.gguf_dir, args.tool, model)
            if "llamacpp" not in report:  # the build's instruction set, from its own words
                probe = Path(tmp) / "probe.txt"
                probe.write_text("import os\n")
                _, err = llama_completion(args.llamacpp_bin, gguf, probe, args.threads, 2)
                describe_builds(report, args, parse_system_info(err))
            ours = Ours(model, load_tokenizer(model_dir), args.depth)
            measures = {f"decode @ d{args.depth}": Measure("ms/token", higher_is_better=False),
                        **{f"prefill {n}": Measure("tokens/s", higher_is_better=True) for n in prefill_lengths}}
            if prompts:
                measures[f"end to end, {len(prompts)} prompts"] = Measure("tokens/s", higher_is_better=True)
            decode, *prefills = list(measures.values())[:1 + len(prefill_lengths)]
            e2e = measures.get(f"end to end, {len(prompts)} prompts")
            prompt_tokens: dict[str, list[int]] = {"s2d": [], "llama.cpp": []}
            steps = args.rounds * (3 + 2 * len(prefill_lengths) + 2 * len(prompts))
            with tqdm(total=steps, desc=name, file=sys.stderr, unit="run") as bar:
                for rnd in range(args.rounds):
                    bar.set_postfix_str(f"round {rnd + 1}/{args.rounds}: decode")
                    watch = OthersCpu()
                    decode.add("s2d", ours.decode_ms(args.reps))
                    bar.update()
                    tg = llama_bench(args.llamacpp_bin, gguf, args.threads, args.reps, gen=NEW_TOKENS, depth=args.depth)
                    decode.add("llama.cpp", 1000 / tg[0].tokens_per_s)
                    bar.update()
                    decode.add("floor", ours.floor_ms(20 * args.reps))
                    decode.add("others", watch.share())
                    bar.update()
                    bar.set_postfix_str(f"round {rnd + 1}/{args.rounds}: prefill")
                    for n, m in zip(prefill_lengths, prefills):
                        watch = OthersCpu()
                        m.add("s2d", ours.prefill_tps(n, args.reps))
                        bar.update()
                        pp = llama_bench(args.llamacpp_bin, gguf, args.threads, args.reps, prompt=str(n))
                        m.add("llama.cpp", pp[0].tokens_per_s)
                        m.add("others", watch.share())
                        bar.update()
                    if e2e is None:
                        continue
                    bar.set_postfix_str(f"round {rnd + 1}/{args.rounds}: end to end")
                    watch = OthersCpu()
                    totals = {"s2d": [0, 0.0], "llama.cpp": [0, 0.0]}  # engine -> [new tokens, seconds]
                    for text, file in zip(prompts, files):
                        n_prompt, n_new, secs = ours.generate(text)
                        totals["s2d"][0] += n_new
                        totals["s2d"][1] += secs
                        bar.update()
                        done, _ = llama_completion(args.llamacpp_bin, gguf, file, args.threads, NEW_TOKENS)
                        totals["llama.cpp"][0] += done.new_tokens
                        totals["llama.cpp"][1] += done.seconds
                        bar.update()
                        if rnd == 0:
                            prompt_tokens["s2d"].append(n_prompt)
                            prompt_tokens["llama.cpp"].append(done.prompt_tokens)
                    for engine, (tokens, secs) in totals.items():
                        if tokens != NEW_TOKENS * len(prompts):
                            raise SameRunError(f"{engine} emitted {tokens} tokens, not {NEW_TOKENS} per prompt")
                        e2e.add(engine, tokens / secs)
                    e2e.add("others", watch.share())
            results[name] = measures
            report["models"][name] = {"dir": str(model_dir), "gguf": str(gguf), "weights_MB": ours.floor.nbytes / 1e6,
                                      "prompt_tokens": prompt_tokens,
                                      "measures": {k: m.to_json() for k, m in measures.items()}}
            print(f"{name}: done", file=sys.stderr, flush=True)
            del ours, model

    print(header(report))
    print(table(results))
    for name, m in report["models"].items():
        p = m["prompt_tokens"]
        if p["s2d"]:
            same = sum(a == b for a, b in zip(p["s2d"], p["llama.cpp"]))
            print(f"- {name}: prompts of {min(p['s2d'])}-{max(p['s2d'])} tokens, the same count in both tokenizers "
                  f"for {same} of {len(p['s2d'])}; weights a decoded token streams: {m['weights_MB']:.0f} MB")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)  # runs/ by default: records stay out of the tree
        args.out.write_text(json.dumps(report, indent=1) + "\n")


def describe_builds(report: dict, args: argparse.Namespace, llama_flags: dict[str, bool]) -> None:
    """Which instruction set each side runs, and whether the comparison is held (both the same)."""
    theirs = build_kind(llama_flags)
    ours = report["ours"]["native_isa"]
    held = theirs == ours
    if args.isa is None:
        verdict = "not held by --isa: each engine at its best" + (f", {ours} for both here" if held else
                                                                   f" (they differ: {ours} against {theirs})")
    elif held:
        verdict = f"held: both at {ours}"
    else:
        verdict = (f"NOT HELD: ours at {ours}, llama.cpp built for {theirs}. llamacpp.sh builds for this host's best "
                   "only (GGML_NATIVE=ON) and cannot build for a lesser instruction set; pass --llamacpp-bin a build "
                   "configured with -DGGML_NATIVE=OFF and the wanted -DGGML_AVX*/-DGGML_AVX512* flags")
    report["llamacpp"] = {"bin": str(args.llamacpp_bin), "kind": theirs,
                          "flags": sorted(k for k, v in llama_flags.items() if v), "version": llama_version(args),
                          "held": held and args.isa is not None, "verdict": verdict}


def llama_version(args: argparse.Namespace) -> str:
    run = subprocess.run([str(args.llamacpp_bin / "llama-bench"), "--version"], capture_output=True, text=True,
                         check=False)
    m = re.search(r"version: (.*)", run.stdout + run.stderr)
    return m.group(1).strip() if m else "unknown"


def header(report: dict) -> str:
    kind = report["cpu_kind"]
    lines = [(f"CPU: {report['cpu']} ({kind}{'' if kind == 'AMX' else ', no AMX'}), {report['threads']} threads; "
              f"s2d {report['s2d_commit'] or report['s2d_source']}: native runtime {report['ours']['native_isa']} "
              f"({report['ours'].get('native_products', 'products not recorded')}), torch kernels "
              f"{report['ours']['torch_cpu_capability']}, ONEDNN_MAX_CPU_ISA {report['ours']['ONEDNN_MAX_CPU_ISA']}")]
    if "llamacpp" in report:
        lc = report["llamacpp"]
        lines.append(f"llama.cpp {lc['version']} at {lc['bin']}: built for {lc['kind']} "
                     f"({' '.join(lc['flags'])}); --isa {report['isa_requested'] or '(none)'}: {lc['verdict']}")
    lines.append(f"{report['rounds']} rounds, interleaved (s2d, llama.cpp, floor); decode: {NEW_TOKENS} tokens after "
                 f"{report['depth']} (llama-bench tg{NEW_TOKENS} @ d{report['depth']}), median of {report['reps']} runs; "
                 f"end to end: {report['prompts']} prompts of {report['prompts_file']} cut to ~{report['prompt_chars']} "
                 f"characters, {NEW_TOKENS} greedy tokens, prefill + decode. Ratios: s2d's speed / llama.cpp's per "
                 "round (> 1: s2d ahead); s2d / floor: decode time over one read of the weights; others' CPU: the share "
                 "of this machine's CPUs that other processes used during each round's measure (a round where it is "
                 "high is suspect).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
