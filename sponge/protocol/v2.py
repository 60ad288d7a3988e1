"""Open Inference Protocol (V2) request/response codecs: JSON tensors and the binary tensor extension.

The binary extension (Triton/KServe): the body starts with a JSON header of
`Inference-Header-Content-Length` bytes, followed by raw tensor bytes for every input whose
`parameters.binary_data_size` is set, in input order. Outputs are returned the same way when the
client asks (`outputs[i].parameters.binary_data` or request `parameters.binary_data_output`).
BYTES tensors in binary form are 4-byte little-endian length-prefixed elements.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import orjson

from sponge.protocol import json_tensor
from sponge.runtime.base import TensorSpec

HEADER_LENGTH = "inference-header-content-length"
MAX_DIMS = 32  # dimensions of one tensor: numpy's own limit is 64, no model input has more than a few

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
V2_NAME_OF = {v: k for k, v in DTYPES.items() if k != "BYTES"}


class ProtocolError(Exception):
    """A client error; `status` is the HTTP status, the message names the offending field."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, int]]:  # keep the status across a process boundary
        return (type(self), (self.message, self.status))


@dataclass
class RequestedOutput:
    name: str
    binary: bool = False
    classification: int = 0  # Triton classification extension: top-k "score:index:label" strings


@dataclass
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] = field(default_factory=list)
    binary_output_default: bool = False


def v2_datatype(dtype: np.dtype) -> str:
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    return V2_NAME_OF[np.dtype(dtype)]


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"'{where}' must be a JSON object")
    return value


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise ProtocolError(f"'{where}' must be a list of integers")
    if len(value) > MAX_DIMS:  # numpy refuses more at reshape time (a 500 otherwise)
        raise ProtocolError(f"'{where}' has {len(value)} dimensions, more than the {MAX_DIMS} allowed")
    if any(d < 0 for d in value):
        raise ProtocolError(f"'{where}' has a negative dimension: {value}")
    return tuple(value)


@dataclass(frozen=True)
class Limits:
    """What the server accepts. Every size a request declares is checked against these before any
    buffer is built for it, so a 100-byte request cannot make the server allocate gigabytes."""

    specs: Sequence[TensorSpec] | None = None  # the model's inputs (names, datatypes, dims; -1 = any)
    max_batch: int | None = None  # rows on the first axis of one request
    max_elements: int | None = None  # elements of one input tensor (matters where the model has -1 dims)


def _check_declared(i: int, name: str, datatype: str, shape: tuple[int, ...], limits: Limits) -> int:
    """Refuse a declared tensor the model or the server's caps cannot take; returns its element count.
    Runs before the tensor's data is looked at, so nothing has been allocated for it yet."""
    where = f"inputs[{i}]"
    if limits.specs is not None:
        spec = next((s for s in limits.specs if s.name == name), None)
        if spec is None:
            raise ProtocolError(f"'{where}.name': input '{name}' is not an input of this model "
                                f"(expected {sorted(s.name for s in limits.specs)})")
        if datatype != spec.datatype:
            raise ProtocolError(f"'{where}.datatype': input '{name}' has datatype {datatype} "
                                f"but the model expects {spec.datatype}")
        if len(shape) != len(spec.shape) or any(w != -1 and w != g for w, g in zip(spec.shape, shape)):
            raise ProtocolError(f"'{where}.shape': input '{name}' has shape {list(shape)} "
                                f"but the model expects {list(spec.shape)} (-1 = any)")
    if limits.max_batch is not None and shape and shape[0] > limits.max_batch:
        raise ProtocolError(f"'{where}.shape': request batch {shape[0]} exceeds the server's maximum of "
                            f"{limits.max_batch}", 413)
    count = math.prod(shape)
    if limits.max_elements is not None and count > limits.max_elements:
        raise ProtocolError(f"'{where}.shape' {list(shape)} declares {count} elements, more than the server's "
                            f"limit of {limits.max_elements} per input", 413)
    return count


