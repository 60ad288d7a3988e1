"""`RemoteReplica`: the front door's handle of a `sponge worker` on another host (or pod).

Same public interface as the local `Replica` (runtime/replica.py) so `ServingCore` uses it unchanged:
`name, start, infer -> BatchResult, stop, kill, restart, set_threads, ready, busy, pid (None),
on_start, on_death, inputs, outputs, labels, restarts`. The wire format is in runtime/remote_worker.py.

Failure handling (each batch answered at most once, none waits forever):

* one TCP connection at a time; the batches sent on it are pending *on that connection*. When it drops
  (EOF, reset), a ping goes unanswered for `ping_timeout_s` (a cut link: TCP alone would notice only
  after minutes), a batch gets no answer within `batch_timeout_s`, or `kill()` is called (the core's
  watchdog), the connection is aborted, every batch pending on it fails with `ReplicaDied` and the
  replica is not ready. An answer that arrives later cannot be taken for anything: its connection is
  gone, and an id no longer pending is discarded (counted in `late_answers`).
* `restart()` reconnects with exponential backoff (`backoff_initial_s` doubling to `backoff_max_s`)
  until the worker answers again; meanwhile the replica stays not ready (a vanished worker is dropped
  from service, not waited on). It is cancellable (shutdown).
* `start()` is one attempt: a worker that cannot be reached at start is a clear error.
* a worker that is stopping (SIGTERM) says so in its PONGs: the replica turns not ready at once (no new
  batches) but keeps the connection until the batch in flight is answered, then reconnects as above.

At most once *answered*, not at most once *run*: a batch failed with `ReplicaDied` may still have run
on the worker (e.g. the link was cut after it was sent). Inference has no side effects, so the core may
re-dispatch it to another replica.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from sponge.runtime import frames as fr
from sponge.runtime.base import TensorSpec
from sponge.runtime.replica import BatchResult, ReplicaDied, ReplicaError

log = logging.getLogger("sponge.remote")
STREAM_LIMIT = 4 << 20  # the StreamReader pauses the socket at 2 x limit (64 KiB by default: many rounds per batch)


class WorkerUnreachable(ConnectionError):
    """The worker could not be connected to, or did not answer its status request in time."""


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)  # batch id -> its answer
    pings: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    dead: bool = False
    draining: bool = False  # the worker said it is stopping: no new batches; those in flight are answered


class RemoteReplica:
    """A replica served by a remote `sponge worker` at host:port."""

    def __init__(self, name: str, host: str, port: int, *, connect_timeout_s: float = 5.0,
                 ping_interval_s: float = 1.0, ping_timeout_s: float = 2.0, batch_timeout_s: float = 30.0,
                 backoff_initial_s: float = 0.1, backoff_max_s: float = 5.0,
                 max_body: int = fr.DEFAULT_MAX_BODY_BYTES,
                 on_start: Callable[["RemoteReplica"], None] | None = None) -> None:
        self.name = name
        self.host, self.port = host, port
        self.connect_timeout_s = connect_timeout_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.batch_timeout_s = batch_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.max_body = max_body
        self.on_start = on_start
        self.on_death: Callable[["RemoteReplica"], None] | None = None
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.labels: list[str] | None = None
        self.restarts = 0
        self.threads: int | None = None  # the last set_threads (re-sent after a reconnect)
        self.worker_status: dict[str, Any] = {}  # the worker's last PONG / STATUS_REPLY / RESULT figures
        self.late_answers = 0  # answers for ids no longer pending (failed or unknown): discarded
        self.deaths = 0
        self._conn: _Conn | None = None
        # ids unique across reconnects and front-door restarts (a worker's answer names exactly one batch)
        self._ids = itertools.count(random.getrandbits(48) + 1)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None  # not a local process: nothing to signal or put in a cgroup here

    @property
    def ready(self) -> bool:
        return self._conn is not None and not self._conn.dead and not self._conn.draining

    @property
    def busy(self) -> bool:
        return self._conn is not None and bool(self._conn.pending)

    # ---- connection --------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect once and learn the model's tensors; WorkerUnreachable if the worker does not answer."""
        if self._conn is not None:
            await self.stop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port, limit=STREAM_LIMIT)
        except (OSError, TimeoutError) as exc:
            raise WorkerUnreachable(f"replica {self.name}: cannot connect to worker {self.address}: "
                                    f"{type(exc).__name__}: {exc}") from None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                writer.writelines(fr.encode(fr.STATUS, next(self._ids)))
                await writer.drain()
                frame = await fr.read_frame(reader, self.max_body)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, fr.FrameError) as exc:
            writer.transport.abort()
            raise WorkerUnreachable(f"replica {self.name}: worker {self.address} did not answer its status "
                                    f"request: {type(exc).__name__}: {exc}") from None
        if frame.kind != fr.STATUS_REPLY:
            writer.transport.abort()
            raise WorkerUnreachable(f"replica {self.name}: worker {self.address} answered status with "
                                    f"{fr.KINDS.get(frame.kind)}: {frame.meta.get('error', '')}")
        info = frame.meta
        if info.get("ready") is False:
            writer.transport.abort()
            raise WorkerUnreachable(f"replica {self.name}: worker {self.address} is draining (stopping)")
        spec = lambda ds: [TensorSpec(str(d["name"]), str(d["datatype"]), tuple(int(x) for x in d["shape"]))  # noqa: E731
                           for d in ds]
        try:
            inputs, outputs, labels = spec(info["inputs"]), spec(info["outputs"]), info.get("labels")
        except (KeyError, TypeError, ValueError) as exc:
            writer.transport.abort()
            raise WorkerUnreachable(f"replica {self.name}: worker {self.address} sent a malformed status: "
                                    f"{type(exc).__name__}: {exc}") from None
        self.inputs, self.outputs, self.labels = inputs, outputs, labels
        self.worker_status = {k: v for k, v in info.items() if k not in ("inputs", "outputs", "labels")}
        conn = _Conn(reader, writer)
        self._conn = conn
        conn.tasks.append(asyncio.create_task(self._read_loop(conn), name=f"remote-{self.name}-reader"))
        conn.tasks.append(asyncio.create_task(self._ping_loop(conn), name=f"remote-{self.name}-ping"))
        if self.threads is not None:
            self.set_threads(self.threads)
        log.info("replica %s connected to worker %s (%s threads, limit %s)", self.name, self.address,
                 info.get("threads"), info.get("limit_m"))
        if self.on_start is not None:
            self.on_start(self)

    def _drop(self, conn: _Conn, reason: str) -> None:
        """The connection is dead: abort it, fail what is pending on it, not ready (once per connection)."""
        if conn.dead:
            return
        conn.dead = True
        conn.writer.transport.abort()
        current = asyncio.current_task()
        for t in conn.tasks:
            if t is not current:
                t.cancel()
        exc = ReplicaDied(f"replica {self.name} (worker {self.address}): {reason}")
        for fut in list(conn.pending.values()) + list(conn.pings.values()):
            if not fut.done():
                fut.set_exception(exc)
        conn.pending.clear()
        conn.pings.clear()
        if self._conn is conn:
            self._conn = None
            self.deaths += 1
            log.warning("replica %s: %s", self.name, reason)
            if self.on_death is not None:
                self.on_death(self)

    async def _read_loop(self, conn: _Conn) -> None:
        try:
            while True:
                frame = await fr.read_frame(conn.reader, self.max_body, writable=True)
                if frame.kind == fr.PONG:
                    self.worker_status = frame.meta
                    if frame.meta.get("ready") is False and not conn.draining:
                        conn.draining = True  # the core stops dispatching here; restart() waits for it back
                        log.warning("replica %s: worker %s is draining (stopping)", self.name, self.address)
                    fut = conn.pings.pop(frame.batch_id, None)
                elif frame.kind in (fr.RESULT, fr.ERROR):
                    fut = conn.pending.pop(frame.batch_id, None)
                    if fut is None and frame.kind == fr.ERROR:
                        log.warning("replica %s: worker error for no pending batch (%d): %s", self.name,
                                    frame.batch_id, frame.meta.get("error"))
                else:
                    fut = None
                if fut is None or fut.done():
                    if frame.kind != fr.PONG:
                        self.late_answers += 1
                    continue
                fut.set_result(frame)
        except asyncio.CancelledError:
            raise
        except asyncio.IncompleteReadError:
            self._drop(conn, "the worker closed the connection")
        except fr.FrameError as exc:
            self._drop(conn, f"malformed frame from the worker: {exc}")
        except (ConnectionError, OSError) as exc:
            self._drop(conn, f"connection lost: {type(exc).__name__}: {exc}")

    async def _ping_loop(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        while not conn.dead:
            await asyncio.sleep(self.ping_interval_s)
            pid = next(self._ids)
            fut: asyncio.Future[Any] = loop.create_future()
            conn.pings[pid] = fut
            t0 = time.monotonic()
            try:
                conn.writer.writelines(fr.encode(fr.PING, pid))
                async with asyncio.timeout(self.ping_timeout_s):
                    await conn.writer.drain()
                    await fut
            except TimeoutError:
                self._drop(conn, f"no answer to a ping within {self.ping_timeout_s:.1f} s")
                return
            except (ConnectionError, OSError) as exc:
                self._drop(conn, f"connection lost: {type(exc).__name__}: {exc}")
                return
            except ReplicaDied:
                return
            self.worker_status["ping_ms"] = (time.monotonic() - t0) * 1000.0

    # ---- batches -----------------------------------------------------------------------------
    async def infer(self, inputs: dict[str, np.ndarray]) -> BatchResult:
        conn = self._conn
        if conn is None or conn.dead:
            raise ReplicaDied(f"replica {self.name} (worker {self.address}) is not connected")
        batch_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            data = fr.encode(fr.INFER, batch_id, None, inputs)
        except fr.FrameError as exc:
            raise ReplicaError(f"replica {self.name}: cannot send the batch: {exc}") from None
        conn.pending[batch_id] = fut
        try:
            async with asyncio.timeout(self.batch_timeout_s):
                conn.writer.writelines(data)
                await conn.writer.drain()
                frame = await fut
        except TimeoutError:
            self._drop(conn, f"no answer to batch {batch_id} within {self.batch_timeout_s:.1f} s")
            raise ReplicaDied(f"replica {self.name} (worker {self.address}): batch timed out after "
                              f"{self.batch_timeout_s:.1f} s") from None
        except (ConnectionError, OSError) as exc:
            self._drop(conn, f"connection lost while sending: {type(exc).__name__}: {exc}")
            raise ReplicaDied(f"replica {self.name} (worker {self.address}) connection lost") from None
        finally:
            # answered, failed or cancelled (the core's watchdog): never answerable again on this connection
            conn.pending.pop(batch_id, None)
        if frame.kind == fr.ERROR:
            raise ReplicaError(f"replica {self.name} (worker {self.address}): {frame.meta.get('error')}")
        meta = frame.meta
        self.worker_status.update(threads=meta.get("threads"), limit_m=meta.get("limit_m"))
        return BatchResult(frame.tensors, float(meta.get("infer_ms", 0.0)), int(meta.get("threads") or 0))

    async def status(self) -> dict[str, Any]:
        """Ask the worker for its status now (a PING; the PONG is its status)."""
        conn = self._conn
        if conn is None or conn.dead:
            raise ReplicaDied(f"replica {self.name} (worker {self.address}) is not connected")
        pid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        conn.pings[pid] = fut
        conn.writer.writelines(fr.encode(fr.PING, pid))
        try:
            async with asyncio.timeout(self.ping_timeout_s):
                await conn.writer.drain()
                frame = await fut
        except TimeoutError:
            conn.pings.pop(pid, None)
            raise ReplicaDied(f"replica {self.name}: no status answer within {self.ping_timeout_s:.1f} s") from None
        return dict(frame.meta)

    def set_threads(self, n: int) -> None:
        """Ask the worker for `n` runtime threads (it keeps within its own CPU limit)."""
        self.threads = n
        conn = self._conn
        if conn is not None and not conn.dead and not conn.writer.is_closing():
            conn.writer.writelines(fr.encode(fr.THREADS, next(self._ids), {"threads": int(n)}))

    def kill(self) -> None:
        """The worker is hung (the core's watchdog): drop the connection and fail what it holds, at once.
        Nothing to signal on another host; `restart` reconnects."""
        if self._conn is not None:
            self._drop(self._conn, "killed (no answer in time)")

    async def restart(self) -> None:
        """Reconnect, with backoff, until the worker answers (not ready meanwhile)."""
        await self.stop()
        self.restarts += 1
        delay = self.backoff_initial_s
        attempt = 0
        while True:
            try:
                await self.start()
                return
            except WorkerUnreachable as exc:
                attempt += 1
                if attempt == 1 or attempt % 10 == 0:
                    log.warning("%s (attempt %d; retrying with backoff up to %.1f s)", exc, attempt,
                                self.backoff_max_s)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(self.backoff_max_s, delay * 2)

    async def stop(self) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None  # a deliberate stop is not a death: no on_death
        if not conn.dead:
            self._drop(conn, "stopped")
        await asyncio.gather(*conn.tasks, return_exceptions=True)


def parse_addresses(spec: str, default_port: int = 9000) -> list[tuple[str, int]]:
    """'host[:port],[v6]:port,...' -> [(host, port)] (for wiring remote replicas into a front door)."""
    out: list[tuple[str, int]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        host, port = item, default_port
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"worker address {item!r}: expected [v6-address]:port")
                port = int(rest[1:])
        elif item.count(":") == 1:
            host, p = item.split(":")
            port = int(p)
        if not host or not 0 < port < 65536:
            raise ValueError(f"worker address {item!r}: expected host[:port] with a port in 1..65535")
        out.append((host, port))
    return out


def remote_replicas(spec: str, prefix: str = "remote", **kw: Any) -> list[RemoteReplica]:
    """One RemoteReplica per address of `spec` (see parse_addresses), named prefix-0, prefix-1, ..."""
    return [RemoteReplica(f"{prefix}-{i}", h, p, **kw) for i, (h, p) in enumerate(parse_addresses(spec))]
