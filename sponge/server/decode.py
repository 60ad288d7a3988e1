"""Decoding infer bodies where they do not hold up the event loop (issues 9 and 13).

A thread is not enough for JSON: the parse is a single C call that holds the GIL throughout (orjson and
`np.asarray(list)` before issue 13; simdjson's parse and `as_buffer` now, `sponge/protocol/json_tensor.py`),
so the event loop waits about as long as if it had decoded inline. Measured before issue 13 (orjson,
`decode ms / longest loop stall ms`, busy host):

    body               inline         thread         process
    JSON   1 MiB       5.5 / 5.6      6.1 / 6.1      9.0 / 1.3
    JSON   4 MiB      33   / 33      36   / 21      42   / 2.2
    JSON  16 MiB      93   / 94     117   / 83     144   / 6.5
    JSON  65 MiB     434   / 434    529   / 379    817   / 42
    binary FP32 37 MiB 0.1 / 1.3     0.3 / 1.5    254   / 25     (zero-copy: never worth a hop)
    binary BYTES 11 MiB 270 / 271   280   / 11     654   / 52     (a Python loop: threads interleave)

Re-measured with simdjson (issue 13; FP32 JSON from `bench/json_decode.py --loop`, the others by hand;
quiet host, so not comparable digit for digit with the table above):

    body                     inline         thread         process
    JSON UINT8 image 0.5 MiB  2.2 / 3.4      2.6 / 2.3      4.7 / 1.4
    JSON FP32 image 2.8 MiB   3.6 / 4.7      4.1 / 3.8      8.5 / 1.4
    JSON 1 MiB of digits      4.7 / 5.9      5.2 / 4.5      7.3 / 1.3    (the densest numbers: ~4.5 ms/MiB)
    JSON FP32 16 MiB         30   / 30      48   / 40      70   / 4.6
    JSON FP32 63 MiB        153   / 153    158   / 131    766   / 44

The decoder is 3-6x faster, but still holds the GIL: a thread stalls the loop for the whole decode,
so the helper process is still what keeps the loop responsive for large JSON (16 MiB: 4.6 ms of stall
instead of 30-40). The thresholds stay: below 1 MiB the worst case (single-digit numbers) stalls
~5 ms on a thread, about what the old decoder's 1 MiB did; a 224x224x3 UINT8 image (0.5 MiB) now
stalls 2.3 ms instead of ~6.

So:
* body < `thread_bytes` (256 KiB): inline; a stall of at most ~1.5 ms, where a hop would cost more;
* JSON part (the whole body, or the `Inference-Header-Content-Length` header) >= `process_json_bytes`
  (1 MiB): in a child process, where the GIL is its own; the parent only copies bytes in and arrays
  out (that request pays +2.5 ms at 1 MiB, +5 ms for a 2.8 MiB FP32 image, +40 ms at 16 MiB; the loop
  ~0.3 ms of stall per MiB).
  The parse's memory peak is then outside the front door;
* otherwise (binary tensors with a small JSON header; JSON of 256 KiB-1 MiB): on a thread.

The child is started on the first body that needs it (~0.4 s) and restarted if it dies.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence, TypeVar

from sponge.protocol.v2 import InferRequest, Limits, decode_request
from sponge.runtime.base import TensorSpec

log = logging.getLogger(__name__)

T = TypeVar("T")
THREAD_BYTES = 256 * 1024
PROCESS_JSON_BYTES = 1024 * 1024


def _exit_with_parent(parent_pid: int) -> None:
    """In the child: exit when the front door is gone. A pool worker blocks on its call queue, whose
    write end it holds itself, so a parent that dies (or exits without stopping it) never wakes it."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float | None:
    """CPU time (user + system, seconds) a live process has used so far, from /proc; None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
    except (OSError, IndexError):
        return None
    try:  # utime, stime: fields 14 and 15 of stat(5), 12 and 13 after "pid (comm)"
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (IndexError, ValueError):
        return None


class DecoderFailed(Exception):
    """The decoding process died (e.g. killed for memory): a server fault, answered 500."""


class DecoderClosed(Exception):
    """The decoder was closed (the server is stopping) while a body waited for its threads."""


class BodyDecoder:
    """Routes each body to inline / thread / process decoding by size (see the module docstring)."""

    def __init__(self, thread_bytes: int = THREAD_BYTES, process_json_bytes: int = PROCESS_JSON_BYTES) -> None:
        self.thread_bytes = thread_bytes
        self.process_json_bytes = process_json_bytes
        # Two threads / one process: the GIL makes more threads pointless, and one JSON parse at a time
        # bounds the memory of decodes in progress (the others wait with their body already read).
        self._threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sponge-decode")
        self._process: ProcessPoolExecutor | None = None
        self.counts = {"inline": 0, "thread": 0, "process": 0}
        self._closed = False
        # CPU of the decoder child(ren), front-door work billed with it (child_cpu_s): the last reading of
        # each live worker, and the sum of the last readings of those gone
        self._child_cpu: dict[int, float] = {}
        self._retired_cpu_s = 0.0

    @property
    def closed(self) -> bool:
        return self._closed

    def route(self, body_len: int, header_length: int | None) -> str:
        json_len = header_length if header_length is not None else body_len
        if json_len >= self.process_json_bytes:
            return "process"
        return "thread" if body_len >= self.thread_bytes else "inline"

    async def decode(self, body: bytes, header_length: int | None, limits: Limits,
                     outputs: Sequence[TensorSpec]) -> tuple[InferRequest, int]:
        """`decode_request`, off the event loop when the body is large. ProtocolError passes through."""
        where = "inline" if self._closed else self.route(len(body), header_length)  # closed: still answer
        self.counts[where] += 1
        if where == "inline":
            return decode_request(body, header_length, limits, outputs)
        loop = asyncio.get_running_loop()
        pool: Executor = self._threads if where == "thread" else self._pool()
        try:
            return await loop.run_in_executor(pool, decode_request, body, header_length, limits, outputs)
        except BrokenProcessPool as exc:
            if pool is self._process:  # not a pool already replaced after an earlier failure
                log.error("the request decoder process died (%s): a new one starts with the next body", exc)
                self._drop_process()
            raise DecoderFailed("the request decoder process died; retry") from None

    async def run(self, fn: Callable[..., T], *args: Any, size: int) -> T:
        """`fn(*args)`, a decode of a `size`-byte message other than a V2 HTTP body (the gRPC front
        door's): inline below `thread_bytes`, else on the decoder's threads (a protobuf parse holds the
        GIL as a JSON one does, but its raw contents are copies, not a parse per number: ~1 ms/MiB; no
        process hop pays for itself). ProtocolError passes through."""
        if self._closed or size < self.thread_bytes:
            self.counts["inline"] += 1
            return fn(*args)
        self.counts["thread"] += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._threads, functools.partial(fn, *args))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():  # our pool stopped, not the caller
                raise DecoderClosed("server is shutting down") from None
            raise

    def child_cpu_s(self) -> float:
        """CPU seconds used so far by the decoder's child process(es), dead ones included (each counted up to
        its last reading: the CPU a child used after it was last read and before it died is not seen).
        Reads /proc: cheap, called at a metrics scrape or a controller tick."""
        workers = getattr(self._process, "_processes", None) or {}  # private, as in _detach_process
        seen: dict[int, float] = {}
        for pid in list(workers):
            cpu = process_cpu_s(pid)
            if cpu is not None:
                seen[pid] = max(cpu, self._child_cpu.get(pid, 0.0))
            elif pid in self._child_cpu:
                seen[pid] = self._child_cpu[pid]
        for pid, cpu in self._child_cpu.items():
            if pid not in seen:  # gone (died, or the pool was dropped): keep what it used
                self._retired_cpu_s += cpu
        self._child_cpu = seen
        return self._retired_cpu_s + sum(seen.values())

    def _pool(self) -> ProcessPoolExecutor:
        if self._process is None:  # spawn, not fork: this process runs an event loop and threads
            self._process = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_exit_with_parent, initargs=(os.getpid(),))
        return self._process

    def _detach_process(self) -> ProcessPoolExecutor | None:
        """Forget the pool and stop its worker at once: shutdown(wait=False) alone left the worker
        running after the server exited (seen live); what it was decoding is abandoned anyway."""
        if self._process is not None:
            self.child_cpu_s()  # its workers' last readings, before they go
        pool, self._process = self._process, None
        if pool is not None:
            workers = getattr(pool, "_processes", None) or {}  # private, but the only handle on them
            for proc in list(workers.values()):
                proc.terminate()
        return pool

    def _drop_process(self) -> None:
        pool = self._detach_process()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the worker thread(s) and process without waiting (a decode in progress is abandoned)."""
        self._closed = True
        self._drop_process()
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def aclose(self, timeout_s: float = 2.0) -> None:
        """close(), then wait off the loop (bounded) until the pool is torn down, so that its queues
        are released, not reported by multiprocessing as leaked semaphores at exit."""
        self._closed = True
        pool = self._detach_process()
        self._threads.shutdown(wait=False, cancel_futures=True)
        if pool is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True), timeout_s)
            except TimeoutError:
                log.warning("the request decoder process did not stop within %.1f s", timeout_s)
