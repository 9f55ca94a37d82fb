"""A live server for tests: uvicorn on a free loopback port, and what server tests compare against."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import uvicorn

from s2d.engine import MultiTargetEngine
from s2d.sampling import SamplingParams
from s2d.serve.app import Server, create_app

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
KEY = "sk-test"


class LiveServer:
    """uvicorn on a free loopback port, in a thread."""

    def __init__(self, server: Server) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = server
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=self.port,
                                                     log_level="error", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uvicorn.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(10)


def reference(family, target: str, prompt: str, max_tokens: int, method: str = "s2d",
              params: SamplingParams = SamplingParams()) -> str:
    """What `s2d generate` prints for the prompt (greedy by default), through the engine directly."""
    tokenizer, models, draft = family
    engine = MultiTargetEngine({target: models[target]}, draft, method)
    state = engine.generate(target, tokenizer(prompt).input_ids, params, max_tokens)
    return tokenizer.decode(state.output, skip_special_tokens=True)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return body["error"]
