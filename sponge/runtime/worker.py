"""The replica worker process: the unit of vertical scaling. It owns the model runtime, runs whole
batches sent by the server, and keeps its runtime threads equal to its CPU allocation — told
directly by the server, or noticed by itself by polling its own cgroup quota (an external resizer
such as the kubelet does not tell the application)."""

from __future__ import annotations

import gc
import os
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

LIMIT_POLL_S = 0.1


def _follow_own_limit(runtime: Any, stop: threading.Event) -> None:
    from sponge.scaling.self_limit import read_own_cpu_limit_m, threads_for

    last: int | None = -1
    while not stop.wait(LIMIT_POLL_S):
        try:
            limit = read_own_cpu_limit_m()
        except OSError:
            continue
        if limit != last:
            last = limit
            runtime.set_threads(threads_for(limit) if limit is not None else runtime.max_threads)


def worker_main(conn: Connection, model_path: str, threads: int, max_threads: int, follow_own_limit: bool) -> None:
    """Entry point of the replica process (spawned): serve ('infer', id, inputs) until ('stop',) or EOF."""
    from sponge.runtime.onnx_runtime import OnnxRuntime

    try:
        runtime = OnnxRuntime(model_path, threads=threads, max_threads=max_threads)
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", {"pid": os.getpid(), "inputs": runtime.inputs, "outputs": runtime.outputs,
                         "labels": runtime.labels}))
    gc.collect()
    gc.freeze()  # the runtime's and the imports' objects: out of full collections' walks (as the server's)
    stop = threading.Event()
    if follow_own_limit:
        threading.Thread(target=_follow_own_limit, args=(runtime, stop), daemon=True).start()
    try:
        _serve(conn, runtime)
    except (BrokenPipeError, ConnectionResetError):
        return  # the server went away with a batch in flight (shutdown): its answer has no reader
    finally:
        stop.set()


def _serve(conn: Connection, runtime: Any) -> None:
    """Run batches until ('stop',) or the server closes the connection."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the server closed its end: nothing left to serve
            return
        kind = msg[0]
        if kind == "infer":
            _, batch_id, inputs = msg
            t0 = time.perf_counter()
            try:
                outputs = runtime.infer(inputs)
            except Exception as exc:  # a bad batch must not kill the replica
                conn.send(("error", batch_id, f"{type(exc).__name__}: {exc}"))
                continue
            infer_ms = (time.perf_counter() - t0) * 1000.0
            conn.send(("result", batch_id, outputs, infer_ms, runtime.active_threads))
        elif kind == "threads":
            runtime.set_threads(int(msg[1]))
        elif kind == "stop":
            return
