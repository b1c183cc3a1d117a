"""`flashformer serve`: an OpenAI-compatible HTTP server over one Engine, with continuous batching.

Starlette on uvicorn, in one process: the request handlers run on the event loop and talk to the
`Scheduler` (scheduler.py), whose thread alone drives the engine, through its queue and each
sequence's sink (`loop.call_soon_threadsafe` into an asyncio queue). Endpoints: GET /v1/models,
POST /v1/completions and /v1/chat/completions (`stream: true` as server-sent events ending in
`data: [DONE]`), GET /health and GET /metrics (Prometheus).

Every bad request is a 4xx with an OpenAI-style body, {"error": {"message", "type", "param",
"code"}}, naming the field at fault in `param`; requests beyond the free slots and the queue get
429. A client that disconnects (mid-stream or while waiting) has its sequences cancelled: their
slots are free at the next decode step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import sys
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Engine, StreamDelta
from .sampling import SamplingParams, max_logprobs
from .scheduler import Observer, QueueFull, Scheduler, SchedulerStopped, Sequence
from .validate import DEFAULT_MAX_QUEUE

# OpenAI's defaults where they differ from SamplingParams': temperature 1 (sampling), and for a
# chat the rest of the context as max_tokens (a completion keeps SamplingParams' 16).
DEFAULT_TEMPERATURE = 1.0
# Request fields that map one to one onto SamplingParams (top_k, min_p, repetition_penalty,
# stop_token_ids and ignore_eos are vLLM's extensions; the openai client sends them through
# extra_body).
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos")
# Fields this server does not implement, with the values that ask for nothing (accepted).
UNSUPPORTED = {
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
}
SEED_MODULUS = 2**64  # choice j of a seeded request with n > 1 samples with seed + j (mod this)
SSE_DONE = "data: [DONE]\n\n"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client gone before its answer (seen in /metrics only)


class APIError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def response(self) -> JSONResponse:
        return JSONResponse(_error_body(self.message, self.type, self.param, self.code), status_code=self.status)


def _error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- metrics ------------------------------------------------------------------------------------


class Metrics(Observer):
    """The server's Prometheus metrics (own registry: several apps may live in one process); the
    scheduler reports into it from its thread."""

    # a decode step takes ~1-13 ms on an H200 (README): the latency buckets resolve that range
    LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)
    TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self, max_batch_size: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("flashformer_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.finished_total = Counter("flashformer_sequences_finished", "Sequences ended: stop, length, cancelled, error",
                                      ["reason"], registry=r)
        self.prompt_tokens = Counter("flashformer_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("flashformer_generation_tokens", "Tokens generated", registry=r)
        self.waiting = Gauge("flashformer_queue_depth", "Sequences waiting for a batch slot", registry=r)
        self.running = Gauge("flashformer_running_sequences", "Sequences holding a batch slot", registry=r)
        self.ttft = Histogram("flashformer_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=self.TTFT_BUCKETS, registry=r)
        self.itl = Histogram("flashformer_inter_token_latency_seconds", "Between consecutive tokens of a sequence",
                             buckets=self.LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("flashformer_queue_time_seconds", "From a sequence's arrival to its slot",
                                    buckets=self.TTFT_BUCKETS, registry=r)
        self.batch_rows = Histogram("flashformer_decode_batch_rows", "Batch rows of each decode step",
                                    buckets=tuple(range(1, max_batch_size + 1)), registry=r)

    def admitted(self, seq, waited):
        self.queue_time.observe(waited)
        self.prompt_tokens.inc(len(seq.request.prompt_ids))

    def token(self, seq, delta):
        times = seq.request.times
        self.generation_tokens.inc()
        if len(times) == 1:
            self.ttft.observe(times[0] - seq.request.start)
        else:
            self.itl.observe(times[-1] - times[-2])

    def finished(self, seq, reason):
        self.finished_total.labels(reason).inc()

    def step(self, rows):
        self.batch_rows.observe(rows)

    def depth(self, waiting, running):
        self.waiting.set(waiting)
        self.running.set(running)


class _CountRequests:
    """ASGI middleware counting each HTTP response by endpoint and status (a plain ASGI wrapper:
    Starlette's BaseHTTPMiddleware would stand between a streaming response and its client's
    disconnect)."""

    def __init__(self, app, metrics: Metrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


# -- request parsing ----------------------------------------------------------------------------


def _get(body: dict, name: str, kind, requirement: str, default=None):
    """body[name] when present and not null, checked with isinstance(value, kind)."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise APIError(400, f"{name} must be {requirement}, got {json.dumps(value)[:80]}", name)
    return value


