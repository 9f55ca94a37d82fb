"""The OpenAI wire format: request bodies (validated), response objects and errors."""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Fields clients send that change nothing here (bookkeeping), accepted and ignored.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier")

# What one request may ask of the scheduler thread, which serves every request: the stop strings are
# checked at each step of the sequence (time linear in their total length).
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 512
MAX_JSON_DEPTH = 32  # a chat request needs 4 (body, messages, a message, content parts)


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
        429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields of both endpoints. Unknown fields are refused: a silently ignored knob misleads."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's default: sampling at 1
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # vLLM's extension; 0 = off
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    method: str | None = None  # s2d's extension (the client's extra_body): the decoding method, e.g. ar, s2d
    # s2d's extension: the most tokens drafted per step for this request (llama.cpp's speculative.n_max);
    # 0 turns speculation off for it; None: the method's own
    max_draft_tokens: int | None = Field(default=None, ge=0)
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if (longest := max(map(len, stops), default=0)) > MAX_STOP_CHARS:
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters, got {longest}")
        return stops

    def refuse_unsupported(self) -> None:
        """Fields we parse but cannot honour, refused by name (rather than ignored)."""
        if self.n != 1:
            raise APIError(400, f"n={self.n} is not supported: one completion per request (send n requests)", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported (penalties would change the target's distribution, "
                                    "which speculative decoding reproduces exactly)", name)
        if self.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported", "logprobs")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported", "echo")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported", "best_of")
        if self.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            raise APIError(400, "one prompt per request (send one request per prompt)", "prompt")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: the chat template may read them
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"only text content parts are supported, got type {part.get('type')!r}",
                               "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens


def parse_body(raw: bytes, model: type[BaseModel]):
    """A request body as ``model``: malformed JSON and invalid fields become 400s naming the problem."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from None
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_values(data)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        what = "unsupported field" if first["type"] == "extra_forbidden" else first["msg"]
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise APIError(400, f"{where}: {what}{more}", where or None) from None


def check_values(data: dict) -> None:
    """Refuse what JSON parsers accept but nothing downstream can use, naming the field: nesting deeper
    than MAX_JSON_DEPTH, NaN/Infinity (and numbers that overflow to them) and strings that are not valid
    Unicode (lone surrogates from ``\\ud800`` escapes, which every tokenizer rejects). Iterative: the
    depth check must not itself recurse."""
    todo: list[tuple[object, tuple, int]] = [(data, (), 1)]
    while todo:
        value, path, depth = todo.pop()
        where = ".".join(map(str, path)) or None
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise APIError(400, f"{where}: the request body nests deeper than {MAX_JSON_DEPTH} levels", where)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, path + (key,))
                todo.append((item, path + (key,), depth + 1))
        elif isinstance(value, float) and not math.isfinite(value):
            raise APIError(400, f"{where}: {value} is not allowed (numbers must be finite)", where)
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, path: tuple) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        where = ".".join(map(str, path)) or None
        raise APIError(400, f"{where}: the text is not valid Unicode ({err.reason} at character {err.start})",
                       where) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


Kind = Literal["completion", "chat"]


def choice(kind: Kind, text: str | None, finish_reason: str | None, stream: bool, first: bool = False) -> dict:
    if kind == "completion":
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if stream:
        delta: dict = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def response(kind: Kind, rid: str, model: str, created: int, choices: list[dict], usage: dict | None,
             stream: bool) -> dict:
    obj = {"completion": "text_completion", "chat": "chat.completion.chunk" if stream else "chat.completion"}[kind]
    body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if usage is not None or not stream:
        body["usage"] = usage
    return body


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