def _decode_bytes_elements(blob: memoryview, count: int, where: str) -> np.ndarray:
    """Length-prefixed BYTES elements. The caller has checked that `blob` can hold `count` prefixes,
    so the array allocated here is bounded by the bytes actually received."""
    size = len(blob)
    if count * 4 > size:  # also here: never allocate for elements that cannot be present
        raise ProtocolError(f"'{where}': {count} BYTES elements need at least {4 * count} bytes, got {size}")
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > size:
            raise ProtocolError(f"'{where}': binary BYTES data ends inside element {i}")
        (n,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if pos + n > size:
            raise ProtocolError(f"'{where}': binary BYTES element {i} is longer than the data")
        out[i] = bytes(blob[pos : pos + n])
        pos += n
    if pos != len(blob):
        raise ProtocolError(f"'{where}': {size - pos} trailing bytes after {count} BYTES elements")
    return out


def _encode_bytes_elements(arr: np.ndarray) -> bytes:
    parts = []
    for el in arr.reshape(-1):
        b = el if isinstance(el, bytes) else str(el).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


class _JsonText:
    """The JSON text of a request parsed by simdjson, and the spans of its inputs' `data` lists,
    located on first need (only numeric tensors need them)."""

    def __init__(self, text: bytes) -> None:
        self.text = text
        self._spans: dict[int, tuple[int, int, int]] | None = None

    def span(self, i: int) -> tuple[int, int, int] | None:
        if self._spans is None:
            try:
                self._spans = json_tensor.data_spans(self.text)
            except (json_tensor.Fallback, AttributeError, IndexError, TypeError, ValueError):
                self._spans = {}  # the orjson path decides
        return self._spans.get(i)


def _json_tensor(data: Any, shape: tuple[int, ...], count: int, datatype: str, where: str,
                 text: _JsonText | None = None, index: int = 0) -> np.ndarray:
    """A tensor from JSON `data`; the arrays built are bounded by the data present, never by `shape`.
    A simdjson Array (from `json_tensor.load`) of numbers goes straight into a typed buffer; anything
    that path declines is read into Python objects and decoded as before."""
    if isinstance(data, json_tensor.simdjson.Array):
        if text is not None and DTYPES[datatype].kind in "iuf":  # not BOOL or BYTES: see json_tensor
            try:
                return json_tensor.tensor(data, text.span(index), DTYPES[datatype], datatype,
                                          shape, count, where)
            except json_tensor.Fallback:
                pass
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
        data = data.as_list()
    if datatype == "BYTES":
        flat = _flatten(data)
        if len(flat) != count:
            raise ProtocolError(f"'{where}.data' has {len(flat)} elements but shape {list(shape)} needs {count}")
        arr = np.empty(count, dtype=object)
        for i, el in enumerate(flat):
            if not isinstance(el, str):
                raise ProtocolError(f"'{where}.data' element {i} must be a string for datatype BYTES")
            arr[i] = el.encode()
        return arr.reshape(shape)
    try:  # the numbers as JSON gave them (bool, int64, uint64, float64), then the datatype's range
        raw = np.asarray(data)
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. uneven nesting: numpy says where
        raise ProtocolError(f"'{where}.data' cannot be read as {datatype}: {exc}") from None
    if raw.dtype.kind not in "biuf":  # a string, null, object or an integer past 64 bits
        raise ProtocolError(json_tensor.not_a_number(data, datatype, where))
    if raw.size != count:
        raise ProtocolError(f"'{where}.data' has {raw.size} elements but shape {list(shape)} needs {count}")
    dtype = DTYPES[datatype]
    try:
        if dtype.kind in "iu" and raw.dtype.kind == "f":  # floats, or ints past int64 next to negatives:
            try:  # numpy converts each Python number exactly (truncating floats) and refuses one out of range
                return np.asarray(data, dtype=dtype).reshape(shape)
            except (OverflowError, ValueError, TypeError) as exc:
                json_tensor.cast(raw, dtype, datatype, where)  # names the element where it can
                raise ProtocolError(f"'{where}.data' cannot be read as {datatype}: {exc}") from None
        return json_tensor.cast(raw, dtype, datatype, where).reshape(shape)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def parse_infer_request(body: bytes, header_length: int | None, limits: Limits | None = None) -> InferRequest:
    """Decode a V2 infer request body (JSON, or JSON header + binary tensors). With `limits`, every
    declared tensor is checked against the model and the server's caps before its data is decoded."""
    limits = limits or Limits()
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise ProtocolError(
                f"header 'Inference-Header-Content-Length' is {header_length} but the body has {len(body)} bytes"
            )
        header_bytes, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        header_bytes, binary = body, memoryview(b"")
    # simdjson for a large JSON part (numeric `data` lists are never read into Python objects: see
    # json_tensor); orjson for a small one (~20 us less per request below ~16 KiB, bench/json_decode.py)
    # and where simdjson declines, which also words the error of a body that is not valid JSON
    doc = json_tensor.load(header_bytes) if len(header_bytes) >= json_tensor.MIN_BYTES else None
    text = _JsonText(header_bytes) if doc is not None else None
    if doc is None:
        try:
            doc = orjson.loads(header_bytes)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"request body is not valid JSON: {exc}") from None
    doc = _obj(doc, "request")
    req_id = doc.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise ProtocolError("'id' must be a string")
    params = _obj(doc.get("parameters", {}), "parameters")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, raw in enumerate(raw_inputs):
        where = f"inputs[{i}]"
        raw = _obj(raw, where)
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"'{where}.name' must be a non-empty string")
        where = f"inputs[{i}] ('{name}')"
        if name in inputs:
            raise ProtocolError(f"{where}: input given twice")
        datatype = raw.get("datatype")
        if not isinstance(datatype, str) or datatype not in DTYPES:  # a list is unhashable: check the type first
            raise ProtocolError(f"'{where}.datatype' must be one of {sorted(DTYPES)}, got {datatype!r}")
        shape = _shape(raw.get("shape"), f"{where}.shape")
        count = _check_declared(i, name, datatype, shape, limits)
        tparams = _obj(raw.get("parameters", {}), f"{where}.parameters")
        size = tparams.get("binary_data_size")
        if size is not None:
            if header_length is None:
                raise ProtocolError(
                    f"'{where}.parameters.binary_data_size' is set but the request has no "
                    "'Inference-Header-Content-Length' header"
                )
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(f"'{where}.parameters.binary_data_size' must be a non-negative integer")
            if offset + size > len(binary):
                raise ProtocolError(
                    f"'{where}.parameters.binary_data_size' is {size} but only {len(binary) - offset} "
                    "bytes of binary data remain"
                )
            blob = binary[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                if count > size // 4:  # each element has a 4-byte length prefix: refuse before allocating
                    raise ProtocolError(
                        f"'{where}.shape' {list(shape)} declares {count} BYTES elements but "
                        f"'{where}.parameters.binary_data_size' {size} can hold at most {size // 4} "
                        "(4-byte length prefix each)"
                    )
                arr = _decode_bytes_elements(blob, count, where).reshape(shape)
            else:
                expected = count * DTYPES[datatype].itemsize
                if size != expected:
                    raise ProtocolError(
                        f"'{where}.parameters.binary_data_size' is {size} bytes but shape {list(shape)} "
                        f"of {datatype} needs {expected}"
                    )
                arr = np.frombuffer(blob, dtype=DTYPES[datatype]).reshape(shape)
        else:
            if "data" not in raw:
                raise ProtocolError(f"'{where}.data' is missing (and no binary_data_size given)")
            arr = _json_tensor(raw["data"], shape, count, datatype, where, text, i)
        inputs[name] = arr
    if offset != len(binary):
        raise ProtocolError(
            f"body has {len(binary) - offset} bytes of binary data not claimed by any input's binary_data_size"
        )
    outputs: list[RequestedOutput] = []
    binary_default = bool(params.get("binary_data_output", False))
    raw_outputs = doc.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise ProtocolError("'outputs' must be a list")
    for i, raw in enumerate(raw_outputs):
        raw = _obj(raw, f"outputs[{i}]")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"'outputs[{i}].name' must be a non-empty string")
        op = _obj(raw.get("parameters", {}), f"outputs[{i}].parameters")
        cls = op.get("classification", 0)
        if not isinstance(cls, int) or isinstance(cls, bool) or cls < 0:
            raise ProtocolError(f"'outputs[{i}].parameters.classification' must be a non-negative integer")
        outputs.append(RequestedOutput(name, bool(op.get("binary_data", binary_default)), cls))
    return InferRequest(req_id, params, inputs, outputs, binary_default)