def _sampling(body: dict, aliases: dict[str, str], defaults: dict) -> SamplingParams:
    """SamplingParams from the request's fields (SAMPLING_FIELDS, and `aliases`: request name ->
    field); each field is checked alone first so that the error names it."""
    given, names = {}, {}
    for name in (*SAMPLING_FIELDS, *aliases):
        if body.get(name) is not None:
            field = aliases.get(name, name)
            given[field], names[field] = body[name], name
    for field, value in given.items():
        try:
            SamplingParams(**{field: value})
        except ValueError as exc:
            message = str(exc).removeprefix("invalid SamplingParams: ").replace(field, names[field], 1)
            raise APIError(400, message, names[field]) from None
    return SamplingParams(**{"temperature": DEFAULT_TEMPERATURE, **defaults, **given})


def _token(lp) -> str:
    """A logprob entry's token as OpenAI writes it: its text, or "token_id:N" without a tokenizer."""
    return lp.token if lp.token is not None else f"token_id:{lp.token_id}"


def _chat_logprobs(logprobs) -> dict | None:
    """A chat choice's (or chunk's) logprobs, OpenAI's shape: one entry a token."""
    if logprobs is None:
        return None
    entry = lambda lp: {"token": _token(lp), "logprob": lp.logprob, "bytes": lp.bytes}  # noqa: E731
    return {"content": [{**entry(lp), "top_logprobs": [entry(t) for t in lp.top_logprobs]} for lp in logprobs]}


def _completion_logprobs(logprobs, offset: int) -> dict | None:
    """A completion choice's (or chunk's) logprobs in the legacy shape: tokens (the text each
    added: they join into the completion's text), their logprobs, their alternatives (token ->
    logprob) and where each starts in the text (`offset`: the text before these tokens)."""
    if logprobs is None:
        return None
    tokens = [lp.text if lp.text is not None else _token(lp) for lp in logprobs]
    starts = []
    for t in tokens:
        starts.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{_token(t): t.logprob for t in lp.top_logprobs} for lp in logprobs], "text_offset": starts}


def _chat_logprob_count(body: dict) -> int | None:
    """SamplingParams.logprobs of a chat request: top_logprobs (default 0) when logprobs is true."""
    want = _get(body, "logprobs", bool, "a bool", False)
    top = _get(body, "top_logprobs", int, f"an int in 0..{max_logprobs()}")
    if top is not None and not 0 <= top <= max_logprobs():
        raise APIError(400, f"top_logprobs must be an int in 0..{max_logprobs()}, got {top}", "top_logprobs")
    if top is not None and not want:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if want else None


def _check_unsupported(body: dict) -> None:
    for name, neutral in UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise APIError(400, f"{name} is not supported by this server", name)


