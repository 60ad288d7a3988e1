"""Server-side handle of one replica worker process: start, feed batches, notice death, restart."""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import pickle
import socket
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from sponge.runtime.base import TensorSpec
from sponge.runtime.worker import worker_main

log = logging.getLogger("sponge.replica")
START_TIMEOUT_S = 60.0
STOP_JOIN_S = 2.0  # a worker told to stop exits after its batch in flight; longer than this, it is SIGKILLed
_HEADER = struct.Struct("!i")  # multiprocessing.Connection framing: 4-byte big-endian length


def _frame(obj: object) -> bytes:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) >= 2**31 - 1:
        raise ValueError(f"batch of {len(payload)} bytes is too large for one message")
    return _HEADER.pack(len(payload)) + payload


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
                msg = pickle.loads(await reader.readexactly(n))
                kind, batch_id = msg[0], msg[1]
                fut = self._pending.pop(batch_id, None)
                if fut is None or fut.done():
                    continue
                if kind == "result":
                    fut.set_result(BatchResult(msg[2], msg[3], msg[4]))
                else:
                    fut.set_exception(ReplicaError(msg[2]))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            if self._conn is not None and self._reader is reader:
                self._on_death()

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
        log.warning("replica %s died (exit code %s)", self.name, code)
        if self.on_death is not None:
            self.on_death(self)

    async def infer(self, inputs: dict[str, np.ndarray]) -> BatchResult:
        if not self.ready or self._conn is None:
            raise ReplicaDied(f"replica {self.name} is not running")
        assert self._loop is not None
        batch_id = next(self._ids)
        fut: asyncio.Future[BatchResult] = self._loop.create_future()
        self._pending[batch_id] = fut
        try:
            self._conn.write(_frame(("infer", batch_id, inputs)))
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
            self._conn.write(_frame(("threads", n)))

    async def restart(self) -> None:
        await self.stop()
        self.restarts += 1
        await self.start()

    async def stop(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            if not conn.is_closing():
                conn.write(_frame(("stop",)))
            conn.close()
            if self._reader_task is not None:
                self._reader_task.cancel()
        if self._proc is not None:
            proc = self._proc
            await asyncio.get_running_loop().run_in_executor(None, proc.join, STOP_JOIN_S)
            if proc.is_alive():
                proc.kill()
                await asyncio.get_running_loop().run_in_executor(None, proc.join, 2)
        self._ready.clear()
        self._proc = None
