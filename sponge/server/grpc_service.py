"""The gRPC front door: Open Inference Protocol V2's `inference.GRPCInferenceService` on grpc.aio, on the
same event loop as the HTTP server (`serve.run` starts it after uvicorn's startup, stops it with it).

It shares everything behind the protocol with `app.py`: the serving core (EDF queue, admission,
batching, replicas), the per-request SLO (`slo_ms`, `network_ms`, `sent_at` in the request's
`parameters`, or `x-sponge-*` metadata as HTTP takes headers: `server/slo.py`), the validation and
limits of `protocol/v2.py` (via `protocol/grpc_v2/codec.py`, same checks, same messages naming the
field), the body decoder's threads for large messages, and the metrics (`server/frontdoor.py`).

Errors, as gRPC status codes (the message is the HTTP answer's `error`):

    malformed request, a tensor the model or the caps refuse   INVALID_ARGUMENT  (HTTP 400 / 413)
    unknown model or version                                   NOT_FOUND         (404)
    a budget that cannot be met                                DEADLINE_EXCEEDED (504)
    admission refused: overloaded, queue full                  RESOURCE_EXHAUSTED + retry hint (503)
    shutting down, or no worker ready yet (model unknown)      UNAVAILABLE + retry hint (503)
    replica failure                                            INTERNAL          (500)

The retry hint is trailing metadata: `retry-after` in seconds (HTTP's Retry-After) and
`grpc-retry-pushback-ms`, which gRPC's own retry policy honours. A message over the receive limit
(`max_body_bytes`) is refused by gRPC itself (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import grpc

from sponge import __version__
from sponge.protocol import grpc_v2 as pb
from sponge.protocol.grpc_v2.codec import check_model, decode_model_infer, encode_model_infer
from sponge.protocol.v2 import Limits, ProtocolError
from sponge.server.core import DeadlineExpired, InferenceFailed, ServerBusy, ServingCore, ShuttingDown
from sponge.server.decode import BodyDecoder, DecoderClosed, DecoderFailed
from sponge.server.frontdoor import FrontDoor, requested_outputs
from sponge.server.slo import HEADER_OF, request_budget

log = logging.getLogger("sponge.grpc")

EXTENSIONS = ["classification", "sponge_dynamic_slo"]
VERSIONS = ["1"]
PLATFORM = "onnxruntime_onnx"
_SLO_METADATA = frozenset(HEADER_OF.values())


class GrpcBindError(RuntimeError):
    """The gRPC port could not be bound."""


class Abort(Exception):
    """Answer the RPC with this status (raised inside a handler, turned into context.abort)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after_s = code, message, retry_after_s


NO_WORKER_YET = ("model '{}' is not available yet: no replica (worker) is ready, so its inputs are unknown; "
                 "retry shortly")


def status_of(exc: ProtocolError) -> grpc.StatusCode:
    return grpc.StatusCode.NOT_FOUND if exc.status == 404 else grpc.StatusCode.INVALID_ARGUMENT


