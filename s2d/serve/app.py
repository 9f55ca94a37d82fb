"""The HTTP layer: an OpenAI-compatible API over the scheduler (FastAPI), with Prometheus metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from s2d.drafting import DraftOptions, build_drafter, check_method, default_options, needs_draft_model
from s2d.engine import Engine
from s2d.model.config import CheckpointError
from s2d.model.llama import Transformer
from s2d.sampling import SamplingParams
from s2d.serve import DEFAULT_PREFILL_CHUNK
from s2d.serve import protocol as p
from s2d.serve.protocol import APIError
from s2d.serve.scheduler import Event, Job, QueueFullError, Request, Scheduler, TargetPool
from s2d.serve.text import TextStream

log = logging.getLogger("s2d.serve")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions")  # /metrics labels; any other path: "other"


@dataclass
class ServerConfig:
    method: str = "s2d"  # each request's decoding method unless it names another
    api_key: str | None = None  # when set, /v1/* and /metrics need "Authorization: Bearer KEY"
    max_slots: int = 4  # sequences decoded at once per target (each holds a KV cache)
    max_waiting: int = 64  # requests queued beyond those; more are refused with 503
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prompt tokens prefilled per step (decode steps run between chunks)
    max_body_bytes: int = 1 << 20


class Metrics:
    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = r = CollectorRegistry()
        self._totals: dict[str, tuple[int, int]] = {}  # model -> (tokens, target passes), for the MAT gauge
        self.requests = Counter("s2d_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("s2d_prompt_tokens", "prompt tokens of finished requests", ["model"], registry=r)
        self.tokens = Counter("s2d_generated_tokens", "tokens generated", ["model"], registry=r)
        self.passes = Counter("s2d_target_passes", "target verification passes", ["model"], registry=r)
        self.proposed = Counter("s2d_draft_tokens_proposed", "draft tokens proposed", ["model"], registry=r)
        self.accepted = Counter("s2d_draft_tokens_accepted", "draft tokens accepted", ["model"], registry=r)
        self.mat = Gauge("s2d_mean_accepted_tokens", "tokens per target pass so far (MAT)", ["model"], registry=r)
        self.latency = Histogram("s2d_request_latency_seconds", "request latency, submit to last token", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("s2d_time_to_first_token_seconds", "submit to first generated text", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        Gauge("s2d_requests_waiting", "requests queued for a slot", registry=r).set_function(
            lambda: scheduler.waiting)
        Gauge("s2d_requests_cancelled", "requests stopped because their client went away", registry=r).set_function(
            lambda: scheduler.cancelled)
        Gauge("s2d_sequences_active", "sequences being decoded", registry=r).set_function(lambda: scheduler.active)
        Gauge("s2d_prompt_tokens_reused", "prompt tokens a slot's KV cache already held (prompt cache)",
              registry=r).set_function(lambda: scheduler.reused_prompt_tokens)

    def finished(self, job: Job) -> None:
        model, stats = job.request.target, job.state.stats
        self.prompt_tokens.labels(model).inc(len(job.request.prompt))
        self.tokens.labels(model).inc(stats.new_tokens)
        self.passes.labels(model).inc(stats.target_passes)
        self.proposed.labels(model).inc(stats.proposed)
        self.accepted.labels(model).inc(stats.accepted)
        tokens, passes = self._totals.get(model, (0, 0))
        tokens, passes = tokens + stats.new_tokens, passes + stats.target_passes
        self._totals[model] = (tokens, passes)
        self.mat.labels(model).set(tokens / passes if passes else 0.0)
        self.latency.labels(model).observe(job.finished_at - job.submitted_at)
        if job.first_token_at is not None:
            self.ttft.labels(model).observe(job.first_token_at - job.submitted_at)


class Server:
    """Targets sharing a vocabulary (and a draft), behind one scheduler."""

    def __init__(self, tokenizer, targets: dict[str, Transformer], draft: Transformer | None,
                 config: ServerConfig | None = None,
                 options: Callable[[str, str], DraftOptions] | None = None) -> None:
        """``tokenizer``: one for every target, or ``{target: tokenizer}`` (each target's own chat template
        and decoding). ``options(target, method)``: the drafting knobs of a target with a method (default:
        the method's)."""
        config = config or ServerConfig()
        check_method(config.method)
        if needs_draft_model(config.method) and draft is None:
            raise ValueError(f"method {config.method} needs a draft model")
        self.tokenizers = dict(tokenizer) if isinstance(tokenizer, dict) else {name: tokenizer for name in targets}
        if missing := [name for name in targets if name not in self.tokenizers]:
            raise ValueError(f"no tokenizer for target {missing[0]!r}")
        self.tokenizer, self.draft, self.config = self.tokenizers[next(iter(targets))], draft, config
        options = options or (lambda target, method: default_options(method, draft))
        for name, model in targets.items():  # the default method's side files: refused now, not at every request
            try:
                build_drafter(config.method, draft, options(name, config.method), model)
            except ValueError as err:
                raise ValueError(f"method {config.method} cannot serve {name}: {err}") from None
        self.pools = {name: TargetPool(Engine(model, None), draft, lambda m, n=name: options(n, m), config.max_slots)
                      for name, model in targets.items()}
        self.scheduler = Scheduler(self.pools, config.max_waiting, config.prefill_chunk)
        self.metrics = Metrics(self.scheduler)

    # --- a request's way in ---

    def prepare(self, req: p.CompletionRequest | p.ChatRequest) -> Request:
        req.refuse_unsupported()
        if req.model not in self.pools:
            raise APIError(404, f"the model {req.model!r} does not exist; served: {', '.join(self.pools)}", "model",
                           "model_not_found")
        method = req.method or self.config.method
        try:
            check_method(method)
        except ValueError as err:
            raise APIError(400, str(err), "method") from None
        if needs_draft_model(method) and self.draft is None:
            raise APIError(400, f"method {method!r} needs a draft model; this server has none", "method")
        try:
            params = SamplingParams(req.temperature, req.top_k, req.top_p, req.seed)
        except ValueError as err:  # each of SamplingParams' messages starts with the field's name
            field = str(err).split()[0]
            raise APIError(400, str(err), field if field in ("temperature", "top_k", "top_p", "seed") else None) \
                from None
        prompt = self._prompt_ids(req)
        if not prompt:
            raise APIError(400, "the prompt is empty", "prompt" if isinstance(req, p.CompletionRequest) else "messages")
        context = self.pools[req.model].engine.context
        if len(prompt) >= context:
            raise APIError(413, f"the prompt has {len(prompt)} tokens; {req.model}'s context is {context} tokens",
                           None, "context_length_exceeded")
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or context - len(prompt)
        if len(prompt) + max_tokens > context:
            raise APIError(400, f"the prompt's {len(prompt)} tokens + max_tokens {max_tokens} exceed {req.model}'s "
                                f"context of {context} tokens", "max_tokens", "context_length_exceeded")
        if isinstance(req, p.CompletionRequest) and isinstance(req.prompt, list) and req.prompt \
                and isinstance(req.prompt[0], int):
            vocab = self.pools[req.model].engine.target.cfg.vocab_size
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise APIError(400, f"prompt token ids must lie in [0, {vocab})", "prompt")
        return Request(req.model, prompt, params, max_tokens, method, tuple(req.stop or ()), req.max_draft_tokens)

    def _prompt_ids(self, req) -> list[int]:
        tokenizer = self.tokenizers[req.model]
        if isinstance(req, p.CompletionRequest):
            prompt = req.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
                return list(prompt)
            text = prompt if isinstance(prompt, str) else "".join(prompt)
            return tokenizer(text).input_ids
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"{req.model} has no chat template (not a chat model): use /v1/completions",
                           "messages")
        messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in req.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - the template is the checkpoint's own Jinja code
            raise APIError(400, f"the chat template failed on these messages: {err}", "messages") from None
        return tokenizer(text, add_special_tokens=False).input_ids

    def usage(self, job: Job) -> dict:
        stats, n = job.state.stats, len(job.request.prompt)
        return {"prompt_tokens": n, "completion_tokens": stats.new_tokens, "total_tokens": n + stats.new_tokens,
                "s2d": {"method": job.request.method, "target_passes": stats.target_passes,
                        "draft_tokens_proposed": stats.proposed, "draft_tokens_accepted": stats.accepted,
                        "mean_accepted_tokens": round(stats.mean_accepted_tokens, 4),
                        "exit_counts": {str(k): v for k, v in sorted(stats.exit_counts.items())},
                        # vLLM's names for the same counts, and acceptance by draft position
                        "num_draft_tokens": stats.proposed, "num_accepted_tokens": stats.accepted,
                        "mean_acceptance_length": round(stats.mean_accepted_tokens, 4),
                        "num_drafts_per_pos": list(stats.proposed_at),
                        "num_accepted_tokens_per_pos": list(stats.accepted_at)}}


