"""Load on `s2d serve`: concurrent OpenAI clients, mixed targets, streaming and not, over loopback.

    python benchmarks/serve_load.py --zoo ../shared/zoo --draft s2d/data/default/draft [--clients 8]
        [--requests 25] [--max-tokens 64] [--out runs/serve_load.json]

Starts `s2d serve` on the zoo's three targets with the draft (a subprocess on 127.0.0.1), then:
1. sequential: every distinct (target, prompt) once, one request at a time: the expected texts;
2. concurrent: ``--clients`` threads, each sending ``--requests`` greedy requests in turn (targets
   and prompts mixed, every other request streamed).
Checks that every request succeeds and that every concurrent response equals its sequential one;
reports latency and time-to-first-token percentiles, throughput and the server's resident memory
before and after. Exits non-zero if any response fails or differs.

``--peer-gguf GGUF [--peer-args '...']`` then runs the same concurrent jobs against llama-server on that GGUF
of the one target (``../shared/tools/llamacpp.sh server``; its ``build`` and ``gguf`` commands make both), in
the same run: plain ``-np 8`` continuous batching, or e.g. ``--spec-type ngram-mod``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from s2d.bench.results import cpu_name

TARGETS = ("zoo-s", "zoo-m", "zoo-l")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ask(client: openai.OpenAI, target: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    t0 = time.perf_counter()
    if not stream:
        r = client.completions.create(model=target, prompt=prompt, max_tokens=max_tokens, temperature=0)
        t = time.perf_counter() - t0
        return {"text": r.choices[0].text, "latency": t, "ttft": t, "tokens": r.usage.completion_tokens}
    text, ttft, tokens = [], None, 0
    for chunk in client.completions.create(model=target, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text:
            ttft = ttft or time.perf_counter() - t0
            text.append(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    t = time.perf_counter() - t0
    return {"text": "".join(text), "latency": t, "ttft": ttft or t, "tokens": tokens}


def wait_ready(url: str, server: subprocess.Popen, what: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.time() > deadline:
            sys.exit(f"serve_load: {what} did not start")
        time.sleep(0.2)


def concurrent(url: str, jobs: list[tuple[str, str, bool]], clients: int, max_tokens: int,
               model: str | None = None) -> tuple[list[dict], list[str], float]:
    """``clients`` threads, each sending its share of ``jobs`` in turn: (results, failures, wall seconds).
    ``model``: the id every request names (llama-server serves one model), else each job's target."""
    failures: list[str] = []
    lock = threading.Lock()
    per = len(jobs) // clients

    def run_client(c: int) -> list[dict]:
        own = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        out = []
        for target, prompt, stream in jobs[c * per:(c + 1) * per]:
            try:
                r = ask(own, model or target, prompt, max_tokens, stream)
            except Exception as err:  # counted, reported, and the run fails
                with lock:
                    failures.append(f"{target}: {type(err).__name__}: {err}")
                continue
            r["target"], r["stream"], r["prompt"] = target, stream, prompt
            out.append(r)
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(run_client, range(clients)) for r in rs]
    return results, failures, time.perf_counter() - t0


def summary(results: list[dict], wall: float) -> dict:
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results if r["stream"]]
    return {"throughput_tokens_per_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
            "latency_p50_s": percentile(lat, 0.5), "latency_p95_s": percentile(lat, 0.95),
            "ttft_p50_s": percentile(ttft, 0.5) if ttft else None,
            "ttft_p95_s": percentile(ttft, 0.95) if ttft else None}


