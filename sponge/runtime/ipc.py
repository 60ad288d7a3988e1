"""The replica IPC format: how the server hands a batch to a replica worker and gets its outputs back.

Tensors travel through **shared memory**, one pair of segments per worker process; the socket between the
two processes carries only a small header per message.

Transport. The socketpair `multiprocessing` opened for the worker (`Replica.start`), with that module's
framing: each message is a 4-byte big-endian signed length, then that many bytes of payload. The start
handshake is multiprocessing's own pickled `("ready", info)` / `("failed", message)`, once; every later
message in either direction has this payload:

    u32 big-endian  H = length of the header
    H bytes         the header: a JSON object (UTF-8)
    the rest        the inline region: tensors not in shared memory, at the offsets the header gives

Segments. Files the server creates (`/dev/shm/sponge-<server pid>-<replica>-<seq>-in|out`, mode 0600) and
maps; the worker maps them by path when a message first names them. The server owns them: it unlinks a
segment as soon as the worker has answered a message that named it (the worker has mapped it by then, so
the memory lives on, but no name is left behind), and unmaps its side when the worker dies or stops,
when it replaces a segment by a larger one, and at shutdown. A file left by a server that crashed
before the answer is removed by the next server (`sweep_stale`). The worker never creates or unlinks.

Server -> worker:
    {"op": "infer", "id": 7, "in": PATH|null, "in_size": BYTES, "out": PATH|null, "out_size": BYTES,
     "inputs": [TENSOR, ...]}     run a batch; outputs into the "out" segment if they fit, else inline
    {"op": "threads", "n": 4}     use n runtime threads
    {"op": "stop"}                exit after the batch in flight
Worker -> server:
    {"op": "result", "id": 7, "infer_ms": 3.2, "threads": 2, "out_bytes": BYTES, "outputs": [TENSOR, ...]}
    {"op": "error", "id": 7, "message": "ValueError: ..."}   (the worker keeps running)

TENSOR = {"name": str, "dtype": numpy dtype string ("<f4", "|u1", ...), "shape": [int, ...],
          "where": "shm" | "inline" | "pickle", "offset": int, "nbytes": int}
    shm: C-order bytes at `offset` in the message's segment ("in" for inputs, "out" for outputs);
    inline: the same, in the inline region; pickle: a pickled numpy array in the inline region (object
    arrays: BYTES tensors). Offsets in a segment are multiples of ALIGN.

A segment is used by at most one message at a time: the server sends a batch through shared memory only
while no other batch of its is in flight through it (otherwise inline), and copies the outputs out of the
"out" segment before it reads the next message. So one copy from a request's tensor into the replica's
input (the batch is assembled directly in the segment; the worker reads it in place) and one copy of each
output out of the segment into the arrays the requests get.
"""

from __future__ import annotations

import math
import mmap
import os
import pickle
import re
import struct
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import orjson

ALIGN = 64  # bytes: tensors in a segment start at multiples of this (cache lines, SIMD loads)
MIN_SEGMENT = 64 * 1024
_H = struct.Struct("!I")
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_NAME = re.compile(r"sponge-(\d+)-[\w.-]+-\d+-(?:in|out)$")


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def segment_size(nbytes: int) -> int:
    """Capacity of a new segment for `nbytes`: the next power of two, at least MIN_SEGMENT (a segment is
    replaced only when a batch outgrows it, so growth is rare)."""
    size = MIN_SEGMENT
    while size < nbytes:
        size *= 2
    return size


