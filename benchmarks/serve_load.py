"""Load on `s2d serve`: concurrent OpenAI clients, mixed targets, streaming and not, over loopback; and the same
jobs against llama-server in the same run, engines interleaved in rounds.

    python benchmarks/serve_load.py [--zoo ../shared/zoo] [--draft s2d/data/default/draft] [--clients 8]
        [--requests 25] [--max-tokens 64] [--out runs/serve_load.json]

Starts `s2d serve` on the zoo targets (``--targets``, default all three) with the draft (a subprocess on
127.0.0.1), then:
1. sequential (``--check-sequential``, on by default): every distinct (target, prompt) once, one request
   at a time against the same server: the expected texts (greedy);
2. concurrent, in each of ``--rounds`` rounds: ``--clients`` threads, each sending ``--requests`` greedy
   requests in turn (every other request streamed). Targets: each request of a client takes the next
   target in turn, or with ``--clients-per-target K`` each target gets K clients of its own (``--clients``
   is then K x targets).
Checks that every request succeeds and that every concurrent response equals its sequential one; reports
throughput, latency and time-to-first-token percentiles (overall and per target), errors, and the server's
resident memory. Exits non-zero if any s2d response fails or differs.

Prompts: the zoo's code suite by default (its short and medium prompts, the first ``--prompts``), or
``--prompts-file F`` (Spec-Bench rows, ``turns[0]``; e.g. ../shared/data/foreign_code.jsonl), ``--prompts``
of them spread evenly over the file (default all), each cut to ``--prompt-chars`` (default 1500 with a
prompts file) at its last line end within them.

llama-server (``--peer-gguf GGUF``, a GGUF of the one target; ``../shared/tools/llamacpp.sh build`` and
``gguf`` make both): each ``--peer-args '...'`` (repeatable; default one plain peer) is one llama-server,
started with ``llamacpp.sh server GGUF PORT ARGS`` and stopped again in each round, after s2d's turn:
round 1 = s2d, peer 1, peer 2, ...; round 2 = the same; the host's speed drifts 2-3x between minutes, so
each round's ratio s2d / peer compares engines measured within the same minute, and the report gives
every round's ratio and their median. llama-server serves one model: mixed targets are s2d only.

Slots: ``llamacpp.sh server`` passes ``-np 8 -c 32768`` before the peer's own arguments (8 slots; llama-server
caps a slot at the model's trained context, 2048 tokens for the zoo, as its /props says), and llama-server
keeps the last value of a repeated option, so ``--peer-np 32`` (appended to every peer as ``-np 32 -c
32*--peer-slot-ctx``, 2048 tokens a slot by default) or a peer's own ``-np 32 -c 65536`` gives 32 slots. With
``-np`` given, llama-server's KV cache is not unified: each slot holds ``-c / -np`` tokens. Before measuring,
the bench reads each peer's /props (slots, context per slot) and checks that the longest prompt (its
/tokenize) plus ``--max-tokens`` fits a slot (foreign_code cut to 1,500 characters: at most 491 zoo tokens,
so 256 new tokens fit even 1,024-token slots); fewer slots than clients is said on stderr (requests then
queue inside llama-server).

llama.cpp's draft model (``--spec-type draft-simple -md GGUF``): ``--export-exit E`` exports exit E of
``--draft`` once to a temporary GGUF (``s2d export-gguf --model DRAFT --exit E --out ...``) and puts its
path wherever a peer's arguments say ``{exit_gguf}``. The two-step way: run ``s2d export-gguf`` yourself
and name the file in ``-md``.

llama-server caches each slot's last prompt and reuses it for a request that starts the same way
(``cache_prompt``, on by default), as s2d serve does (its prompt cache). ``--no-peer-cache-prompt`` turns it off
per request, for a comparison of the decoding alone.

The report (JSON on stdout and in ``--out``; a table on stderr) names the CPU and its kind (AMX /
AVX512-BF16 / AVX512 / AVX2, from /proc/cpuinfo), every command line run, and per engine and round:
tokens/s, latency p50/p95, errors. Pure parts are tested in tests/test_serve_load_bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from s2d.bench.cpu import cpu_flags, cpu_kind  # light modules: no torch
from s2d.bench.questions import cut_prompt, spread

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
TARGETS = ("zoo-s", "zoo-m", "zoo-l")
PLACEHOLDER = "{exit_gguf}"
WARM_UP = "import os\n\n\ndef main():\n"
S2D = "s2d"

Job = tuple[str, str, bool]  # (target, prompt, streamed)


# ---- pure parts (tests/test_serve_load_bench.py) ----

def read_prompts(path: Path, n: int | None, chars: int) -> list[str]:
    """A Spec-Bench-format JSONL's first turns, ``n`` spread over the file, each cut to ``chars``."""
    prompts = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompts.append(json.loads(line)["turns"][0])
        except (ValueError, KeyError, IndexError, TypeError):
            raise SystemExit(f"serve_load: {path}:{i}: not a row with turns[0] (Spec-Bench format)") from None
    prompts = [cut_prompt(p, chars) for p in spread(prompts, n)]
    if not prompts:
        raise SystemExit(f"serve_load: {path} has no prompts")
    return prompts


