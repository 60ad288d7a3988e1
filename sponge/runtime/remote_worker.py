"""`sponge worker`: the model runtime on its own, taking whole batches over the network.

A remote worker is what a local replica process is (runtime/worker.py), reachable over TCP: a pod
of its own in Kubernetes, resized in place by the kubelet. It runs one batch at a time (on one
executor thread, so its event loop keeps answering pings and probes while a batch runs), notices a
changed CPU quota by itself (`scaling/self_limit.py`, polled every 100 ms: cgroup v2 `cpu.max` as
seen inside a container, or the v1 `cpu.cfs_quota_us`, and the CPU affinity) and follows it with its
runtime's thread count without a restart. Every RESULT, PONG and STATUS_REPLY reports the thread
count in force and the limit it follows. The front-door side is `runtime/remote.py` (`RemoteReplica`).

One port, two protocols (default 9000)
--------------------------------------
The first four bytes of a connection decide: `SPNG` (the frame magic) starts the binary data
protocol below; anything else is read as an HTTP/1.1 request, answered, and the connection closed:

* `GET /live`   200 `{"live": true}` while the process runs (liveness probe);
* `GET /ready`  200 `{"ready": true, ...}` once the model is loaded, 503 while draining: at SIGTERM the
  worker says not ready (here and in every PONG, so front doors stop sending) for 2 s, finishes the
  batches in flight (at most 10 s), then exits;
* `GET /status` 200 the status object (threads, limit_m, batches, model, ...).

So a Kubernetes readiness probe `httpGet: {path: /ready, port: 9000}` and the front door's data
connection share port 9000 and one Service port.

Why raw framing over TCP, not HTTP/2
------------------------------------
A batch is one request and one answer between two fixed peers that hold one connection for hours;
there is nothing for HTTP/2's streams, HPACK or flow control to do but cost time and a dependency.
Measured by `bench/remote.py --model payload` (EfficientNet-Lite0's input, no compute): over a veth
link the transport adds 0.36 / 1.3 / 7.5 ms per batch (p50) at 1 / 8 / 32 images, against 0.32 / 0.93 /
5.7 ms for the local replica's pickle over a socketpair (x1.1-1.4): what is left to win is the copies
of the bytes themselves, which an HTTP/2 layer would add to, not remove.

Framing (both directions; `runtime/frames.py` implements it)
------------------------------------------------------------
Every message is one frame::

    offset  size  field
    0       4     magic b"SPNG"
    4       1     version (1)
    5       1     kind: 1 INFER, 2 RESULT, 3 ERROR, 4 PING, 5 PONG, 6 STATUS, 7 STATUS_REPLY, 8 THREADS
    6       2     reserved, 0
    8       8     batch id (u64; a PING's or STATUS's own id; echoed in the answer)
    16      4     meta length M (u32, at most 4 MiB)
    20      8     body length B (u64, at most --max-body-mb)
    28      M     meta: a UTF-8 JSON object
    28+M    B     body: raw tensor bytes

All integers big-endian (network order). A frame carrying tensors (INFER, RESULT) has in its meta
`"tensors": [{"name": str, "datatype": V2 datatype, "shape": [int, ...], "nbytes": int}, ...]`, and
the body is those tensors' bytes back to back in that order: numeric C-order little-endian, BOOL one
byte (0/1) per element, BYTES per element a 4-byte little-endian length then the bytes (V2's binary
extension). `nbytes` must equal elements × item size for numeric tensors and the sizes must add up to
B. RESULT's meta also has `infer_ms`, `threads` (the count in force), `limit_m` (the CPU limit the
worker sees, null = none); ERROR's has `error` (message) and `code` (`bad_frame`, `runtime`,
`unexpected`); PONG's and STATUS_REPLY's are the status (`ready`, `threads`, `wanted_threads`,
`max_threads`, `sessions` (thread counts whose runtime session is built), `limit_m`, `batches`,
`errors`; STATUS_REPLY adds `inputs`, `outputs`, `labels`,
`model`); THREADS's is `{"threads": n}` (no answer).

Nothing received is unpickled: the meta is JSON, the body is only viewed as the declared dtypes after
every size was checked against the bytes received. A malformed frame whose header was sound (so it
was read whole) is answered ERROR `bad_frame` with its batch id and the connection goes on; a bad
header (wrong magic or version, sizes beyond the limits) is answered ERROR and that connection closed.
Either way the worker keeps serving. The worker trusts its network otherwise (no authentication):
run it on a private pod network.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from sponge.runtime import frames as fr

log = logging.getLogger("sponge.worker")
DEFAULT_PORT = 9000
LIMIT_POLL_S = 0.1
HTTP_HEAD_TIMEOUT_S = 5.0
DRAIN_S = 10.0
NOTICE_S = 2.0  # at SIGTERM, say not ready this long before closing: a front door pings every 1 s
# asyncio's StreamReader pauses the socket whenever it buffers 2 x limit: at the default 64 KiB a 4.8 MB
# batch took ~37 pause/resume rounds through the event loop
STREAM_LIMIT = 4 << 20
MAX_PIPELINED = 4  # batches of one connection received and not yet answered (the front door sends one at a time)


class LimitFollower:
    """Polls this process's CPU limit (self_limit, re-rootable for tests) and sets the runtime's threads
    when it changes. `limit_m` is the last limit seen (None: unlimited)."""

    def __init__(self, runtime: Any, root: str | Path = "/", poll_s: float = LIMIT_POLL_S) -> None:
        self.runtime = runtime
        self.root = root
        self.poll_s = poll_s
        self.limit_m: int | None = None
        self.changes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.poll(apply=False)  # the limit at start; the runtime was built with its threads (or --threads)

    def threads_for(self, limit_m: int | None) -> int:
        from sponge.scaling.self_limit import threads_for

        return self.runtime.max_threads if limit_m is None else min(threads_for(limit_m), self.runtime.max_threads)

    def poll(self, apply: bool = True) -> bool:
        """Read the limit once; on a change set the threads (if `apply`). True when it changed."""
        from sponge.scaling.self_limit import read_own_cpu_limit_m

        try:
            limit = read_own_cpu_limit_m(self.root)
        except OSError:
            return False
        if limit == self.limit_m and self.changes:
            return False
        self.limit_m = limit
        self.changes += 1
        if not apply:
            return True
        self.runtime.set_threads(self.threads_for(limit))
        log.info("CPU limit %s: %d runtime thread(s)", f"{limit} m" if limit is not None else "none",
                 self.runtime.threads)
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="limit-follower")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # never let the follower die
                log.exception("reading the CPU limit failed")

    def stop(self) -> None:
        self._stop.set()


class WorkerServer:
    """Serves one runtime on one port: binary frames (data) and HTTP/1.1 (probes), told apart by the
    first four bytes of each connection."""

    def __init__(self, runtime: Any, host: str = "0.0.0.0", port: int = DEFAULT_PORT,
                 max_body: int = fr.DEFAULT_MAX_BODY_BYTES, follow_limit: bool = True,
                 limit_root: str | Path = "/", limit_poll_s: float = LIMIT_POLL_S, model: str = "") -> None:
        self.runtime = runtime
        self.host, self.port = host, port
        self.max_body = max_body
        self.model = model
        self.follower = LimitFollower(runtime, limit_root, limit_poll_s) if follow_limit else None
        self.draining = False
        self.batches = 0
        self.errors = 0
        self.bad_frames = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="infer")
        self._server: asyncio.Server | None = None
        self._inflight = 0
        self._conns: set[asyncio.StreamWriter] = set()

    # ---- status ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        rt = self.runtime
        return {"ready": self._server is not None and not self.draining, "pid": os.getpid(),
                "threads": getattr(rt, "active_threads", rt.threads), "wanted_threads": rt.threads,
                "max_threads": rt.max_threads, "sessions": getattr(rt, "ready_thread_counts", None),
                "limit_m": self.follower.limit_m if self.follower is not None else None,
                "batches": self.batches, "errors": self.errors, "bad_frames": self.bad_frames,
                "inflight": self._inflight, "model": self.model}

    def info(self) -> dict[str, Any]:
        specs = lambda ss: [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in ss]  # noqa: E731
        return {**self.status(), "inputs": specs(self.runtime.inputs), "outputs": specs(self.runtime.outputs),
                "labels": getattr(self.runtime, "labels", None)}

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, self.host, self.port, limit=STREAM_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.follower is not None:
            self.follower.start()

    async def close(self, drain_s: float = 0.0, notice_s: float = 0.0) -> None:
        """Drain, then stop: say not ready (PONG, /ready 503) for `notice_s` while any connection is open, so
        front doors stop sending (batches that still come are served); wait up to `drain_s` more for the
        batches in flight; then stop listening and close every connection."""
        self.draining = True
        t0 = time.monotonic()
        while self._conns and time.monotonic() - t0 < notice_s:
            await asyncio.sleep(0.01)
        deadline = time.monotonic() + drain_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._server is not None:
            self._server.close()
        for w in list(self._conns):
            w.close()
        if self.follower is not None:
            self.follower.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- connections -----------------------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            first = await reader.readexactly(4)
            if first == fr.MAGIC:
                await self._serve_frames(reader, writer, first)
            else:
                await self._serve_http(reader, writer, first)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError, TimeoutError):
            pass  # the peer went away, or an HTTP head beyond the stream limit: only this connection ends
        except Exception:  # never let one connection's surprise go unlogged; the worker serves on
            log.exception("connection from %s failed", writer.get_extra_info("peername"))
        finally:
            self._conns.discard(writer)
            writer.close()

    def _send(self, writer: asyncio.StreamWriter, kind: int, batch_id: int, meta: dict[str, Any] | None = None,
              tensors: dict[str, np.ndarray] | None = None) -> None:
        if not writer.is_closing():
            writer.writelines(fr.encode(kind, batch_id, meta, tensors))

    async def _serve_frames(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    frame = await fr.read_frame(reader, self.max_body, first)
                except fr.FrameError as exc:
                    self.bad_frames += 1
                    log.warning("bad frame from %s: %s", writer.get_extra_info("peername"), exc)
                    self._send(writer, fr.ERROR, exc.batch_id, {"error": str(exc), "code": "bad_frame"})
                    await writer.drain()
                    if not exc.recoverable:
                        return
                    first = b""
                    continue
                first = b""
                if frame.kind == fr.INFER:
                    if len(tasks) >= MAX_PIPELINED:  # bounded memory: stop reading until one is done
                        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    t = asyncio.create_task(self._infer(frame, writer))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                elif frame.kind == fr.PING:
                    self._send(writer, fr.PONG, frame.batch_id, self.status())
                elif frame.kind == fr.STATUS:
                    self._send(writer, fr.STATUS_REPLY, frame.batch_id, self.info())
                elif frame.kind == fr.THREADS:
                    n = frame.meta.get("threads")
                    if type(n) is not int or n < 1:
                        self._send(writer, fr.ERROR, frame.batch_id,
                                   {"error": f"threads must be a positive integer, got {n!r}", "code": "bad_frame"})
                    else:
                        self.set_threads(n)
                else:
                    self._send(writer, fr.ERROR, frame.batch_id,
                               {"error": f"a worker does not take {fr.KINDS[frame.kind]} frames", "code": "unexpected"})
                await writer.drain()
        finally:
            for t in tasks:  # their answers have no reader; the executor finishes a running batch anyway
                t.cancel()

    def set_threads(self, n: int) -> None:
        """The front door asks for `n` threads: honoured up to what the worker's own CPU limit gives."""
        if self.follower is not None and self.follower.limit_m is not None:
            n = min(n, self.follower.threads_for(self.follower.limit_m))
        self.runtime.set_threads(n)

    def _timed_infer(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """The runtime's own time, as a local worker reports it (the executor hop is dispatch overhead)."""
        t0 = time.perf_counter()
        outputs = self.runtime.infer(inputs)
        return outputs, (time.perf_counter() - t0) * 1000.0

    async def _infer(self, frame: fr.Frame, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        self._inflight += 1
        try:
            try:
                outputs, infer_ms = await loop.run_in_executor(self._executor, self._timed_infer, frame.tensors)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bad batch must not stop the worker
                self.errors += 1
                self._send(writer, fr.ERROR, frame.batch_id,
                           {"error": f"{type(exc).__name__}: {exc}", "code": "runtime"})
            else:
                self.batches += 1
                st = self.status()
                self._send(writer, fr.RESULT, frame.batch_id,
                           {"infer_ms": infer_ms, "threads": st["threads"], "limit_m": st["limit_m"]}, outputs)
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the front door went away: the answer has no reader
        finally:
            self._inflight -= 1

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes) -> None:
        async with asyncio.timeout(HTTP_HEAD_TIMEOUT_S):
            head = first + await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            status, body = 400, {"error": "expected an HTTP/1.x request or a Sponge frame"}
        else:
            method, path = parts[0], parts[1].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, body = 405, {"error": f"method {method} not allowed"}
            elif path == "/live":
                status, body = 200, {"live": True}
            elif path == "/ready":
                st = self.status()
                status, body = (200 if st["ready"] else 503), {"ready": st["ready"], "threads": st["threads"],
                                                               "limit_m": st["limit_m"]}
            elif path == "/status":
                status, body = 200, self.status()
            else:
                status, body = 404, {"error": f"no route {path} (try /ready, /live, /status)"}
        payload = orjson.dumps(body)
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  503: "Service Unavailable"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                     + (payload if not line.startswith("HEAD") else b""))
        await writer.drain()