class Segment:
    """A shared-memory file mapped into this process."""

    def __init__(self, path: str, size: int, mm: mmap.mmap, owner: bool) -> None:
        self.path, self.size, self.mm, self.owner = path, size, mm, owner
        self.linked = owner  # the server's until it unlinks the name

    @classmethod
    def create(cls, tag: str, size: int) -> "Segment":
        """A new segment (server side): a 0600 file in SHM_DIR of `size` bytes, mapped."""
        path = os.path.join(SHM_DIR, f"sponge-{os.getpid()}-{tag}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            if hasattr(os, "posix_fallocate"):  # reserve it now: a full tmpfs is an OSError here, not a
                os.posix_fallocate(fd, 0, size)  # SIGBUS at the first write into the mapping
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(path, size, mm, owner=True)

    @classmethod
    def attach(cls, path: str, size: int) -> "Segment":
        """Map an existing segment (worker side)."""
        fd = os.open(path, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(path, size, mm, owner=False)

    def unlink(self) -> None:
        if self.linked:
            self.linked = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Unmap (and, on the server's side, unlink if not done yet). Views into it must be gone: a
        view still exported keeps the mapping (BufferError), which then goes with the view."""
        self.unlink()
        try:
            self.mm.close()
        except BufferError:
            pass

    def view(self, dtype: np.dtype, shape: Sequence[int], offset: int) -> np.ndarray:
        return np.ndarray(tuple(shape), dtype=dtype, buffer=self.mm, offset=offset)


def sweep_stale(directory: str = SHM_DIR) -> int:
    """Remove segments left by servers that are no longer running (crashed between a segment's creation
    and the worker's first answer). Returns how many were removed."""
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        m = _NAME.match(name)
        if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed += 1
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- messages ----------------------------------------------------------------------------------------

def encode(header: dict[str, Any], inline: Iterable[bytes | memoryview] = ()) -> bytes:
    h = orjson.dumps(header)
    return b"".join([_H.pack(len(h)), h, *inline])


def decode(payload: bytes) -> tuple[dict[str, Any], memoryview]:
    (n,) = _H.unpack_from(payload, 0)
    end = _H.size + n
    return orjson.loads(memoryview(payload)[_H.size:end]), memoryview(payload)[end:]


def shm_able(dtype: np.dtype) -> bool:
    return not dtype.hasobject


@dataclass
class Packed:
    """Tensors laid out for one message: their descriptions, the bytes the segment needs, the inline
    pieces (and their total length)."""

    tensors: list[dict[str, Any]]
    shm_bytes: int
    inline: list[bytes | memoryview]


def plan(shapes: Sequence[tuple[str, np.dtype, tuple[int, ...]]], capacity: int | None) -> tuple[list[dict], int]:
    """Offsets of numeric tensors in a segment (aligned, in order); `where` is "shm" for all of them when
    they fit in `capacity` (None: no segment), else "inline" for all. Object tensors are always pickled
    inline (their offsets are filled by `pack_inline`). Returns the descriptions and the segment bytes
    needed by the numeric ones."""
    off = 0
    out = []
    for name, dtype, shape in shapes:
        d = {"name": name, "dtype": dtype.str, "shape": [int(s) for s in shape], "where": "pickle",
             "offset": 0, "nbytes": 0}
        if shm_able(dtype):
            nbytes = math.prod(int(s) for s in shape) * dtype.itemsize
            d.update(where="shm", offset=off, nbytes=nbytes)
            off = aligned(off + nbytes)
        out.append(d)
    if capacity is None or off > capacity:
        for d in out:
            if d["where"] == "shm":
                d["where"] = "inline"
    return out, off


def pack_inline(descs: list[dict[str, Any]], arrays: Sequence[Any]) -> list[bytes | memoryview]:
    """Inline pieces for the tensors not in shared memory, offsets rewritten to the inline region.
    `arrays[i]` is the array of `descs[i]` (or, for the server's batches, a callable giving it)."""
    pieces: list[bytes | memoryview] = []
    off = 0
    for d, a in zip(descs, arrays):
        if d["where"] == "shm":
            continue
        arr = a() if callable(a) else a
        raw = pickle.dumps(arr, protocol=pickle.HIGHEST_PROTOCOL) if d["where"] == "pickle" else \
            memoryview(np.ascontiguousarray(arr)).cast("B")
        d["offset"], d["nbytes"] = off, len(raw)
        pieces.append(raw)
        off += len(raw)
    return pieces


def read_tensor(d: dict[str, Any], segment: Segment | None, inline: memoryview, copy: bool) -> np.ndarray:
    """The array a description names: a view into the segment or the inline region, or a copy of it."""
    where = d["where"]
    if where == "pickle":
        return pickle.loads(inline[d["offset"]: d["offset"] + d["nbytes"]])
    dtype, shape = np.dtype(d["dtype"]), d["shape"]
    if where == "shm":
        if segment is None:
            raise ValueError(f"tensor {d['name']!r} is in shared memory but no segment is mapped")
        arr = segment.view(dtype, shape, d["offset"])
    else:
        count = d["nbytes"] // dtype.itemsize if dtype.itemsize else 0
        arr = np.frombuffer(inline, dtype=dtype, count=count, offset=d["offset"]).reshape(shape)
    return arr.copy() if copy else arr
