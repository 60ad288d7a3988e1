"""OnnxRuntime's thread count: a wanted count whose session finishes building later still takes effect.

The race is forced deterministically: `_build` of the contested count blocks on an Event, so the
set_threads call lands while that build is in flight, whatever the machine's load.
"""

from __future__ import annotations

import threading
import time
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sponge.runtime import ipc
from sponge.runtime.onnx_runtime import OnnxRuntime

WAIT_S = 10.0  # generous: only bounds a hang, never a timing assertion


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """y = x + 1 on float [N, 4]: loads in milliseconds."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "tiny", [x], [y], [one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(model, str(path))
    return path


def _active_session_threads(rt: OnnxRuntime) -> int:
    """The intra-op thread count of the session that `infer` would use now (read from ORT itself)."""
    return int(rt._active.get_session_options().intra_op_num_threads)


def _blocking_build(rt: OnnxRuntime, monkeypatch: pytest.MonkeyPatch, blocked: int
                    ) -> tuple[threading.Event, threading.Event]:
    """Make the build of `blocked` threads wait until released; returns (started, release)."""
    original = rt._build
    started, release = threading.Event(), threading.Event()

    def build(n: int) -> Any:
        if n == blocked:
            started.set()
            assert release.wait(WAIT_S)
        return original(n)

    monkeypatch.setattr(rt, "_build", build)
    return started, release


def _wait_for(cond: Any) -> bool:
    """Poll `cond` until true or WAIT_S passes (the switch happens on the builder thread)."""
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_set_threads_during_prebuild_takes_effect(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = OnnxRuntime(tiny_model, threads=1, max_threads=2, prebuild=False)
    started, release = _blocking_build(rt, monkeypatch, blocked=2)
    prebuild = threading.Thread(target=rt._prebuild_all, daemon=True)
    prebuild.start()
    assert started.wait(WAIT_S)
    rt.set_threads(2)  # 2 is in _building: the prebuild owns it
    assert rt.threads == 2
    assert _active_session_threads(rt) == 1  # serves with the closest ready one meanwhile
    assert rt.active_threads == 1  # ... and says so
    release.set()
    prebuild.join(WAIT_S)
    assert not prebuild.is_alive()
    assert _wait_for(lambda: _active_session_threads(rt) == 2)
    assert rt.active_threads == 2
    out = rt.infer({"x": np.zeros((3, 4), np.float32)})
    assert np.array_equal(out["y"], np.ones((3, 4), np.float32))


def test_stale_build_does_not_override_newer_set_threads(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = OnnxRuntime(tiny_model, threads=1, max_threads=3, prebuild=False)
    started, release = _blocking_build(rt, monkeypatch, blocked=3)
    rt.set_threads(3)  # starts a background build of 3, which blocks
    assert started.wait(WAIT_S)
    rt.set_threads(1)  # changed our mind before 3 is ready
    release.set()
    assert _wait_for(lambda: 3 in rt.ready_thread_counts)
    assert rt.threads == 1 and rt.active_threads == 1 and _active_session_threads(rt) == 1


def test_closer_session_serves_while_the_wanted_one_builds(tiny_model: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    rt = OnnxRuntime(tiny_model, threads=1, max_threads=4, prebuild=False)
    started, release = _blocking_build(rt, monkeypatch, blocked=4)
    rt.set_threads(4)  # only 1 is ready: 1 serves, 4 builds (blocked)
    assert started.wait(WAIT_S)
    rt._build(3)  # another count becomes ready, closer to 4 than 1
    assert rt.active_threads == 3 and _active_session_threads(rt) == 3
    release.set()
    assert _wait_for(lambda: rt.active_threads == 4)
    assert _active_session_threads(rt) == 4


class _LaggingRuntime:
    """A runtime that wants 4 threads but still runs with 1 (its 4-thread session is building)."""

    inputs: list[Any] = []
    outputs: list[Any] = []
    labels = None
    max_threads = 4
    threads = 4
    active_threads = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {}


def _infer_message(batch_id: int) -> bytes:
    """A batch of no tensors, in the replica IPC format (sponge.runtime.ipc)."""
    return ipc.encode({"op": "infer", "id": batch_id, "in": None, "in_size": 0, "out": None, "out_size": 0,
                       "inputs": []})


def test_worker_reports_the_thread_count_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    import sponge.runtime.onnx_runtime as onnx_runtime
    from sponge.runtime.worker import worker_main

    monkeypatch.setattr(onnx_runtime, "OnnxRuntime", _LaggingRuntime)
    server, child = Pipe()
    worker = threading.Thread(target=worker_main, args=(child, "unused.onnx", 4, 4, False), daemon=True)
    worker.start()
    try:
        assert server.poll(WAIT_S) and server.recv()[0] == "ready"
        server.send_bytes(_infer_message(7))
        assert server.poll(WAIT_S)
        answer, _ = ipc.decode(server.recv_bytes())
        assert (answer["op"], answer["id"], answer["threads"]) == ("result", 7, 1)
    finally:
        server.send_bytes(ipc.encode({"op": "stop"}))
        worker.join(WAIT_S)
    assert not worker.is_alive()


class _SlowRuntime(_LaggingRuntime):
    started = threading.Event()

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.started.set()
        time.sleep(0.2)
        return {}


def test_worker_exits_quietly_when_the_server_goes_away_mid_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shutdown with a batch in flight (e.g. an idle probe): the answer has no reader; the worker ends
    without a BrokenPipeError traceback."""
    import sponge.runtime.onnx_runtime as onnx_runtime
    from sponge.runtime.worker import worker_main

    monkeypatch.setattr(onnx_runtime, "OnnxRuntime", _SlowRuntime)
    server, child = Pipe()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker_main(child, "unused.onnx", 1, 1, False)
        except BaseException as exc:  # what would print a traceback in the replica process
            errors.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    assert server.poll(WAIT_S) and server.recv()[0] == "ready"
    server.send_bytes(_infer_message(1))
    assert _SlowRuntime.started.wait(WAIT_S)
    server.close()
    worker.join(WAIT_S)
    assert not worker.is_alive() and errors == []
