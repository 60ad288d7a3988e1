"""The remote worker's wire format: length-prefixed binary frames over one TCP connection.

The layout is documented in full in `sponge/runtime/remote_worker.py`; in short, every frame is

    header  28 bytes, network byte order:  magic b"SPNG" | version u8 (1) | kind u8 | reserved u16 (0)
                                           | batch id u64 | meta length u32 | body length u64
    meta    UTF-8 JSON object (`meta length` bytes): for tensors {"tensors": [{"name", "datatype",
            "shape", "nbytes"}, ...]} plus the kind's fields
    body    the tensors' raw bytes, in `tensors` order, back to back (`body length` bytes)

Numeric tensors are C-order little-endian; BOOL one byte per element (0 or 1); BYTES each element a
4-byte little-endian length then its bytes (as V2's binary tensor extension). Nothing is ever
unpickled: the meta is JSON, the body is only ever viewed as the declared dtype after every declared
size was checked against the bytes received (`FrameError` names what is wrong).
"""

from __future__ import annotations

import asyncio
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

MAGIC = b"SPNG"
VERSION = 1
HEADER = struct.Struct("!4sBBHQIQ")  # magic, version, kind, reserved, batch id, meta length, body length
assert HEADER.size == 28

MAX_META_BYTES = 4 << 20  # 4 MiB: names, shapes and a model's labels; never a tensor
DEFAULT_MAX_BODY_BYTES = 512 << 20  # one batch; the worker's --max-body-mb
MAX_DIMS = 32
MAX_TENSORS = 256
MAX_NAME = 256

# Message kinds.
INFER = 1  # front door -> worker: a whole batch (tensors); answered RESULT or ERROR with its batch id
RESULT = 2  # worker -> front door: outputs (tensors) + infer_ms, threads, limit_m
ERROR = 3  # worker -> front door: {"error": message, "code": "bad_frame" | "runtime" | "unexpected"}
PING = 4  # front door -> worker (health check); answered PONG with the same id
PONG = 5  # worker -> front door: the worker's status (threads, limit_m, ready, ...)
STATUS = 6  # front door -> worker: answered STATUS_REPLY
STATUS_REPLY = 7  # worker -> front door: status + model inputs/outputs/labels
THREADS = 8  # front door -> worker: {"threads": n}; no answer (the next PONG/RESULT shows the count)
KINDS = {INFER: "infer", RESULT: "result", ERROR: "error", PING: "ping", PONG: "pong", STATUS: "status",
         STATUS_REPLY: "status_reply", THREADS: "threads"}

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_LEN = struct.Struct("<I")


class FrameError(Exception):
    """A malformed frame. `recoverable`: the whole frame was consumed, so the stream is still in step
    and the connection can go on; otherwise (bad magic, sizes beyond the limits) it must be closed."""

    def __init__(self, message: str, batch_id: int = 0, recoverable: bool = False) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.recoverable = recoverable


@dataclass
class Frame:
    kind: int
    batch_id: int
    meta: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def datatype_of(arr: np.ndarray) -> str:
    if arr.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    for name, dt in DTYPES.items():
        if arr.dtype.kind == dt.kind and arr.dtype.itemsize == dt.itemsize:
            return name
    raise FrameError(f"dtype {arr.dtype} has no V2 datatype")


def _bytes_blob(arr: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for v in arr.reshape(-1):
        b = v.encode() if isinstance(v, str) else bytes(v)
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def encode(kind: int, batch_id: int, meta: dict[str, Any] | None = None,
           tensors: dict[str, np.ndarray] | None = None) -> list[bytes | memoryview]:
    """A frame as a list of buffers for `writer.writelines` (numeric tensors are not copied)."""
    meta = dict(meta or {})
    chunks: list[bytes | memoryview] = []
    body_len = 0
    if tensors is not None:
        descs = []
        for name, arr in tensors.items():
            arr = np.asarray(arr)
            dt = datatype_of(arr)
            if dt == "BYTES":
                data: bytes | memoryview = _bytes_blob(arr)
            else:
                arr = np.ascontiguousarray(arr, dtype=DTYPES[dt])  # little-endian, C order
                data = memoryview(arr.reshape(-1)).cast("B")
            descs.append({"name": name, "datatype": dt, "shape": list(arr.shape), "nbytes": len(data)})
            chunks.append(data)
            body_len += len(data)
        meta["tensors"] = descs
    meta_b = orjson.dumps(meta, option=orjson.OPT_SERIALIZE_NUMPY)
    if len(meta_b) > MAX_META_BYTES:
        raise FrameError(f"meta of {len(meta_b)} bytes exceeds {MAX_META_BYTES}")
    return [HEADER.pack(MAGIC, VERSION, kind, 0, batch_id, len(meta_b), body_len), meta_b, *chunks]


def encode_bytes(kind: int, batch_id: int, meta: dict[str, Any] | None = None,
                 tensors: dict[str, np.ndarray] | None = None) -> bytes:
    return b"".join(bytes(c) for c in encode(kind, batch_id, meta, tensors))


def parse_header(head: bytes, max_body: int = DEFAULT_MAX_BODY_BYTES) -> tuple[int, int, int, int]:
    """(kind, batch_id, meta_len, body_len) of a 28-byte header; FrameError (not recoverable) if invalid."""
    magic, version, kind, reserved, batch_id, meta_len, body_len = HEADER.unpack(head)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r} (expected {MAGIC!r}): not a Sponge worker frame")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version} (this side speaks {VERSION})", batch_id)
    if reserved != 0:
        raise FrameError(f"reserved header field is {reserved}, must be 0", batch_id)
    if meta_len > MAX_META_BYTES:
        raise FrameError(f"meta length {meta_len} exceeds the limit of {MAX_META_BYTES} bytes", batch_id)
    if body_len > max_body:
        raise FrameError(f"body length {body_len} exceeds the limit of {max_body} bytes", batch_id)
    return kind, batch_id, meta_len, body_len