def error_status(err: BaseException) -> APIError:
    """A failure inside the scheduler as the error a client sees."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, QueueFullError):
        return APIError(503, str(err))
    if isinstance(err, CheckpointError):  # the model's own fault (non-finite logits), not the request's
        return APIError(500, str(err))
    if isinstance(err, ValueError):  # InputError and the drafting registry's refusals
        return APIError(400, str(err))
    return APIError(500, f"internal error: {type(err).__name__}: {err}")


class Guard:
    """Authentication and body size before any handler, and every /v1/ request counted by the status its
    client got: a stream that failed after its 200 header by its error event's status (``state.s2d_status``),
    an internal error by 500. Plain ASGI: FastAPI's ``@app.middleware`` wrapper hides the client's
    disconnect from handlers, and a non-streaming request would then generate on for nobody."""

    def __init__(self, app: ASGIApp, server: Server) -> None:
        self.app, self.server = app, server

    def authorized(self, request: HTTPRequest) -> bool:
        key = self.server.config.api_key
        if not key:
            return True
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request, path = HTTPRequest(scope), scope["path"]
        state = scope.setdefault("state", {})
        status = 500  # what ServerErrorMiddleware answers when the app raises

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            error = None
            length = request.headers.get("content-length")
            if (path.startswith("/v1/") or path == "/metrics") and not self.authorized(request):
                error = APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", None,
                                 "invalid_api_key")
            elif length is not None and length.isdigit() and int(length) > self.server.config.max_body_bytes:
                error = APIError(413, f"the request body is {length} bytes; the limit is "
                                      f"{self.server.config.max_body_bytes}")
            if error is not None:
                await JSONResponse(error.body(), error.status)(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        except Exception:
            status = 500
            raise
        finally:
            if path.startswith("/v1/"):  # unknown paths share one label: a client cannot grow /metrics
                endpoint = path if path in ENDPOINTS else "other"
                self.server.metrics.requests.labels(endpoint, str(state.get("s2d_status", status))).inc()


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        yield
        server.scheduler.stop()

    app = FastAPI(title="s2d", lifespan=lifespan)
    app.add_middleware(Guard, server=server)
    metrics = server.metrics

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, err: APIError):
        return JSONResponse(err.body(), err.status)

    @app.exception_handler(Exception)
    async def internal(request: HTTPRequest, err: Exception):  # a bug: still the OpenAI shape, and logged
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(error_status(err).body(), 500)

    @app.exception_handler(404)
    async def not_found(request: HTTPRequest, err):
        return JSONResponse(APIError(404, f"no route {request.method} {request.url.path}").body(), 404)

    @app.exception_handler(405)
    async def bad_method(request: HTTPRequest, err):
        return JSONResponse(APIError(405, f"{request.method} is not allowed on {request.url.path}").body(), 405)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(server.pools), "waiting": server.scheduler.waiting,
                "active": server.scheduler.active}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        created = p.now()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "s2d"}
                                           for name in server.pools]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await serve(request, p.CompletionRequest, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        return await serve(request, p.ChatRequest, "chat")

    async def serve(request: HTTPRequest, model: type, kind: p.Kind):
        raw = await request.body()
        if len(raw) > server.config.max_body_bytes:
            raise APIError(413, f"the request body is {len(raw)} bytes; the limit is {server.config.max_body_bytes}")

        def parse() -> tuple:
            req = p.parse_body(raw, model)
            return req, server.prepare(req)

        # Off the event loop: a body near the size limit takes ~1 s to parse, template and tokenize,
        # which would hold every other request's responses and stream chunks.
        req, job_request = await asyncio.to_thread(parse)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = Job(job_request, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                  TextStream(server.tokenizers[req.model], job_request.stop))
        try:
            server.scheduler.submit(job)
        except QueueFullError as err:
            raise APIError(503, f"the server is busy: {err}") from None
        rid, created = p.new_id("cmpl" if kind == "completion" else "chatcmpl"), p.now()

        last_check = [time.monotonic()]

        async def next_event() -> Event | None:
            """The job's next event; None when the client has gone (the job is then cancelled)."""
            while True:
                if time.monotonic() - last_check[0] >= DISCONNECT_POLL_S:  # also while events keep coming
                    last_check[0] = time.monotonic()
                    if await request.is_disconnected():
                        job.cancel()
                        return None
                try:
                    return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    pass

        if not req.stream:
            text = []
            while (ev := await next_event()) is not None:
                if ev.kind == "text":
                    text.append(ev.text)
                elif ev.kind == "error":
                    raise error_status(ev.error)
                else:
                    metrics.finished(job)
                    choice = p.choice(kind, "".join(text), ev.finish_reason, False)
                    return p.response(kind, rid, req.model, created, [choice], server.usage(job), False)
            return JSONResponse({}, 499)  # the client is gone; nobody reads this

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def chunks() -> AsyncIterator[str]:
            def chunk(choices: list[dict], usage: dict | None = None) -> str:
                return p.sse(p.response(kind, rid, req.model, created, choices, usage, True))

            def failed(error: APIError) -> str:
                request.state.s2d_status = error.status  # what /metrics counts: the 200 header was a promise
                return p.sse(error.body())

            try:
                if kind == "chat":
                    yield chunk([p.choice(kind, None, None, True, first=True)])
                while (ev := await next_event()) is not None:
                    if ev.kind == "text":
                        yield chunk([p.choice(kind, ev.text, None, True)])
                    elif ev.kind == "error":
                        yield failed(error_status(ev.error))
                        break
                    else:
                        metrics.finished(job)
                        yield chunk([p.choice(kind, None, ev.finish_reason, True)])
                        if include_usage:
                            yield chunk([], server.usage(job))
                        break
                else:
                    request.state.s2d_status = 499  # the client went away mid-stream
                yield p.sse("[DONE]")
            except Exception as err:  # a bug: an error event in the OpenAI shape, not a cut-off stream
                log.exception("internal error in a stream on %s", request.url.path)
                yield failed(APIError(500, f"internal error: {type(err).__name__}: {err}"))
                yield p.sse("[DONE]")
            finally:  # the client went away mid-stream (the response is cancelled): stop generating
                job.cancel()

        return StreamingResponse(chunks(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