# ---- the command -----------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run the model runtime alone and serve whole batches over the network "
                                      "(a remote replica; probes GET /ready and /live on the same port)")
    p.add_argument("--model", default="default", help="ONNX file, or 'default' (EfficientNet-Lite0)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0, all; the worker "
                                                     "has no authentication: keep it on a private network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"data frames and HTTP probes (default {DEFAULT_PORT})")
    p.add_argument("--threads", type=int, default=None,
                   help="initial runtime threads (default: what the CPU limit gives, else --max-threads)")
    p.add_argument("--max-threads", type=int, default=None, help="most runtime threads (default: the CPU count)")
    p.add_argument("--max-body-mb", type=int, default=fr.DEFAULT_MAX_BODY_BYTES >> 20,
                   help="largest batch accepted, MiB (default %(default)s)")
    p.add_argument("--no-follow-limit", dest="follow_limit", action="store_false",
                   help="do not follow the own CPU quota with the thread count")
    p.add_argument("--limit-poll-ms", type=float, default=LIMIT_POLL_S * 1000, help="CPU limit poll interval")
    p.add_argument("--cgroup-root", default="/", help=argparse.SUPPRESS)  # tests: a fake / with proc/ and sys/
    p.set_defaults(func=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model == "default":
        from sponge.models.efficientnet_lite0 import default_model_path

        model_path = default_model_path()
    else:
        model_path = Path(args.model).expanduser()
        if not model_path.is_file():
            print(f"sponge: error: --model: no such file: {model_path}", file=sys.stderr)
            return 2
    try:
        import uvloop  # the front door's loop too (uvicorn picks it): faster socket paths

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve(model_path, args.host, args.port, threads=args.threads, max_threads=args.max_threads,
                          max_body=args.max_body_mb << 20, follow_limit=args.follow_limit,
                          limit_root=args.cgroup_root, limit_poll_s=args.limit_poll_ms / 1000.0))
    except OSError as exc:
        print(f"sponge: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


async def serve(model_path: str | Path, host: str, port: int, threads: int | None = None,
                max_threads: int | None = None, max_body: int = fr.DEFAULT_MAX_BODY_BYTES, follow_limit: bool = True,
                limit_root: str | Path = "/", limit_poll_s: float = LIMIT_POLL_S) -> None:
    """Load the model, serve until SIGTERM/SIGINT (then drain: /ready 503, batches in flight finish)."""
    from sponge.runtime.onnx_runtime import OnnxRuntime
    from sponge.scaling.self_limit import read_own_cpu_limit_m, threads_for

    if threads is None:
        limit = read_own_cpu_limit_m(limit_root) if follow_limit else None
        threads = threads_for(limit) if limit is not None else (max_threads or os.cpu_count() or 1)
    loop = asyncio.get_running_loop()
    runtime = await loop.run_in_executor(None, lambda: OnnxRuntime(model_path, threads=threads,
                                                                   max_threads=max_threads))
    server = WorkerServer(runtime, host, port, max_body, follow_limit, limit_root, limit_poll_s,
                          model=Path(model_path).stem)
    await server.start()
    log.info("sponge worker: %s on %s:%d (frames + HTTP /ready /live), %d thread(s), limit %s, pid %d",
             model_path, host, server.port, runtime.threads, server.status()["limit_m"], os.getpid())
    print(f"listening {server.port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: not ready for %.0f s, then draining batches in flight (at most %.0f s)", NOTICE_S, DRAIN_S)
    await server.close(DRAIN_S, NOTICE_S)