def parse_frame(kind: int, batch_id: int, meta_b: bytes, body: bytes | bytearray | memoryview) -> Frame:
    """Check and decode a frame whose bytes were all read (so every FrameError here is recoverable)."""
    def bad(msg: str) -> FrameError:
        return FrameError(f"{KINDS.get(kind, f'kind {kind}')} frame {batch_id}: {msg}", batch_id, recoverable=True)

    if kind not in KINDS:
        raise bad(f"unknown message kind {kind}")
    try:
        meta = orjson.loads(meta_b) if meta_b else {}
    except orjson.JSONDecodeError as exc:
        raise bad(f"meta is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise bad("meta must be a JSON object")
    frame = Frame(kind, batch_id, meta)
    descs = meta.get("tensors")
    if descs is None:
        if len(body):
            raise bad(f"{len(body)} body bytes but no 'tensors' in the meta")
        return frame
    if not isinstance(descs, list) or len(descs) > MAX_TENSORS:
        raise bad(f"'tensors' must be a list of at most {MAX_TENSORS} descriptors")
    view = memoryview(body)
    pos = 0
    for i, d in enumerate(descs):
        where = f"tensors[{i}]"
        if not isinstance(d, dict):
            raise bad(f"{where} must be an object")
        name, dt, shape, nbytes = d.get("name"), d.get("datatype"), d.get("shape"), d.get("nbytes")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise bad(f"{where}.name must be a non-empty string of at most {MAX_NAME} characters")
        where = f"{where} ('{name}')"
        if name in frame.tensors:
            raise bad(f"{where}: duplicate tensor name")
        if dt != "BYTES" and dt not in DTYPES:
            raise bad(f"{where}.datatype {dt!r} is not a V2 datatype")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(type(s) is int and s >= 0 for s in shape)):
            raise bad(f"{where}.shape must be a list of at most {MAX_DIMS} non-negative integers, got {shape!r}")
        if type(nbytes) is not int or nbytes < 0:
            raise bad(f"{where}.nbytes must be a non-negative integer")
        if pos + nbytes > len(view):
            raise bad(f"{where} declares {nbytes} bytes at offset {pos}, beyond the body's {len(view)}")
        count = math.prod(shape)
        chunk = view[pos: pos + nbytes]
        if dt == "BYTES":
            arr = _decode_bytes(chunk, count, bad, where).reshape(shape)
        else:
            dtype = DTYPES[dt]
            if count * dtype.itemsize != nbytes:
                raise bad(f"{where}: shape {shape} of {dt} is {count * dtype.itemsize} bytes, nbytes says {nbytes}")
            if dt == "BOOL" and nbytes and np.frombuffer(chunk, np.uint8).max() > 1:
                raise bad(f"{where}: BOOL elements must be 0 or 1")
            arr = np.frombuffer(chunk, dtype=dtype).reshape(shape)
        frame.tensors[name] = arr
        pos += nbytes
    if pos != len(view):
        raise bad(f"{len(view) - pos} body bytes after the last tensor")
    return frame


def _decode_bytes(blob: memoryview, count: int, bad: Any, where: str) -> np.ndarray:
    size = len(blob)
    if count * 4 > size:  # never allocate for elements that cannot be present
        raise bad(f"{where}: {count} BYTES elements need at least {4 * count} bytes, got {size}")
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        (n,) = _LEN.unpack_from(blob, pos)
        pos += 4
        if pos + n > size:
            raise bad(f"{where}: BYTES element {i} is longer than the data")
        out[i] = bytes(blob[pos: pos + n])
        pos += n
        if i + 1 < count and pos + 4 > size:
            raise bad(f"{where}: BYTES data ends inside element {i + 1}")
    if pos != size:
        raise bad(f"{where}: {size - pos} trailing bytes after {count} BYTES elements")
    return out


def decode_bytes(data: bytes, max_body: int = DEFAULT_MAX_BODY_BYTES) -> Frame:
    """One whole frame from a byte string (tests, tools)."""
    if len(data) < HEADER.size:
        raise FrameError(f"frame of {len(data)} bytes is shorter than its {HEADER.size}-byte header")
    kind, bid, meta_len, body_len = parse_header(data[:HEADER.size], max_body)
    if len(data) != HEADER.size + meta_len + body_len:
        raise FrameError(f"frame of {len(data)} bytes, its header declares {HEADER.size + meta_len + body_len}", bid)
    return parse_frame(kind, bid, data[HEADER.size: HEADER.size + meta_len], data[HEADER.size + meta_len:])


async def read_frame(reader: asyncio.StreamReader, max_body: int = DEFAULT_MAX_BODY_BYTES,
                     first: bytes = b"", writable: bool = False) -> Frame:
    """Read one frame (`first`: header bytes already read, e.g. the magic a multiplexer peeked).
    asyncio.IncompleteReadError at EOF; FrameError when malformed (see `recoverable`). `writable`: the
    tensors view a private bytearray instead of the received bytes (read-only)."""
    head = first + await reader.readexactly(HEADER.size - len(first))
    kind, bid, meta_len, body_len = parse_header(head, max_body)
    meta_b = await reader.readexactly(meta_len) if meta_len else b""
    body: bytes | bytearray = await reader.readexactly(body_len) if body_len else b""
    if writable and body:
        body = bytearray(body)
    return parse_frame(kind, bid, meta_b, body)
