"""ONNX Runtime behind the Runtime interface, with one session per thread count.

ONNX Runtime fixes its intra-op thread pool when a session is created (~0.2 s), and oversubscribed
threads under a CPU quota run several times slower than threads = cores. So the replica keeps one
session per thread count: sessions are built ahead in the background and `set_threads` switches
between them without pausing (until the wanted one is ready, the closest ready one serves).

Whichever thread finishes a build (the prebuild loop or a build started by `set_threads`) switches to
it if it is now the best ready match for the wanted count; the wanted count and the active session
only change under `_lock`, so a newer `set_threads` can never be undone by an older build finishing.
`threads` is the count wanted, `active_threads` the count in force.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sponge.runtime.base import TensorSpec

ORT_TYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


class ModelLoadError(Exception):
    """The model file is missing, not ONNX, or uses types the server cannot carry."""


def _spec(arg: ort.NodeArg) -> TensorSpec:
    if arg.type not in ORT_TYPES:
        raise ModelLoadError(f"tensor '{arg.name}' has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, ORT_TYPES[arg.type], shape)


def _options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads burn CPU quota while idle; under a CFS quota that time is stolen from inference.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class OnnxRuntime:
    """A model on ONNX Runtime (CPU) whose intra-op threads follow the replica's CPU allocation."""

    def __init__(self, model_path: str | Path, threads: int = 1, max_threads: int | None = None,
                 prebuild: bool = True) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        self.path = path
        self.max_threads = max(1, max_threads or os.cpu_count() or 1)
        self._sessions: dict[int, ort.InferenceSession] = {}
        self._lock = threading.Lock()
        self._building: set[int] = set()
        self._threads = min(max(1, threads), self.max_threads)
        self._active: ort.InferenceSession  # set under _lock, with _active_threads, by _build and set_threads
        self._active_threads = 0  # none yet: the first build below becomes active
        try:
            first = self._build(self._threads)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"cannot load {path} with ONNX Runtime: {exc}") from None
        self.inputs = [_spec(a) for a in first.get_inputs()]
        self.outputs = [_spec(a) for a in first.get_outputs()]
        meta = first.get_modelmeta().custom_metadata_map
        self.labels: list[str] | None = json.loads(meta["labels"]) if "labels" in meta else None
        if prebuild:
            threading.Thread(target=self._prebuild_all, daemon=True, name="ort-prebuild").start()

    def _build(self, threads: int) -> ort.InferenceSession:
        """Build the session for `threads` and switch to it if it is now the best match for the wanted count.

        Whoever started the build (prebuild or set_threads), a session that becomes ready while it is
        wanted must take effect, or the replica keeps running with a wrong count.
        """
        try:
            sess = ort.InferenceSession(str(self.path), sess_options=_options(threads),
                                        providers=["CPUExecutionProvider"])
        except BaseException:
            with self._lock:
                self._building.discard(threads)  # a later set_threads may try again
            raise
        with self._lock:
            self._sessions[threads] = sess
            self._building.discard(threads)
            if not self._active_threads or _closeness(threads, self._threads) < _closeness(
                    self._active_threads, self._threads):
                self._active, self._active_threads = sess, threads
        return sess

    def _prebuild_all(self) -> None:
        for n in range(1, self.max_threads + 1):
            with self._lock:
                if n in self._sessions or n in self._building:
                    continue
                self._building.add(n)
            self._build(n)

    @property
    def threads(self) -> int:
        """The thread count wanted (last `set_threads`); see `active_threads` for the one in force."""
        return self._threads

    @property
    def active_threads(self) -> int:
        """The thread count of the session `infer` runs now (differs from `threads` while it builds)."""
        return self._active_threads

    @property
    def ready_thread_counts(self) -> list[int]:
        with self._lock:
            return sorted(self._sessions)

    def set_threads(self, n: int) -> None:
        """Want `n` threads: switch now if its session is ready, else serve with the closest and build it."""
        n = min(max(1, n), self.max_threads)
        with self._lock:
            self._threads = n
            # The closest ready count (fewer threads first) serves while the right one builds.
            best = min(self._sessions, key=lambda k: _closeness(k, n))
            self._active, self._active_threads = self._sessions[best], best
            if best == n or n in self._building:
                return  # ready, or its build (prebuild or an earlier call) switches to it when done
            self._building.add(n)
        threading.Thread(target=self._build, args=(n,), daemon=True, name=f"ort-build-{n}").start()

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self._active  # one read: a concurrent switch affects the next batch, not this one
        results = sess.run(None, batch)
        return {spec.name: arr for spec, arr in zip(self.outputs, results)}


def _closeness(have: int, want: int) -> tuple[int, int]:
    """Sort key of a ready thread count for a wanted one: nearest first, fewer threads on a tie."""
    return (abs(have - want), have)
