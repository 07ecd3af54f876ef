"""The OpenAI-compatible HTTP API and the Prometheus endpoint (FastAPI, served by uvicorn
inside the controller process with `edgefleet controller --http HOST:PORT`).

POST /v1/completions, POST /v1/chat/completions (server-sent events with "stream": true),
GET /v1/models, GET /metrics. The fleet token is the Bearer key. Errors use OpenAI's JSON
shape: 400 bad request, 401 wrong key, 404 unknown model, 429 fleet queue full, 503 no
deployment or a fleet that cannot serve.
"""
from __future__ import annotations

import hmac
import json
import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from controller import page
from controller.chat import chat_tokens
from controller.errors import ControlError, answer
from controller.requests import Piece, Requests

log = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
PUBLIC_PATHS = ("/", "/health")          # no key: a probe, and a page that asks for the key itself


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.counted = False        # already in the request metrics

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2 ** 63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: Any = None
    echo: bool = False


class CompletionBody(Sampling):
    prompt: str | list[int] | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):      # [{"type": "text", "text": ...}, ...]
            if any(part.get("type") != "text" for part in self.content):
                raise ApiError(400, "only text content parts are supported", param="messages")
            return "".join(str(part.get("text", "")) for part in self.content)
        return self.content or ""


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def _openai_reason(piece: Piece) -> str | None:
    return None if not piece.finish_reason else "length" if piece.finish_reason == "length" else "stop"


