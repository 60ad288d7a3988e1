"""The ASGI front door: Open Inference Protocol V2 over HTTP, per-request SLOs, metrics.

Thin on purpose: parsing/encoding lives in sponge.protocol, admission and batching in ServingCore.
"""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from sponge import __version__
from sponge.protocol import openapi_docs
from sponge.protocol.v2 import (
    HEADER_LENGTH,
    Limits,
    ProtocolError,
    encode_infer_response,
)
from sponge.runtime.base import TensorSpec
from sponge.server.core import (
    DeadlineExpired,
    InferenceFailed,
    Pending,
    Served,
    ServerBusy,
    ServingCore,
    ShuttingDown,
)
from sponge.server.decode import BodyDecoder, DecoderFailed
from sponge.server.frontdoor import FrontDoor, requested_outputs
from sponge.server.slo import request_budget

EXTENSIONS = ["binary_tensor_data", "classification", "sponge_dynamic_slo"]
_UINT = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() accepts '²', which int() refuses


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, media_type="application/json",
                    headers=headers)


def _spec_doc(s: TensorSpec) -> dict[str, Any]:
    return {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing (413) beyond `limit` bytes without buffering the excess."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and (
            len(declared) > 18 or int(declared) > limit):
        raise BodyTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def header_length(value: str | None) -> int | None:
    """The `Inference-Header-Content-Length` header as an int (400 unless plain ASCII digits)."""
    if value is None:
        return None
    if not _UINT.fullmatch(value.strip()):
        raise ProtocolError("header 'Inference-Header-Content-Length' must be a non-negative integer, "
                            f"got {value[:40]!r}")
    return int(value)


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client goes away. After the body, an ASGI server's `receive` blocks until the
    connection closes (or the response is complete), then says `http.disconnect`: no polling."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # a stray empty body message: do not spin