def _prompts(body: dict) -> list[tuple[str, str | list[int]]]:
    """(name, text or token ids) of each prompt of a completion request."""
    prompt = body.get("prompt")
    requirement = "a string, a list of token ids, or a list of either (a batch)"
    if isinstance(prompt, str) or (_is_ids(prompt) and prompt):
        return [("prompt", prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        return [(f"prompt[{i}]", p) for i, p in enumerate(prompt)]
    if prompt is None:
        raise APIError(400, "prompt is required", "prompt")
    raise APIError(400, f"prompt must be {requirement}, got {json.dumps(prompt)[:80]}", "prompt")


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _messages(body: dict) -> list[dict]:
    """The chat's messages with each content as a string (a list of text parts is joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, 'messages must be a non-empty list of {"role": ..., "content": ...}', "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f'messages[{i}] must be {{"role": ..., "content": ...}} with a string role', "messages")
        if "content" not in m:
            raise APIError(400, f"messages[{i}] has no content", "messages")
        content = m["content"]
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        elif content is None and m["role"] == "assistant":  # (an assistant turn may have none)
            content = ""
        elif not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({**m, "content": content})
    return out


# -- the app ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    """One HTTP request's sequences (choice i is seqs[i]) and the queue their output arrives on."""

    seqs: list[Sequence]
    queue: asyncio.Queue
    prompt_tokens: int


class Server:
    """The endpoints over one engine and its scheduler (`create_app` routes them)."""

    def __init__(self, engine: Engine, model_name: str, max_queue: int):
        self.engine, self.model_name = engine, model_name
        self.metrics = Metrics(engine.max_batch_size)
        self.scheduler = Scheduler(engine, max_queue=max_queue, observer=self.metrics)
        self.created = int(time.time())

    # -- building requests --

    def _check_common(self, body: dict) -> tuple[bool, bool, int]:
        """(stream, include_usage, n), after the checks every endpoint shares."""
        model = _get(body, "model", str, "a string")
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}", "model",
                           code="model_not_found")
        _check_unsupported(body)
        stream = _get(body, "stream", bool, "a bool", False)
        options = _get(body, "stream_options", dict, "an object", {})
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise APIError(400, "stream_options.include_usage must be a bool", "stream_options")
        n = _get(body, "n", int, "an int >= 1", 1)
        if n < 1:
            raise APIError(400, f"n must be an int >= 1, got {n}", "n")
        return stream, include_usage, n

    def _job(self, prompts: list[tuple[str, list[int]]], params: SamplingParams, n: int) -> _Job:
        """Queue n sequences per prompt (checked first) on the scheduler."""
        engine = self.engine
        total = n * len(prompts)
        if total > engine.max_batch_size:
            raise APIError(400, f"n={n} x {len(prompts)} prompt(s) = {total} sequences exceed the server's "
                           f"max_batch_size={engine.max_batch_size}", "n")
        ids = []
        for name, p in prompts:
            try:
                ids.append(engine._check_prompt(name, p))
            except ValueError as exc:
                raise APIError(400, str(exc), name.split("[")[0]) from None
        bad = [t for t in params.stop_token_ids if t >= engine.spec.vocab_size]
        if bad:
            raise APIError(400, f"stop_token_ids: token id {bad[0]} is outside the vocabulary "
                           f"(vocab_size={engine.spec.vocab_size})", "stop_token_ids")
        choices = [params] * n
        if params.seed is not None:  # n samples of one prompt with one seed would be n copies of one
            choices = [dataclasses.replace(params, seed=(params.seed + j) % SEED_MODULUS) for j in range(n)]
        requests = engine._requests(None, [i for i in ids for _ in range(n)], choices * len(prompts))
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        seqs = [Sequence(r, partial(_put, loop, queue, r.index)) for r in requests]
        try:
            self.scheduler.submit(seqs)
        except QueueFull as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded") from None
        except SchedulerStopped as exc:
            raise APIError(503, str(exc), type="service_unavailable") from None
        return _Job(seqs, queue, sum(len(i) for i in ids))

    def _tokenize(self, name: str, prompt) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if self.engine.tokenizer is None:
            raise APIError(400, f"{name}: this model has no tokenizer (tokenizer.json): send token ids", "prompt")
        return self.engine.tokenizer.encode(prompt)

    # -- endpoints --

    async def completions(self, request: Request) -> Response:
        body = await _body(request)
        stream, include_usage, n = self._check_common(body)
        prompts = [(name, self._tokenize(name, p)) for name, p in _prompts(body)]
        params = _sampling(body, {"logprobs": "logprobs"}, {})
        job = self._job(prompts, params, n)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}

        def choice(index, text, finish_reason, logprobs=None):
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

        if stream:
            offsets = [0] * len(job.seqs)  # each choice's text so far, in token texts (text_offset)

            def chunk(d: StreamDelta) -> dict:
                logprobs = _completion_logprobs(d.logprobs, offsets[d.index])
                if logprobs is not None:
                    offsets[d.index] += sum(len(t) for t in logprobs["tokens"])
                return choice(d.index, d.text, d.finish_reason, logprobs)

            return _sse(self.scheduler, job, include_usage, head, chunk)
        outputs = await _complete(request, self.scheduler, job)
        if isinstance(outputs, Response):
            return outputs
        choices = [choice(i, o.text, o.finish_reason, _completion_logprobs(o.logprobs, 0)) for i, o in enumerate(outputs)]
        usage = _usage(job, sum(len(o.token_ids) for o in outputs))
        return JSONResponse({**head, "choices": choices, "usage": usage})

    async def chat(self, request: Request) -> Response:
        body = await _body(request)
        stream, include_usage, n = self._check_common(body)
        if self.engine.tokenizer is None or self.engine.tokenizer.chat_template is None:
            what = "tokenizer (tokenizer.json)" if self.engine.tokenizer is None else "chat template"
            raise APIError(400, f"this model has no {what}: use /v1/completions", "messages")
        try:
            ids = self.engine._chat_ids(_messages(body))
        except ValueError as exc:
            raise APIError(400, str(exc), "messages") from None
        room = max(1, self.engine.max_seq_len - len(ids))  # (a prompt too long is refused by _job)
        params = _sampling(body, {"max_completion_tokens": "max_tokens"},
                           {"max_tokens": room, "logprobs": _chat_logprob_count(body)})
        job = self._job([("messages", ids)], params, n)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_name}

        if stream:
            def choice(index, delta, finish_reason=None, logprobs=None):
                return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

            first = [choice(i, {"role": "assistant", "content": ""}) for i in range(len(job.seqs))]
            return _sse(self.scheduler, job, include_usage, head,
                        lambda d: choice(d.index, {"content": d.text}, d.finish_reason, _chat_logprobs(d.logprobs)),
                        first)
        outputs = await _complete(request, self.scheduler, job)
        if isinstance(outputs, Response):
            return outputs
        choices = [{"index": i, "message": {"role": "assistant", "content": o.text},
                    "logprobs": _chat_logprobs(o.logprobs), "finish_reason": o.finish_reason}
                   for i, o in enumerate(outputs)]
        usage = _usage(job, sum(len(o.token_ids) for o in outputs))
        return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id != self.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {self.model_name!r}",
                           "model", code="model_not_found")
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "flashformer",
                "max_model_len": self.engine.max_seq_len}

    async def health(self, request: Request) -> Response:
        if not self.scheduler.alive:
            return JSONResponse(_error_body("the scheduler is not running", "service_unavailable"), status_code=503)
        waiting, running = self.scheduler.counts()
        return JSONResponse({"status": "ok", "running": running, "waiting": waiting})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int, item) -> None:
    """A sequence's sink, called from the scheduler's thread: hand `item` to the event loop."""
    loop.call_soon_threadsafe(queue.put_nowait, (index, item))


