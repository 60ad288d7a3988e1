"""The replica worker process: the unit of vertical scaling. It owns the model runtime, runs whole
batches sent by the server, and keeps its runtime threads equal to its CPU allocation — told
directly by the server, or noticed by itself by polling its own cgroup quota (an external resizer
such as the kubelet does not tell the application)."""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

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
    """Entry point of the replica process (spawned): say ("ready", info), then serve batches (sponge.runtime.ipc)
    until told to stop or the server closes the connection."""
    from sponge.runtime.onnx_runtime import OnnxRuntime

    try:
        runtime = OnnxRuntime(model_path, threads=threads, max_threads=max_threads)
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", {"pid": os.getpid(), "inputs": runtime.inputs, "outputs": runtime.outputs,
                         "labels": runtime.labels}))
    if multiprocessing.parent_process() is not None:  # the replica process (not a test calling this inline)
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
    """Run batches until {"op": "stop"} or the server closes the connection (sponge.runtime.ipc: format)."""
    from sponge.runtime import ipc

    segments: dict[str, ipc.Segment | None] = {"in": None, "out": None}
    try:
        while True:
            try:
                payload = conn.recv_bytes()
            except (EOFError, OSError):  # the server closed its end: nothing left to serve
                return
            header, inline = ipc.decode(payload)
            op = header["op"]
            if op == "infer":
                conn.send_bytes(_infer(header, inline, runtime, segments))
            elif op == "threads":
                runtime.set_threads(int(header["n"]))
            elif op == "stop":
                return
    finally:
        for seg in segments.values():
            if seg is not None:
                seg.close()


def _attach(segments: dict[str, Any], kind: str, path: str | None, size: int) -> None:
    """Map the segment the server names for `kind` ("in" / "out"), replacing the one mapped before."""
    from sponge.runtime import ipc

    cur = segments[kind]
    if path is None or (cur is not None and cur.path == path and cur.size == size):
        return
    if cur is not None:
        segments[kind] = None
        cur.close()
    segments[kind] = ipc.Segment.attach(path, size)


def _infer(header: dict[str, Any], inline: memoryview, runtime: Any, segments: dict[str, Any]) -> bytes:
    """One batch: inputs read in place from the input segment, outputs written into the output segment when
    they fit (else inline). Returns the answer's payload. A bad batch answers an error, never kills."""
    from sponge.runtime import ipc

    batch_id = header["id"]
    try:
        _attach(segments, "in", header.get("in"), int(header.get("in_size", 0)))
        _attach(segments, "out", header.get("out"), int(header.get("out_size", 0)))
    except OSError as exc:
        return ipc.encode({"op": "error", "id": batch_id, "segments_failed": True,
                           "message": f"cannot map the batch's shared memory: {exc}"})
    try:
        inputs = {d["name"]: ipc.read_tensor(d, segments["in"], inline, copy=False) for d in header["inputs"]}
        t0 = time.perf_counter()
        outputs = runtime.infer(inputs)
        infer_ms = (time.perf_counter() - t0) * 1000.0
        del inputs  # no view into the input segment outlives the batch
    except Exception as exc:  # a bad batch must not kill the replica
        return ipc.encode({"op": "error", "id": batch_id, "message": f"{type(exc).__name__}: {exc}"})
    names = list(outputs)
    arrays = [np.asarray(outputs[n]) for n in names]
    out = segments["out"] if header.get("out") else None
    descs, need = ipc.plan([(n, a.dtype, a.shape) for n, a in zip(names, arrays)],
                           out.size if out is not None else None)
    for d, a in zip(descs, arrays):
        if d["where"] == "shm":
            view = out.view(a.dtype, a.shape, d["offset"])
            np.copyto(view, a)
            del view
    rows = max((a.shape[0] for a in arrays if a.ndim), default=0)
    pieces = ipc.pack_inline(descs, arrays)
    return ipc.encode({"op": "result", "id": batch_id, "infer_ms": infer_ms, "threads": runtime.active_threads,
                       "out_bytes_per_row": need / rows if rows else 0.0, "outputs": descs}, pieces)
