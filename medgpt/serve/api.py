"""An OpenAI-compatible API for a model: `medgpt serve configs/tiny/serve.yaml --model.name_or_path DIR`.

    GET  /health                 liveness, no key needed
    GET  /v1/models              the one model served, under --serve.model_name
    POST /v1/chat/completions    messages -> answer (chat template applied); "stream": true for server-sent events
    POST /v1/completions         raw prompt -> continuation (no template); streams too

Any OpenAI client works: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)`. It is a thin shell over the
one generation engine (medgpt/infer/engine.py). Concurrent requests are batched (medgpt/serve/batcher.py): by
default continuously (requests join and leave the running batch between decoding steps, medgpt/infer/continuous.py),
or statically with --serve.batching static (queued requests with the same sampling settings share one
`engine.generate` call); either way each row has its own max_tokens, streaming callback and cancel flag (a client
that disconnects frees its row).
Request fields and response bodies (the OpenAI wire format) live in medgpt/serve/schema.py.
`create_app(engine, ServeArgs)` builds the app without starting a server, for tests and other hosts.

With `--rag.index_dir` (a `medgpt rag index` directory) chat requests are answered from the knowledge base: the
last user message gets the best passages, numbered, sized to the context (medgpt/rag/answer.py, as `medgpt rag
ask`), and the response carries them as an extra top-level `sources` field (on the final chunk of a stream). A
request sends `"knowledge": false` to skip it; /v1/completions is never augmented.
`--serve.engine vllm` hands a merged model to vLLM's own OpenAI server instead (medgpt/serve/vllm.py).

Safe defaults: binds 127.0.0.1; an API key (--serve.api_key or MEDGPT_API_KEY) is compared in constant time;
other sites' pages are kept out (POSTs must be application/json, and the Host header must name this server, against
DNS rebinding: --serve.allowed_hosts adds names); request size, nesting, prompt length, max_tokens and the queue are
bounded (a full queue answers 429 with Retry-After); errors are OpenAI-shaped JSON and a server
error never shows a traceback to the client; the request log has token counts and latency, never message text
(unless --serve.log_bodies, and even then personal identifiers are scrubbed unless --serve.scrub_logs false).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) as real objects.
import asyncio
import hmac
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

from medgpt.args import GenArgs, ModelArgs
from medgpt.config import arg, section
from medgpt.rag.answer import KnowledgeArgs, load_knowledge
from medgpt.serve.batcher import Job, make_batcher
from medgpt.serve.schema import (
    APIError,
    bad,
    budget,
    chunk,
    completion,
    engine_error,
    field,
    finish_reason,
    read_json,
    sampling,
    sse,
    to_messages,
    usage,
)
from medgpt.utils import MedGPTError, log

try:  # the `serve` extra; without it `medgpt serve --help` still works, and `medgpt serve` says what to install
    from starlette.requests import Request
except ImportError:  # pragma: no cover - exercised only without the extra
    Request = None

KEY_ENV = "MEDGPT_API_KEY"
LOOPBACK = ("localhost", "127.0.0.1", "::1")
RETRY_AFTER_S = "1"  # a full queue drains in about one batch's time
logger = logging.getLogger("medgpt.serve")


@dataclass
class ServeArgs:
    host: str = arg("127.0.0.1", "Address to bind. 0.0.0.0 exposes the API to your network: set api_key then.")
    port: int = arg(8000, "Port to listen on (0: any free port; the address is printed at start).", min=0, max=65535)
    api_key: Optional[str] = arg(None, f"Key clients must send as `Authorization: Bearer KEY` (also read from "
                                 f"${KEY_ENV}, which keeps it out of your shell history). None: no key needed.")
    allowed_hosts: list[str] = arg(factory=list, help="More names clients may reach the server under, as the Host "
                                   "header gives them (e.g. med.example.org,192.168.1.20), or * for any. Always "
                                   "allowed: the host bound, localhost, 127.0.0.1 and ::1. Other names are refused "
                                   "(400), against DNS rebinding, also with host 0.0.0.0.")
    engine: Literal["hf", "vllm"] = arg("hf", "hf: this server on the MedGPT engine (CPU or one GPU, batched). "
                                        "vllm: run vLLM's OpenAI server on a merged model (GPU, much faster).")
    model_name: Optional[str] = arg(None, "Model id shown in /v1/models and expected in requests "
                                    "(default: the model directory's name, or the adapter's when one is given).")
    max_prompt_tokens: int = arg(4096, "Longest prompt accepted, in tokens (the model's context also limits it).",
                                 min=1)
    max_tokens: int = arg(2048, "Largest max_tokens a request may ask for.", min=1)
    max_body_bytes: int = arg(1 << 20, "Largest request body in bytes; bigger ones get 413.", min=1)
    batching: Literal["continuous", "static"] = arg("continuous", "continuous: requests join and leave the running "
                                                    "batch between decoding steps (a short answer never waits for a "
                                                    "long one). static: a batch runs to its longest answer before the "
                                                    "next starts.")
    max_batch_size: int = arg(8, "Most requests generated together in one batch (1: no batching).", min=1)
    batch_wait_ms: float = arg(5.0, "How long a new batch waits for more requests to join it, in milliseconds "
                               "(continuous: only when the model is idle).", min=0)
    max_queue: int = arg(256, "Most requests waiting for the model; more get 429 (retry later).", min=1)
    log_requests: bool = arg(True, "Log one line per request: method, path, status, token counts, latency.")
    log_bodies: bool = arg(False, "Also log request bodies and answers. They hold patients' questions: "
                           "debugging only.")
    scrub_logs: bool = arg(True, "With log_bodies: replace personal identifiers in the logged text (ID, phone, "
                           "medical record and card numbers, e-mails, birth dates, names) with [TYPE] placeholders.")
    vllm_args: str = arg("", "--serve.engine vllm only: extra flags for vLLM's server, as one string "
                         "(e.g. '--max-model-len 8192 --gpu-memory-utilization 0.9').")


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs, "The model to serve (a merged model, or a base + adapter).")
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the model's own.")
    gen: GenArgs = section(GenArgs, "Decoding defaults for requests that do not set temperature, top_p, ...")
    only_cpu: bool = arg(False, "Run on the CPU even when a GPU is available.")
    serve: ServeArgs = section(ServeArgs, "The API server.")
    rag: KnowledgeArgs = section(KnowledgeArgs, "Knowledge base: answer chat requests from your own documents.")


# --------------------------------------------------------------------------------------------------- app

def default_model_name(engine) -> str:
    """The served id: the adapter dir's name when there is one, else the model dir's (`merged`, `Qwen2.5-7B`)."""
    return Path(engine.name.split("+")[-1].rstrip("/")).name or "medgpt"


def scrubbed(value):
    """`value` (a request body, an answer) with personal identifiers in every string replaced by [TYPE]."""
    from medgpt.data.pii import scrub

    if isinstance(value, str):
        return scrub(value)[0]
    if isinstance(value, dict):
        return {k: scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrubbed(v) for v in value]
    return value


SOURCE_FIELDS = ("n", "source", "line", "heading", "where", "text")


async def _api_error(request, e: APIError):
    from fastapi.responses import JSONResponse

    headers = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": RETRY_AFTER_S}}.get(e.status)
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _http_error(request, e):
    from fastapi.responses import JSONResponse

    message = {404: f"No route {request.method} {request.url.path}. This server has GET /health, "
                    f"GET /v1/models, POST /v1/chat/completions and POST /v1/completions.",
               405: f"{request.method} is not allowed on {request.url.path}."}.get(e.status_code, str(e.detail))
    return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code)


async def _crash(request, e: Exception):  # logged with its traceback by the server, never sent
    from fastapi.responses import JSONResponse

    return JSONResponse(APIError(500, "Internal server error (see the server log).").body(), status_code=500)


class Server:
    """What the routes share: the engine and its batcher, the settings, the served name, the key, the index."""

    def __init__(self, engine, serve: ServeArgs, gen: GenArgs, index, rag: KnowledgeArgs):
        self.engine, self.serve, self.gen, self.index, self.rag = engine, serve, gen, index, rag
        self.name = serve.model_name or default_model_name(engine)
        self.key = serve.api_key or os.environ.get(KEY_ENV) or None
        self.batcher = make_batcher(engine, serve.batching, serve.max_batch_size, serve.batch_wait_ms)
        self.started = int(time.time())

    # ------------------------------------------------------------------------------------------- checks

    def authorize(self, request: Request) -> None:
        if self.key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Constant time: how long the comparison takes says nothing about how much of the key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key.encode()):
            raise APIError(401, "Missing or wrong API key. Send it as the header `Authorization: Bearer KEY`.",
                           code="invalid_api_key")

    async def request_body(self, request: Request) -> dict:
        body = await read_json(request, self.serve.max_body_bytes)
        if self.serve.log_bodies:
            shown = scrubbed(body) if self.serve.scrub_logs else body
            logger.info("body %s %s", request.url.path, json.dumps(shown, ensure_ascii=False)[:4000])
        asked = body.get("model")
        if asked is not None and asked != self.name:
            raise APIError(404, f"Model '{asked}' is not served here; use '{self.name}' (see GET /v1/models).",
                           param="model", code="model_not_found")
        return body

    # ------------------------------------------------------------------------------------------- routes

    async def health(self):
        return {"status": "ok", "model": self.name}

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.started, "owned_by": "medgpt"}

    async def models(self):
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, model_id: str):
        if model_id != self.name:
            raise APIError(404, f"Model '{model_id}' is not served here; this server has '{self.name}'.",
                           param="model", code="model_not_found")
        return self.model_card()

    def with_knowledge(self, body: dict, messages: list[dict]) -> tuple[list[dict], Optional[list[dict]]]:
        """The messages with the knowledge base's passages in the last user turn, and those passages as sources.

        The passages are sized so that the prompt fits both the context next to the answer's budget and
        --serve.max_prompt_tokens: a short question is never refused because of what retrieval added."""
        from medgpt.rag.answer import fit_augment

        asked = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
        valid = isinstance(asked, int) and not isinstance(asked, bool) and asked > 0  # else budget() refuses it
        answer_room = asked if valid else min(self.gen.max_new_tokens, self.serve.max_tokens)
        reserve = max(answer_room, self.engine.max_context - self.serve.max_prompt_tokens)
        messages, sources = fit_augment(self.engine, messages, self.index, self.rag.top_k, reserve,
                                        mode=self.rag.mode)
        return messages, [{k: s[k] for k in SOURCE_FIELDS} for s in sources]

    async def chat_completions(self, request: Request):
        body = await self.request_body(request)
        messages = to_messages(body.get("messages"))
        use = field(body, "knowledge", (bool,), what="true or false")
        sources = None
        try:
            # Only a conversation that ends with the user's turn has a question (the rest is refused below).
            if self.index is not None and use is not False and messages[-1]["role"] == "user":
                messages, sources = await asyncio.to_thread(self.with_knowledge, body, messages)  # off the loop
            prompt = await asyncio.to_thread(self.engine.prompt_ids, messages)
        except MedGPTError as e:
            raise bad(str(e), param="messages") from None
        return await self.answer(request, body, prompt, chat=True, sources=sources)

    async def completions(self, request: Request):
        body = await self.request_body(request)
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1:
            text = text[0]
        if not isinstance(text, str) or not text:
            raise bad("'prompt' must be a non-empty string (one prompt per request).", param="prompt")
        prompt = await asyncio.to_thread(self.engine.text_ids, text)
        return await self.answer(request, body, prompt, chat=False)

    # ------------------------------------------------------------------------------------------- answers

    async def answer(self, request: Request, body: dict, prompt: list[int], chat: bool,
                     sources: Optional[list[dict]] = None):
        from fastapi.responses import Response, StreamingResponse

        serve = self.serve
        settings, stop = sampling(body, self.gen)
        max_new = budget(body, len(prompt), self.gen, serve, self.engine.max_context, "messages" if chat else "prompt")
        stream = field(body, "stream", (bool,), what="true or false") or False
        options = field(body, "stream_options", (dict,), what="an object") or {}
        include_usage = stream and options.get("include_usage") is True
        if self.batcher.waiting() >= serve.max_queue:
            raise APIError(429, f"The server is busy ({serve.max_queue} requests waiting). Retry in a moment.",
                           code="server_busy")
        job = Job(prompt, replace(settings, max_new_tokens=max_new), stop, stream, asyncio.get_running_loop())
        self.batcher.submit(job)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        shape = dict(chat=chat, rid=rid, created=int(time.time()), model=self.name)
        if stream:
            return StreamingResponse(self.events(request, job, shape, include_usage, sources),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            result = await wait_for_result(request, job)
        finally:
            job.cancel.set()
        if result is None:  # the client disconnected; nobody reads this
            return Response(status_code=499)
        self.finished(request, rid, result)
        return completion(**shape, result=result, sources=sources)

    async def events(self, request: Request, job: Job, shape: dict, include_usage: bool,
                     sources: Optional[list[dict]]):
        """The server-sent events of a streamed answer."""
        try:
            if shape["chat"]:
                yield sse(chunk(**shape, role=True, with_usage=include_usage))
            while True:
                kind, payload = await job.events.get()
                if kind == "text":
                    yield sse(chunk(**shape, text=payload, with_usage=include_usage))
                    continue
                if kind == "error":
                    yield sse(engine_error(payload).body())
                else:
                    self.finished(request, shape["rid"], payload)
                    yield sse(chunk(**shape, finish=finish_reason(payload), with_usage=include_usage,
                                    sources=sources))
                    if include_usage:
                        yield sse(chunk(**shape, counts=usage(payload)))
                break
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away mid-stream: its row stops at the next token
            job.cancel.set()

    def finished(self, request: Request, rid: str, result) -> None:
        request.state.usage = (result.prompt_tokens, result.completion_tokens)  # for the request log
        if self.serve.log_bodies:
            text = scrubbed(result.text) if self.serve.scrub_logs else result.text
            logger.info("answer %s %s", rid, json.dumps(text, ensure_ascii=False)[:4000])


def create_app(engine, serve: ServeArgs, gen: Optional[GenArgs] = None, index=None,
               rag: Optional[KnowledgeArgs] = None):
    """The FastAPI app serving `engine`; its batcher thread starts and stops with the app (lifespan).

    `index` (a loaded medgpt.rag.index.Index) answers chat requests from the knowledge base, with `rag`'s top_k
    and mode."""
    import contextlib

    from fastapi import APIRouter, Depends, FastAPI
    from starlette.exceptions import HTTPException

    server = Server(engine, serve, gen or GenArgs(), index, rag or KnowledgeArgs())
    if serve.log_requests or serve.log_bodies:
        logger.setLevel(logging.INFO)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.batcher.start()
        yield
        server.batcher.stop()

    app = FastAPI(title="MedGPT", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = server.batcher
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _crash)
    app.add_middleware(host_check, allowed=allowed_hosts(serve))
    if serve.log_requests:  # added last, so it runs first and logs the requests host_check refuses too
        app.add_middleware(request_log)

    app.get("/health")(server.health)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(server.authorize)])
    v1.get("/models")(server.models)
    v1.get("/models/{model_id:path}")(server.model)
    v1.post("/chat/completions")(server.chat_completions)
    v1.post("/completions")(server.completions)
    app.include_router(v1)
    return app


async def wait_for_result(request, job: Job):
    """The job's Result; None if the client disconnects first (checked each second while waiting)."""
    while True:
        try:
            kind, payload = await asyncio.wait_for(job.events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None
            continue
        if kind == "done":
            return payload
        if kind == "error":
            raise engine_error(payload)


def host_name(header: str) -> str:
    """The name in a Host header, lowercased, without its port, IPv6 brackets or a trailing dot:
    `[::1]:8000` -> `::1`, `LocalHost:8000` -> `localhost`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return (header.rpartition(":")[0] if header.count(":") == 1 else header).rstrip(".")


def allowed_hosts(serve: ServeArgs) -> Optional[set[str]]:
    """The names the server answers to (see ServeArgs.allowed_hosts); None: any."""
    extra = {host_name(h) for h in serve.allowed_hosts}
    return None if "*" in extra else {host_name(serve.host), *LOOPBACK, *extra}


def host_check(app, allowed: Optional[set[str]]):
    """ASGI middleware against DNS rebinding: a page on evil.example whose DNS name is switched to 127.0.0.1 would
    be same-origin with this server, but its requests still carry `Host: evil.example`. Those get a 400."""
    from fastapi.responses import JSONResponse

    async def middleware(scope, receive, send):
        if scope["type"] == "http" and allowed is not None:
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if host_name(host) not in allowed:
                error = APIError(400, f"This server does not answer to the host {json.dumps(host[:100])}. Reach it "
                                      f"as {' or '.join(sorted(allowed))}, or start it with --serve.allowed_hosts "
                                      f"naming the host.", code="invalid_host")
                return await JSONResponse(error.body(), status_code=400)(scope, receive, send)
        await app(scope, receive, send)

    return middleware


def request_log(app):
    """ASGI middleware: one line per request when its response ends (streams included), never any text:
    `POST /v1/chat/completions 200 prompt_tokens=12 completion_tokens=40 latency_ms=85`."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        start, status, logged = time.perf_counter(), [0], [False]
        state = scope.setdefault("state", {})  # the handler stores (prompt, completion) tokens in request.state

        def line(note: str = "") -> None:
            logged[0] = True
            p, c = state.get("usage", ("-", "-"))
            logger.info("%s %s %s prompt_tokens=%s completion_tokens=%s latency_ms=%.0f%s", scope["method"],
                        scope["path"], status[0], p, c, 1000 * (time.perf_counter() - start), note)

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and not logged[0]:
                line()

        try:
            await app(scope, receive, logged_send)
        finally:
            if not logged[0]:
                line(" (client disconnected)" if status[0] else " (no response)")

    return middleware


# ------------------------------------------------------------------------------------------------ server

def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so a busy port fails with a clear message before the model loads."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MedGPTError(f"cannot listen on {host}:{port} ({e.strerror}). Another server may be using the port: "
                          f"pick another with --serve.port (0: any free port).") from None
    sock.listen(2048)
    return sock


