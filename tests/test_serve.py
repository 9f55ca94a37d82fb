"""The OpenAI-compatible server: the official client against a live server on 127.0.0.1 (tiny random models)."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from s2d.sampling import SamplingParams
from s2d.serve.app import Server, ServerConfig
from s2d.serve.scheduler import Event, Job, QueueFullError, Request, Scheduler, TargetPool
from s2d.serve.text import TextStream
from servetools import CHAT_TEMPLATE, KEY, LiveServer, error_of, reference

@pytest.fixture(scope="module")
def family(serve_family):
    return serve_family


@pytest.fixture(scope="module")
def live(family):
    tokenizer, models, draft = family
    server = LiveServer(Server(tokenizer, models, draft, ServerConfig(max_slots=2, max_body_bytes=20_000)))
    yield server
    server.stop()


def test_models_and_health(live):
    assert [m.id for m in live.client().models.list().data] == ["a", "b"]
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["models"] == ["a", "b"]


@pytest.mark.parametrize("method", [None, "ar", "pld", "sd", "s2d-tree"])
def test_greedy_completion_equals_generate(live, family, method):
    prompt = "def add(a, b):\n    return"
    extra = {"method": method} if method else None
    r = live.client().completions.create(model="a", prompt=prompt, max_tokens=24, temperature=0, extra_body=extra)
    assert r.choices[0].text == reference(family, "a", prompt, 24, method or "s2d")
    assert r.usage.prompt_tokens == len(family[0](prompt).input_ids)
    assert r.usage.completion_tokens <= 24 and r.choices[0].finish_reason in ("stop", "length")
    s2d = r.usage.model_extra["s2d"]
    assert s2d["method"] == (method or "s2d") and s2d["target_passes"] >= 1
    assert s2d["mean_accepted_tokens"] == pytest.approx(r.usage.completion_tokens / s2d["target_passes"], abs=1e-3)


def test_cli_generate_matches_server(live, checkpoints, capsys):
    from s2d.cli import main

    prompt = "import os\n"
    assert main(["generate", "--target", f"a={checkpoints['target']}", "--draft", str(checkpoints["draft"]),
                 "--prompt", prompt, "--max-new-tokens", "16", "--dtype", "float32", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["text"]
    r = live.client().completions.create(model="a", prompt=prompt, max_tokens=16, temperature=0)
    assert r.choices[0].text == expected


def test_streaming_completion(live):
    client = live.client()
    kwargs = dict(model="b", prompt="class A:\n", max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    with httpx.stream("POST", live.url + "/v1/completions", json={**kwargs, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_sequences(live, family):
    client = live.client()
    full = reference(family, "a", "x = ", 32)
    stop = full[5:8]
    assert stop and full.find(stop) >= 0
    r = client.completions.create(model="a", prompt="x = ", max_tokens=32, temperature=0, stop=[stop, "\x00never"])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="a", prompt="x = ", max_tokens=32, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.find(stop)]


def test_seeded_sampling_repeats(live, family):
    """A seeded request draws as `s2d generate --seed` does, whatever its slot served before."""
    client = live.client()
    kwargs = dict(model="a", prompt="for i in", max_tokens=16, temperature=1.0, seed=7)
    expected = reference(family, "a", "for i in", 16, params=SamplingParams(1.0, seed=7))
    for _ in range(3):
        assert client.completions.create(**kwargs).choices[0].text == expected


def test_chat(family):
    tokenizer, models, draft = family
    assert not getattr(tokenizer, "chat_template", None)
    live = LiveServer(Server(tokenizer, {"a": models["a"]}, draft))
    try:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            live.client().chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}])
    finally:
        live.stop()
    chat_tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    live = LiveServer(Server(chat_tokenizer, {"a": models["a"]}, draft))
    try:
        client = live.client()
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "print hello"}]
        r = client.chat.completions.create(model="a", messages=messages, max_tokens=12, temperature=0)
        expected = reference(family, "a", "<system>be brief\n<user>print hello\n<assistant>", 12)
        assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected
        chunks = list(client.chat.completions.create(model="a", messages=messages, max_tokens=12, temperature=0,
                                                     stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    finally:
        live.stop()


def test_errors_and_the_server_keeps_serving(live):
    client, url = live.client(), live.url + "/v1/completions"
    ok = {"model": "a", "prompt": "a", "max_tokens": 2, "temperature": 0}
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.completions.create(model="a", prompt="a", n=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="a")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="a", prompt="a", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="unknown method"):
        client.completions.create(model="a", prompt="a", extra_body={"method": "warp"})
    with pytest.raises(openai.BadRequestError, match="unsupported field"):
        client.completions.create(model="a", prompt="a", extra_body={"frobnicate": 1})
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="a", prompt="a", max_tokens=10_000)
    assert httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert error_of(httpx.post(url, json=[1, 2]))["type"] == "invalid_request_error"
    too_long = httpx.post(url, json={**ok, "prompt": "y" * 600})  # 600 tokens > the tiny model's 512
    assert too_long.status_code == 413 and error_of(too_long)["code"] == "context_length_exceeded"
    big = httpx.post(url, json={**ok, "prompt": "z" * 30_000})  # over the 20 kB body limit
    assert big.status_code == 413 and "limit" in error_of(big)["message"]
    assert error_of(httpx.get(live.url + "/v1/nothing"))["type"] == "not_found_error"
    assert client.completions.create(**ok).choices[0].finish_reason in ("stop", "length")


def test_api_key(family):
    tokenizer, models, draft = family
    live = LiveServer(Server(tokenizer, {"a": models["a"]}, draft, ServerConfig(api_key=KEY)))
    try:
        with pytest.raises(openai.AuthenticationError):
            live.client("sk-wrong").models.list()
        assert httpx.get(live.url + "/v1/models").status_code == 401
        assert httpx.get(live.url + "/metrics").status_code == 401
        assert httpx.get(live.url + "/health").status_code == 200
        assert live.client(KEY).completions.create(model="a", prompt="a", max_tokens=2).usage.completion_tokens >= 1
    finally:
        live.stop()


def test_concurrent_requests_equal_sequential(live, family):
    """Requests to the same and different targets interleave in the scheduler; none disturbs another."""
    prompts = [("a", "def f(x):"), ("b", "import sys"), ("a", "while True:"), ("b", "x = [1, 2"),
               ("a", "try:\n    "), ("a", "# comment"), ("b", "return"), ("a", "if x")]
    expected = [reference(family, t, p, 20) for t, p in prompts]

    def ask(i: int) -> str:
        target, prompt = prompts[i]
        if i % 2:
            chunks = live.client().completions.create(model=target, prompt=prompt, max_tokens=20, temperature=0,
                                                      stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return live.client().completions.create(model=target, prompt=prompt, max_tokens=20,
                                                 temperature=0).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, range(len(prompts)))) == expected
    assert all(not slot.busy for pool in live.server.pools.values() for slot in pool.slots)
    assert all(len(pool.slots) <= 2 for pool in live.server.pools.values())


def test_full_queue_answers_503(family, monkeypatch):
    tokenizer, models, draft = family
    live = LiveServer(Server(tokenizer, {"a": models["a"]}, draft, ServerConfig(max_slots=1, max_waiting=1)))
    from s2d.serve import scheduler

    step = scheduler.decode_step_batch
    monkeypatch.setattr(scheduler, "decode_step_batch", lambda *a: (time.sleep(0.02), step(*a))[1])
    try:
        def ask(_) -> int:
            body = {"model": "a", "prompt": "w", "max_tokens": 20, "temperature": 0, "method": "ar"}
            return httpx.post(live.url + "/v1/completions", json=body, timeout=60).status_code

        with ThreadPoolExecutor(4) as pool:
            codes = sorted(pool.map(ask, range(4)))
        assert codes.count(200) >= 2 and 503 in codes  # one decoding + one waiting; the rest refused
        assert live.client().completions.create(model="a", prompt="w", max_tokens=2).usage.completion_tokens >= 1
    finally:
        live.stop()


def test_disconnect_stops_generation(live, monkeypatch):
    from s2d.serve import scheduler

    step = scheduler.decode_step_batch
    # >= 4 s for 400 tokens
    monkeypatch.setattr(scheduler, "decode_step_batch", lambda *a: (time.sleep(0.01), step(*a))[1])
    cancelled = live.server.scheduler.cancelled
    with httpx.stream("POST", live.url + "/v1/completions",
                      json={"model": "a", "prompt": "q", "max_tokens": 400, "temperature": 0, "stream": True,
                            "method": "ar"}) as r:
        assert next(r.iter_lines()).startswith("data: ")
    deadline = time.time() + 3
    while live.server.scheduler.active or live.server.scheduler.waiting:
        assert time.time() < deadline, "a request whose client left kept running"
        time.sleep(0.05)
    assert live.server.scheduler.cancelled == cancelled + 1
    assert live.client().completions.create(model="a", prompt="q", max_tokens=2).usage.completion_tokens >= 1


def generated(live, model: str) -> float:
    for line in httpx.get(live.url + "/metrics").text.splitlines():
        if line.startswith(f's2d_generated_tokens_total{{model="{model}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_metrics(live):
    live.client().completions.create(model="b", prompt="m", max_tokens=4, temperature=0)
    text = httpx.get(live.url + "/metrics").text
    for name in ("s2d_requests_total", "s2d_generated_tokens_total", "s2d_target_passes_total",
                 "s2d_draft_tokens_accepted_total", "s2d_mean_accepted_tokens", "s2d_request_latency_seconds_bucket",
                 "s2d_time_to_first_token_seconds_count", "s2d_requests_waiting", "s2d_sequences_active"):
        assert name in text, name
    assert generated(live, "b") >= 1


# --- the parts, without HTTP ---


def test_scheduler_one_slot_many_jobs(family):
    """Jobs beyond the slots wait, then run; each equals its sequential run; a full queue is refused."""
    tokenizer, models, draft = family
    from s2d.drafting import default_options
    from s2d.engine import Engine

    pool = TargetPool(Engine(models["a"]), draft, lambda m: default_options(m, draft), max_slots=1)
    scheduler = Scheduler({"a": pool}, max_waiting=3)
    done = threading.Semaphore(0)
    results: dict[int, list[Event]] = {}

    def job(i: int, prompt: str) -> Job:
        results[i] = []
        request = Request("a", tokenizer(prompt).input_ids, SamplingParams(), 12, "s2d")
        return Job(request, lambda ev: (results[i].append(ev), ev.kind != "text" and done.release()),
                   TextStream(tokenizer))

    prompts = ["abc", "def g():", "1 + 1"]
    for i, prompt in enumerate(prompts):
        scheduler.submit(job(i, prompt))
    with pytest.raises(QueueFullError):
        scheduler.submit(job(9, "over"))
    scheduler.start()
    try:
        for _ in prompts:
            assert done.acquire(timeout=30)
    finally:
        scheduler.stop()
    for i, prompt in enumerate(prompts):
        assert results[i][-1].kind == "done"
        assert "".join(ev.text for ev in results[i]) == reference(family, "a", prompt, 12)
    assert len(pool.slots) == 1


def test_text_stream_holds_back_stop_prefixes():
    class Chars:  # token id = a character's code point
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    stream = TextStream(Chars(), ("END",))
    assert stream.push([ord(c) for c in "abE"]) == ("ab", False)  # "E" may start "END"
    assert stream.push([ord(c) for c in "abEN"]) == ("", False)
    assert stream.push([ord(c) for c in "abENx"]) == ("ENx", False)
    assert stream.push([ord(c) for c in "abENxyEND!"]) == ("y", True)
    tail = TextStream(Chars(), ("END",))
    tail.push([ord(c) for c in "ok\ufffd"])
    assert tail.sent == "ok" and tail.flush() == "\ufffd"


def _pushed(stream: TextStream, ids: list[int], steps: list[int]) -> str:
    """Push ``ids`` in steps of the given sizes (cycled); check each push's whole text; the released text."""
    out, n, i = [], 0, 0
    while n < len(ids):
        n = min(len(ids), n + steps[i % len(steps)])
        i += 1
        out.append(stream.push(ids[:n])[0])
        assert stream._text == stream.tokenizer.decode(ids[:n], skip_special_tokens=True)
    return "".join(out) + stream.flush()


