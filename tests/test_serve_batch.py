"""Continuous batching in the server (issue 26, part 3): every admitted sequence of a target is stepped in
one target pass; 16 concurrent mixed requests (methods, targets, streamed or not, greedy and seeded sampling)
answer exactly what each answers alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from servetools import LiveServer, reference

from s2d.model.loading import load_family
from s2d.sampling import SamplingParams
from s2d.serve import scheduler
from s2d.serve.app import Server, ServerConfig


@pytest.fixture(scope="module")
def family(checkpoints, sorted_draft_dir):
    # Two targets (the plain draft checkpoint doubles as a small second target) and the 3-exit sorted draft.
    return load_family({"a": str(checkpoints["target"]), "b": str(checkpoints["draft"])}, str(sorted_draft_dir),
                       "float32", "cpu")


REQUESTS = [(t, m, p, s) for t, m, p, s in [
    ("a", "s2d", "def f(x):", 0), ("b", "ar", "import sys", None), ("a", "sd-exit-1", "while True:", None),
    ("b", "lookup", "x = [1, 2, 1, 2", None), ("a", "s2d-tree", "try:\n    ", None), ("a", "pld", "# a # a #", None),
    ("b", "s2d", "return", 3), ("a", "ar", "if x", 5), ("a", "rsd", "class A:", None), ("b", "sd-exit-2", "def", 7),
    ("a", "lookup", "for i in i", None), ("b", "s2d-tree", "yield", None), ("a", "s2d", "x = {", 11),
    ("b", "pld", "(((", None), ("a", "sd-exit-2", "lambda", None), ("b", "rsd", "async def", 13)]]


def test_sixteen_concurrent_mixed_requests_equal_each_alone(family, monkeypatch):
    sizes: list[int] = []
    batch_step = scheduler.decode_step_batch

    def spy(target, states, eos):
        sizes.append(len(states))
        return batch_step(target, states, eos)

    monkeypatch.setattr(scheduler, "decode_step_batch", spy)
    tokenizer, models, draft = family
    expected = []
    for target, method, prompt, seed in REQUESTS:
        params = SamplingParams() if seed is None else SamplingParams(temperature=1.0, seed=seed)
        expected.append(reference(family, target, prompt, 16, method, params))
    live = LiveServer(Server(tokenizer, models, draft, ServerConfig(max_slots=8)))
    try:
        def ask(i: int) -> str:
            target, method, prompt, seed = REQUESTS[i]
            extra = {"extra_body": {"method": method}, "temperature": 0 if seed is None else 1.0}
            if seed is not None:
                extra["seed"] = seed
            client = live.client()
            if i % 2:
                chunks = client.completions.create(model=target, prompt=prompt, max_tokens=16, stream=True, **extra)
                return "".join(c.choices[0].text for c in chunks)
            return client.completions.create(model=target, prompt=prompt, max_tokens=16, **extra).choices[0].text

        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            got = list(pool.map(ask, range(len(REQUESTS))))
    finally:
        live.stop()
    assert got == expected
    assert max(sizes) >= 4  # several sequences of one target verified in one step
    assert all(not slot.busy for pool in live.server.pools.values() for slot in pool.slots)


def test_max_draft_tokens_per_request(family):
    """max_draft_tokens in the body caps a request's draft per step; 0 turns speculation off for it; the text
    stays the target's own; vLLM's names for the counts come in the usage."""
    tokenizer, models, draft = family
    expected = reference(family, "a", "for i in range(10):", 24, "sd-exit-2")
    live = LiveServer(Server(tokenizer, models, draft, ServerConfig(max_slots=2)))
    try:
        def ask(extra: dict) -> tuple[str, dict]:
            r = httpx.post(live.url + "/v1/completions", timeout=60, json={
                "model": "a", "prompt": "for i in range(10):", "max_tokens": 24, "temperature": 0,
                "method": "sd-exit-2", **extra})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"], r.json()["usage"]["s2d"]

        text, usage = ask({})
        assert text == expected and len(usage["num_drafts_per_pos"]) == 5  # the method's own 5 tokens
        assert usage["num_draft_tokens"] == usage["draft_tokens_proposed"] == sum(usage["num_drafts_per_pos"])
        assert usage["num_accepted_tokens"] == sum(usage["num_accepted_tokens_per_pos"])
        text, usage = ask({"max_draft_tokens": 2})
        assert text == expected and len(usage["num_drafts_per_pos"]) == 2
        text, usage = ask({"max_draft_tokens": 0})
        assert text == expected and usage["num_draft_tokens"] == 0 and usage["mean_acceptance_length"] == 1.0
        for bad in (-1, "many", 2.5):
            r = httpx.post(live.url + "/v1/completions", timeout=60,
                           json={"model": "a", "prompt": "x", "max_tokens": 2, "max_draft_tokens": bad})
            assert r.status_code == 400 and "max_draft_tokens" in r.json()["error"]["message"] + str(
                r.json()["error"].get("param")), r.text
    finally:
        live.stop()