def run(cfg: Config) -> int:
    """Serve the model over an OpenAI-compatible HTTP API until Ctrl+C."""
    if cfg.serve.engine == "vllm":
        from medgpt.serve.vllm import launch

        if cfg.rag.index_dir:
            raise MedGPTError("--rag.index_dir needs --serve.engine hf: vLLM's own server knows nothing of the "
                              "knowledge base. Drop one of the two.")
        return launch(cfg)
    if not cfg.model.name_or_path:
        raise MedGPTError("no model given. Add --model.name_or_path DIR (a merged model or an HF model dir).")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MedGPTError(f"`medgpt serve` needs fastapi and uvicorn ({e.name} is missing): "
                          f"pip install 'medgpt[serve]'.") from None
    from medgpt.infer.engine import Engine

    serve = cfg.serve
    index = load_knowledge(cfg.rag)  # before the model: a missing index fails fast
    sock = bind(serve.host, serve.port)
    engine = Engine.load(cfg.model, cfg.template, only_cpu=cfg.only_cpu)
    app = create_app(engine, serve, cfg.gen, index, cfg.rag)
    if not logger.handlers:  # our request lines on stderr, beside uvicorn's own
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    open_ = not (serve.api_key or os.environ.get(KEY_ENV))
    if open_ and serve.host not in LOOPBACK:
        log(f"warning: serving on {serve.host} without an API key: anyone who can reach this port can use the "
            f"model. Set --serve.api_key or ${KEY_ENV}.")
    if serve.host not in LOOPBACK and not serve.allowed_hosts:
        log(f"note: only requests addressed to {serve.host} or a loopback name are answered; list the names "
            f"clients use for this machine with --serve.allowed_hosts (its address or DNS name, or * for any).")
    if serve.log_bodies:
        log("warning: --serve.log_bodies is on: request and answer text goes to the log"
            + (" (personal identifiers scrubbed)." if serve.scrub_logs else ", personal identifiers included."))
    if index is not None:
        log(f"knowledge base: {len(index)} passages from {cfg.rag.index_dir} (top {cfg.rag.top_k}, "
            f"{cfg.rag.mode}); requests may send \"knowledge\": false to skip it")
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
    log(f"serving '{serve.model_name or default_model_name(engine)}' at {url} "
        f"(key: {'none' if open_ else 'required'}; {serve.batching} batches of up to {serve.max_batch_size}; "
        f"Ctrl+C to stop)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful shutdown: a normal way to stop
        pass
    log("server stopped")
    return 0
