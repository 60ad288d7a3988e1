"""Server-side handle of one replica worker process: start, feed batches, notice death, restart.

Batches and their outputs go through shared memory (`sponge.runtime.ipc` documents the format): a batch
is assembled straight into the replica's input segment — a batch of several requests given as
`BatchParts` is concatenated there, so each request's tensor is copied once on its way to the runtime —
and the outputs are copied once out of its output segment."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import multiprocessing as mp
import os
import re
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from sponge.runtime import ipc
from sponge.runtime.base import TensorSpec
from sponge.runtime.worker import worker_main

log = logging.getLogger("sponge.replica")
START_TIMEOUT_S = 60.0
STOP_JOIN_S = 2.0  # a worker told to stop exits after its batch in flight; longer than this, it is SIGKILLed
_HEADER = struct.Struct("!i")  # multiprocessing.Connection framing: 4-byte big-endian length


def _frame(header: dict[str, Any], inline: list[bytes | memoryview] | None = None) -> bytes:
    payload = ipc.encode(header, inline or ())
    if len(payload) >= 2**31 - 1:
        raise ValueError(f"batch of {len(payload)} bytes is too large for one message")
    return _HEADER.pack(len(payload)) + payload


class BatchParts(Mapping[str, np.ndarray]):
    """A batch given as its requests' inputs (each name's arrays joined along the first axis). `Replica.infer`
    writes the parts straight into shared memory; anything else that reads it as a mapping gets the joined
    array (computed once per name)."""

    def __init__(self, parts: list[dict[str, np.ndarray]]) -> None:
        if not parts:
            raise ValueError("a batch needs at least one request")
        self.parts = parts
        self._joined: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._joined:
            self._joined[name] = np.concatenate([p[name] for p in self.parts])
        return self._joined[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.parts[0])

    def __len__(self) -> int:
        return len(self.parts[0])

    def spec(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        """dtype and shape of the joined array, without joining."""
        first = self.parts[0][name]
        rows = sum(p[name].shape[0] for p in self.parts)
        return np.result_type(*(p[name] for p in self.parts)), (rows, *first.shape[1:])

    def write(self, name: str, out: np.ndarray) -> None:
        np.concatenate([p[name] for p in self.parts], out=out)


def _spec(inputs: Mapping[str, np.ndarray], name: str) -> tuple[np.dtype, tuple[int, ...]]:
    if isinstance(inputs, BatchParts):
        return inputs.spec(name)
    a = np.asarray(inputs[name])
    return a.dtype, a.shape


def _write(inputs: Mapping[str, np.ndarray], name: str, out: np.ndarray) -> None:
    if isinstance(inputs, BatchParts):
        inputs.write(name, out)
    else:
        np.copyto(out, inputs[name], casting="no")


class ReplicaDied(Exception):
    """The worker process exited while a batch was in flight."""


class ReplicaError(Exception):
    """The runtime raised on a batch (the worker keeps running)."""


@dataclass
class BatchResult:
    outputs: dict[str, np.ndarray]
    infer_ms: float
    threads: int


class Replica:
    """One model-server process, fed one whole batch at a time."""

    _swept = False  # stale segments of crashed servers removed (once per server process)

    def __init__(self, name: str, model_path: str, threads: int, max_threads: int,
                 follow_own_limit: bool = True, on_start: Callable[["Replica"], None] | None = None) -> None:
        self.name = name
        self.model_path = model_path
        self.threads = threads
        self.max_threads = max_threads
        self.follow_own_limit = follow_own_limit
        self.on_start = on_start
        self.on_death: Callable[["Replica"], None] | None = None
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.labels: list[str] | None = None
        self.restarts = 0
        self._proc: Any = None
        self._conn: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[BatchResult]] = {}
        self._ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # shared memory with the worker process in force (sponge.runtime.ipc): created on the first batch
        # that needs them, dropped with the process
        self._seg_in: ipc.Segment | None = None
        self._seg_out: ipc.Segment | None = None
        self._seq = itertools.count()
        self._shm_batch: int | None = None  # the batch in flight through the segments (one at a time)
        self._to_unlink: dict[int, list[ipc.Segment]] = {}  # batch id -> segments it named first
        self._out_per_row = 0.0  # output bytes per batch row, learned from the worker's answers
        self._warned_shm = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    async def start(self) -> None:
        """Spawn the worker and wait until its model is loaded."""
        self._loop = asyncio.get_running_loop()
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=worker_main, name=f"sponge-{self.name}",
                           args=(child, self.model_path, self.threads, self.max_threads, self.follow_own_limit),
                           daemon=True)
        proc.start()
        child.close()
        try:
            ok = await self._loop.run_in_executor(None, parent.poll, START_TIMEOUT_S)
        except asyncio.CancelledError:  # shutdown during a (re)start: no orphan (its exit ends the poll too)
            proc.kill()
            raise
        if not ok:
            proc.kill()
            raise RuntimeError(f"replica {self.name} did not start within {START_TIMEOUT_S:.0f} s")
        try:
            msg = parent.recv()
        except EOFError:
            raise RuntimeError(f"replica {self.name} exited during start (exit code {proc.exitcode})") from None
        if msg[0] != "ready":
            await self._loop.run_in_executor(None, proc.join, 5)  # never a blocking join on the loop
            raise RuntimeError(f"replica {self.name} failed to load the model: {msg[1]}")
        info = msg[1]
        self.inputs, self.outputs, self.labels = info["inputs"], info["outputs"], info["labels"]
        # The worker side keeps the blocking multiprocessing.Connection; this side speaks the same
        # framing over asyncio streams, so large batches never block the event loop.
        sock = socket.socket(fileno=os.dup(parent.fileno()))
        parent.close()
        self._reader, self._writer = await asyncio.open_connection(sock=sock)
        self._proc, self._conn = proc, self._writer
        self._reader_task = asyncio.create_task(self._read_loop(self._reader), name=f"replica-{self.name}-reader")
        self._ready.set()
        log.info("replica %s started (pid %d, %d threads)", self.name, proc.pid, self.threads)
        if self.on_start is not None:
            self.on_start(self)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                header, inline = ipc.decode(await reader.readexactly(n))
                self._answered(header, inline)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            if self._conn is not None and self._reader is reader:
                self._on_death()

    def _answered(self, header: dict[str, Any], inline: memoryview | None = None) -> None:
        """The worker answered batch `id`: resolve its future with the outputs copied out of the segment
        (or inline), free the segment for the next batch, unlink the names it has now mapped."""
        batch_id = header["id"]
        for seg in self._to_unlink.pop(batch_id, ()):
            seg.unlink()
        fut = self._pending.pop(batch_id, None)
        try:
            if header["op"] == "result":
                self._out_per_row = max(self._out_per_row, float(header.get("out_bytes_per_row", 0.0)))
                if fut is not None and not fut.done():
                    try:
                        outputs = {d["name"]: ipc.read_tensor(d, self._seg_out, inline, copy=True)
                                   for d in header["outputs"]}
                    except Exception as exc:  # never leave the batch unanswered (nor the read loop dead)
                        fut.set_exception(ReplicaError(f"unreadable answer: {type(exc).__name__}: {exc}"))
                    else:
                        fut.set_result(BatchResult(outputs, header["infer_ms"], header["threads"]))
            else:
                if header.get("segments_failed"):  # the worker could not map them: new ones next time
                    self._drop_segments()
                if fut is not None and not fut.done():
                    fut.set_exception(ReplicaError(header["message"]))
        finally:
            if self._shm_batch == batch_id:
                self._shm_batch = None

    def _drop_segments(self) -> None:
        """Unmap and unlink this side's segments (the worker's mappings go with its process, or when it is
        told of new ones)."""
        for seg in (self._seg_in, self._seg_out):
            if seg is not None:
                seg.close()
        self._seg_in = self._seg_out = None
        self._to_unlink.clear()
        self._shm_batch = None

    def _on_death(self) -> None:
        assert self._loop is not None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._ready.clear()
        # Non-blocking (waitpid WNOHANG): this runs on the event loop. The process is reaped by stop().
        code = self._proc.exitcode if self._proc is not None else None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ReplicaDied(f"replica {self.name} died"
                                              + (f" (exit code {code})" if code is not None else "")))
        self._pending.clear()
        self._drop_segments()
        log.warning("replica %s died (exit code %s)", self.name, code)
        if self.on_death is not None:
            self.on_death(self)

    def _segment(self, current: ipc.Segment | None, nbytes: int, kind: str, batch_id: int) -> ipc.Segment:
        """`current` if it holds `nbytes`, else a new segment (the old one unmapped), unlinked once the
        worker has answered this batch."""
        if current is not None and current.size >= nbytes:
            return current
        if current is not None:
            current.close()
        if not self._swept:
            Replica._swept = True
            ipc.sweep_stale()
        safe = re.sub(r"[^\w.-]", "_", self.name)  # a file name, whatever the replica is called
        seg = ipc.Segment.create(f"{safe}-{next(self._seq)}-{kind}", ipc.segment_size(nbytes))
        self._to_unlink.setdefault(batch_id, []).append(seg)
        return seg

    def _message(self, batch_id: int, inputs: Mapping[str, np.ndarray]) -> bytes:
        """The batch's message: its tensors written into the input segment when no other batch is in flight
        through it (else inline), and the output segment sized for its rows."""
        names = list(inputs)
        specs = [(n, *_spec(inputs, n)) for n in names]
        use_shm = self._shm_batch is None
        descs, need = ipc.plan(specs, math.inf if use_shm else None)  # type: ignore[arg-type]
        header: dict[str, Any] = {"op": "infer", "id": batch_id, "in": None, "in_size": 0, "out": None,
                                  "out_size": 0, "inputs": descs}
        rows = max((s[2][0] for s in specs if s[2]), default=0)
        if use_shm:
            # sized by the outputs per row seen so far (the very first batch's outputs come back inline)
            out_need = math.ceil(self._out_per_row * rows)
            try:
                if need > 0:
                    self._seg_in = self._segment(self._seg_in, need, "in", batch_id)
                if out_need > 0:
                    self._seg_out = self._segment(self._seg_out, out_need, "out", batch_id)
            except OSError as exc:  # e.g. /dev/shm too small (a container's 64 MB): this batch goes inline
                if not self._warned_shm:
                    self._warned_shm = True
                    log.warning("replica %s: no shared memory for a batch (%s): sent through the socket", self.name,
                                exc)
                self._drop_segments()
                use_shm = False
                descs, need = ipc.plan(specs, None)
                header["inputs"] = descs
        if use_shm:
            if need > 0:
                assert self._seg_in is not None
                for d in descs:
                    if d["where"] == "shm":
                        view = self._seg_in.view(np.dtype(d["dtype"]), d["shape"], d["offset"])
                        _write(inputs, d["name"], view)
                        del view
                header.update({"in": self._seg_in.path, "in_size": self._seg_in.size})
            if out_need > 0:
                assert self._seg_out is not None
                header.update({"out": self._seg_out.path, "out_size": self._seg_out.size})
            self._shm_batch = batch_id
        inline = ipc.pack_inline(descs, [(lambda n=n: inputs[n]) for n in names])
        return _frame(header, inline)

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> BatchResult:
        """Run one batch: `inputs` by name (first axis = batch), or a `BatchParts` of requests' inputs."""
        if not self.ready or self._conn is None:
            raise ReplicaDied(f"replica {self.name} is not running")
        assert self._loop is not None
        batch_id = next(self._ids)
        try:
            frame = self._message(batch_id, inputs)
        except BaseException:  # a batch the format cannot carry: the caller's error, not the replica's death
            for seg in self._to_unlink.pop(batch_id, ()):
                seg.unlink()
            if self._shm_batch == batch_id:
                self._shm_batch = None
            raise
        fut: asyncio.Future[BatchResult] = self._loop.create_future()
        self._pending[batch_id] = fut
        try:
            self._conn.write(frame)
            await self._conn.drain()
        except (ConnectionError, OSError):
            self._pending.pop(batch_id, None)
            if self._conn is not None:
                self._on_death()
            raise ReplicaDied(f"replica {self.name} died") from None
        return await fut

    def kill(self) -> None:
        """The worker is hung (e.g. stopped): SIGKILL its own pid and fail what it holds, at once; the
        dispatch loop then restarts it (`restart` reaps the process off the event loop)."""
        if self._proc is not None and self._proc.exitcode is None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass
        if self._conn is not None:
            self._on_death()

    def set_threads(self, n: int) -> None:
        self.threads = n
        if self._conn is not None and not self._conn.is_closing():
            self._conn.write(_frame({"op": "threads", "n": int(n)}))

    async def restart(self) -> None:
        await self.stop()
        self.restarts += 1
        await self.start()

    async def stop(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            if not conn.is_closing():
                conn.write(_frame({"op": "stop"}))
            conn.close()
            if self._reader_task is not None:
                self._reader_task.cancel()
        self._drop_segments()
        if self._proc is not None:
            proc = self._proc
            await asyncio.get_running_loop().run_in_executor(None, proc.join, STOP_JOIN_S)
            if proc.is_alive():
                proc.kill()
                await asyncio.get_running_loop().run_in_executor(None, proc.join, 2)
        self._ready.clear()
        self._proc = None