class GrpcService:
    """The service's handlers on one ServingCore; `start` / `stop` run a grpc.aio server with them."""

    def __init__(self, core: ServingCore, *, max_message_bytes: int, default_slo_ms: float,
                 max_clock_skew_ms: float, max_request_batch: int, max_request_elements: int | None = None,
                 decoder: BodyDecoder | None = None) -> None:
        self.core = core
        self.door = FrontDoor(core, "grpc")
        self.max_message_bytes = max_message_bytes
        self.default_slo_ms = default_slo_ms
        self.max_clock_skew_ms = max_clock_skew_ms
        self.max_request_batch = max_request_batch
        self.max_request_elements = max_request_elements
        self.decoder = decoder or BodyDecoder()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port) and serve; returns the port. GrpcBindError if it cannot
        bind. SO_REUSEPORT is off: gRPC's default would let a second server share a taken port silently."""
        server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),
            # as large as the HTTP front door's largest body, both ways (outputs are about as large)
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ])
        server.add_generic_rpc_handlers((self.handler(),))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio raises on a failed bind (older versions return 0)
            raise GrpcBindError(str(exc)) from None
        if bound == 0:
            raise GrpcBindError(f"failed to bind {address}")
        await server.start()
        self.server, self.port = server, bound
        log.info("gRPC (%s) listening on %s:%d", pb.SERVICE, host, bound)
        return bound

    async def stop(self, grace_s: float) -> None:
        """Refuse new RPCs at once; RPCs in flight get `grace_s` (the serving core, stopped alongside,
        answers queued ones UNAVAILABLE), then are cancelled. Idempotent."""
        server, self.server = self.server, None
        if server is not None:
            await server.stop(grace_s)

    def handler(self) -> grpc.GenericRpcHandler:
        def typed(method: str, fn: Callable[[Any, Any], Awaitable[Any]]) -> grpc.RpcMethodHandler:
            req, resp = pb.METHODS[method]
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=req.FromString,
                                                       response_serializer=resp.SerializeToString)

        return grpc.method_handlers_generic_handler(pb.SERVICE, {
            "ServerLive": typed("ServerLive", self.server_live),
            "ServerReady": typed("ServerReady", self.server_ready),
            "ModelReady": typed("ModelReady", self.model_ready),
            "ServerMetadata": typed("ServerMetadata", self.server_metadata),
            "ModelMetadata": typed("ModelMetadata", self.model_metadata),
            # bytes in, bytes out: parsed (off the loop when large) and encoded here
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self.model_infer),
        })

    # ---- health and metadata ---------------------------------------------------------------------
    async def server_live(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.core.can_serve())

    async def _known(self, name: str, version: str, context: grpc.aio.ServicerContext) -> None:
        try:
            check_model(name, version, self.core.model_name, VERSIONS)
        except ProtocolError as exc:
            await context.abort(status_of(exc), exc.message)

    async def model_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._known(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=self.core.can_serve())

    async def server_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name="sponge", version=__version__, extensions=EXTENSIONS)

    async def model_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._known(request.name, request.version, context)
        r = self.core.spec_replica
        if r is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, NO_WORKER_YET.format(self.core.model_name))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.core.model_name, versions=VERSIONS, platform=PLATFORM,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in r.inputs],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in r.outputs])

    # ---- inference -------------------------------------------------------------------------------
    async def model_infer(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self._infer(body, context)
        except Abort as a:
            # the hint in seconds as HTTP's Retry-After, and in milliseconds as gRPC's own retry policy reads
            # it from a server (gRFC A6 pushback)
            metadata = () if a.retry_after_s is None else (
                ("retry-after", str(a.retry_after_s)), ("grpc-retry-pushback-ms", str(1000 * a.retry_after_s)))
            await context.abort(a.code, a.message, trailing_metadata=metadata)
            raise  # not reached: abort raises
        except Exception as exc:  # a bug: keep serving, say what broke (HTTP's 500 "internal error")
            log.exception("ModelInfer: unexpected error")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            raise

    async def _infer(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        core, door = self.core, self.door
        arrival_ms = core.clock()
        arrival_wall_s = time.time()  # the same moment on the wall clock, for sent_at
        replica = core.spec_replica
        if replica is None:  # no worker discovered yet (--backend kubernetes): the model's tensors are unknown
            door.count("rejected")
            raise Abort(grpc.StatusCode.UNAVAILABLE, NO_WORKER_YET.format(core.model_name), 1)
        try:
            limits = Limits(replica.inputs, self.max_request_batch, self.max_request_elements)
            req, items = await self.decoder.run(decode_model_infer, body, limits, replica.outputs,
                                                core.model_name, VERSIONS, size=len(body))
            budget = request_budget(req.parameters, slo_metadata(context), arrival_ms, arrival_wall_s,
                                    self.default_slo_ms, self.max_clock_skew_ms)
        except ProtocolError as exc:
            door.count("invalid")
            raise Abort(status_of(exc), exc.message) from None
        except DecoderFailed as exc:
            door.count("error")
            raise Abort(grpc.StatusCode.INTERNAL, str(exc)) from None
        except DecoderClosed as exc:  # stopping while the message waited for a decoder thread
            door.count("error")
            raise Abort(grpc.StatusCode.UNAVAILABLE, f"server busy: {exc}", 1) from None
        try:
            answer = await door.serve(req.inputs, items, budget, arrival_ms,
                                      lambda pending: asyncio.shield(pending.future))
        except DeadlineExpired as exc:
            raise Abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded: {exc}") from None
        except ServerBusy as exc:
            if core.closing:
                raise Abort(grpc.StatusCode.UNAVAILABLE, f"server busy: {exc}", 1) from None
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {exc} (retry after "
                        f"{exc.retry_after_s} s)", exc.retry_after_s) from None
        except ShuttingDown as exc:  # queued or in flight at SIGTERM: another server may take it
            raise Abort(grpc.StatusCode.UNAVAILABLE, f"server busy: {exc}", 1) from None
        except InferenceFailed as exc:
            raise Abort(grpc.StatusCode.INTERNAL, f"inference failed: {exc}") from None
        assert answer is not None  # only HTTP's wait reports a client gone (here: cancellation)
        outputs = requested_outputs(req.outputs, answer.served, replica.labels, True)
        return encode_model_infer(core.model_name, VERSIONS[0], req.id, [(n, a) for n, a, _ in outputs],
                                  answer.params)


def slo_metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The `x-sponge-slo-ms`, `x-sponge-network-ms`, `x-sponge-sent-at` metadata (HTTP's headers of the
    same meaning), for clients that cannot set parameters."""
    md = context.invocation_metadata()
    if not md:
        return {}
    return {k: v for k, v in md if k in _SLO_METADATA and isinstance(v, str)}