def client_jobs(targets: tuple[str, ...], prompts: list[str], clients: int, requests: int,
                per_target: bool) -> list[list[Job]]:
    """Each client's requests, in order. Prompts go round the list client by client; every other request is
    streamed. ``per_target``: client c serves targets[c % len] only; else each request takes the next target."""
    return [[(targets[c % len(targets)] if per_target else targets[(c + i) % len(targets)],
              prompts[(c * requests + i) % len(prompts)], i % 2 == 1)
             for i in range(requests)] for c in range(clients)]


def schedule(engines: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, engine) in the order run: every engine once per round, in the order given."""
    return [(r, e) for r in range(1, rounds + 1) for e in engines]


def ratios(ours: list[float], theirs: list[float]) -> list[float | None]:
    """Round by round ours / theirs (None where theirs is 0: nothing finished)."""
    if len(ours) != len(theirs):
        raise ValueError(f"ratios: {len(ours)} rounds against {len(theirs)}")
    return [a / b if b else None for a, b in zip(ours, theirs)]


def median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def peer_argv(peer_args: str, common: list[str], exit_gguf: Path | None) -> list[str]:
    """One peer's llama-server arguments: ``common`` (e.g. -np/-c), then its own, split as a shell would,
    ``{exit_gguf}`` replaced by the exported draft exit."""
    out = []
    for word in [*common, *shlex.split(peer_args)]:
        if PLACEHOLDER in word:
            if exit_gguf is None:
                raise SystemExit(f"serve_load: peer args {peer_args!r} name {PLACEHOLDER}: pass --export-exit E")
            word = word.replace(PLACEHOLDER, str(exit_gguf))
        out.append(word)
    return out


def peer_label(peer_args: str) -> str:
    return "llama-server " + (peer_args.strip() or "plain")


def summary(results: list[dict], failures: int, wall: float) -> dict:
    """Throughput over the run's wall time, latency and time-to-first-token percentiles, errors."""
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results if r["stream"]]
    counted = [r["draft"] for r in results if r.get("draft")]
    drafted, accepted = sum(d for d, _ in counted), sum(a for _, a in counted)
    return {"throughput_tokens_per_s": sum(r["tokens"] for r in results) / wall if wall else 0.0, "wall_s": wall,
            "latency_p50_s": percentile(lat, 0.5), "latency_p95_s": percentile(lat, 0.95),
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "succeeded": len(results), "errors": failures,
            # Drafted and accepted tokens as the server reports them (None: it said nothing, no speculation).
            "draft_tokens": drafted if counted else None, "draft_accepted": accepted if counted else None,
            "draft_acceptance": accepted / drafted if drafted else None}


def per_target(results: list[dict], failures: list[tuple[str, str]], wall: float) -> dict[str, dict]:
    """Each target's summary; its own span too (its last response's end), since in a mixed run a small
    target's clients finish early and the whole run's wall would understate its throughput."""
    out = {}
    for t in sorted({r["target"] for r in results} | {t for t, _ in failures}):
        mine = [r for r in results if r["target"] == t]
        s = summary(mine, sum(ft == t for ft, _ in failures), wall)
        span = max((r["end"] for r in mine), default=0.0)
        s["own_span_s"] = span
        s["throughput_own_span_tokens_per_s"] = sum(r["tokens"] for r in mine) / span if span else 0.0
        out[t] = s
    return out