def check_inputs(inputs: dict[str, np.ndarray], specs: Sequence[TensorSpec], max_batch: int) -> int:
    """Validate tensors against the model's inputs; returns the request's batch size (first axis)."""
    by_name = {s.name: s for s in specs}
    for name in inputs:
        if name not in by_name:
            raise ProtocolError(f"input '{name}' is not an input of this model (expected {sorted(by_name)})")
    batch = None
    for spec in specs:
        if spec.name not in inputs:
            raise ProtocolError(f"input '{spec.name}' is missing")
        arr = inputs[spec.name]
        dt = v2_datatype(arr.dtype)
        if dt != spec.datatype:
            raise ProtocolError(f"input '{spec.name}' has datatype {dt} but the model expects {spec.datatype}")
        if len(arr.shape) != len(spec.shape) or any(
            want != -1 and want != got for want, got in zip(spec.shape, arr.shape)
        ):
            raise ProtocolError(
                f"input '{spec.name}' has shape {list(arr.shape)} but the model expects {list(spec.shape)} (-1 = any)"
            )
        n = arr.shape[0] if arr.ndim else 1
        if batch is not None and n != batch:
            raise ProtocolError(f"input '{spec.name}' has batch {n} but other inputs have batch {batch}")
        batch = n
    assert batch is not None
    if batch < 1:
        raise ProtocolError(f"batch dimension must be >= 1, got {batch}")
    if batch > max_batch:
        raise ProtocolError(f"request batch {batch} exceeds the server's maximum of {max_batch}")
    return batch


