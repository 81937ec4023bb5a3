"""The HTTP service of a run: FastAPI + uvicorn, a web page at ``/``, micro-batched inference.

Prediction is :meth:`Predictor.predict` (LoRA merged at load, length-sorted batches); this
module only moves requests to it and answers back:

* ``POST /predict``  ``{"text": "..."}`` or ``{"texts": [...]}``, optional ``top_k``
* ``GET /health``    liveness and queue depth
* ``GET /info``      labels, base model, trainable parameters, the run's metrics, limits
* ``GET /``          the page: type a text, see the class and one bar per class
  (``HEAD`` too on these three, for load balancers and uptime checks)
* ``GET /openapi.json`` and ``/docs``: the schema FastAPI derives from the models below

Concurrent requests are micro-batched: each request puts its texts on an asyncio queue; one
worker takes the first waiting request, keeps collecting for at most ``max_wait_ms`` or until
``max_batch`` texts, runs one ``predict`` call in a thread (the event loop keeps serving) and
resolves every request's future. With micro-batching off the same worker takes one request at
a time, which is what a plain one-request-one-forward service does.

Every client mistake is a 4xx with a JSON body ``{"error": "..."}``: body too large (413),
malformed JSON or schema (422), too many texts, a text too long, an empty text, a text that is
not valid Unicode (422). A request that fails inside a micro-batch fails alone: the others in
its batch are answered. A fault of the service itself is a 500 with the same JSON body. A body
that does not arrive in time is a 408.
On shutdown the service stops taking requests (503), answers uploads still in progress 503 and
the requests already received normally; a forced stop (a second Ctrl-C) answers them all 503.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

# At module level, not in create_app: FastAPI resolves the routes' annotations (``request:
# Request``, the return types) in this module's namespace. Only `loraclf serve` imports this module.
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .data import unicode_problem
from .errors import LoraclfError, RunError
from .predict import Predictor
from .runs import EXAMPLES_FILE, Run, open_run

SHUTTING_DOWN = "the service is shutting down; retry on another instance"  # the 503 of a stopping service
MAX_WAIT_MS = 10_000  # a longer wait to fill a micro-batch is a typo, and an infinite one hangs every request


@dataclass(frozen=True)
class Limits:
    """What one request may carry; anything beyond is refused with a 4xx before any inference."""

    max_body_bytes: int = 1_000_000
    max_texts: int = 256
    max_text_chars: int = 10_000
    max_top_k: int = 100  # only bites on models with more classes: a larger top_k lists every class
    # A body not fully arrived by then is answered 408: a client that stalls mid-upload would
    # otherwise hold its connection (a file descriptor) for ever, and enough of them stop the service.
    body_timeout_s: int = 30


# ----------------------------------------------------------------------------- schema


class PredictRequest(BaseModel):
    """One text (``text``) or several (``texts``), never both."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "Stocks rally after the merger"},
                                                                              {"texts": ["a", "b"], "top_k": 2}]})

    text: str | None = Field(None, description="a single text to classify")
    texts: list[str] | None = Field(None, description="several texts to classify, answered in order")
    # strict: "2" or true are client mistakes, not 2 and 1; null (what many clients send for an
    # optional field they leave unset) is the default
    top_k: int | None = Field(1, ge=1, strict=True,
                              description="how many of the most probable classes to list per text (more than the "
                                          "number of classes lists them all; null: 1)")

    @field_validator("top_k", mode="after")
    @classmethod
    def _unset_top_k(cls, value: int | None) -> int:
        return 1 if value is None else value