async def _body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _usage(job: _Job, completion_tokens: int) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens}


def _failure(exc: BaseException) -> APIError:
    if isinstance(exc, SchedulerStopped):
        return APIError(503, str(exc), type="service_unavailable")
    return APIError(500, f"generation failed: {exc}", type="internal_server_error")


async def _complete(request: Request, scheduler: Scheduler, job: _Job) -> list | JSONResponse:
    """Wait for every sequence of `job`; their RequestOutputs. A client that disconnects first
    cancels them (and the answer, which no one reads, is a 499)."""
    outputs: list = [None] * len(job.seqs)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        left = len(job.seqs)
        while left:
            get = asyncio.ensure_future(job.queue.get())
            done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:  # no one will read the answer
                get.cancel()
                return JSONResponse(_error_body("the client disconnected", "client_closed_request"),
                                    status_code=CLIENT_CLOSED_REQUEST)
            index, item = get.result()
            if isinstance(item, BaseException):
                raise _failure(item)
            if item.finish_reason is not None:
                outputs[index] = item.output
                left -= 1
        return outputs
    finally:
        gone.cancel()
        scheduler.cancel(job.seqs)  # (a no-op for the finished ones)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read already: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(scheduler: Scheduler, job: _Job, include_usage: bool, head: dict, choice, first=()) -> StreamingResponse:
    """The job's deltas as server-sent events, each chunk `head` with one choice: `first` (choices
    before any token), then choice(delta) of each delta, a usage chunk when asked, then [DONE].
    The client disconnecting ends the generator (Starlette cancels it), which cancels the job's
    sequences."""

    async def events():
        try:
            for c in first:
                yield _event({**head, "choices": [c]})
            left, completion = len(job.seqs), 0
            while left:
                index, item = await job.queue.get()
                if isinstance(item, BaseException):
                    error = _failure(item)
                    yield _event(_error_body(error.message, error.type))
                    break
                completion += len(item.token_ids)
                left -= item.finish_reason is not None
                yield _event({**head, "choices": [choice(item)]})
            else:
                if include_usage:
                    yield _event({**head, "choices": [], "usage": _usage(job, completion)})
            yield SSE_DONE
        finally:
            scheduler.cancel(job.seqs)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, *, model_name: str, max_queue: int = DEFAULT_MAX_QUEUE, ready=None) -> Starlette:
    """The ASGI app serving `engine` as `model_name`. Its scheduler runs from the app's startup
    to its shutdown (and holds the engine meanwhile); `ready()` is called once it runs."""
    server = Server(engine, model_name, max_queue)

    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        if ready is not None:
            ready()
        try:
            yield
        finally:
            server.scheduler.stop()

    async def api_error(request, exc: APIError):
        return exc.response()

    async def http_error(request, exc: HTTPException):  # no such route, or not that method
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(_error_body(message, kind), status_code=exc.status_code, headers=exc.headers)

    async def internal_error(request, exc: Exception):  # uvicorn logs the traceback; the client gets one line
        return JSONResponse(_error_body(f"internal error: {type(exc).__name__}: {exc}", "internal_server_error"),
                            status_code=500)

    routes = [
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", server.model, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.prometheus, methods=["GET"]),
    ]
    endpoints = {r.path for r in routes if "{" not in r.path}
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(_CountRequests, metrics=server.metrics, endpoints=endpoints)],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: internal_error},
    )
    app.state.server = server
    return app


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), for serve(); OSError naming the address
    when it is taken (bind before loading the model: the error comes at once)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(engine: Engine, sock: socket.socket, *, model_name: str, max_queue: int = DEFAULT_MAX_QUEUE,
          log_level: str = "info") -> None:
    """Serve `engine` on `sock` (bind()) until SIGINT or SIGTERM. Once the server is ready, one
    line on stderr gives its address: `flashformer: serving NAME at http://HOST:PORT (...)`."""
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def ready():
        print(f"flashformer: serving {model_name} at {url} (backend {engine.backend.name}, max_batch_size "
              f"{engine.max_batch_size}, max_seq_len {engine.max_seq_len})", file=sys.stderr, flush=True)

    app = create_app(engine, model_name=model_name, max_queue=max_queue, ready=ready)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, access_log=log_level == "debug")
    uvicorn.Server(config).run(sockets=[sock])