async def served_unless_gone(core: ServingCore, pending: Pending, request: Request) -> Served | None:
    """The request's result; None if its client disconnected while it was still queued (it is then
    removed from the queue: no replica will run it). Once in a batch it is waited for as usual."""
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({pending.future, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    client_left = gone in done and gone.exception() is None  # a failing receive proves nothing: keep it
    if client_left and not pending.future.done() and core.cancel(pending):
        return None
    return await asyncio.shield(pending.future)


def create_app(core: ServingCore, *, max_body_bytes: int, default_slo_ms: float, max_clock_skew_ms: float,
               max_request_batch: int, max_request_elements: int | None = None,
               decoder: BodyDecoder | None = None, lifespan: Any = None) -> FastAPI:
    decoder = decoder or BodyDecoder()

    @asynccontextmanager
    async def lifespan_and_decoder(app: FastAPI) -> AsyncIterator[Any]:
        try:
            if lifespan is None:
                yield None
            else:
                async with lifespan(app) as state:
                    yield state
        finally:
            await decoder.aclose()

    app = FastAPI(title="Sponge", version=__version__, lifespan=lifespan_and_decoder,
                  description="Open Inference Protocol (V2) server with per-request dynamic SLOs.")
    app.state.core = core
    name = core.model_name
    metrics = core.metrics
    door = FrontDoor(core, "http")
    app.state.decoder = decoder
    metrics.front_door.decoder = decoder  # its child's CPU is front-door CPU (sponge_front_door_cpu_seconds)

    def model_known(model_name: str) -> Response | None:
        if model_name != name:
            return error(404, f"model '{model_name}' is not served here (available: '{name}')")
        return None

    def no_worker_yet() -> Response:
        """No replica has ever answered (e.g. no worker discovered yet): the model's tensors are unknown."""
        return error(503, f"model '{name}' is not available yet: no replica (worker) is ready, so its inputs "
                     "are unknown; retry shortly", {"Retry-After": "1"})

    def ready() -> bool:  # 503 while no replica can serve: dead, restarting, hung past its watchdog, stopping
        return core.can_serve()

    @app.get("/v2", tags=["v2"], summary="Server metadata", responses=openapi_docs.SERVER_METADATA_RESPONSES)
    async def server_metadata() -> dict[str, Any]:
        return {"name": "sponge", "version": __version__, "extensions": EXTENSIONS}

    @app.get("/v2/health/live", tags=["v2"], summary="Liveness", responses=openapi_docs.LIVE_RESPONSES)
    async def live() -> Response:
        return Response(b'{"live":true}', media_type="application/json")

    @app.get("/v2/health/ready", tags=["v2"], summary="Readiness (a replica can serve)",
             responses=openapi_docs.READY_RESPONSES)
    async def server_ready() -> Response:
        ok = ready()
        return Response(orjson.dumps({"ready": ok}), status_code=200 if ok else 503, media_type="application/json")

    @app.get("/v2/models/{model_name}", tags=["v2"], summary="Model metadata",
             responses=openapi_docs.MODEL_METADATA_RESPONSES)
    @app.get("/v2/models/{model_name}/versions/{version}", tags=["v2"], include_in_schema=False)
    async def model_metadata(model_name: str, version: str | None = None) -> Response:
        if (resp := model_known(model_name)) is not None:
            return resp
        r = core.spec_replica
        if r is None:
            return no_worker_yet()
        doc = {"name": name, "versions": ["1"], "platform": "onnxruntime_onnx",
               "inputs": [_spec_doc(s) for s in r.inputs], "outputs": [_spec_doc(s) for s in r.outputs]}
        return Response(orjson.dumps(doc), media_type="application/json")

    @app.get("/v2/models/{model_name}/ready", tags=["v2"], summary="Model readiness",
             responses=openapi_docs.MODEL_READY_RESPONSES)
    @app.get("/v2/models/{model_name}/versions/{version}/ready", tags=["v2"], include_in_schema=False)
    async def model_ready(model_name: str, version: str | None = None) -> Response:
        if (resp := model_known(model_name)) is not None:
            return resp
        ok = ready()
        return Response(orjson.dumps({"name": name, "ready": ok}), status_code=200 if ok else 503,
                        media_type="application/json")

    @app.post("/v2/models/{model_name}/infer", tags=["v2"], summary="Inference",
              openapi_extra=openapi_docs.INFER_OPERATION)
    @app.post("/v2/models/{model_name}/versions/{version}/infer", tags=["v2"], include_in_schema=False)
    async def infer(model_name: str, request: Request, version: str | None = None) -> Response:
        arrival_ms = core.clock()
        arrival_wall_s = time.time()  # the same moment on the wall clock, for sent_at: before the body is read
        if (resp := model_known(model_name)) is not None:
            door.count("invalid")
            return resp
        try:
            body = await read_body(request, max_body_bytes)
        except BodyTooLarge as exc:
            door.count("invalid")
            return error(413, str(exc))
        replica = core.spec_replica
        if replica is None:
            door.count("rejected")
            return no_worker_yet()
        try:
            hl = header_length(request.headers.get(HEADER_LENGTH))
            limits = Limits(replica.inputs, max_request_batch, max_request_elements)
            # a large body off the event loop: liveness and small requests are answered meanwhile
            req, items = await decoder.decode(body, hl, limits, replica.outputs)
            budget = request_budget(req.parameters, request.headers, arrival_ms, arrival_wall_s,
                                    default_slo_ms, max_clock_skew_ms)
        except ProtocolError as exc:
            door.count("invalid")
            return error(exc.status, exc.message)
        except DecoderFailed as exc:
            door.count("error")
            return error(500, str(exc))
        try:
            answer = await door.serve(req.inputs, items, budget, arrival_ms,
                                      lambda pending: served_unless_gone(core, pending, request))
        except DeadlineExpired as exc:
            return error(504, f"deadline exceeded: {exc}")
        except ServerBusy as exc:
            return error(503, f"server busy: {exc}", {"Retry-After": str(exc.retry_after_s)})
        except ShuttingDown as exc:  # queued or in flight at SIGTERM: another server may take it
            return error(503, f"server busy: {exc}", {"Retry-After": "1"})
        except InferenceFailed as exc:
            return error(500, f"inference failed: {exc}")
        if answer is None:  # the client went away while queued: nobody to answer
            return error(499, "client closed the request")
        outputs = requested_outputs(req.outputs, answer.served, replica.labels, req.binary_output_default)
        params = answer.params
        body_out, headers = encode_infer_response(name, None, req.id, outputs, params)
        return Response(body_out, headers=headers)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response,  # not JSON
             responses=openapi_docs.metrics_responses(CONTENT_TYPE_LATEST))
    async def prometheus() -> Response:
        metrics.queue_length.labels(name).set(len(core.queue))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # keep serving, say what broke
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    # Errors raised by the framework itself (unknown route, wrong method, a query parameter of the wrong
    # type) answer in V2's shape `{"error": "..."}` too, not FastAPI's `{"detail": ...}`.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.url.path}"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {request.url.path} (allowed: {allowed})"
        return error(exc.status_code, message, dict(exc.headers) if exc.headers else None)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, exc: RequestValidationError) -> Response:
        return error(400, validation_message(exc))

    app.openapi = lambda: v2_openapi(app)  # type: ignore[method-assign]
    return app


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one line naming each field: "query parameter 'since_ms': ..."."""
    parts = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ())]
        where, field = (loc[0], ".".join(loc[1:])) if loc else ("request", "")
        what = "body field" if where == "body" else f"{where} parameter"
        parts.append(f"{what} '{field}': {e.get('msg', 'invalid')}" if field else f"{where}: {e.get('msg')}")
    return "; ".join(parts) or "invalid request"


def v2_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with validation errors documented as they are answered (400 `{"error"}`, not
    422 `{"detail"}`) and the admin bearer scheme declared."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    secured = False
    for ops in spec.get("paths", {}).values():
        for op in ops.values():
            responses = op.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", openapi_docs.error_response("invalid parameter (the message names it)"))
            secured = secured or "security" in op
    schemas = spec.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    if not schemas:
        spec.get("components", {}).pop("schemas", None)
    if secured:
        spec.setdefault("components", {})["securitySchemes"] = openapi_docs.SECURITY_SCHEMES
    if "components" in spec and not any(spec["components"].values()):
        del spec["components"]
    app.openapi_schema = spec
    return spec