def run_peer(args, jobs: list[tuple[str, str, bool]], sequential: dict) -> dict:
    """The same jobs against llama-server (``llamacpp.sh server GGUF PORT ARGS``), in the same run."""
    port = free_port()
    cmd = ["bash", str(args.llamacpp_sh), "server", str(args.peer_gguf), str(port), *args.peer_args.split()]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server, "llama-server")
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        ask(client, "peer", jobs[0][1], 8, False)  # warm-up
        results, failures, wall = concurrent(url, jobs, args.clients, args.max_tokens, model="peer")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    same = sum(r["text"] == sequential[(r["target"], r["prompt"])]["text"] for r in results)
    return {"server": "llama-server " + args.peer_args, "requests": len(jobs), "succeeded": len(results),
            "failures": failures, "same_text_as_s2d": same, **summary(results, wall)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path("../shared/zoo"))
    ap.add_argument("--draft", type=Path, default=Path("s2d/data/default/draft"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=24, help="distinct prompts from the zoo's code suite")
    ap.add_argument("--max-slots", type=int, default=4)
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help="comma-separated zoo targets served (default: all three)")
    ap.add_argument("--method", default=None, help="the server's method (default: its own, s2d with a sorted draft)")
    ap.add_argument("--peer-gguf", type=Path, default=None,
                    help="also run the same jobs against llama-server on this GGUF of the (one) target, same run")
    ap.add_argument("--peer-args", default="", help="llama-server's extra arguments, e.g. '--spec-type ngram-mod'")
    ap.add_argument("--llamacpp-sh", type=Path, default=Path("../shared/tools/llamacpp.sh"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    suite = args.zoo / "code_suite.jsonl"
    if not suite.is_file():
        sys.exit(f"serve_load: {suite} not found; pass --zoo DIR (the zoo folder beside the project)")
    prompts = [json.loads(line)["turns"][0] for line in suite.read_text().splitlines() if line.strip()]
    # Short and medium prompts: the 'long' ones would make this a prefill benchmark.
    prompts = [p for p in prompts if len(p) < 2500][:args.prompts]
    port = free_port()
    cmd = [sys.executable, "-m", "s2d.cli", "serve", "--port", str(port), "--draft", str(args.draft),
           "--max-slots", str(args.max_slots), "--max-waiting", str(args.clients * 2)]
    targets = tuple(args.targets.split(","))
    if args.method:
        cmd += ["--method", args.method]
    for name in targets:
        cmd += ["--target", f"{name}={args.zoo / name}"]
    server = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server, "the server")
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        jobs = [(targets[(c + i) % len(targets)], prompts[(c * args.requests + i) % len(prompts)], i % 2 == 1)
                for c in range(args.clients) for i in range(args.requests)]
        distinct = sorted({(t, p) for t, p, _ in jobs})
        for name in targets:  # warm-up: the native runtime's first call on each model
            ask(client, name, prompts[0], 8, False)
        rss_before = rss_mb(server.pid)

        t0 = time.perf_counter()
        sequential = {(t, p): ask(client, t, p, args.max_tokens, False) for t, p in distinct}
        sequential_s = time.perf_counter() - t0

        results, failures, wall = concurrent(url, jobs, args.clients, args.max_tokens)
        rss_after = rss_mb(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    seq_tokens = sum(r["tokens"] for r in sequential.values())
    report = {
        "cpu": cpu_name(), "clients": args.clients, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "max_slots": args.max_slots, "targets": targets,
        "method": args.method or "s2d (server default)",
        "requests": len(jobs), "succeeded": len(results), "failures": failures,
        "identical_to_sequential": sum(r["text"] == sequential[(r["target"], r["prompt"])]["text"] for r in results),
        **summary(results, wall),
        "sequential_tokens_per_s": seq_tokens / sequential_s, "sequential_requests": len(distinct),
        "server_rss_mb_before": rss_before, "server_rss_mb_after": rss_after,
        "graceful_exit_code": server.returncode,
    }
    if args.peer_gguf is not None:
        if len(targets) != 1:
            sys.exit("serve_load: --peer-gguf compares one target (pass --targets with one name)")
        report["peer"] = run_peer(args, jobs, sequential)
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)  # runs/ by default: records stay out of the tree
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    ok = not failures and report["identical_to_sequential"] == len(jobs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
