"""Open Inference Protocol (V2) over gRPC: the message classes of `inference.proto` and the service's
method table, for the server (`sponge.server.grpc_service`) and for clients (`stub`).

The classes live in a descriptor pool of their own (built from `_descriptor.py`, which
`python -m sponge.protocol.grpc_v2.generate` compiles from the .proto at development time), not in
protobuf's default pool: tritonclient and KServe register the same `inference.*` names there, and a
process importing both would fail. On the wire nothing differs: the method paths are
`/inference.GRPCInferenceService/<Method>` and the field numbers are the specification's.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pool, message_factory

from sponge.protocol.grpc_v2._descriptor import SERIALIZED

SERVICE = "inference.GRPCInferenceService"

_pool = descriptor_pool.DescriptorPool()
FILE = _pool.AddSerializedFile(SERIALIZED)


def _cls(name: str) -> Any:
    return message_factory.GetMessageClass(FILE.message_types_by_name[name])


ServerLiveRequest = _cls("ServerLiveRequest")
ServerLiveResponse = _cls("ServerLiveResponse")
ServerReadyRequest = _cls("ServerReadyRequest")
ServerReadyResponse = _cls("ServerReadyResponse")
ModelReadyRequest = _cls("ModelReadyRequest")
ModelReadyResponse = _cls("ModelReadyResponse")
ServerMetadataRequest = _cls("ServerMetadataRequest")
ServerMetadataResponse = _cls("ServerMetadataResponse")
ModelMetadataRequest = _cls("ModelMetadataRequest")
ModelMetadataResponse = _cls("ModelMetadataResponse")
InferParameter = _cls("InferParameter")
InferTensorContents = _cls("InferTensorContents")
ModelInferRequest = _cls("ModelInferRequest")
ModelInferResponse = _cls("ModelInferResponse")

# method -> (request class, response class), as the service declares them
METHODS: dict[str, tuple[Any, Any]] = {
    m.name: (message_factory.GetMessageClass(m.input_type), message_factory.GetMessageClass(m.output_type))
    for m in FILE.services_by_name["GRPCInferenceService"].methods
}


def path(method: str) -> str:
    """The HTTP/2 path of a method: `/inference.GRPCInferenceService/ModelInfer`."""
    return f"/{SERVICE}/{method}"


class Stub:
    """Client callables on a grpc (or grpc.aio) channel, one per method: `Stub(ch).ModelInfer(request)`.
    `raw=True` leaves requests and responses as serialized bytes (a load generator that builds its
    request once)."""

    def __init__(self, channel: Any, raw: bool = False) -> None:
        for name, (req, resp) in METHODS.items():
            call = channel.unary_unary(path(name), request_serializer=None if raw else req.SerializeToString,
                                       response_deserializer=None if raw else resp.FromString)
            setattr(self, name, call)