def medians(rounds: list[dict]) -> dict:
    """Per key, the median over rounds of the summaries' numbers."""
    keys = ("throughput_tokens_per_s", "wall_s", "latency_p50_s", "latency_p95_s", "ttft_p50_s", "ttft_p95_s",
            "draft_acceptance")
    return {k: median([r[k] for r in rounds]) for k in keys}


# ---- servers and clients ----

def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def draft_counts(obj) -> tuple[int, int] | None:
    """(drafted, accepted) tokens from a response or chunk, if it says: s2d's usage.s2d (vLLM's names) or
    llama-server's timings (draft_n, draft_n_accepted). Proof that a peer speculated, and its acceptance."""
    usage = getattr(obj, "usage", None)
    own = ((usage.model_extra or {}) if usage is not None else {}).get("s2d")
    if own and "num_draft_tokens" in own:
        return own["num_draft_tokens"], own["num_accepted_tokens"]
    timings = (obj.model_extra or {}).get("timings")
    if timings and "draft_n" in timings:
        return timings["draft_n"], timings.get("draft_n_accepted", 0)
    return None


def ask(client: openai.OpenAI, target: str, prompt: str, max_tokens: int, stream: bool,
        extra: dict | None = None) -> dict:
    t0 = time.perf_counter()
    if not stream:
        r = client.completions.create(model=target, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      extra_body=extra)
        t = time.perf_counter() - t0
        return {"text": r.choices[0].text, "latency": t, "ttft": t, "tokens": r.usage.completion_tokens,
                "draft": draft_counts(r)}
    text, ttft, tokens, draft = [], None, 0, None
    for chunk in client.completions.create(model=target, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}, extra_body=extra):
        if chunk.choices and chunk.choices[0].text:
            ttft = ttft or time.perf_counter() - t0
            text.append(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        draft = draft_counts(chunk) or draft
    t = time.perf_counter() - t0
    return {"text": "".join(text), "latency": t, "ttft": ttft or t, "tokens": tokens, "draft": draft}


def wait_ready(url: str, server: subprocess.Popen, what: str, log: Path | None = None, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.time() > deadline:
            tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
            server.kill()
            sys.exit(f"serve_load: {what} did not start" + (f"; its log ends:\n{tail}" if tail else ""))
        time.sleep(0.2)


def stop(server: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    server.send_signal(sig)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def concurrent(url: str, jobs: list[list[Job]], max_tokens: int, model: str | None = None,
               extra: dict | None = None) -> tuple[list[dict], list[tuple[str, str]], float]:
    """One thread per client, each sending its jobs in turn: (results, failures as (target, message), wall s).
    ``model``: the id every request names (llama-server serves one model), else each job's target."""
    failures: list[tuple[str, str]] = []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def run_client(own_jobs: list[Job]) -> list[dict]:
        own = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=1200)
        out = []
        for target, prompt, stream in own_jobs:
            try:
                r = ask(own, model or target, prompt, max_tokens, stream, extra)
            except Exception as err:  # noqa: BLE001 -- any failure is counted and reported, and the run fails
                with lock:
                    failures.append((target, f"{type(err).__name__}: {err}"))
                continue
            r["target"], r["stream"], r["prompt"], r["end"] = target, stream, prompt, time.perf_counter() - t0
            out.append(r)
        return out

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = [r for rs in pool.map(run_client, jobs) for r in rs]
    return results, failures, time.perf_counter() - t0


def llama_server_bin() -> Path:
    return Path(os.environ.get("DIR", Path.home() / ".cache" / "llamacpp-peer")) / "bin" / "llama-server"


def peer_slots(url: str, prompts: list[str], max_tokens: int, clients: int, label: str) -> dict:
    """llama-server's slots and context per slot (/props), checked against the longest prompt (/tokenize) +
    max_tokens: a request that does not fit a slot would fail or be truncated, not measured."""
    props = httpx.get(url + "/props", timeout=30).json()
    slots = props.get("total_slots")
    n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
    longest = max(len(httpx.post(url + "/tokenize", json={"content": p, "add_special": True}, timeout=30)
                      .json()["tokens"]) for p in set(prompts))
    if n_ctx is not None and longest + max_tokens > n_ctx:
        raise SystemExit(f"serve_load: {label}: a slot holds {n_ctx} tokens, the longest prompt {longest} + "
                         f"--max-tokens {max_tokens} do not fit; raise -c (slots x tokens per slot), e.g. "
                         f"--peer-np {slots} --peer-slot-ctx {longest + max_tokens + 64}")
    if slots is not None and slots < clients:
        print(f"serve_load: {label}: {slots} slots for {clients} clients: requests queue inside llama-server "
              f"(--peer-np {clients} gives one each)", file=sys.stderr)
    return {"slots": slots, "ctx_per_slot": n_ctx, "longest_prompt_tokens": longest}


def run_peer(args, label: str, argv: list[str], jobs: list[list[Job]], prompts: list[str],
             expected: dict[tuple[str, str], str], log_dir: Path) -> dict:
    """One round of one peer: start llama-server, check its slots, warm up, the concurrent jobs, stop it."""
    port = free_port()
    cmd = ["bash", str(args.llamacpp_sh), "server", str(args.peer_gguf), str(port), *argv]
    log = log_dir / f"llama-server-{port}.log"
    with log.open("w") as sink:
        server = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    extra = None if args.peer_cache_prompt else {"cache_prompt": False}
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server, label, log)
        slots = peer_slots(url, prompts, args.max_tokens, len(jobs), label)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        # Warm-up on a text no job sends: llama-server would keep a job's prompt cached in a slot.
        ask(client, "peer", WARM_UP, 8, False, extra)
        results, failures, wall = concurrent(url, jobs, args.max_tokens, model="peer", extra=extra)
    finally:
        stop(server)
    same = sum(r["text"] == expected.get((r["target"], r["prompt"])) for r in results)
    return {"engine": label, "command": shlex.join(cmd), **slots, "failures": [m for _, m in failures],
            "same_text_as_s2d": same, **summary(results, len(failures), wall)}


def export_exit(args, out_dir: Path) -> tuple[Path, str]:
    """Exit ``--export-exit`` of ``--draft`` as a GGUF for llama.cpp's -md, once per run."""
    out = out_dir / f"exit{args.export_exit}.gguf"
    cmd = [sys.executable, "-m", "s2d.cli", "export-gguf", "--model", str(args.draft), "--exit",
           str(args.export_exit), "--out", str(out)]
    print(f"serve_load: exporting the draft's exit {args.export_exit}: {shlex.join(cmd)}", file=sys.stderr)
    done = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          check=False)
    if done.returncode or not out.is_file():
        sys.exit(f"serve_load: export-gguf failed ({done.returncode}):\n{done.stderr[-1500:]}")
    return out, shlex.join(cmd)


