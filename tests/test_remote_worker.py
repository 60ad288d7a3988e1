"""Remote replicas (issue 12 item 1): the frame codec, `sponge worker` + `RemoteReplica` on loopback,
the worker following its CPU quota, and faults across network namespaces (a worker SIGKILLed
mid-batch, a link cut): no request hangs, none is answered twice, the remaining worker serves on.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import struct
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
import pytest

from helpers import wait_listening
from sponge.models.trivial import trivial_model_path, trivial_weights
from sponge.runtime import frames as fr
from sponge.runtime.onnx_runtime import OnnxRuntime
from sponge.runtime.remote import RemoteReplica, WorkerUnreachable
from sponge.runtime.remote_worker import WorkerServer
from sponge.runtime.replica import ReplicaDied, ReplicaError

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 10.0  # bounds a hang; never a timing assertion


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture(scope="module")
def model() -> Path:
    return trivial_model_path()


@pytest.fixture(scope="module")
def runtime(model: Path) -> OnnxRuntime:
    return OnnxRuntime(model, threads=1, max_threads=min(2, os.cpu_count() or 1))


def expected(x: np.ndarray) -> np.ndarray:
    w, b = trivial_weights()
    return x @ w + b


@asynccontextmanager
async def worker(runtime: Any, **kw: Any) -> AsyncIterator[WorkerServer]:
    kw.setdefault("follow_limit", False)
    srv = WorkerServer(runtime, "127.0.0.1", 0, **kw)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


# ---- framing -----------------------------------------------------------------------------------

SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 255, 7]], dtype=np.uint8),
    "UINT16": np.array([0, 65535], dtype=np.uint16),
    "UINT32": np.array([0, 2**32 - 1], dtype=np.uint32),
    "UINT64": np.array([0, 2**64 - 1], dtype=np.uint64),
    "INT8": np.array([-128, 127], dtype=np.int8),
    "INT16": np.array([-(2**15), 2**15 - 1], dtype=np.int16),
    "INT32": np.array([[-(2**31)], [2**31 - 1]], dtype=np.int32),
    "INT64": np.array([-(2**63), 2**63 - 1], dtype=np.int64),
    "FP16": np.array([0.5, -65504.0, np.inf], dtype=np.float16),
    "FP32": np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32),
    "FP64": np.array([np.pi, -0.0, 1e300]),
    "BYTES": np.array([[b"", b"cat"], [b"\x00\xff", "t\u00e9".encode()]], dtype=object),
}


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_round_trip_every_v2_datatype(datatype: str) -> None:
    arr = SAMPLES[datatype]
    empty = arr.reshape(-1)[:0].reshape(0, *arr.shape[1:])
    data = fr.encode_bytes(fr.RESULT, 2**64 - 1, {"infer_ms": 1.5, "threads": 2}, {"a": arr, "empty": empty})
    frame = fr.decode_bytes(data)
    assert (frame.kind, frame.batch_id) == (fr.RESULT, 2**64 - 1)
    assert frame.meta["infer_ms"] == 1.5 and frame.meta["threads"] == 2
    assert [d["datatype"] for d in frame.meta["tensors"]] == [datatype, datatype]
    out = frame.tensors["a"]
    assert out.shape == arr.shape and out.dtype == arr.dtype
    assert (out == arr).all() if datatype != "FP64" else np.array_equal(out, arr)
    assert frame.tensors["empty"].shape == empty.shape


def test_big_endian_and_strided_arrays_travel_as_their_values() -> None:
    be = np.arange(6, dtype=">i4").reshape(2, 3)
    strided = np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]
    frame = fr.decode_bytes(fr.encode_bytes(fr.INFER, 1, None, {"be": be, "s": strided}))
    assert np.array_equal(frame.tensors["be"], be) and frame.tensors["be"].dtype == np.dtype("<i4")
    assert np.array_equal(frame.tensors["s"], strided)


def test_no_tensor_frames_and_header_layout() -> None:
    data = fr.encode_bytes(fr.PING, 42)
    assert data[:4] == b"SPNG" and len(data) == fr.HEADER.size + 2  # meta "{}"
    assert struct.unpack("!Q", data[8:16]) == (42,)
    assert fr.decode_bytes(data).meta == {}


def _frame(meta: bytes, body: bytes = b"", kind: int = fr.INFER, bid: int = 9, magic: bytes = fr.MAGIC,
           version: int = 1, reserved: int = 0) -> bytes:
    return fr.HEADER.pack(magic, version, kind, reserved, bid, len(meta), len(body)) + meta + body


def _t(name: str = "x", dt: str = "FP32", shape: Any = (2,), nbytes: Any = 8) -> bytes:
    import orjson

    return orjson.dumps({"tensors": [{"name": name, "datatype": dt, "shape": list(shape) if isinstance(shape, tuple)
                                      else shape, "nbytes": nbytes}]})


MALFORMED = [
    ("bad magic", _frame(b"{}", magic=b"POST"), "bad magic", False),
    ("version", _frame(b"{}", version=7), "unsupported frame version 7", False),
    ("reserved", _frame(b"{}", reserved=1), "reserved header field", False),
    ("unknown kind", _frame(b"{}", kind=99), "unknown message kind 99", True),
    ("meta not json", _frame(b"{nope"), "meta is not valid JSON", True),
    ("meta not object", _frame(b"[1]"), "meta must be a JSON object", True),
    ("body without tensors", _frame(b"{}", b"xx"), "2 body bytes but no 'tensors'", True),
    ("unknown datatype", _frame(_t(dt="FP128"), bytes(8)), "datatype 'FP128' is not a V2 datatype", True),
    ("negative dim", _frame(_t(shape=[-2]), bytes(8)), "shape must be a list", True),
    ("non-int dim", _frame(_t(shape=[2.0]), bytes(8)), "shape must be a list", True),
    ("size mismatch", _frame(_t(shape=(3,)), bytes(8)), "is 12 bytes, nbytes says 8", True),
    ("nbytes beyond body", _frame(_t(nbytes=16), bytes(8)), "beyond the body's 8", True),
    ("trailing body", _frame(_t(), bytes(9)), "1 body bytes after the last tensor", True),
    ("empty name", _frame(_t(name=""), bytes(8)), "name must be a non-empty string", True),
    ("bool not 0/1", _frame(_t(dt="BOOL", nbytes=2), b"\x01\x02"), "BOOL elements must be 0 or 1", True),
    ("bytes too few", _frame(_t(dt="BYTES", shape=(3,), nbytes=8), bytes(8)), "need at least 12 bytes", True),
    ("bytes overrun", _frame(_t(dt="BYTES", shape=(1,), nbytes=5), struct.pack("<I", 9) + b"a"),
     "longer than the data", True),
    ("bytes trailing", _frame(_t(dt="BYTES", shape=(1,), nbytes=6), struct.pack("<I", 1) + b"ab"),
     "1 trailing bytes", True),
]


@pytest.mark.parametrize("data,message,recoverable", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_frames_give_clear_errors(data: bytes, message: str, recoverable: bool) -> None:
    with pytest.raises(fr.FrameError, match=message) as info:
        fr.decode_bytes(data)
    assert info.value.recoverable is recoverable
    if recoverable:
        assert info.value.batch_id == 9


def test_sizes_beyond_the_limits_are_refused_before_reading() -> None:
    head = fr.HEADER.pack(fr.MAGIC, 1, fr.INFER, 0, 1, fr.MAX_META_BYTES + 1, 0)
    with pytest.raises(fr.FrameError, match="meta length"):
        fr.parse_header(head)
    head = fr.HEADER.pack(fr.MAGIC, 1, fr.INFER, 0, 1, 2, 1 << 40)
    with pytest.raises(fr.FrameError, match="body length 1099511627776 exceeds the limit"):
        fr.parse_header(head, max_body=1 << 20)


def test_worker_addresses() -> None:
    from sponge.runtime.remote import parse_addresses, remote_replicas

    assert parse_addresses("a:1, b ,[::1]:9001,[fe80::1],10.0.0.2:9000") == [
        ("a", 1), ("b", 9000), ("::1", 9001), ("fe80::1", 9000), ("10.0.0.2", 9000)]
    for bad in ("a:0", "a:x", "[::1]x", ":9000"):
        with pytest.raises(ValueError):
            parse_addresses(bad)
    reps = remote_replicas("h1,h2:9100", batch_timeout_s=3)
    assert [(r.name, r.address, r.batch_timeout_s) for r in reps] == [
        ("remote-0", "h1:9000", 3), ("remote-1", "h2:9100", 3)]


# ---- the worker on loopback ----------------------------------------------------------------------

async def _raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _http(port: int, request: bytes, host: str = "127.0.0.1") -> tuple[int, bytes]:
    r, w = await asyncio.open_connection(host, port)
    w.write(request)
    data = await asyncio.wait_for(r.read(), WAIT_S)
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_worker_answers_malformed_frames_and_keeps_serving(runtime: OnnxRuntime) -> None:
    async def main() -> None:
        async with worker(runtime) as srv:
            x = np.ones((2, 16), np.float32)
            r, w = await _raw(srv.port)
            for data, message, recoverable in [m[1:] for m in MALFORMED if m[3]]:
                w.write(data)
                frame = await asyncio.wait_for(fr.read_frame(r), WAIT_S)
                assert frame.kind == fr.ERROR and frame.meta["code"] == "bad_frame"
                assert message in frame.meta["error"] and frame.batch_id == 9
            # the same connection still serves: a good batch, then a batch the model rejects
            w.writelines(fr.encode(fr.INFER, 10, None, {"x": x}))
            frame = await asyncio.wait_for(fr.read_frame(r), WAIT_S)
            assert frame.kind == fr.RESULT and frame.batch_id == 10
            np.testing.assert_allclose(frame.tensors["y"], expected(x), rtol=1e-5, atol=1e-5)
            w.writelines(fr.encode(fr.INFER, 11, None, {"x": np.ones((2, 3), np.float32)}))
            frame = await asyncio.wait_for(fr.read_frame(r), WAIT_S)
            assert frame.kind == fr.ERROR and frame.meta["code"] == "runtime" and frame.batch_id == 11
            w.writelines(fr.encode(fr.RESULT, 12))  # a kind a worker does not take
            frame = await asyncio.wait_for(fr.read_frame(r), WAIT_S)
            assert frame.meta["code"] == "unexpected"
            # an unrecoverable header: ERROR, then that connection (only) is closed
            w.write(_frame(b"{}", version=3))
            frame = await asyncio.wait_for(fr.read_frame(r), WAIT_S)
            assert "unsupported frame version 3" in frame.meta["error"]
            assert await asyncio.wait_for(r.read(), WAIT_S) == b""
            w.close()
            r2, w2 = await _raw(srv.port)
            w2.writelines(fr.encode(fr.INFER, 13, None, {"x": x}))
            assert (await asyncio.wait_for(fr.read_frame(r2), WAIT_S)).kind == fr.RESULT
            w2.close()
            assert srv.bad_frames == sum(m[3] for m in MALFORMED) + 1

    run(main())


def test_worker_http_probes_on_the_same_port(runtime: OnnxRuntime) -> None:
    async def main() -> None:
        async with worker(runtime) as srv:
            assert await _http(srv.port, b"GET /live HTTP/1.1\r\nHost: w\r\n\r\n") == (200, b'{"live":true}')
            status, body = await _http(srv.port, b"GET /ready HTTP/1.1\r\nHost: w\r\n\r\n")
            assert status == 200 and b'"ready":true' in body
            status, body = await _http(srv.port, b"GET /status?x=1 HTTP/1.1\r\n\r\n")
            assert status == 200 and b'"threads"' in body and b'"limit_m"' in body
            assert (await _http(srv.port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
            assert (await _http(srv.port, b"POST /ready HTTP/1.1\r\n\r\n"))[0] == 405
            assert (await _http(srv.port, b"garbage\r\n\r\n"))[0] == 400
            srv.draining = True
            assert (await _http(srv.port, b"GET /ready HTTP/1.1\r\n\r\n"))[0] == 503

    run(main())


def test_remote_replica_equals_local_runtime(runtime: OnnxRuntime) -> None:
    async def main() -> None:
        async with worker(runtime, model="trivial") as srv:
            rep = RemoteReplica("r0", "127.0.0.1", srv.port)
            await rep.start()
            assert rep.ready and not rep.busy and rep.pid is None
            assert [(s.name, s.datatype, s.shape) for s in rep.inputs] == [("x", "FP32", (-1, 16))]
            assert [s.name for s in rep.outputs] == ["y"]
            rng = np.random.default_rng(3)
            for b in (1, 8, 32):
                x = rng.standard_normal((b, 16)).astype(np.float32)
                res = await rep.infer({"x": x})
                np.testing.assert_array_equal(res.outputs["y"], runtime.infer({"x": x})["y"])
                assert res.threads == runtime.active_threads and res.infer_ms > 0
                assert res.outputs["y"].flags.writeable  # as a local replica's
            with pytest.raises(ReplicaError, match="worker 127.0.0.1"):
                await rep.infer({"x": np.ones((1, 3), np.float32)})
            assert rep.ready  # a batch the runtime rejects does not kill the replica
            st = await rep.status()
            assert st["batches"] == 3 and st["errors"] == 1 and st["model"] == "trivial"
            rep.set_threads(1)
            await rep.stop()
            assert not rep.ready
            with pytest.raises(ReplicaDied):
                await rep.infer({"x": np.ones((1, 16), np.float32)})

    run(main())


class SlowRuntime:
    """Wraps a runtime: each batch waits `delay_s` first (in the worker's executor thread)."""

    def __init__(self, inner: OnnxRuntime, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.inputs, self.outputs, self.labels = inner.inputs, inner.outputs, None
        self.max_threads, self.threads, self.active_threads = inner.max_threads, 1, 1

    def set_threads(self, n: int) -> None:
        self.threads = self.active_threads = n

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self.delay_s)
        return self.inner.infer(batch)


def test_late_answer_of_a_cancelled_batch_is_discarded(runtime: OnnxRuntime) -> None:
    """The core's watchdog cancels infer(); the worker's answer arrives later and must not be taken
    for the next batch's."""
    async def main() -> None:
        async with worker(SlowRuntime(runtime, 0.3)) as srv:
            rep = RemoteReplica("r0", "127.0.0.1", srv.port)
            await rep.start()
            a, b = np.full((1, 16), 1.0, np.float32), np.full((1, 16), 2.0, np.float32)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await rep.infer({"x": a})
            assert not rep.busy
            res = await rep.infer({"x": b})  # queued behind a's run in the worker; a's answer comes first
            np.testing.assert_allclose(res.outputs["y"], expected(b), rtol=1e-5, atol=1e-5)
            assert rep.late_answers == 1
            await rep.stop()

    run(main())


def test_batch_timeout_fails_with_replica_died_and_restart_reconnects(runtime: OnnxRuntime) -> None:
    async def main() -> None:
        async with worker(SlowRuntime(runtime, 1.0)) as srv:
            deaths: list[str] = []
            rep = RemoteReplica("r0", "127.0.0.1", srv.port, batch_timeout_s=0.3, ping_interval_s=5)
            await rep.start()
            rep.on_death = lambda r: deaths.append(r.name)
            t0 = time.monotonic()
            with pytest.raises(ReplicaDied, match="timed out after 0.3 s"):
                await rep.infer({"x": np.ones((1, 16), np.float32)})
            assert time.monotonic() - t0 < 1.0
            assert not rep.ready and deaths == ["r0"]
            await rep.restart()
            assert rep.ready and rep.restarts == 1
            await rep.stop()

    run(main())


def test_a_draining_worker_answers_its_batch_in_flight_and_takes_no_new_ones(runtime: OnnxRuntime) -> None:
    async def main() -> None:
        srv = WorkerServer(SlowRuntime(runtime, 0.4), "127.0.0.1", 0, follow_limit=False)
        await srv.start()
        rep = RemoteReplica("r0", "127.0.0.1", srv.port, ping_interval_s=0.05)
        await rep.start()
        x = np.ones((1, 16), np.float32)
        batch = asyncio.create_task(rep.infer({"x": x}))
        await asyncio.sleep(0.05)
        closing = asyncio.create_task(srv.close(drain_s=5, notice_s=0.3))
        assert await _until(lambda: _true(not rep.ready), 2)  # told by a PONG, before the batch ends
        assert not batch.done()
        np.testing.assert_allclose((await batch).outputs["y"], expected(x), rtol=1e-5, atol=1e-5)
        # a new connection is refused work: told "draining" while the worker still listens, refused once
        # its notice period is over (which comes first depends on how busy the host is)
        with pytest.raises(WorkerUnreachable, match="draining|cannot connect"):
            await RemoteReplica("r1", "127.0.0.1", srv.port).start()
        await closing
        assert await _until(lambda: _true(rep._conn is None), 2)  # then the worker closed the connection

    run(main())


async def _mute_worker(stop: asyncio.Event, info: dict[str, Any]) -> tuple[asyncio.Server, int]:
    """A 'worker' that answers the status request and then never again (hung host, silent drop)."""
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        frame = await fr.read_frame(r, first=await r.readexactly(4))
        w.writelines(fr.encode(fr.STATUS_REPLY, frame.batch_id, info))
        await w.drain()
        await stop.wait()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_worker_that_stops_answering_fails_the_batch_by_ping_timeout(runtime: OnnxRuntime) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        info = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}], "outputs": [], "threads": 1}
        server, port = await _mute_worker(stop, info)
        rep = RemoteReplica("r0", "127.0.0.1", port, ping_interval_s=0.1, ping_timeout_s=0.3, batch_timeout_s=30)
        await rep.start()
        t0 = time.monotonic()
        with pytest.raises(ReplicaDied, match="no answer to a ping within 0.3 s"):
            await rep.infer({"x": np.ones((1, 16), np.float32)})
        assert time.monotonic() - t0 < 2.0 and not rep.ready
        stop.set()
        server.close()

    run(main())