@pytest.mark.parametrize("seed", range(4))
def test_text_stream_decodes_incrementally_as_a_whole(seed):
    """Each push decodes only the tokens past the settled text, and its text equals decoding the whole output:
    random bytes (multi-byte characters split across tokens, invalid sequences, the end-of-text token skipped)
    pushed 1-4 tokens at a time."""
    from s2d.model.tiny import byte_tokenizer

    tok = byte_tokenizer()
    rng = random.Random(seed)
    text = "".join(rng.choice(["a", " ", "é", "€", "😀", "\n", "x = 1"]) for _ in range(60))
    ids = tok.encode(text)
    ids[rng.randrange(len(ids))] = rng.randrange(128, 256)  # an invalid byte somewhere
    ids.insert(rng.randrange(len(ids)), tok.eos_token_id)
    assert _pushed(TextStream(tok), ids, [1, 2, 3, 4][seed:] + [1]) == tok.decode(ids, skip_special_tokens=True)


def test_text_stream_keeps_sentencepiece_leading_spaces():
    """A SentencePiece-style decoder drops the leading space of a text's first token: decoded alone, a window
    would lose the space between words; the overlap of settled tokens keeps it."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "▁def", "▁f", "(x):", "▁return", "▁x", "▁+", "▁1"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    ids = [1, 2, 3, 4, 5, 6, 7]
    assert tok.decode([4]) == "return"  # the space a window alone would lose
    assert _pushed(TextStream(tok), ids, [1]) == "def f(x): return x + 1"