class ClassProbability(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    label: str = Field(description="the most probable class")
    probabilities: dict[str, float] = Field(description="probability of every class")
    top_k: list[ClassProbability] = Field(description="the top_k most probable classes, most probable first")


class PredictResponse(BaseModel):
    predictions: list[Prediction] = Field(description="one per input text, in input order")


class ErrorResponse(BaseModel):
    error: str


class HealthResponse(BaseModel):
    status: str
    pending_requests: int = Field(description="requests waiting for an answer")
    receiving_requests: int = Field(description="requests still receiving their body (answered 503 on shutdown)")
    micro_batching: bool


class InfoResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    labels: list[str]
    base_model: str | None
    trainable_params: int | None
    params: dict[str, Any] | None
    metrics: dict[str, Any] | None
    run_dir: str | None
    device: str
    precision: str
    cuda_graphs: bool = Field(description="each batch shape's forward replayed from a CUDA graph")
    cuda_graphs_stopped: str | None = Field(
        None, description="why CUDA graphs were turned off while serving (a capture failed), else null")
    micro_batching: dict[str, Any]
    limits: dict[str, int]


class ClientError(Exception):
    """A request the service refuses; becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ----------------------------------------------------------------------------- micro-batching


@dataclass
class _Job:
    texts: list[str]
    top_k: int
    future: asyncio.Future


class MicroBatcher:
    """Collects concurrent requests into one ``predict`` call.

    A batch starts with the oldest waiting request and grows until it holds ``max_batch``
    texts or ``max_wait_ms`` have passed since it started; a request that would overflow a
    non-empty batch waits for the next one (a single request larger than ``max_batch`` is a
    batch of its own). ``enabled=False`` runs every request alone.
    """

    def __init__(self, predictor: Predictor, enabled: bool = True, max_batch: int = 64, max_wait_ms: float = 5.0):
        if max_batch < 1 or not 0 <= max_wait_ms <= MAX_WAIT_MS:  # (NaN fails the comparison too)
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms between 0 and {MAX_WAIT_MS}")
        self.predictor = predictor
        self.enabled = enabled
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.closing = False
        self.batches = 0
        self.texts_done = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held: _Job | None = None
        self._collecting: list[_Job] = []  # the batch _next_batch is filling (its jobs are in no queue)
        self.pending = 0  # requests submitted and not answered yet (queued, collected or in predict)

    def start(self) -> None:
        """Start the worker on the running loop (again, if a previous loop has gone)."""
        loop = asyncio.get_running_loop()
        if self._worker is not None and self._loop is loop and not self._worker.done():
            return
        self._loop, self._queue, self._held, self.closing = loop, asyncio.Queue(), None, False
        self._worker = loop.create_task(self._run(), name="loraclf-microbatcher")

    async def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, answer everything already queued, then stop the worker."""
        self.closing = True
        if self._worker is None:
            return
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline and not self._worker.done():
            await asyncio.sleep(0.005)
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        self._worker = None

    def abort(self) -> None:
        """A forced stop: every waiting request is answered 503 now (the one in ``predict`` too,
        through the worker's cancellation) instead of being dropped with its connection."""
        self.closing = True
        stopped = ClientError(503, "the service was stopped before answering; retry")
        waiting = [*self._collecting] + ([self._held] if self._held is not None else [])
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        self._held = None
        for job in waiting:
            if not job.future.done():
                job.future.set_exception(stopped)
        if self._worker is not None:
            self._worker.cancel()

    async def submit(self, texts: list[str], top_k: int = 1) -> list[dict[str, Any]]:
        if self.closing:
            raise ClientError(503, SHUTTING_DOWN)
        self.start()
        assert self._queue is not None and self._loop is not None
        job = _Job(texts, top_k, self._loop.create_future())
        self._queue.put_nowait(job)
        self.pending += 1
        try:
            return await job.future
        finally:
            self.pending -= 1

    async def _next_batch(self) -> list[_Job]:
        assert self._queue is not None
        first = self._held or await self._queue.get()
        while first.future.done():  # its client has gone while it waited
            first = await self._queue.get()
        self._held = None
        batch, size = [first], len(first.texts)
        self._collecting = batch
        if not self.enabled:
            return batch
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except (asyncio.TimeoutError, TimeoutError):
                    break
            if job.future.done():  # its client has gone: it takes no room in the batch
                continue
            if size + len(job.texts) > self.max_batch:
                self._held = job  # first in the next batch
                break
            batch.append(job)
            size += len(job.texts)
        return batch

    async def _run(self) -> None:
        while True:
            await self._answer(await self._next_batch())

    async def _answer(self, batch: list[_Job]) -> None:
        live = [j for j in batch if not j.future.done()]  # a client that went away is skipped
        if not live:
            return
        texts = [t for j in live for t in j.texts]
        top_k = max(j.top_k for j in live)
        try:
            results = await asyncio.to_thread(self.predictor.predict, texts, top_k)
        except asyncio.CancelledError:
            for j in live:
                if not j.future.done():
                    j.future.set_exception(ClientError(503, "the service stopped before answering"))
            raise
        except Exception as e:  # noqa: BLE001 - every waiting request must get an answer
            if len(live) > 1:
                # One request's texts must not fail the others that shared its batch: answer each
                # alone, so the error reaches only the request that caused it.
                for j in live:
                    await self._answer([j])
                return
            if not live[0].future.done():
                live[0].future.set_exception(e)
            return
        self.batches += 1
        self.texts_done += len(texts)
        i = 0
        for j in live:
            part = results[i:i + len(j.texts)]
            i += len(j.texts)
            if not j.future.done():
                j.future.set_result([_trim(r, j.top_k) for r in part])


def _trim(result: dict[str, Any], top_k: int) -> dict[str, Any]:
    # top_k lists are sorted (stable), so the first k of a longer list are exactly the top k.
    return {"label": result["label"], "probabilities": result["probabilities"], "top_k": result["top_k"][:top_k]}


# ----------------------------------------------------------------------------- request checks


def check_request(req: PredictRequest, limits: Limits, n_labels: int | None = None) -> list[str]:
    """The texts of a request, or a ClientError saying exactly what is wrong with it. A ``top_k``
    above ``n_labels`` (the model's number of classes) asks for every class, which is allowed."""
    if (req.text is None) == (req.texts is None):
        raise ClientError(422, 'give exactly one of "text" (a string) or "texts" (a list of strings)')
    texts = [req.text] if req.text is not None else list(req.texts or [])
    if not texts:
        raise ClientError(422, '"texts" is empty; give at least one text')
    if len(texts) > limits.max_texts:
        raise ClientError(422, f"{len(texts)} texts in one request; the limit is {limits.max_texts}")
    if min(req.top_k, n_labels or req.top_k) > limits.max_top_k:
        raise ClientError(422, f"top_k {req.top_k} is above the limit of {limits.max_top_k}")
    single = req.text is not None
    for i, t in enumerate(texts):
        name = "text" if single else f"text {i + 1}"
        if not t.strip():
            raise ClientError(422, f"{name} is empty; give every text some characters")
        if len(t) > limits.max_text_chars:
            raise ClientError(422, f"{name} has {len(t):,} characters; the limit is {limits.max_text_chars:,}")
        problem = unicode_problem(t)
        if problem:
            raise ClientError(422, f"{name} {problem}")
    return texts


def _validation_message(errors: list[dict[str, Any]], body: Any = None) -> str:
    """One line for FastAPI's validation errors; ``body``: the decoded body text, where FastAPI
    keeps it (a JSON error's position then also reads as line and column)."""
    parts = []
    for e in errors[:5]:
        path = [p for p in e.get("loc", ()) if p != "body"]
        loc = ".".join(str(p) for p in path)
        if len(path) == 2 and path[0] == "texts" and isinstance(path[1], int):
            loc = f"text {path[1] + 1}"  # numbered from 1, as check_request numbers them
        if e.get("type") == "json_invalid":
            # json's own words and where: "Expecting value at character 9" is what a client fixes by
            why = str((e.get("ctx") or {}).get("error") or "").strip()
            at = ""
            if len(path) == 1 and isinstance(path[0], int):
                pos = path[0]
                at = f" at character {pos}"
                if isinstance(body, str) and "\n" in body[:pos]:  # a pretty-printed body: say where as an editor does
                    line, column = body.count("\n", 0, pos) + 1, pos - body.rfind("\n", 0, pos)
                    at += f", line {line} column {column}"
            parts.append("the body is not valid JSON" + (f" ({why}{at})" if why else ""))
        elif e.get("type") in ("model_attributes_type", "dict_type") and loc == "":
            parts.append('the body must be a JSON object such as {"text": "..."}, '
                         "sent with Content-Type: application/json")
        elif e.get("type") == "missing" and loc == "":
            parts.append('the body is empty; send a JSON object such as {"text": "..."}')
        elif e.get("type") == "extra_forbidden":
            parts.append(f'unknown field "{loc}" (fields: text, texts, top_k)')
        else:
            parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


class _Uploads:
    """The requests still receiving their body. On shutdown they are answered 503 at once: a
    client that stalls mid-upload would otherwise hold the graceful stop for its whole timeout."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()
        self.closing = False

    def abort(self) -> None:
        self.closing = True
        for task in list(self.tasks):
            task.cancel()


class _RequestGuard:
    """ASGI middleware, outermost: what must hold before any parsing and around the whole request.

    * A body over ``limits.max_body_bytes`` is answered 413: the declared Content-Length is
      checked first and the bytes actually received second, so a chunked upload cannot slip
      past. A bounded part of the rest is read and dropped first; closing on unread bytes makes
      the kernel reset the connection, and the client sees the reset instead of the answer (not
      for a client waiting for "100 Continue": it has sent no body).
    * A body not complete within ``limits.body_timeout_s`` is answered 408.
    * A request cancelled by the server (shutdown of an upload, a forced stop) ends with a JSON
      503 when nothing was sent yet, not with a traceback in the log and a text/plain 500.
    The body, once read, is replayed to the app.
    """

    DRAIN_BYTES = 16 * 2**20  # at most this much of a refused body is read before answering
    DRAIN_SECONDS = 2.0

    def __init__(self, app: Any, limits: Limits, uploads: _Uploads):
        self.app = app
        self.limits = limits
        self.uploads = uploads

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: dict) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            if scope["method"] in ("GET", "HEAD", "OPTIONS"):
                await self.app(scope, receive, send_tracked)
                return
            body = await self._read(scope, receive, send_tracked)
            if body is None:
                return
            sent = False

            async def replay() -> dict:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_tracked)
        except asyncio.CancelledError:
            # The server is stopping; the request is not re-raised into uvicorn, which would log
            # a traceback per request and answer text/plain.
            if not started:
                try:
                    await _error(send, 503, SHUTTING_DOWN)
                except (Exception, asyncio.CancelledError):  # noqa: BLE001 - the client may be gone
                    pass

    async def _read(self, scope: dict, receive: Any, send: Any) -> bytes | None:
        """The whole body, or None once an error has been answered (or the client left)."""
        limit = self.limits.max_body_bytes
        too_large = f"request body is larger than the limit of {limit:,} bytes"
        if self.uploads.closing:
            await _error(send, 503, SHUTTING_DOWN)
            return None
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # A client that sent "Expect: 100-continue" waits for leave to upload: none of the body
            # is on its way, so answer now (reading would have the server invite the upload first)
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await self._drain(receive, more=True)
            await _error(send, 413, too_large)
            return None
        task = asyncio.current_task()
        assert task is not None
        self.uploads.tasks.add(task)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.limits.body_timeout_s
            chunks, size, more = [], 0, True
            while more:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
                except (asyncio.TimeoutError, TimeoutError):
                    await _error(send, 408, f"the request body did not arrive within {self.limits.body_timeout_s} s "
                                            "(it was shorter than its Content-Length, or the client stalled)")
                    return None
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                more = message.get("more_body", False)
                if size > limit:
                    await self._drain(receive, more)
                    await _error(send, 413, too_large)
                    return None
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            self.uploads.tasks.discard(task)

    async def _drain(self, receive: Any, more: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline, dropped = loop.time() + self.DRAIN_SECONDS, 0
        while more and dropped < self.DRAIN_BYTES and loop.time() < deadline:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except (asyncio.TimeoutError, TimeoutError):
                return
            if message["type"] == "http.disconnect":
                return
            dropped += len(message.get("body", b""))
            more = message.get("more_body", False)


async def _client_gone(request: Any) -> None:
    """Returns when the client of ``request`` (its body already read) disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _error(send: Any, status: int, message: str) -> None:
    """Answer ``{"error": message}`` with ``status`` and close the connection (its body may be unread)."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------- the app


def run_info(run: Run) -> dict[str, Any]:
    """What ``/info`` tells about a run, from its run.json."""
    params = run.info.get("params") or {}
    return {"base_model": run.info.get("base_model") or run.cfg.model.name_or_path,
            "trainable_params": params.get("trainable"), "params": params or None,
            "metrics": run.info.get("metrics"), "run_dir": str(run.path)}


def load_examples(run_dir: str | Path) -> dict[str, list[str]]:
    """Example texts per class saved by ``train`` (RUN_DIR/examples.json); {} when absent."""
    try:
        data = json.loads((Path(run_dir) / EXAMPLES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): [t for t in v if isinstance(t, str) and t.strip()] for k, v in data.items() if isinstance(v, list)}


def create_app(predictor: Predictor, *, info: dict[str, Any] | None = None,
               examples: dict[str, list[str]] | None = None, limits: Limits | None = None,
               micro_batching: bool = True, max_batch: int = 64, max_wait_ms: float = 5.0) -> Any:
    """The FastAPI app serving ``predictor``; ``info`` (see :func:`run_info`) feeds ``/info``."""
    from contextlib import asynccontextmanager

    limits = limits or Limits()
    info = dict(info or {})
    batcher = MicroBatcher(predictor, enabled=micro_batching, max_batch=max_batch, max_wait_ms=max_wait_ms)
    uploads = _Uploads()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()  # graceful: queued requests are answered first

    app = FastAPI(title="loraclf", version=_version(),
                  description="Text classification with a LoRA fine-tuned encoder. "
                              "Errors are JSON objects {\"error\": \"...\"}.",
                  lifespan=lifespan)
    app.state.batcher = batcher
    app.state.predictor = predictor
    app.state.limits = limits
    app.state.uploads = uploads
    errors = {408: {"model": ErrorResponse, "description": "the request body did not arrive in time"},
              413: {"model": ErrorResponse, "description": "request body too large"},
              422: {"model": ErrorResponse,
                    "description": "invalid request: schema, empty text, too many or too long texts"},
              500: {"model": ErrorResponse, "description": "a fault of the service (details in its log)"},
              503: {"model": ErrorResponse, "description": "shutting down"}}

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(list(exc.errors()), exc.body)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and request.url.path == "/predict":
            # FastAPI's answer to a body it cannot decode (not UTF-8): a client mistake like bad JSON
            return JSONResponse({"error": "the body is not valid JSON (or not UTF-8)"}, status_code=422)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # A fault of the service, not the client: still the promised JSON shape (uvicorn logs the traceback)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    @app.exception_handler(LoraclfError)
    async def _library(request: Request, exc: LoraclfError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=422)

    # this instance's limits, which the request schema (shared by every instance) cannot carry
    limits_text = (f"Limits of this instance: at most {limits.max_texts:,} texts per request, "
                   f"{limits.max_text_chars:,} characters per text, a body of {limits.max_body_bytes:,} bytes; "
                   "beyond them the answer is 413 or 422. A top_k above the model's "
                   f"{len(predictor.label_names)} classes lists them all"
                   + (f"; a top_k above {limits.max_top_k:,} is refused" if limits.max_top_k < len(predictor.label_names)
                      else "") + ".")

    @app.post("/predict", response_model=PredictResponse, responses=errors, summary="classify one text or several",
              description=limits_text)
    async def predict(req: PredictRequest, request: Request) -> Response:
        if request.query_params:  # "/predict?top_k=3" was answered with top_k 1, as if understood
            raise ClientError(422, f"/predict takes no query parameters (got {', '.join(request.query_params)}); "
                                   "give them in the JSON body")
        texts = check_request(req, limits, len(predictor.label_names))
        # uvicorn does not cancel a request whose client has gone (a timeout, a closed tab): watch
        # for that, so that its texts leave the queue instead of delaying the clients still waiting
        answer = asyncio.ensure_future(batcher.submit(texts, req.top_k))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
            if not answer.done() and gone.exception() is not None:
                await answer  # the connection cannot be watched: answer as if it could not leave
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()  # the client left, or this request was cancelled (a forced stop)
        if not answer.done() or answer.cancelled():  # (a cancelled task is done only on its next turn)
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        # Returned as a response, the result skips FastAPI's re-validation through PredictResponse:
        # Predictor.predict already builds that shape, and under load every request's cost counts.
        return JSONResponse({"predictions": answer.result()})

    @app.head("/health", include_in_schema=False)  # what load balancers and uptime checks often send
    @app.get("/health", response_model=HealthResponse, summary="liveness")
    async def health() -> dict[str, Any]:
        return {"status": "closing" if batcher.closing else "ok", "pending_requests": batcher.pending,
                "receiving_requests": len(uploads.tasks), "micro_batching": batcher.enabled}

    @app.head("/info", include_in_schema=False)
    @app.get("/info", response_model=InfoResponse, summary="the model behind the service")
    async def get_info() -> dict[str, Any]:
        return {"labels": list(predictor.label_names), "base_model": info.get("base_model"),
                "trainable_params": info.get("trainable_params"), "params": info.get("params"),
                "metrics": info.get("metrics"), "run_dir": info.get("run_dir"), "device": str(predictor.device),
                "precision": predictor.precision, "cuda_graphs": predictor.graphs is not None and predictor.graphs.active,
                "cuda_graphs_stopped": predictor.graphs.disabled if predictor.graphs is not None else None,
                "micro_batching": {"enabled": batcher.enabled, "max_batch": batcher.max_batch,
                                   "max_wait_ms": batcher.max_wait_s * 1000, "batches": batcher.batches,
                                   "texts": batcher.texts_done},
                "limits": asdict(limits)}

    page = render_page(predictor.label_names, examples or {}, info, limits)

    @app.head("/", include_in_schema=False)  # uptime checks often send HEAD /
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    app.add_middleware(_RequestGuard, limits=limits, uploads=uploads)  # outermost: before any parsing
    return app


def _version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------------------- the page


def render_page(labels: list[str], examples: dict[str, list[str]], info: dict[str, Any], limits: Limits) -> str:
    """The single-file page: inline CSS and JS, no external asset, works offline."""
    buttons = []
    for label in labels:
        for i, text in enumerate(examples.get(label, [])[:3]):
            buttons.append(f'<button type="button" class="example" data-label="{html.escape(label)}" '
                           f'data-text="{html.escape(text)}" title="{html.escape(text)}">'
                           f'{html.escape(label)} #{i + 1}</button>')
    examples_html = "".join(buttons) or '<span class="muted">no examples saved with this run</span>'
    acc = ((info.get("metrics") or {}).get("test") or {}).get("accuracy")
    meta = [f"base model <code>{html.escape(str(info.get('base_model') or '?'))}</code>"]
    if info.get("trainable_params") is not None:
        meta.append(f"{int(info['trainable_params']):,} trainable parameters")
    if acc is not None:
        meta.append(f"test accuracy {100 * float(acc):.2f} %")
    values = {"META": " · ".join(meta), "EXAMPLES": examples_html,
              "LABELS": json.dumps(labels).replace("<", "\\u003c"), "MAXCHARS": str(limits.max_text_chars)}
    # One pass, so text inside an example can never be taken for a placeholder.
    return re.sub(r"__([A-Z]+)__", lambda m: values.get(m.group(1), m.group(0)), _PAGE)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>loraclf</title>
<style>
 body{font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#1d1d1f}
 h1{font-size:1.4rem;margin:0 0 .2rem} .muted{color:#6e6e73;font-size:.9rem}
 textarea{width:100%;box-sizing:border-box;min-height:7rem;font:inherit;padding:.6rem;border:1px solid #c7c7cc;border-radius:8px}
 button{font:inherit;padding:.45rem .9rem;border-radius:8px;border:1px solid #c7c7cc;background:#f5f5f7;cursor:pointer;margin:.2rem .2rem .2rem 0}
 button#classify{background:#0a66d8;color:#fff;border-color:#0a66d8} button:disabled{opacity:.6;cursor:wait}
 #result{margin-top:1.2rem} #label{font-size:1.3rem;font-weight:600}
 .row{display:grid;grid-template-columns:9rem 1fr 4.5rem;gap:.6rem;align-items:center;margin:.3rem 0}
 .track{background:#ececf0;border-radius:4px;height:1rem;overflow:hidden}
 .bar{background:#8fb8ef;height:100%;width:0;transition:width .2s} .row.top .bar{background:#0a66d8}
 .pct{text-align:right;font-variant-numeric:tabular-nums} .name{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
 #error{color:#b00020;margin-top:.8rem;min-height:1.2rem}
</style></head>
<body>
<h1>loraclf</h1>
<div class="muted">__META__</div>
<p><label for="text">Text to classify</label></p>
<textarea id="text" maxlength="__MAXCHARS__" placeholder="Paste or type a text…"></textarea>
<div><button type="button" id="classify">Classify</button> <span class="muted">(Ctrl+Enter)</span></div>
<p class="muted">Examples: __EXAMPLES__</p>
<div id="error" role="alert"></div>
<div id="result" hidden>
 <div>Predicted class: <span id="label" data-testid="label"></span></div>
 <div id="bars"></div>
</div>
<script type="application/json" id="labels">__LABELS__</script>
<script>
(function () {
  "use strict";
  const labels = JSON.parse(document.getElementById("labels").textContent);
  const $ = (id) => document.getElementById(id);
  const text = $("text"), button = $("classify"), error = $("error");
  function show(p) {
    $("label").textContent = p.label;
    const bars = $("bars");
    bars.textContent = "";
    labels.forEach(function (name) {
      const v = p.probabilities[name] || 0;
      const row = document.createElement("div");
      row.className = "row" + (name === p.label ? " top" : "");
      row.dataset.label = name;
      const n = document.createElement("div"); n.className = "name"; n.textContent = name; n.title = name;
      const track = document.createElement("div"); track.className = "track";
      const bar = document.createElement("div"); bar.className = "bar"; bar.style.width = (100 * v).toFixed(1) + "%";
      track.appendChild(bar);
      const pct = document.createElement("div"); pct.className = "pct"; pct.textContent = (100 * v).toFixed(1) + " %";
      row.append(n, track, pct);
      bars.appendChild(row);
    });
    $("result").hidden = false;
  }
  async function classify() {
    error.textContent = "";
    if (!text.value.trim()) { error.textContent = "Type or paste a text first."; return; }
    button.disabled = true;
    document.body.dataset.state = "busy";
    try {
      const r = await fetch("predict", {method: "POST", headers: {"Content-Type": "application/json"},
                                        body: JSON.stringify({text: text.value})});
      const body = await r.json().catch(function () { return {error: "HTTP " + r.status}; });
      if (!r.ok) { error.textContent = body.error || ("HTTP " + r.status); $("result").hidden = true; }
      else { show(body.predictions[0]); }
    } catch (e) {
      error.textContent = "The service did not answer: " + e;
    } finally {
      button.disabled = false;
      document.body.dataset.state = "done";
    }
  }
  button.addEventListener("click", classify);
  text.addEventListener("keydown", function (e) { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) classify(); });
  document.querySelectorAll("button.example").forEach(function (b) {
    b.addEventListener("click", function () { text.value = b.dataset.text; classify(); });
  });
})();
</script>
</body></html>
"""


# ----------------------------------------------------------------------------- serving a run


def build_app(run: Run | str | Path, *, micro_batching: bool = True, max_batch: int = 64, max_wait_ms: float = 5.0,
              limits: Limits | None = None, batch_size: int = 64, precision: str = "auto",
              cuda_graphs: bool | None = None) -> Any:
    """Open a finished run (a folder, or one already opened), load its Predictor (LoRA merged;
    ``cuda_graphs`` as for :class:`Predictor`) and build the app."""
    if not isinstance(run, Run):
        run = open_run(run)
    predictor = Predictor.from_run(run, batch_size=batch_size, precision=precision, cuda_graphs=cuda_graphs)
    return create_app(predictor, info=run_info(run), examples=load_examples(run.path), limits=limits,
                      micro_batching=micro_batching, max_batch=max_batch, max_wait_ms=max_wait_ms)


def listen(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket (port 0 picks a free one); a clear RunError when the address is taken."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        # e.strerror of a failed bind already repeats the address; the errno's text does not
        reason = os.strerror(e.errno) if isinstance(e.errno, int) and e.errno > 0 else (e.strerror or str(e))
        raise RunError(f"cannot listen on {host}:{port} ({reason})", where="serve",
                       fix="choose another --port (or --port 0 for a free one) or --host") from None


def http_protocol(head_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline on request heads: a connection whose request line
    and headers are not complete ``head_timeout_s`` after it opened, or after its previous
    response, is closed. uvicorn times out neither (its keep-alive timer stops at the first byte),
    so clients that connect and send nothing, or half a head, held their connections for ever, and
    a few hundred of them used up the file descriptors: the service stopped answering anyone."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_overdue)

        def _head_overdue(self) -> None:
            # h11 leaves IDLE once a whole head has arrived; a request in progress is not touched
            # (its body has the 408 of _RequestGuard, its answer takes what the model takes)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return HeadDeadline


def run_server(app: Any, sock: socket.socket, log_level: str = "warning",
               on_started: Callable[[], None] | None = None,
               on_stopping: Callable[[bool], None] | None = None, graceful_timeout_s: float = 30) -> bool:
    """Serve ``app`` (from :func:`create_app`) until SIGINT/SIGTERM; True when the stop was forced.

    The first signal stops accepting connections, answers uploads still in progress 503, finishes
    the requests already received and drains the micro-batch queue (uvicorn's graceful shutdown,
    at most ``graceful_timeout_s``: the requests still waiting then are answered 503). A second
    Ctrl-C forces the stop: every waiting request is answered 503 at once. ``log_level`` info or
    debug also logs a line per request (uvicorn's access log).
    ``on_started`` runs once the server accepts connections and its signal handlers are in place
    (a signal before that is the caller's: the CLI ends with "interrupted", exit 130);
    ``on_stopping(forced)`` runs on each signal.
    """
    import uvicorn

    class Server(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None
        started_error: BaseException | None = None

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)
            if self.started and on_started is not None:
                try:
                    on_started()
                except Exception as e:  # noqa: BLE001 - e.g. its line into a closed pipe or a full disk
                    # raised here, it would end in uvicorn's lifespan traceback; stop cleanly and
                    # give it to the caller once the server is down. Asked for on the next loop
                    # turn: uvicorn before 0.30 skips its shutdown (and the app's) when should_exit
                    # is already set as startup returns
                    self.started_error = e
                    self.loop.call_soon(setattr, self, "should_exit", True)

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            forced = self.force_exit
            if self.loop is not None:  # a Python signal handler: hand the work to the loop
                self.loop.call_soon_threadsafe(app.state.uploads.abort)
                if forced:
                    self.loop.call_soon_threadsafe(app.state.batcher.abort)
            if on_stopping is not None:
                on_stopping(forced)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets=sockets)
            # A forced stop skips the waiting: give the requests just answered 503 a moment to
            # send it before the loop closes under them.
            deadline = time.monotonic() + 2
            while self.force_exit and self.server_state.tasks and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if self.force_exit:  # uvicorn skips the app's shutdown then, and its cancelled lifespan logs a traceback
                await self.lifespan.shutdown()

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s,
                            access_log=log_level in ("info", "debug"),
                            http=http_protocol(app.state.limits.body_timeout_s))
    server = Server(config)
    # uvicorn handles SIGINT/SIGTERM (graceful shutdown), then re-raises the signal to the handler
    # it found. Finding this one, a stop asked for by a signal returns here as a normal end.
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if server.started_error is not None:
        raise server.started_error
    return server.force_exit