def decode_request(body: bytes, header_length: int | None, limits: Limits,
                   outputs: Sequence[TensorSpec]) -> tuple[InferRequest, int]:
    """Parse a request and validate it against the model (`limits.specs`, `limits.max_batch` required)
    and its requested outputs: pure CPU work, runnable on a worker thread or process. Returns the
    request and its batch size (images)."""
    if limits.specs is None or limits.max_batch is None:
        raise ValueError("decode_request needs the model's input specs and max_batch")
    req = parse_infer_request(body, header_length, limits)
    items = check_inputs(req.inputs, limits.specs, limits.max_batch)
    check_outputs(req, outputs)
    return req, items


def classify(scores: np.ndarray, k: int, labels: Sequence[str] | None) -> np.ndarray:
    """Triton classification extension: per row, top-k 'score:index[:label]' strings (BYTES)."""
    rows = scores.reshape(scores.shape[0], -1)
    k = min(k, rows.shape[1])
    top = np.argsort(-rows, axis=1)[:, :k]
    out = np.empty((rows.shape[0], k), dtype=object)
    for r in range(rows.shape[0]):
        for j, idx in enumerate(top[r]):
            s = f"{rows[r, idx]:f}:{idx}"
            if labels is not None and idx < len(labels):
                s += f":{labels[idx]}"
            out[r, j] = s.encode()
    return out


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    req_id: str | None,
    outputs: Sequence[tuple[str, np.ndarray, bool]],
    parameters: dict[str, Any],
) -> tuple[bytes, dict[str, str]]:
    """Encode (name, array, binary?) outputs; returns body and extra headers."""
    out_docs = []
    blobs: list[bytes] = []
    for name, arr, binary in outputs:
        dt = v2_datatype(arr.dtype)
        d: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if binary:
            blob = _encode_bytes_elements(arr) if dt == "BYTES" else np.ascontiguousarray(arr).tobytes()
            d["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif dt == "BYTES":
            d["data"] = [el.decode(errors="replace") if isinstance(el, bytes) else str(el) for el in arr.reshape(-1)]
        else:
            d["data"] = arr.reshape(-1)
        out_docs.append(d)
    doc: dict[str, Any] = {"model_name": model_name, "outputs": out_docs, "parameters": parameters}
    if model_version is not None:
        doc["model_version"] = model_version
    if req_id is not None:
        doc["id"] = req_id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def check_outputs(req: Any, outputs: Sequence[TensorSpec]) -> None:
    """Every requested output is one of the model's (400 naming it otherwise); HTTP and gRPC alike."""
    out_names = {s.name for s in outputs}
    for o in req.outputs:
        if o.name not in out_names:
            raise ProtocolError(f"output '{o.name}' is not an output of this model (expected {sorted(out_names)})")

