"""The FastAPI application: routes, limits, authentication and errors around the engine.

    GET  /                      the web page (page.html: self-contained, works offline)
    GET  /health                503 while the model loads, 200 when ready (never needs the API key)
    GET  /metrics               Prometheus text (metrics.py)
    GET  /v1/models             the one model this server serves
    POST /v1/chat/completions   OpenAI's chat completions, streaming or not (api.py)
    POST /v1/detect, /v1/segment   an image and labels in, objects out
    POST /v1/embeddings, /v1/classify   a contrastive SigLIP, when the server has one (--siglip; siglip.py)

Every request goes the same way: its image URL is read under the ImagePolicy (images.py), the pipeline turns
image, prompt and options into a checked row (Pali.row: a NanopaliError here is a 400 naming the problem), the
engine queues it (503 with Retry-After when the queue is full) and steps it with the others (engine.py), and
the answer streams back through an asyncio queue. A request that runs past --timeout is cancelled (504); a
streaming client that disconnects cancels its row at the next step. Model families plug in as routers:
`text_router` here, `siglip_router` (siglip.py) for the contrastive model's /v1/embeddings and /v1/classify.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanopali.errors import NanopaliError
from nanopali.serve import api
from nanopali.serve.engine import Engine, QueueFull
from nanopali.serve.errors import ServerError, as_http_errors
from nanopali.serve.images import ImagePolicy, decode_base64
from nanopali.serve.metrics import Metrics
from nanopali.serve.middleware import Authentication, BodyLimit, Counting
from nanopali.serve.siglip import siglip_router

# the endpoints the metrics count by name (others: "other")
PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/detect", "/v1/segment",
         "/v1/embeddings", "/v1/classify"}

log = logging.getLogger("nanopali.serve")


@dataclass
class Settings:
    """The server's options (the `nanopali serve` flags); checked by the CLI."""
    model_name: str = "nanopali"
    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None
    timeout: float = 300.0                  # seconds from arrival to the end of the answer
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 25_000_000
    images: ImagePolicy = field(default_factory=ImagePolicy)
    siglip_name: str | None = None          # the contrastive model's served name; None: the server has none