# ---- the run ----

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=SHARED / "zoo")
    ap.add_argument("--draft", type=Path, default=REPO / "s2d" / "data" / "default" / "draft")
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients (default 8)")
    ap.add_argument("--clients-per-target", type=int, default=None,
                    help="K clients of their own per target (--clients = K x targets)")
    ap.add_argument("--requests", type=int, default=25, help="per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=None,
                    help="distinct prompts (default: 24 of the code suite; all of a --prompts-file)")
    ap.add_argument("--prompts-file", type=Path, default=None,
                    help="Spec-Bench-format JSONL, e.g. ../shared/data/foreign_code.jsonl (default: the zoo's "
                         "code suite)")
    ap.add_argument("--prompt-chars", type=int, default=None,
                    help="cut prompts to this many characters at a line end (default: 1500 with --prompts-file; "
                         "the code suite's prompts stay whole, its long ones left out)")
    ap.add_argument("--max-slots", type=int, default=4, help="s2d serve --max-slots")
    ap.add_argument("--device", default="cpu", help="s2d serve --device (cuda: the GPU path; peers stay as built)")
    ap.add_argument("--serve-args", default="",
                    help="more arguments for s2d serve, one string (e.g. '--prefill-chunk 512')")
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help="comma-separated zoo targets served (default: all three)")
    ap.add_argument("--method", default=None, help="the server's method (default: its own, s2d with a sorted draft)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of every engine in turn")
    ap.add_argument("--check-sequential", action=argparse.BooleanOptionalAction, default=True,
                    help="run every distinct request alone first and require the concurrent texts to equal them")
    ap.add_argument("--peer-gguf", type=Path, default=None,
                    help="also run the same jobs against llama-server on this GGUF of the (one) target, same run")
    ap.add_argument("--peer-args", action="append", default=None,
                    help="one llama-server's extra arguments, e.g. '--spec-type ngram-mod'; repeat for several "
                         "peers ('' = plain; default one plain peer)")
    ap.add_argument("--peer-np", type=int, default=None,
                    help="every peer: -np N -c N*--peer-slot-ctx (default: llamacpp.sh's 8 slots of 4096)")
    ap.add_argument("--peer-slot-ctx", type=int, default=2048, help="tokens per slot with --peer-np")
    ap.add_argument("--peer-cache-prompt", action=argparse.BooleanOptionalAction, default=True,
                    help="llama-server's per-slot prompt cache (its default on; s2d serve has none)")
    ap.add_argument("--export-exit", type=int, default=None,
                    help="export --draft's exit E to a temporary GGUF, named by {exit_gguf} in --peer-args")
    ap.add_argument("--llamacpp-sh", type=Path, default=SHARED / "tools" / "llamacpp.sh")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    args.targets = tuple(t for t in args.targets.split(",") if t)
    if not args.targets:
        ap.error("--targets: name at least one zoo target")
    for t in args.targets:
        if not (args.zoo / t / "config.json").is_file():
            ap.error(f"--targets: unknown target {t!r}: no {args.zoo / t}/config.json (--zoo names the zoo folder)")
    if not (args.draft / "config.json").is_file():
        ap.error(f"--draft: no checkpoint at {args.draft}")
    if args.clients_per_target is not None:
        if args.clients_per_target < 1:
            ap.error("--clients-per-target must be >= 1")
        want = args.clients_per_target * len(args.targets)
        if args.clients not in (None, want):
            ap.error(f"--clients {args.clients} contradicts --clients-per-target x {len(args.targets)} targets")
        args.clients = want
    args.clients = args.clients or 8
    for name in ("clients", "requests", "max_tokens", "rounds", "max_slots", "peer_slot_ctx"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.prompts is not None and args.prompts < 1:
        ap.error("--prompts must be >= 1")
    if args.prompts_file is not None and not args.prompts_file.is_file():
        ap.error(f"--prompts-file: {args.prompts_file} not found")
    if args.prompt_chars is None:  # 0: uncut
        args.prompt_chars = 0 if args.prompts_file is None else 1500
    if args.peer_gguf is None:
        if args.peer_args or args.export_exit is not None or args.peer_np is not None:
            ap.error("--peer-args, --peer-np and --export-exit need --peer-gguf")
    else:
        args.peer_args = args.peer_args if args.peer_args is not None else [""]
        if len(args.targets) != 1:
            ap.error("--peer-gguf compares one target (llama-server serves one model): pass --targets with one name")
        if not args.peer_gguf.is_file():
            ap.error(f"--peer-gguf: {args.peer_gguf} not found (make it with: bash {args.llamacpp_sh} gguf "
                     f"{args.zoo / args.targets[0]} {args.peer_gguf})")
        if not args.llamacpp_sh.is_file():
            ap.error(f"--llamacpp-sh: {args.llamacpp_sh} not found")
        if not llama_server_bin().is_file():
            ap.error(f"no llama-server at {llama_server_bin()}: run bash {args.llamacpp_sh} build (or set DIR)")
        uses = any(PLACEHOLDER in a for a in args.peer_args)
        if args.export_exit is not None and not uses:
            ap.error(f"--export-exit: no --peer-args names {PLACEHOLDER}")
        if uses and args.export_exit is None:
            ap.error(f"--peer-args name {PLACEHOLDER}: pass --export-exit E")
        if args.peer_np is not None and args.peer_np < 1:
            ap.error("--peer-np must be >= 1")
    return args


def load_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file is not None:
        return read_prompts(args.prompts_file, args.prompts, args.prompt_chars)
    suite = args.zoo / "code_suite.jsonl"
    if not suite.is_file():
        sys.exit(f"serve_load: {suite} not found; pass --zoo DIR (the zoo folder beside the project)")
    prompts = read_prompts(suite, None, args.prompt_chars)
    # Short and medium prompts: the 'long' ones would make this a prefill benchmark.
    return [p for p in prompts if len(p) < 2500][:args.prompts or 24]


def table(report: dict) -> str:
    def f(v: float | None, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    lines = [(f"CPU: {report['cpu']} ({report['cpu_kind']}); {report['clients']} clients x "
              f"{report['requests_per_client']} requests, {report['max_tokens']} tokens, targets "
              f"{','.join(report['targets'])}; {report['prompts']} prompts of {report['prompts_source']}"),
             f"{'round':>5}  {'engine':<58} {'tok/s':>7} {'p50 s':>6} {'p95 s':>6} {'errors':>6} {'acc':>5}  s2d/engine"]
    for rd in report["rounds"]:
        s = rd[S2D]
        lines.append(f"{rd['round']:>5}  {S2D:<58} {f(s['throughput_tokens_per_s'], '.1f'):>7} "
                     f"{f(s['latency_p50_s']):>6} {f(s['latency_p95_s']):>6} {s['errors']:>6} {f(s['draft_acceptance']):>5}")
        for p in rd["peers"]:
            ratio = s["throughput_tokens_per_s"] / p["throughput_tokens_per_s"] if p["throughput_tokens_per_s"] else None
            lines.append(f"{rd['round']:>5}  {p['engine'][:58]:<58} {f(p['throughput_tokens_per_s'], '.1f'):>7} "
                         f"{f(p['latency_p50_s']):>6} {f(p['latency_p95_s']):>6} {p['errors']:>6} {f(p['draft_acceptance']):>5}  "
                         f"{f(ratio)}x")
    m = report["median"]
    lines.append(f"{'med':>5}  {S2D:<58} {f(m['throughput_tokens_per_s'], '.1f'):>7} {f(m['latency_p50_s']):>6} "
                 f"{f(m['latency_p95_s']):>6}")
    for p in report.get("peers", []):
        pm = p["median"]
        lines.append(f"{'med':>5}  {p['engine'][:58]:<58} {f(pm['throughput_tokens_per_s'], '.1f'):>7} "
                     f"{f(pm['latency_p50_s']):>6} {f(pm['latency_p95_s']):>6}               "
                     f"{f(p['median_ratio_s2d_over_peer'])}x (rounds: "
                     f"{', '.join(f(r) for r in p['ratio_s2d_over_peer_by_round'])})")
    if len(report["targets"]) > 1:
        for t, s in report["per_target_median"].items():
            lines.append(f"  {t}: {f(s['throughput_tokens_per_s'], '.1f')} tok/s over the run "
                         f"({f(s['throughput_own_span_tokens_per_s'], '.1f')} over its own span), p50/p95 "
                         f"{f(s['latency_p50_s'])}/{f(s['latency_p95_s'])} s, errors {s['errors']}")
    if report["check_sequential"]:
        lines.append(f"identical to sequential: {report['identical_to_sequential']}/{report['requests']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from s2d.bench.results import cpu_name, source_version  # here: the pure parts import without s2d

    prompts = load_prompts(args)
    jobs = client_jobs(args.targets, prompts, args.clients, args.requests, args.clients_per_target is not None)
    distinct = sorted({(t, p) for client in jobs for t, p, _ in client})
    n_jobs = sum(len(c) for c in jobs)
    commands = {"bench": shlex.join([sys.executable, *sys.argv])}
    port = free_port()
    cmd = [sys.executable, "-m", "s2d.cli", "serve", "--port", str(port), "--draft", str(args.draft),
           "--max-slots", str(args.max_slots), "--max-waiting", str(args.clients * 2), "--device", args.device]
    if args.method:
        cmd += ["--method", args.method]
    cmd += shlex.split(args.serve_args)
    for name in args.targets:
        cmd += ["--target", f"{name}={args.zoo / name}"]
    commands["s2d_serve"] = shlex.join(cmd)
    peers = args.peer_args or []
    common = ["-np", str(args.peer_np), "-c", str(args.peer_np * args.peer_slot_ctx)] if args.peer_np else []

    rounds: list[dict] = []
    sequential: dict[tuple[str, str], dict] = {}
    sequential_s = 0.0
    with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        exit_gguf = None
        if args.export_exit is not None:
            exit_gguf, commands["export_gguf"] = export_exit(args, Path(tmp))
        peer_argvs = [peer_argv(a, common, exit_gguf) for a in peers]
        server = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, server, "s2d serve")
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
            for name in args.targets:  # warm-up: the native runtime's first call on each model
                ask(client, name, prompts[0], 8, False)
            rss_before = rss_mb(server.pid)
            if args.check_sequential:
                t0 = time.perf_counter()
                sequential = {(t, p): ask(client, t, p, args.max_tokens, False) for t, p in distinct}
                sequential_s = time.perf_counter() - t0
            for r, engine in schedule([S2D, *(str(i) for i in range(len(peers)))], args.rounds):
                print(f"serve_load: round {r}: {S2D if engine == S2D else peer_label(peers[int(engine)])}",
                      file=sys.stderr)
                if engine == S2D:
                    results, failures, wall = concurrent(url, jobs, args.max_tokens)
                    rd = {"round": r, "peers": []}
                    rounds.append(rd)
                    rd[S2D] = {"failures": [f"{t}: {m}" for t, m in failures],
                               "identical_to_sequential": sum(x["text"] == sequential[(x["target"], x["prompt"])]["text"]
                                                              for x in results) if sequential else None,
                               **summary(results, len(failures), wall),
                               "per_target": per_target(results, failures, wall)}
                    # What a peer's texts are compared with: the sequential texts, else this round's.
                    expected = {k: v["text"] for k, v in sequential.items()} or \
                        {(x["target"], x["prompt"]): x["text"] for x in results}
                else:
                    i = int(engine)
                    rounds[-1]["peers"].append(run_peer(args, peer_label(peers[i]), peer_argvs[i], jobs, prompts,
                                                        expected, Path(tmp)))
            rss_after = rss_mb(server.pid)
        finally:
            stop(server, signal.SIGINT)

    s2d_rounds = [rd[S2D] for rd in rounds]
    seq_tokens = sum(r["tokens"] for r in sequential.values())
    succeeded = sum(s["succeeded"] for s in s2d_rounds)
    errors = sum(s["errors"] for s in s2d_rounds)
    report = {
        "cpu": cpu_name(), "cpu_kind": cpu_kind(cpu_flags()), "s2d_commit": source_version(),
        "commands": commands, "clients": args.clients, "clients_per_target": args.clients_per_target,
        "requests_per_client": args.requests, "max_tokens": args.max_tokens, "max_slots": args.max_slots,
        "targets": args.targets, "method": args.method or "s2d (server default)", "rounds_run": args.rounds,
        "prompts": len(prompts), "prompts_source": str(args.prompts_file or args.zoo / "code_suite.jsonl"),
        "prompt_chars": args.prompt_chars,
        "requests": n_jobs * args.rounds, "succeeded": succeeded, "errors": errors,
        "failures": [f for s in s2d_rounds for f in s["failures"]],
        "check_sequential": args.check_sequential,
        "identical_to_sequential": sum(s["identical_to_sequential"] or 0 for s in s2d_rounds)
        if args.check_sequential else None,
        # The s2d server's numbers: the median over rounds (the one round's with --rounds 1).
        **medians(s2d_rounds), "median": medians(s2d_rounds),
        "per_target_median": {t: {**medians([s["per_target"][t] for s in s2d_rounds if t in s["per_target"]]),
                                  "throughput_own_span_tokens_per_s": median(
                                      [s["per_target"][t]["throughput_own_span_tokens_per_s"]
                                       for s in s2d_rounds if t in s["per_target"]]),
                                  "errors": sum(s["per_target"].get(t, {}).get("errors", 0) for s in s2d_rounds)}
                              for t in args.targets},
        "sequential_tokens_per_s": seq_tokens / sequential_s if sequential_s else None,
        "sequential_requests": len(sequential),
        "server_rss_mb_before": rss_before, "server_rss_mb_after": rss_after,
        "graceful_exit_code": server.returncode, "rounds": rounds,
    }
    if peers:
        report["peer_cache_prompt"] = args.peer_cache_prompt
        report["peers"] = []
        for i, a in enumerate(peers):
            mine = [rd["peers"][i] for rd in rounds]
            by_round = ratios([s["throughput_tokens_per_s"] for s in s2d_rounds],
                              [p["throughput_tokens_per_s"] for p in mine])
            report["peers"].append({"engine": peer_label(a), "args": a, "median": medians(mine),
                                    "errors": sum(p["errors"] for p in mine),
                                    "ratio_s2d_over_peer_by_round": by_round,
                                    "median_ratio_s2d_over_peer": median(by_round)})
        if len(peers) == 1:  # the one-peer record's shape before rounds: its last round
            report["peer"] = rounds[-1]["peers"][0]
    print(json.dumps(report, indent=1))
    print(table(report), file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)  # runs/ by default: records stay out of the tree
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    ok = not errors and (not args.check_sequential or report["identical_to_sequential"] == n_jobs * args.rounds)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
