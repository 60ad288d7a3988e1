"""ModelInferRequest -> InferRequest, and outputs -> ModelInferResponse: the gRPC side of
`sponge.protocol.v2`, with its checks and its messages naming the field.

Every input is checked as the HTTP front door checks it (`v2._check_declared`: name, datatype and
shape against the model, `max_request_batch` rows, `max_request_elements`) before its data is looked
at; then its data against the declaration: `raw_input_contents[i]` must be exactly count x itemsize
bytes (BYTES: 4-byte length-prefixed elements, at most size // 4 of them), typed `contents` must hold
exactly `count` elements in the field of its datatype, within the datatype's range. The message itself
is bounded by the server's max receive size (= `max_body_bytes`), so nothing built here is larger than
what was received.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from sponge.protocol import grpc_v2 as pb
from sponge.protocol.v2 import (
    DTYPES,
    InferRequest,
    Limits,
    ProtocolError,
    RequestedOutput,
    _check_declared,
    _decode_bytes_elements,
    _encode_bytes_elements,
    _shape,
    check_inputs,
    check_outputs,
    v2_datatype,
)
from sponge.runtime.base import TensorSpec

# The typed-contents field of each datatype, and the element type protobuf stores it in
# (the specification's table; FP16 has none: raw contents only).
CONTENTS_FIELD: dict[str, tuple[str, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
    "BYTES": ("bytes_contents", np.dtype(object)),
}


def param_value(p: Any) -> Any:
    """An InferParameter's value as Python (bool, int, float or str; None when nothing is set)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def parameters(pmap: Mapping[str, Any]) -> dict[str, Any]:
    return {k: param_value(v) for k, v in pmap.items()}


def set_parameters(pmap: Any, values: Mapping[str, Any]) -> None:
    """Fill a `map<string, InferParameter>` from Python values (bool, int, float, str)."""
    for k, v in values.items():
        p = pmap[k]
        if isinstance(v, bool):
            p.bool_param = v
        elif isinstance(v, int):
            p.int64_param = v
        elif isinstance(v, float):
            p.double_param = v
        else:
            p.string_param = str(v)


def _typed(contents: Any, datatype: str, shape: tuple[int, ...], count: int, where: str) -> np.ndarray:
    if datatype not in CONTENTS_FIELD:
        raise ProtocolError(f"'{where}.contents': datatype {datatype} has no typed contents field; send its "
                            "data in raw_input_contents")
    field, stored = CONTENTS_FIELD[datatype]
    for fd, values in contents.ListFields():  # only the fields holding elements
        if fd.name != field:
            raise ProtocolError(f"'{where}.contents.{fd.name}' is set but datatype {datatype} takes its "
                                f"elements in 'contents.{field}'")
    values = getattr(contents, field)
    if len(values) != count:
        raise ProtocolError(f"'{where}.contents.{field}' has {len(values)} elements but shape {list(shape)} "
                            f"needs {count}")
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        for j, el in enumerate(values):
            arr[j] = el
        return arr.reshape(shape)
    raw = np.fromiter(values, dtype=stored, count=count)
    dtype = DTYPES[datatype]
    if dtype.kind in "iu" and dtype != stored and raw.size:  # INT8/16 in int32, UINT8/16 in uint32
        info = np.iinfo(dtype)
        outside = (raw < info.min) | (raw > info.max)
        if outside.any():
            bad = int(np.flatnonzero(outside)[0])
            raise ProtocolError(f"'{where}.contents.{field}' element {bad} ({raw[bad]}) is out of range for "
                                f"{datatype} [{info.min}, {info.max}]")
    return raw.astype(dtype, copy=False).reshape(shape)


def _raw(blob: bytes, i: int, name: str, datatype: str, shape: tuple[int, ...], count: int) -> np.ndarray:
    where = f"raw_input_contents[{i}]"
    size = len(blob)
    if datatype == "BYTES":
        if count > size // 4:  # each element has a 4-byte length prefix: refuse before allocating
            raise ProtocolError(f"'{where}' is {size} bytes: it can hold at most {size // 4} BYTES elements "
                                f"(4-byte length prefix each) but input '{name}' (inputs[{i}]) shape "
                                f"{list(shape)} declares {count}")
        return _decode_bytes_elements(memoryview(blob), count, where).reshape(shape)
    expected = count * DTYPES[datatype].itemsize
    if size != expected:
        raise ProtocolError(f"'{where}' is {size} bytes but input '{name}' (inputs[{i}]) shape {list(shape)} "
                            f"of {datatype} needs {expected}")
    return np.frombuffer(blob, dtype=DTYPES[datatype]).reshape(shape)