def test_a_malformed_answer_fails_the_batch_and_drops_the_connection() -> None:
    """The front door does not trust the network either: a RESULT whose sizes do not add up is a dead
    connection (ReplicaDied), not a hang or a wrong answer."""
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        frame = await fr.read_frame(r, first=await r.readexactly(4))
        w.writelines(fr.encode(fr.STATUS_REPLY, frame.batch_id, {"inputs": [], "outputs": []}))
        frame = await fr.read_frame(r)
        w.write(_frame(_t(shape=(3,)), bytes(8), kind=fr.RESULT, bid=frame.batch_id))
        await w.drain()
        await asyncio.sleep(5)

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        rep = RemoteReplica("r0", "127.0.0.1", server.sockets[0].getsockname()[1])
        await rep.start()
        with pytest.raises(ReplicaDied, match="malformed frame from the worker.*nbytes says 8"):
            await rep.infer({"x": np.ones((1, 16), np.float32)})
        assert not rep.ready
        server.close()

    run(main())


def test_duplicate_and_unknown_answers_are_discarded() -> None:
    """A worker (or a network) that answers a batch twice, or answers an id never sent, cannot make the
    front door answer anything twice: the first answer is taken, the rest discarded and counted."""
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        frame = await fr.read_frame(r, first=await r.readexactly(4))
        w.writelines(fr.encode(fr.STATUS_REPLY, frame.batch_id, {"inputs": [], "outputs": []}))
        while True:
            frame = await fr.read_frame(r)
            if frame.kind != fr.INFER:
                continue
            y = frame.tensors["x"] * 2
            for _ in range(2):  # twice
                w.writelines(fr.encode(fr.RESULT, frame.batch_id, {"infer_ms": 1.0, "threads": 1}, {"y": y}))
            w.writelines(fr.encode(fr.RESULT, 12345, {"infer_ms": 1.0}, {"y": y + 1}))  # never sent
            await w.drain()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        rep = RemoteReplica("r0", "127.0.0.1", server.sockets[0].getsockname()[1])
        await rep.start()
        for k in range(5):
            x = np.full((2, 3), float(k), np.float32)
            res = await rep.infer({"x": x})
            np.testing.assert_array_equal(res.outputs["y"], x * 2)  # its own answer, not a stale one
        await asyncio.sleep(0.05)
        assert rep.late_answers == 10 and rep.ready
        await rep.stop()
        server.close()

    run(main())