def create_app(settings: Settings, load: Callable[[], object], on_load_error: Callable[[BaseException], None] = None,
               load_siglip: Callable[[], object] | None = None):
    """The app; `load()` returns the Pali (and `load_siglip()`, with settings.siglip_name, the zero-shot pipeline's
    Contrastive), called on a thread at startup while /health answers 503."""
    state = State(settings, Metrics())

    async def lifespan(app):
        thread = threading.Thread(target=state.load, args=(load, on_load_error, load_siglip), name="nanopali-load",
                                  daemon=True)
        thread.start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="nanopali", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.nanopali = state
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, metrics=state.metrics)
    app.add_middleware(Authentication, key=settings.api_key, metrics=state.metrics)
    app.add_middleware(Counting, metrics=state.metrics, paths=PATHS)  # outermost: counts the refused requests too

    @app.exception_handler(ServerError)
    async def server_error(request: Request, e: ServerError):
        return JSONResponse(api.error_body(str(e), e.kind, e.param, e.code), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(api.error_body(f"the body is not valid JSON: {first.get('msg')}"), 400)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse(api.error_body(f"{where}: {first.get('msg')}", param=where or None), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(api.error_body(str(e.detail)), e.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE)

    @app.get("/health")
    async def health():
        if state.error is not None:
            return JSONResponse({"status": "error", "error": str(state.error)}, 503)
        return JSONResponse({"status": "ok" if state.ready else "loading"}, 200 if state.ready else 503)

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    app.include_router(text_router(state))
    app.include_router(siglip_router(state))
    return app


class State:
    """What the routes share: the settings, the metrics, and once loaded the pipeline and its engine."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.pali, self.engine, self.error, self.clip = None, None, None, None

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def load(self, load, on_error, load_siglip=None) -> None:
        try:
            if load_siglip is not None:
                self.clip = load_siglip()
            pali = load()
            engine = Engine(pali, self.settings.max_batch, self.settings.max_queue, self.metrics)
            engine.start()
            self.pali, self.engine = pali, engine
            log.info("nanopali: the model is loaded; serving %s", self.settings.model_name)
        except BaseException as e:  # reported by /health and by the CLI, which stops the server
            self.error = e
            if on_error is not None:
                on_error(e)

    def check_model(self, name: str | None) -> None:
        if not self.ready:
            raise ServerError(503, "the model is still loading; /health says when it is ready", "server_error",
                              headers={"Retry-After": "5"})
        if name is not None and name != self.settings.model_name:
            raise ServerError(404, f"model {name!r} not found; this server serves {self.settings.model_name!r}",
                              param="model", code="model_not_found")

    def check_siglip(self, name: str | None):
        """The contrastive pipeline for a request naming `name` (None: the one there is); 404 when there is none."""
        served = self.settings.siglip_name
        if served is None:
            raise ServerError(404, "this server has no contrastive model; start it with --siglip [DIR] for "
                              "/v1/embeddings and /v1/classify", code="model_not_found")
        if not self.ready:
            raise ServerError(503, "the model is still loading; /health says when it is ready", "server_error",
                              headers={"Retry-After": "5"})
        if name is not None and name != served:
            raise ServerError(404, f"model {name!r} not found; this server's contrastive model is {served!r}",
                              param="model", code="model_not_found")
        return self.clip


# ---------------------------------------------------------------------- PaliGemma: text, boxes and masks


def text_router(state: State) -> APIRouter:
    router = APIRouter()
    settings = state.settings

    @router.get("/v1/models")
    async def models():
        state.check_model(None)
        names = [settings.model_name] + ([settings.siglip_name] if settings.siglip_name else [])
        return {"object": "list", "data": [_model_card(n) for n in names]}

    @router.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != settings.siglip_name:
            state.check_model(name)
        return _model_card(name)

    @router.post("/v1/chat/completions")
    async def chat(body: api.ChatRequest, request: Request):
        arrived = time.monotonic()
        state.check_model(body.model)
        with as_http_errors():
            url, prompt = api.chat_prompt(body)
            options, stop = api.chat_options(body, state.pali.model.device)
        job = await Job.start(state, url, prompt, options, arrived)
        id_ = api.new_id()
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_chat_stream(state, job, id_, stop, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        cut = api.StopCut(stop)
        text = "".join([cut.push(piece) async for piece in job.pieces(request)]) + cut.finish()
        return api.completion(id_, settings.model_name, text, job.row, await job.objects())

    async def task(kind: str, body: api.TaskRequest, request: Request):
        arrived = time.monotonic()
        state.check_model(body.model)
        with as_http_errors():
            prompt = api.task_prompt(kind, body)
        url = body.image if body.image.split(":", 1)[0].lower() in ("data", "file", "http", "https") else None
        options = {"max_new_tokens": body.max_tokens} if body.max_tokens else {}
        job = await Job.start(state, url, prompt, options, arrived, raw=None if url else body.image)
        text = "".join([piece async for piece in job.pieces(request)])
        return {"id": api.new_id(kind), "object": {"detect": "detection", "segment": "segmentation"}[kind],
                "created": int(time.time()), "model": settings.model_name, "text": text,
                "image_size": list(job.row.image.size), **(await job.objects(body.convention)),
                "usage": api.usage(job.row)}

    @router.post("/v1/detect")
    async def detect(body: api.TaskRequest, request: Request):
        return await task("detect", body, request)

    @router.post("/v1/segment")
    async def segment(body: api.TaskRequest, request: Request):
        return await task("segment", body, request)

    return router


async def _chat_stream(state: State, job: "Job", id_: str, stop: list[str], include_usage: bool):
    """Server-sent events in OpenAI's chunk format; a disconnect (the generator closed) cancels the row."""
    name, cut = state.settings.model_name, api.StopCut(stop)
    try:
        yield _sse(api.chunk(id_, name, {"role": "assistant", "content": ""}))
        async for piece in job.pieces(None):
            if text := cut.push(piece):
                yield _sse(api.chunk(id_, name, {"content": text}))
        if text := cut.finish():
            yield _sse(api.chunk(id_, name, {"content": text}))
        yield _sse(api.chunk(id_, name, await job.objects() or {}, job.row.finish_reason))
        if include_usage:
            yield _sse({**api.chunk(id_, name, {}), "choices": [], "usage": api.usage(job.row)})
    except ServerError as e:  # the status line is sent already: the error goes in the stream
        yield _sse(api.error_body(str(e), e.kind, e.param, e.code))
    finally:
        job.row.cancel()  # a no-op for a finished row; stops one whose client went away
    yield "data: [DONE]\n\n"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class Job:
    """One request's row as the event loop sees it: pieces and the end arrive through an asyncio.Queue."""

    def __init__(self, state: State, arrived: float):
        self.state, self.arrived, self.loop = state, arrived, asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.row = None
        self.first = True

    @classmethod
    async def start(cls, state: State, url: str | None, prompt: str, options: dict, arrived: float,
                    raw: str | None = None):
        """Read the image, make the row (checked by the pipeline) and queue it; errors are ServerErrors."""
        job, settings = cls(state, arrived), state.settings
        with as_http_errors():
            data = (await run_in_threadpool(settings.images.read, url) if url is not None
                    else decode_base64(raw, "image"))
            job.row = await run_in_threadpool(state.pali.row, data, prompt, max_pixels=settings.max_image_pixels,
                                              on_piece=job._piece, **options)
        try:
            state.engine.submit(job.row, job._done)
        except QueueFull as e:
            state.metrics.rejected.labels("queue_full").inc()
            raise ServerError(503, f"the server is busy: {e}; retry later", "server_error", code="queue_full",
                              headers={"Retry-After": "1"}) from None
        return job

    def _piece(self, piece: str) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, piece)

    def _done(self, row) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    async def pieces(self, request: Request | None):
        """The answer's pieces until the row ends; past the deadline the row is cancelled (504), and a
        non-streaming client that disconnects (`request`) cancels it too."""
        deadline = self.arrived + self.state.settings.timeout
        while True:
            left = deadline - time.monotonic()
            try:
                piece = await asyncio.wait_for(self.queue.get(), timeout=max(0.0, min(left, 1.0)))
            except asyncio.TimeoutError:
                if time.monotonic() >= deadline:
                    self.row.cancel()
                    self.state.metrics.ended.labels("timeout").inc()
                    raise ServerError(504, f"the answer took longer than the server's timeout of "
                                      f"{self.state.settings.timeout:g} s", "timeout", code="timeout") from None
                if request is not None and await request.is_disconnected():
                    self.row.cancel()
                    raise ServerError(499, "the client went away")
                continue
            if piece is None:
                break
            if self.first:
                self.first = False
                self.state.metrics.first_token.observe(time.monotonic() - self.arrived)
            yield piece
        if self.row.error is not None:
            error = self.row.error
            if isinstance(error, NanopaliError):
                raise ServerError(400, str(error))
            raise ServerError(500, f"generation failed: {type(error).__name__}: {error}", "server_error")

    async def objects(self, convention: str = "bigvision") -> dict | None:
        """For a detect / segment prompt, its parsed objects as JSON (api.objects_json); None otherwise."""
        result = await run_in_threadpool(self.state.pali.result, self.row, convention)
        return None if isinstance(result, str) else api.objects_json(result)


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "nanopali"}


PAGE = resources.files("nanopali.serve").joinpath("page.html").read_text(encoding="utf-8")