def parse_model_infer(msg: Any, limits: Limits | None = None) -> InferRequest:
    """A ModelInferRequest as the InferRequest the HTTP path builds (every output binary: gRPC answers
    raw contents). With `limits`, each declared tensor is checked before its data is read."""
    limits = limits or Limits()
    if not msg.inputs:
        raise ProtocolError("'inputs' must be a non-empty list")
    raw_contents = msg.raw_input_contents
    if raw_contents and len(raw_contents) != len(msg.inputs):
        raise ProtocolError(f"'raw_input_contents' has {len(raw_contents)} entries but the request has "
                            f"{len(msg.inputs)} inputs (raw contents carry every input's data, in order, or none)")
    inputs: dict[str, np.ndarray] = {}
    for i, t in enumerate(msg.inputs):
        name = t.name
        if not name:
            raise ProtocolError(f"'inputs[{i}].name' must be a non-empty string")
        where = f"inputs[{i}] ('{name}')"
        if name in inputs:
            raise ProtocolError(f"{where}: input given twice")
        datatype = t.datatype
        if datatype not in DTYPES:
            raise ProtocolError(f"'{where}.datatype' must be one of {sorted(DTYPES)}, got {datatype!r}")
        shape = _shape(list(t.shape), f"{where}.shape")
        count = _check_declared(i, name, datatype, shape, limits)
        if raw_contents:
            if t.HasField("contents"):
                raise ProtocolError(f"'{where}.contents' is set but the request also has raw_input_contents "
                                    "(one or the other)")
            inputs[name] = _raw(raw_contents[i], i, name, datatype, shape, count)
        elif t.HasField("contents"):
            inputs[name] = _typed(t.contents, datatype, shape, count, where)
        else:
            raise ProtocolError(f"'{where}.contents' is missing (and no raw_input_contents given)")
    outputs: list[RequestedOutput] = []
    for i, o in enumerate(msg.outputs):
        if not o.name:
            raise ProtocolError(f"'outputs[{i}].name' must be a non-empty string")
        cls = param_value(o.parameters["classification"]) if "classification" in o.parameters else 0
        if not isinstance(cls, int) or isinstance(cls, bool) or cls < 0:
            raise ProtocolError(f"'outputs[{i}].parameters.classification' must be a non-negative integer")
        outputs.append(RequestedOutput(o.name, True, cls))
    return InferRequest(msg.id or None, parameters(msg.parameters), inputs, outputs, True)


def check_model(name: str, version: str, served_name: str, versions: Sequence[str]) -> None:
    """ProtocolError 404 (NOT_FOUND) unless `name` is the served model and `version` one of its
    versions (empty: the server's choice)."""
    if name != served_name:
        raise ProtocolError(f"model '{name}' is not served here (available: '{served_name}')", 404)
    if version and version not in versions:
        raise ProtocolError(f"model '{name}' has no version '{version}' (versions: {list(versions)})", 404)


def decode_model_infer(body: bytes, limits: Limits, outputs: Sequence[TensorSpec], model_name: str,
                       versions: Sequence[str]) -> tuple[InferRequest, int]:
    """`v2.decode_request` for a serialized ModelInferRequest: parse, check the model and version
    (404), validate against the model (`limits.specs`, `limits.max_batch` required) and its outputs;
    returns the request and its batch size (images). Pure CPU work, runnable on a worker thread."""
    if limits.specs is None or limits.max_batch is None:
        raise ValueError("decode_model_infer needs the model's input specs and max_batch")
    try:
        msg = pb.ModelInferRequest.FromString(body)
    except Exception as exc:  # protobuf's DecodeError: not a ModelInferRequest at all
        raise ProtocolError(f"request is not a valid ModelInferRequest: {exc}") from None
    check_model(msg.model_name, msg.model_version, model_name, versions)
    req = parse_model_infer(msg, limits)
    items = check_inputs(req.inputs, limits.specs, limits.max_batch)
    check_outputs(req, outputs)
    return req, items


def encode_model_infer(model_name: str, model_version: str, req_id: str | None,
                       outputs: Sequence[tuple[str, np.ndarray]], params: Mapping[str, Any]) -> bytes:
    """A serialized ModelInferResponse: every output's data in raw_output_contents (BYTES elements
    length-prefixed), in `outputs` order."""
    resp = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=req_id or "")
    for name, arr in outputs:
        dt = v2_datatype(arr.dtype)
        resp.outputs.add(name=name, datatype=dt, shape=arr.shape)
        resp.raw_output_contents.append(_encode_bytes_elements(arr) if dt == "BYTES"
                                        else np.ascontiguousarray(arr).tobytes())
    set_parameters(resp.parameters, params)
    return resp.SerializeToString()