def test_restart_waits_with_backoff_until_the_worker_is_back(runtime: OnnxRuntime) -> None:
    async def main() -> None:
        srv = WorkerServer(runtime, "127.0.0.1", 0, follow_limit=False)
        await srv.start()
        port = srv.port
        rep = RemoteReplica("r0", "127.0.0.1", port, backoff_initial_s=0.05, backoff_max_s=0.2,
                            connect_timeout_s=1)
        await rep.start()
        await srv.close()
        await asyncio.sleep(0.1)  # the worker's side closed: the replica notices
        assert not rep.ready
        with pytest.raises(WorkerUnreachable):
            await RemoteReplica("r1", "127.0.0.1", port, connect_timeout_s=1).start()
        task = asyncio.create_task(rep.restart())
        await asyncio.sleep(0.5)
        assert not task.done() and not rep.ready  # dropped while the worker is gone
        srv2 = WorkerServer(runtime, "127.0.0.1", port, follow_limit=False)
        await srv2.start()
        await asyncio.wait_for(task, WAIT_S)
        assert rep.ready
        res = await rep.infer({"x": np.ones((1, 16), np.float32)})
        assert res.outputs["y"].shape == (1, 16)
        await rep.stop()
        await srv2.close()

    run(main())


def test_serving_core_uses_remote_replicas_unchanged(runtime: OnnxRuntime) -> None:
    from sponge.scheduling.batcher import ExpiryPolicy
    from sponge.server.core import ServingCore
    from sponge.server.metrics import Metrics
    from sponge.server.slo import Budget

    async def main() -> None:
        async with worker(runtime) as s1, worker(runtime) as s2:
            reps = [RemoteReplica("a", "127.0.0.1", s1.port), RemoteReplica("b", "127.0.0.1", s2.port)]
            for r in reps:
                await r.start()
            core = ServingCore("m", reps, 4, 64, ExpiryPolicy.REJECT, 0.0, Metrics(), 1000)  # type: ignore[arg-type]
            core.start()
            rng = np.random.default_rng(5)
            xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(40)]
            now = core.clock()
            pend = [core.submit({"x": x}, 1, Budget(60000, 0, 60000, now + 60000), now) for x in xs]
            served = await asyncio.wait_for(asyncio.gather(*(p.future for p in pend)), WAIT_S)
            for x, s in zip(xs, served):
                np.testing.assert_allclose(s.outputs["y"], expected(x), rtol=1e-5, atol=1e-5)
            await core.close()
            assert not any(r.ready for r in reps)

    run(main())


