"""Front door and serving-core fixes: the upload counted once, sent_at bounded by the request's own
SLO, a watchdog on hung replicas, disconnected clients dropped from the queue, a clean shutdown that
answers in-flight requests without blocking the loop, and the arrival-rate gauge."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from helpers import until
from sponge.protocol.v2 import ProtocolError
from sponge.runtime.base import TensorSpec
from sponge.runtime.replica import BatchResult, Replica, ReplicaDied
from sponge.scheduling.batcher import ExpiryPolicy
from sponge.server.app import create_app
from sponge.server.core import InferenceFailed, ServingCore
from sponge.server.metrics import Metrics
from sponge.server.slo import Budget, request_budget


# ---- fakes --------------------------------------------------------------------------------------
class FakeReplica:
    """Replica interface without a process: doubles its input; `hang` holds every batch until released."""

    def __init__(self, name: str = "r0", hang: bool = False) -> None:
        self.name = name
        self.inputs = [TensorSpec("x", "FP32", (-1, 4))]
        self.outputs = [TensorSpec("y", "FP32", (-1, 4))]
        self.labels = None
        self.threads = 1
        self.pid = None
        self.hang = hang
        self.release = asyncio.Event()
        self.calls: list[dict[str, np.ndarray]] = []
        self.killed = 0
        self.restarts = 0
        self.on_death = None
        self._ready = True

    @property
    def ready(self) -> bool:
        return self._ready

    async def infer(self, inputs: dict[str, np.ndarray]) -> BatchResult:
        self.calls.append(inputs)
        if self.hang:
            await self.release.wait()
        return BatchResult({"y": inputs["x"] * 2}, 1.0, 1)

    def kill(self) -> None:
        self.killed += 1
        self._ready = False

    async def restart(self) -> None:
        self.restarts += 1
        self._ready = True

    async def stop(self) -> None:
        self._ready = False


def make_core(replica: FakeReplica, **kw) -> ServingCore:
    return ServingCore("m", [replica], 1, 16, ExpiryPolicy.REJECT, 0.0, Metrics(), 1000,  # type: ignore[list-item]
                       **kw)


def make_app(core: ServingCore):
    return create_app(core, max_body_bytes=1 << 20, default_slo_ms=1000.0, max_clock_skew_ms=200.0,
                      max_request_batch=8)


def infer_body(**params) -> bytes:
    return orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
                         "parameters": params})



def counter(core: ServingCore, outcome: str) -> float:
    return core.metrics.registry.get_sample_value("sponge_requests_total", {"model": "m", "outcome": outcome}) or 0.0


# ---- 1. budget: the upload counted once; sent_at bounded by the request's own SLO -------------------
def budget(params, now_wall=1000.0):
    return request_budget(params, {}, arrival_ms=5000.0, wall_now_s=now_wall, default_slo_ms=1000.0,
                          max_clock_skew_ms=200.0)


def test_sent_at_further_back_than_slo_plus_skew_is_refused_as_skewed():
    with pytest.raises(ProtocolError, match=r"parameters\.sent_at.*clock looks skewed") as exc:
        budget({"slo_ms": 500, "sent_at": 998.0})  # 2 s ago: more than 500 + 200 ms
    assert exc.value.status == 400
    with pytest.raises(ProtocolError, match=r"header x-sponge-sent-at.*skewed"):
        request_budget({}, {"x-sponge-sent-at": "990"}, 0.0, 1000.0, 1000.0, 200.0)  # default slo 1000 ms


def test_sent_at_within_slo_plus_skew_is_an_already_late_request_not_an_error():
    b = budget({"slo_ms": 500, "sent_at": 999.4})  # 600 ms ago: late (budget < 0), not refused
    assert b.network_ms == pytest.approx(600) and b.budget_ms == pytest.approx(-100)
    assert budget({"slo_ms": 500, "sent_at": 999.7}).budget_ms == pytest.approx(200)
    with pytest.raises(ProtocolError, match="in the future"):  # the future bound is kept
        budget({"slo_ms": 500, "sent_at": 1000.3})


def test_slow_upload_is_counted_once_not_twice():
    """A body that takes 500 ms to arrive: that time is inside the server's time (the deadline starts
    at arrival), so it must not also be counted as network delay from sent_at. Whatever the machine's
    load, network_ms + server_ms can then never exceed the time the client saw from sent_at to the answer
    (before the fix it did, by about the upload time)."""
    async def run():
        core = make_core(FakeReplica())
        core.start()
        sent_at = time.time()
        raw = infer_body(slo_ms=5000, sent_at=sent_at)

        async def slow_body():
            yield raw[:10]
            await asyncio.sleep(0.5)
            yield raw[10:]
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(core)),
                                         base_url="http://t") as c:
                r = await c.post("/v2/models/m/infer", content=slow_body())
                return r, (time.time() - sent_at) * 1000.0
        finally:
            await core.close()
    r, seen_ms = asyncio.run(run())
    assert r.status_code == 200, r.text
    p = r.json()["parameters"]
    assert p["server_ms"] >= 450  # the upload is in the server's time ...
    assert p["network_ms"] + p["server_ms"] <= seen_ms + 25, (p, seen_ms)  # ... and counted only there
    assert p["budget_ms"] == pytest.approx(5000 - p["network_ms"], abs=0.01)


# ---- 2. watchdog on a hung replica ---------------------------------------------------------------
def test_hung_replica_is_killed_after_the_watchdog_and_its_batch_fails_with_a_timeout():
    async def run():
        rep = FakeReplica(hang=True)
        core = make_core(rep, replica_timeout_floor_ms=200.0, replica_timeout_factor=10.0)
        core.start()
        try:
            now = core.clock()
            t0 = time.monotonic()
            p = core.submit({"x": np.ones((1, 4), np.float32)}, 1, Budget(60000, 0, 60000, now + 60000), now)
            with pytest.raises(InferenceFailed, match=r"replica r0 timed out after 200 ms"):
                await asyncio.wait_for(p.future, 10)
            waited = time.monotonic() - t0
            assert 0.19 <= waited < 5.0
            assert rep.killed == 1
            assert core.estimate(1) == 0.0  # the stall did not enter the latency estimate
            await until(lambda: rep.restarts == 1, what="restart")
            rep.hang = False
            now = core.clock()
            p2 = core.submit({"x": np.ones((1, 4), np.float32)}, 1, Budget(60000, 0, 60000, now + 60000), now)
            served = await asyncio.wait_for(p2.future, 10)
            np.testing.assert_array_equal(served.outputs["y"], 2 * np.ones((1, 4), np.float32))
        finally:
            await core.close()
    asyncio.run(run())


def test_watchdog_timeout_is_k_times_the_estimate_with_a_floor():
    core = make_core(FakeReplica(), replica_timeout_floor_ms=2000.0, replica_timeout_factor=10.0)
    assert core.watchdog_ms(4) == 2000.0  # nothing observed yet: the floor
    core.estimate.observe(4, 500.0)
    assert core.watchdog_ms(4) == 5000.0
    assert core.watchdog_ms(1, cpu_m=250) == 8000.0  # the floor is for a whole core: 4x at 250 m


# ---- 3. a disconnected client's request leaves the queue -----------------------------------------
async def start_uvicorn(app):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started or task.done(), what="uvicorn start")
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, port


def test_request_of_a_disconnected_client_is_removed_from_the_queue_and_counted():
    async def run():
        rep = FakeReplica(hang=True)
        core = make_core(rep)
        core.start()
        server, task, port = await start_uvicorn(make_app(core))
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                first = asyncio.create_task(c.post("/v2/models/m/infer", content=infer_body(slo_ms=60000)))
                await until(lambda: len(rep.calls) == 1, what="first request in flight")
                # A raw client queues a request behind it, then goes away.
                body = infer_body(slo_ms=60000)
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                await until(lambda: len(core.queue) == 1, what="second request queued")
                writer.close()
                await writer.wait_closed()
                await until(lambda: len(core.queue) == 0, timeout_s=5.0, what="the request to leave the queue")
                assert counter(core, "cancelled") == 1
                rep.release.set()
                r = await first
                assert r.status_code == 200, r.text
                await asyncio.sleep(0.2)
                assert len(rep.calls) == 1  # the gone client's request never reached the replica
                m = (await c.get("/metrics")).text
                assert 'sponge_requests_total{model="m",outcome="cancelled"} 1.0' in m
        finally:
            rep.release.set()
            server.should_exit = True
            await asyncio.wait_for(task, 15)
            await core.close()
    asyncio.run(run())


# ---- 4. shutdown: in-flight futures answered, no blocking join on the loop ------------------------
def test_close_answers_the_in_flight_batch():
    async def run():
        rep = FakeReplica(hang=True)
        core = make_core(rep)
        core.start()
        now = core.clock()
        p = core.submit({"x": np.ones((1, 4), np.float32)}, 1, Budget(60000, 0, 60000, now + 60000), now)
        q = core.submit({"x": np.ones((1, 4), np.float32)}, 1, Budget(60000, 0, 60000, now + 60000), now)
        await until(lambda: len(rep.calls) == 1, what="dispatch")
        await asyncio.wait_for(core.close(), 10)
        for f in (p.future, q.future):  # in flight and queued
            assert f.done() and isinstance(f.exception(), InferenceFailed)
            assert "shutting down" in str(f.exception())
    asyncio.run(run())


class FakeProc:
    """multiprocessing.Process stand-in that records the thread every join runs on (never signals)."""

    pid = 2**22 + 12345

    def __init__(self) -> None:
        self.exitcode: int | None = None
        self.join_threads: list[int] = []
        self.killed = False

    def join(self, timeout: float | None = None) -> None:
        self.join_threads.append(threading.get_ident())
        time.sleep(0.02)
        if self.killed:
            self.exitcode = -9

    def is_alive(self) -> bool:
        return self.exitcode is None

    def kill(self) -> None:
        self.killed = True


class FakeWriter:
    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_replica_death_and_stop_never_join_on_the_event_loop():
    async def run():
        loop_thread = threading.get_ident()
        r = Replica("r0", "unused.onnx", 1, 1)
        r._loop = asyncio.get_running_loop()
        r._proc, r._conn = FakeProc(), FakeWriter()
        r._ready.set()
        fut = r._loop.create_future()
        r._pending[0] = fut
        r._on_death()  # what the reader does on EOF
        assert isinstance(fut.exception(), ReplicaDied) and not r.ready
        assert loop_thread not in r._proc.join_threads
        # stop() of a worker that ignores "stop": killed, and every join off the loop.
        proc = r._proc = FakeProc()
        r._conn = FakeWriter()
        await r.stop()
        assert proc.killed and proc.join_threads and loop_thread not in proc.join_threads
    asyncio.run(run())


# ---- end to end: watchdog on a SIGSTOPped replica, arrival-rate gauge ----------------------------
def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


@pytest.fixture(scope="module")
def watchdog_server():
    from serverproc import ServerProcess
    from sponge.models.trivial import trivial_model_path

    srv = ServerProcess("--model", str(trivial_model_path()), "--batch", "1", "--interval-ms", "200",
                        "--replica-timeout-floor-ms", "1000", "--actuator", "none")
    yield srv
    srv.stop()


def _trivial(slo_ms: float) -> dict:
    return {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}],
            "parameters": {"slo_ms": slo_ms}}


@pytest.mark.slow
def test_arrival_rate_gauge_is_set_each_controller_tick():
    from serverproc import ServerProcess
    from sponge.models.trivial import trivial_model_path

    s = ServerProcess("--model", str(trivial_model_path()), "--interval-ms", "200", "--actuator", "none")
    try:
        _check_arrival_rate(s)
    finally:
        s.stop()


def _check_arrival_rate(s) -> None:
    deadline = time.monotonic() + 20
    rate = 0.0
    while time.monotonic() < deadline:
        assert httpx.post(f"{s.url}/v2/models/trivial/infer", json=_trivial(5000), timeout=30).status_code == 200
        m = re.search(r"^sponge_arrival_rate_rps (\S+)$", httpx.get(f"{s.url}/metrics").text, re.M)
        rate = float(m.group(1)) if m else 0.0
        if rate > 0:
            break
        time.sleep(0.05)
    assert rate > 0


@pytest.mark.slow
def test_sigstopped_replica_is_killed_by_the_watchdog_and_restarted(watchdog_server):
    s = watchdog_server
    url = f"{s.url}/v2/models/trivial/infer"
    assert httpx.post(url, json=_trivial(5000), timeout=30).status_code == 200
    pid = s.admin("GET", "/admin/replicas").json()["replicas"][0]["pid"]
    started = _start_time(pid)
    os.kill(pid, signal.SIGSTOP)
    try:
        async def run():
            async def timed():
                t0 = time.monotonic()
                r = await c.post(url, json=_trivial(60000))
                return r, time.monotonic() - t0
            async with httpx.AsyncClient(timeout=60) as c:
                first = asyncio.create_task(timed())
                await asyncio.sleep(0.2)  # the first is in flight on the stopped replica; these queue
                rest = [asyncio.create_task(timed()) for _ in range(3)]
                return await asyncio.gather(first, *rest)
        results = asyncio.run(run())
        failed = [(r, t) for r, t in results if r.status_code != 200]
        assert len(failed) == 1, [(r.status_code, r.text) for r, _ in results]  # the one in flight
        r, t = failed[0]
        assert r.status_code == 500 and "timed out after 1000 ms" in r.json()["error"], r.text
        assert t < 1.0 + 4.0  # the watchdog bound (1 s) plus generous slack for a loaded machine
        # the queued ones were served by the restarted replica
        info = s.admin("GET", "/admin/replicas").json()["replicas"][0]
        assert info["pid"] != pid and info["restarts"] >= 1 and info["ready"]
        assert httpx.post(url, json=_trivial(5000), timeout=30).status_code == 200
    finally:  # our stopped process, if the server did not kill it (checked by its start time, not just pid)
        if started is not None and _start_time(pid) == started:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