class Api:
    """Request handling; one instance per controller."""

    def __init__(self, requests: Requests, token: str = "", threads: int | None = None):
        self.requests = requests
        self.token = token
        # a thread per running or queued request (the fleet's own admission limit answers 429)
        self.limiter = anyio.CapacityLimiter(threads or requests.max_queue + 64)

    # ---------------------------------------------------------------- checks

    def authorize(self, request: Request) -> None:
        if not self.token:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise ApiError(401, "incorrect API key: pass the fleet token (the controller's --token) as the Bearer key",
                           "invalid_request_error", "invalid_api_key")

    def deployment(self, model: str | None = None):
        dep = self.requests.deployments.active
        if dep is None:
            raise ApiError(503, "no deployment is active; run `edgefleet deploy MODEL.gguf` first",
                           "service_unavailable", "no_deployment")
        name = model_id(dep.model_path)
        if model is not None and model not in (name, Path(dep.model_path).name):
            raise ApiError(404, f"the model {model!r} is not deployed; this fleet serves {name!r} (see GET /v1/models)",
                           "invalid_request_error", "model_not_found", "model")
        return dep

    @staticmethod
    def sampling(body: Sampling, default_max: int) -> dict:
        if body.n != 1:
            raise ApiError(400, "n must be 1: each request generates one choice", param="n")
        if body.logprobs or body.echo:
            raise ApiError(400, "logprobs and echo are not supported", param="logprobs" if body.logprobs else "echo")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "at most 4 stop sequences are allowed", param="stop")
        seed = body.seed if body.seed is not None else (random.randrange(2 ** 31) if body.temperature > 0 else 0)
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or default_max
        return dict(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=seed, stop=stop)

    async def prompt_ids(self, dep, prompt) -> list[int]:
        """A completion's prompt as token ids: text (one string) or ids as sent."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "send one prompt per request", param="prompt")
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return list(prompt)
        tok = await anyio.to_thread.run_sync(self.requests.tokenizer, dep.model_path)
        try:   # a long prompt is tokenized on a worker thread, never in the event loop
            return await anyio.to_thread.run_sync(tok.encode, prompt, limiter=self.limiter)
        except UnicodeEncodeError:
            raise ApiError(400, "the prompt is not valid Unicode text (it holds a lone surrogate); "
                                "send UTF-8 text", param="prompt") from None

    # ---------------------------------------------------------------- generation

    async def run(self, kind: str, model: str, dep, ids: list[int], params: dict, stream: bool, usage_chunk: bool):
        it = self.requests.complete(dep.model_path, ids, api="openai", **params)
        first = await self._next(it)            # errors before the first token get their status code
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        shape = Shape(kind, rid, created, model)
        if not stream:
            pieces = [first] + await self._call(list, it)
            return JSONResponse(shape.whole(pieces, len(ids)))
        return StreamingResponse(self._events(shape, it, first, len(ids), usage_chunk), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _next(self, it: Iterator[Piece]) -> Piece | None:
        return await self._call(next, it, None)

    async def _call(self, fn, *args):
        """fn(*args) on a worker thread (generation blocks); fleet errors become ApiErrors
        (Requests.complete has counted them in the metrics already)."""
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        except ControlError as exc:
            a = answer(exc)
            err = ApiError(a.http, str(exc), a.type, exc.code or a.code or None)
        err.counted = True
        raise err

    async def _events(self, shape: "Shape", it: Iterator[Piece], first: Piece | None, n_prompt: int,
                      usage_chunk: bool) -> AsyncIterator[str]:
        n = 0
        try:
            if shape.kind == "chat":
                yield sse(shape.chunk({"role": "assistant", "content": ""}, None))
            piece = first
            while piece is not None:
                n += 1
                yield sse(shape.chunk(piece.text, _openai_reason(piece)))
                piece = await self._next(it)
            if usage_chunk:
                yield sse(shape.usage_chunk(n_prompt, n))
            yield "data: [DONE]\n\n"
        except ApiError as exc:     # the status line is gone: the error travels as an event
            yield sse(exc.body())
        finally:
            with anyio.CancelScope(shield=True):        # a client that left: free the session now
                await anyio.to_thread.run_sync(it.close, limiter=self.limiter)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def model_id(model_path: str) -> str:
    return Path(model_path).stem


class Shape:
    """OpenAI response bodies for completions (kind "text") and chat (kind "chat")."""

    def __init__(self, kind: str, rid: str, created: int, model: str):
        self.kind, self.rid, self.created, self.model = kind, rid, created, model

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def whole(self, pieces: list[Piece], n_prompt: int) -> dict:
        text = "".join(p.text for p in pieces)
        reason = _openai_reason(pieces[-1]) or "length"
        usage = {"prompt_tokens": n_prompt, "completion_tokens": len(pieces), "total_tokens": n_prompt + len(pieces)}
        if self.kind == "chat":
            return self._envelope("chat.completion", [{"index": 0, "message": {"role": "assistant", "content": text},
                                                       "finish_reason": reason, "logprobs": None}], usage=usage)
        return self._envelope("text_completion", [{"index": 0, "text": text, "finish_reason": reason,
                                                   "logprobs": None}], usage=usage)

    def chunk(self, delta, reason: str | None) -> dict:
        if self.kind == "chat":
            d = delta if isinstance(delta, dict) else ({"content": delta} if delta or reason is None else {})
            return self._envelope("chat.completion.chunk", [{"index": 0, "delta": d, "finish_reason": reason,
                                                             "logprobs": None}])
        return self._envelope("text_completion", [{"index": 0, "text": delta, "finish_reason": reason,
                                                   "logprobs": None}])

    def usage_chunk(self, n_prompt: int, n: int) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._envelope(obj, [], usage={"prompt_tokens": n_prompt, "completion_tokens": n,
                                              "total_tokens": n_prompt + n})


class KeyCheck:
    """ASGI middleware: the key and the declared body size are checked before anything else,
    the body included (a plain ASGI class, so that streamed responses pass through untouched)."""

    def __init__(self, app, api: Api, failure, max_body: int):
        self.app, self.api, self.failure, self.max_body = app, api, failure, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            request = Request(scope)
            try:
                if request.url.path not in PUBLIC_PATHS:
                    self.api.authorize(request)
                declared = request.headers.get("content-length")
                if declared is None:        # chunked: read it here, up to the limit, and hand it on
                    receive = await self._bounded(receive)
                elif not declared.isdigit() or int(declared) > self.max_body:
                    raise self._too_large(declared)
            except ApiError as exc:
                await self.failure(request, exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _too_large(self, size: str) -> ApiError:
        return ApiError(413, f"the request body is {size} bytes; the limit is {self.max_body} "
                             "(the controller's --max-body)", param="body")

    async def _bounded(self, receive):
        """A body sent without a length, read whole unless it passes the limit; the app then
        reads it from the returned `receive`."""
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break                       # the client went away
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                raise self._too_large(f"over {self.max_body}")
        first = [{"type": "http.request", "body": b"".join(parts), "more_body": False}]

        async def replay():
            return first.pop() if first else await receive()
        return replay


def create_app(requests: Requests, token: str = "", max_body: int = 4 * 2 ** 20) -> FastAPI:
    """The HTTP API: the OpenAI routes, the fleet page and /metrics."""
    api = Api(requests, token)
    app = FastAPI(title="edgefleet", docs_url=None, redoc_url=None, openapi_url=None)

    def failure(request: Request, exc: ApiError) -> JSONResponse:
        if request.url.path in GENERATION_PATHS and not exc.counted:
            requests.metrics.requests.labels("openai", "rejected").inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    app.add_middleware(KeyCheck, api=api, failure=failure, max_body=max_body)
    add_error_handlers(app, failure)
    add_openai_routes(app, api, requests)
    add_fleet_routes(app, requests)
    return app


def add_error_handlers(app: FastAPI, failure) -> None:
    """Every error leaves as an OpenAI-style error body with one sentence."""

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return failure(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        if err.get("type") == "json_invalid" or tuple(err.get("loc", ())) == ("body",):
            return failure(request, ApiError(400, "the request body is not a valid JSON object; send one with "
                                                  "Content-Type: application/json"))
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        return failure(request, ApiError(400, f"invalid request: {where or 'body'}: {err.get('msg', 'invalid')}",
                                         param=where or None))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException):
        return failure(request, ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        log.exception("HTTP request failed")
        return failure(request, ApiError(500, f"internal error: {exc}", "server_error"))


def add_fleet_routes(app: FastAPI, requests: Requests) -> None:
    """/health, the fleet page and its JSON, /metrics."""

    @app.get("/health")
    async def health():
        status, body = page.health(requests.deployments)
        return JSONResponse(body, status_code=status)

    @app.get("/api/fleet")
    async def fleet():
        return page.fleet(requests.deployments, requests.metrics)

    @app.get("/")
    async def index():
        return HTMLResponse(page.PAGE)

    @app.get("/metrics")
    async def metrics():
        return Response(requests.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def add_openai_routes(app: FastAPI, api: Api, requests: Requests) -> None:
    @app.get("/v1/models")
    async def models():
        dep = requests.deployments.active
        data = [] if dep is None else [{"id": model_id(dep.model_path), "object": "model",
                                        "created": int(dep.created_at), "owned_by": "edgefleet"}]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        dep = api.deployment(body.model)
        params = api.sampling(body, 16)
        ids = await api.prompt_ids(dep, body.prompt)
        return await api.run("text", body.model, dep, ids, params, body.stream,
                             bool(body.stream_options and body.stream_options.include_usage))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        dep = api.deployment(body.model)
        params = api.sampling(body, 256)
        tok = await anyio.to_thread.run_sync(requests.tokenizer, dep.model_path)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            ids = chat_tokens(tok, messages)
        except Exception as exc:  # a template that cannot render these messages
            raise ApiError(400, f"the model's chat template cannot render these messages: {exc}",
                           param="messages") from None
        return await api.run("chat", body.model, dep, ids, params, body.stream,
                             bool(body.stream_options and body.stream_options.include_usage))


class HttpServer:
    """uvicorn on its own thread, on a socket bound before start (port 0 picks a free one)."""

    def __init__(self, app: FastAPI, listen: str, tls_cert: Path | None = None, tls_key: Path | None = None):
        host, port = listen.rsplit(":", 1)
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            raise ValueError(f"cannot serve HTTP on {listen}: {exc.strerror}; choose another --http address") from None
        self.port = self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        # with the fleet's TLS certificate the API is HTTPS (clients need not present one)
        self.server = uvicorn.Server(uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
            ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="http",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