# ---- the worker follows its CPU quota ------------------------------------------------------------

def _container_v2(root: Path, quota: str) -> Path:
    """A / as seen inside a container with its own cgroup namespace (cgroup v2): the pod's cpu.max at
    the mount point."""
    (root / "proc/self").mkdir(parents=True, exist_ok=True)
    (root / "proc/self/cgroup").write_text("0::/\n")
    (root / "proc/self/mountinfo").write_text("41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    (root / "sys/fs/cgroup").mkdir(parents=True, exist_ok=True)
    (root / "sys/fs/cgroup/cpu.max").write_text(quota)
    return root / "sys/fs/cgroup/cpu.max"


async def _until(cond: Any, timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs to see a thread count change")
def test_worker_follows_a_cgroup_v2_quota_change(model: Path, tmp_path: Path) -> None:
    if len(os.sched_getaffinity(0)) < (os.cpu_count() or 1):
        pytest.skip("the CPU affinity is restricted: it would cap the limit too")
    cpu_max = _container_v2(tmp_path, "100000 100000\n")

    async def main() -> None:
        rt = OnnxRuntime(model, threads=1, max_threads=2)
        async with worker(rt, follow_limit=True, limit_root=tmp_path, limit_poll_s=0.02) as srv:
            rep = RemoteReplica("r0", "127.0.0.1", srv.port)
            await rep.start()
            assert rep.worker_status["limit_m"] == 1000 and rep.worker_status["threads"] == 1
            cpu_max.write_text("150000 100000\n")

            async def at(threads: int, limit: int | None) -> bool:
                st = await rep.status()
                return st["threads"] == threads and st["limit_m"] == limit

            assert await _until(lambda: at(2, 1500))
            res = await rep.infer({"x": np.ones((2, 16), np.float32)})
            assert res.threads == 2  # each result says the count it ran with
            cpu_max.write_text("50000 100000\n")
            assert await _until(lambda: at(1, 500))
            rep.set_threads(2)  # the front door cannot ask beyond the worker's own limit
            await asyncio.sleep(0.1)
            assert (await rep.status())["threads"] == 1
            cpu_max.write_text("max 100000\n")
            assert await _until(lambda: at(2, None))
            await rep.stop()

    run(main())


V1_CPU = Path("/sys/fs/cgroup/cpu")


def _v1_writable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a cgroup v1 cpu group"
    if not (V1_CPU / "cpu.cfs_quota_us").exists():
        return "no cgroup v1 cpu controller at /sys/fs/cgroup/cpu"
    if (os.cpu_count() or 1) < 2:
        return "needs 2 CPUs to see a thread count change"
    return None


@pytest.fixture
def v1_group() -> Any:
    """A child cgroup of the v1 cpu controller (sponge-t-<random>); its tasks go back to the root and
    it is removed at teardown."""
    reason = _v1_writable()
    if reason:
        pytest.skip(reason)
    d = V1_CPU / f"sponge-t-{secrets.token_hex(4)}"
    d.mkdir()
    yield d
    try:
        for pid in (d / "cgroup.procs").read_text().split():
            try:
                (V1_CPU / "cgroup.procs").write_text(pid)
            except OSError:
                pass
    finally:
        for _ in range(50):
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _start_worker(model: Path, host: str, port: int, *extra: str, prefix: tuple[str, ...] = ()
                  ) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([*prefix, sys.executable, "-m", "sponge.cli", "worker", "--model", str(model),
                             "--host", host, "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def _kill(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)


@pytest.mark.slow
def test_worker_process_follows_a_v1_quota_written_from_outside(model: Path, v1_group: Path) -> None:
    (v1_group / "cpu.cfs_period_us").write_text("100000")
    (v1_group / "cpu.cfs_quota_us").write_text("200000")
    p = _start_worker(model, "127.0.0.1", 0, "--max-threads", "2", "--limit-poll-ms", "20")
    try:
        (v1_group / "cgroup.procs").write_text(str(p.pid))  # every thread of it
        port = wait_listening(p)

        async def main() -> None:
            rep = RemoteReplica("r0", "127.0.0.1", port)
            await rep.start()

            async def at(threads: int, limit: int | None) -> bool:
                st = await rep.status()
                return st["threads"] == threads and st["limit_m"] == limit

            assert await _until(lambda: at(2, 2000))
            (v1_group / "cpu.cfs_quota_us").write_text("100000")
            assert await _until(lambda: at(1, 1000))
            res = await rep.infer({"x": np.ones((3, 16), np.float32)})
            assert res.threads == 1
            (v1_group / "cpu.cfs_quota_us").write_text("-1")
            assert await _until(lambda: at(2, None))
            await rep.stop()

        run(main())
    finally:
        _kill(p)


def test_worker_command_refuses_a_missing_model() -> None:
    out = subprocess.run([sys.executable, "-m", "sponge.cli", "worker", "--model", "/nonexistent.onnx"],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 2 and "no such file" in out.stderr


# ---- network namespaces ------------------------------------------------------------------------

def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns, veth pairs)"
    name = f"sponge-t-probe{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"'ip netns add' fails here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


class Netns:
    """Namespaces sponge-t-<suffix><i>, each joined to the host by a veth pair on a private /30:
    host side 10.a.b.(4i+1), worker side 10.a.b.(4i+2)."""

    def __init__(self, n: int) -> None:
        self.suffix = secrets.token_hex(3)
        a, b = 100 + secrets.randbelow(150), secrets.randbelow(250)
        self.names = [f"sponge-t-{self.suffix}{i}" for i in range(n)]
        self.host_links = [f"st{self.suffix}{i}h" for i in range(n)]
        self.host_addr = [f"10.{a}.{b}.{4 * i + 1}" for i in range(n)]
        self.addr = [f"10.{a}.{b}.{4 * i + 2}" for i in range(n)]
        self.created: list[str] = []

    def setup(self) -> None:
        for i, ns in enumerate(self.names):
            _ip("netns", "add", ns)
            self.created.append(ns)
            peer = f"st{self.suffix}{i}n"
            _ip("link", "add", self.host_links[i], "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", ns)
            _ip("addr", "add", f"{self.host_addr[i]}/30", "dev", self.host_links[i])
            _ip("link", "set", self.host_links[i], "up")
            _ip("addr", "add", f"{self.addr[i]}/30", "dev", peer, ns=ns)
            _ip("link", "set", peer, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)

    def teardown(self) -> None:
        for i, ns in enumerate(self.created):
            _ip("netns", "del", ns, check=False)  # deletes its veth end, and so the pair
            _ip("link", "del", self.host_links[i], check=False)

    def enter(self, i: int) -> tuple[str, ...]:
        """Command prefix running a program in namespace i's network only (its /sys, and so its cgroup
        view, stay the host's: `ip netns exec` would remount /sys)."""
        return ("nsenter", f"--net=/run/netns/{self.names[i]}")


@pytest.fixture(scope="module")
def heavy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """x [N, 16] -> 16 x (MatMul 1024x1024, Tanh) -> [N, 16]: ~30 Mflop per row, so a batch of 4 is in the
    worker for ~10-20 ms (no `tc netem` here to stretch a batch in flight; a batch must be running when
    its worker is killed). One shared 4 MiB weight keeps the file small."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(11)
    w_in = (rng.standard_normal((16, 1024)) / 4).astype(np.float32)
    w = (rng.standard_normal((1024, 1024)) / 32).astype(np.float32)
    w_out = (rng.standard_normal((1024, 16)) / 32).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h0"])]
    for k in range(16):
        nodes.append(helper.make_node("MatMul", [f"h{k}", "w"], [f"m{k}"]))
        nodes.append(helper.make_node("Tanh", [f"m{k}"], [f"h{k + 1}"]))
    nodes.append(helper.make_node("MatMul", ["h16", "w_out"], ["y"]))
    graph = helper.make_graph(nodes, "heavy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
                              [numpy_helper.from_array(a, n) for a, n in ((w_in, "w_in"), (w, "w"), (w_out, "w_out"))])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path_factory.mktemp("heavy") / "heavy.onnx"
    onnx.save(m, str(path))
    return path


@pytest.fixture
def netns3() -> Any:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    net = Netns(3)
    try:
        net.setup()
        yield net
    finally:
        net.teardown()


@pytest.mark.slow
def test_netns_worker_killed_mid_batch_and_link_cut(heavy_model: Path, netns3: Netns) -> None:
    """Three workers in their own network namespaces behind veth links, served through one
    ServingCore in the host namespace. Worker 0 is SIGKILLed with a batch in flight; worker 1's link
    is cut. Every request is answered once (served correctly, or failed), within the timeouts: a batch
    in flight at a fault is queued again for another replica; worker 2 keeps serving; worker 1 is back
    once its link is."""
    from sponge.scheduling.batcher import ExpiryPolicy
    from sponge.server.core import InferenceFailed, ServingCore
    from sponge.server.metrics import Metrics
    from sponge.server.slo import Budget

    net = netns3
    procs = [_start_worker(heavy_model, net.addr[i], 9000, "--max-threads", "1", prefix=net.enter(i))
             for i in range(3)]
    local = OnnxRuntime(heavy_model, threads=1, max_threads=1, prebuild=False)
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(8)]
    refs = [local.infer({"x": x})["y"] for x in xs]
    try:
        for p in procs:
            assert wait_listening(p) == 9000

        async def main() -> None:
            reps = [RemoteReplica(f"w{i}", net.addr[i], 9000, ping_interval_s=0.2, ping_timeout_s=0.6,
                                  batch_timeout_s=5.0, backoff_initial_s=0.05, backoff_max_s=0.3,
                                  connect_timeout_s=1.0) for i in range(3)]
            for r in reps:
                await r.start()
            for addr in net.addr:  # the readiness probe a kubelet sends, on the data port, over the veth
                status, body = await _http(9000, b"GET /ready HTTP/1.1\r\nHost: w\r\n\r\n", addr)
                assert status == 200 and b'"ready":true' in body
            core = ServingCore("m", reps, 4, 4096, ExpiryPolicy.REJECT, 0.0, Metrics(), 1000,  # type: ignore[arg-type]
                               admission=False)
            core.start()
            outcomes: list[tuple[str, float, str, float]] = []  # (kind, wait s, replica or error, done at)
            answered: dict[int, int] = {}
            tasks = []

            async def one(k: int) -> None:
                x, ref = xs[k % len(xs)], refs[k % len(xs)]
                now = core.clock()
                t0 = time.monotonic()
                p = core.submit({"x": x}, 1, Budget(60000, 0, 60000, now + 60000), now)
                p.future.add_done_callback(lambda _f: answered.__setitem__(k, answered.get(k, 0) + 1))
                try:
                    s = await p.future
                    np.testing.assert_allclose(s.outputs["y"], ref, rtol=1e-4, atol=1e-5)  # its own answer
                    outcomes.append(("ok", time.monotonic() - t0, s.replica, time.monotonic()))
                except InferenceFailed as exc:
                    outcomes.append(("failed", time.monotonic() - t0, str(exc), time.monotonic()))

            async def load(seconds: float) -> None:
                end = time.monotonic() + seconds
                k = len(tasks)
                while time.monotonic() < end:
                    tasks.append(asyncio.create_task(one(k)))
                    k += 1
                    await asyncio.sleep(0.015)

            gen = asyncio.create_task(load(4.0))
            await asyncio.sleep(0.8)
            # mid-batch: kill the moment a batch was sent (it then runs ~10-20 ms in the worker)
            deadline = time.monotonic() + 5
            while reps[0].busy and time.monotonic() < deadline:
                await asyncio.sleep(0.0005)
            while not reps[0].busy and time.monotonic() < deadline:
                await asyncio.sleep(0.0005)
            assert reps[0].busy
            os.kill(procs[0].pid, signal.SIGKILL)
            await asyncio.sleep(0.5)
            _ip("link", "set", net.host_links[1], "down")
            t_cut = time.monotonic()
            await gen
            await asyncio.wait_for(asyncio.gather(*tasks), 15)
            # once both faults are noticed (ping timeout 0.6 s + interval 0.2 s, + slack for a loaded
            # host), only w2 serves
            after = [o for o in outcomes if o[3] > t_cut + 1.5]
            assert after and all(o[0] == "ok" and o[2] == "w2" for o in after), after[:5]
            assert not reps[0].ready and not reps[1].ready and reps[2].ready
            assert all(v == 1 for v in answered.values()) and len(answered) == len(tasks)  # each once
            failed = [o for o in outcomes if o[0] == "failed"]
            ok = [o for o in outcomes if o[0] == "ok"]
            assert len(ok) + len(failed) == len(tasks)
            # the batches in flight at the two faults are queued again (once) for another replica: served by
            # w2, unless one was re-dispatched to w1 just before its link was cut (then it failed)
            redispatched = core.metrics.registry.get_sample_value("sponge_requests_redispatched_total",
                                                                  {"model": "m"}) or 0.0
            assert redispatched >= 1 and len(failed) <= 16, (redispatched, failed)
            assert max(o[1] for o in outcomes) < 5.0  # bounded by the ping timeout, far below the batch timeout
            assert {o[2] for o in ok} == {"w0", "w1", "w2"}
            assert all("w0" in o[2] or "w1" in o[2] for o in failed), failed
            # w0's connection dropped at the SIGKILL (the kernel closes its socket: FIN, or RST if data was
            # unread), w1's behind the cut link too (no ping answered within 0.6 s)
            assert reps[0].deaths >= 1 and reps[1].deaths >= 1
            print(f"{len(ok)} served, {len(failed)} failed, longest wait {max(o[1] for o in outcomes):.2f} s")
            # the cut worker is back (reconnected by the core's restart loop) once its link is
            _ip("link", "set", net.host_links[1], "up")
            assert await _until(lambda: _true(reps[1].ready), 15)
            await core.close()
            assert reps[0].late_answers == 0 and reps[1].late_answers == 0

        run(main())
    finally:
        for p in procs:
            _kill(p)


async def _true(v: bool) -> bool:
    return v
