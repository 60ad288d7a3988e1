"""Per-batch CPU, live: the serving core asks the policy's `batch_cpu_m` at every arrival, before a batch is
formed, when it starts and when it ends, and applies the answer in place (sponge.server.per_batch). The core,
the batcher, the scaler and the policies are real; the replica (a gate the test opens batch by batch), the
actuator and, where time matters, the clock are fakes. One slow test runs a real `sponge serve`."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import numpy as np
import pytest

from sponge.perf.latency_model import LatencyModel
from sponge.policy.learning import LearningPolicy
from sponge.policy.registry import make_policy
from sponge.policy.types import BatchCpu, Decision, Observation, QueueView
from sponge.protocol.v2 import TensorSpec
from sponge.runtime.replica import BatchResult, ReplicaDied
from sponge.scheduling.batcher import ExpiryPolicy
from sponge.server.core import DeadlineExpired, ServingCore
from sponge.server.live import LiveApplier
from sponge.server.metrics import Metrics
from sponge.server.per_batch import PerBatchSizer
from sponge.server.prober import IdleProber
from sponge.server.scaler import ReplicaScaler
from sponge.server.slo import Budget
from test_learning_policy import FakeLearner, SAFE, obs, sample

MODEL = LatencyModel(g=20.0, d=0.5, e=2.0, h=1.0)  # ~20 ms per image at one core


class GateReplica:
    """A replica without a process: each batch waits until the test lets one through (`release`)."""

    name = "r0"
    labels = None
    pid = None

    def __init__(self) -> None:
        self.inputs = [TensorSpec("x", "FP32", (-1, 4))]
        self.outputs = [TensorSpec("y", "FP32", (-1, 4))]
        self.threads = 1
        self.on_start = None
        self.on_death = None
        self.restarts = 0
        self.ready = True
        self.busy = False
        self.killed = False
        self.calls: list[int] = []  # images per batch, in order
        self.gate = asyncio.Semaphore(0)

    def set_threads(self, n: int) -> None:
        self.threads = n

    async def infer(self, inputs: dict) -> BatchResult:
        x = next(iter(inputs.values()))
        self.calls.append(len(x))
        self.busy = True
        try:
            await self.gate.acquire()
        finally:
            self.busy = False
        if self.killed:
            self.killed = False
            raise ReplicaDied("replica r0 died")
        return BatchResult({"y": np.asarray(x) * 2}, 5.0, self.threads)

    def release(self) -> None:
        self.gate.release()

    def kill(self) -> None:
        self.killed = True
        self.ready = False
        self.gate.release()  # the batch (or probe) in flight fails

    async def restart(self) -> None:
        self.restarts += 1
        self.ready = True

    async def stop(self) -> None:
        self.ready = False


class RecordingActuator:
    kind = "fake"
    granularity_m = 1

    def __init__(self, cpu_m: int, clock=None) -> None:
        self.cpu = cpu_m
        self.clock = clock
        self.applied: list[int] = []
        self.history: list[tuple[float, int]] = []

    def attach(self, pid: int) -> None:
        pass

    def apply(self, cpu_m: int) -> None:
        self.cpu = cpu_m
        self.applied.append(cpu_m)
        if self.clock is not None:
            self.history.append((self.clock(), cpu_m))

    def current(self) -> int:
        return self.cpu

    def close(self) -> None:
        pass


class Scripted:
    """A per-batch policy: records every view, answers `answer(view)`."""

    name = "scripted"
    max_cpu_m = 2000

    def __init__(self, answer) -> None:
        self.answer = answer
        self.views: list[QueueView] = []

    def batch_cpu_m(self, view: QueueView) -> BatchCpu | None:
        self.views.append(view)
        return self.answer(view)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def build(policy_fn, cpu_m: int = 1000, min_cpu_m: int = 100, max_cpu_m: int = 2000, max_batch: int = 8,
          batch: int = 1, clock=None, admission: bool = True, **kw):
    replica = GateReplica()
    if clock is not None:
        kw["clock"] = clock
    core = ServingCore("m", [replica], batch, 64, ExpiryPolicy.REJECT, 0.0, Metrics(), cpu_m,  # type: ignore[list-item]
                       max_cpu_m=max_cpu_m, admission=admission, **kw)
    act = RecordingActuator(cpu_m, clock)
    scaler = ReplicaScaler(core, {"r0": act}, min_cpu_m, max_cpu_m)
    sizer = PerBatchSizer(core, policy_fn, scaler.resize, min_cpu_m, max_cpu_m, max_batch)
    core.batch_sizer = sizer
    return core, replica, act, scaler, sizer


def submit(core: ServingCore, budget_ms: float = 1000.0):
    now = core.clock()
    return core.submit({"x": np.ones((1, 4), np.float32)}, 1, Budget(budget_ms, 0.0, budget_ms, now + budget_ms), now)


async def until(cond, timeout_s: float = 3.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


def metric_value(core: ServingCore, name: str, labels: dict[str, str] | None = None) -> float:
    return core.metrics.registry.get_sample_value(name, labels or {}) or 0.0


# ---- the hook: when it is called, what it sees, what it applies -----------------------------------------
def test_called_at_arrival_batch_start_and_end_and_the_cap_applies_to_the_next_batch() -> None:
    async def go() -> None:
        def answer(v: QueueView) -> BatchCpu:
            # two queued and nothing running: the batch about to form gets a cap of 2
            return BatchCpu(700, 2 if v.running is None and len(v.queue_images) >= 2 else 1)

        pol = Scripted(answer)
        core, replica, act, _, _ = build(pol.batch_cpu_m)
        core.start()
        try:
            a = submit(core)
            # arrival: A queued, nothing running (the starts-now case)
            assert [(len(v.queue_images), v.running) for v in pol.views] == [(1, None)]
            assert pol.views[0].current_cpu_m == 1000 and pol.views[0].delay_ms > 0
            await until(lambda: replica.calls == [1])
            # the batch started: A runs (its tightest deadline ~1000 ms away), nothing queued behind it
            started = pol.views[-1]
            assert started.running is not None and started.running.images == 1 and not started.queue_images
            assert 900 < started.running.deadline_ms <= 1000
            assert core.cpu_m["r0"] == 700 and act.applied == [700]
            b, c = submit(core), submit(core)  # two arrivals while A runs
            assert [len(v.queue_images) for v in pol.views[-2:]] == [1, 2]
            assert all(v.running is not None for v in pol.views[-2:])
            n = len(pol.views)
            replica.release()  # A ends: sized with B and C queued and nothing running -> cap 2
            await until(lambda: len(replica.calls) == 2)
            assert pol.views[n].running is None and list(pol.views[n].queue_images) == [1, 1]
            assert replica.calls == [1, 2], "B and C ran as one batch: the cap applied to the batch then formed"
            replica.release()
            await asyncio.gather(a.future, b.future, c.future)
            await until(lambda: not core.running)
            last = pol.views[-1]
            assert last.running is None and not last.queue_images  # the batch ended, nothing left
        finally:
            await core.close()

    run(go())


def test_no_resize_and_no_call_when_nothing_changed() -> None:
    async def go() -> None:
        pol = Scripted(lambda v: BatchCpu(1000, 1))  # the allocation in force
        core, replica, act, _, sizer = build(pol.batch_cpu_m)
        assert core.size_batch() and len(pol.views) == 1
        for _ in range(5):
            assert core.size_batch()  # nothing changed: not even asked
        assert len(pol.views) == 1 and sizer.skipped == 5
        assert act.applied == []  # same CPU: never written
        assert metric_value(core, "sponge_batch_resizes_total", {"direction": "up"}) == 0
        core.size_batch(force=True)
        assert len(pol.views) == 2 and act.applied == []

    run(go())


def test_a_policy_that_keeps_the_interval_decision_is_asked_again_only_at_the_next_decision() -> None:
    async def go() -> None:
        pol = Scripted(lambda v: None)  # e.g. LearningPolicy before its model is ready
        core, _, act, _, sizer = build(pol.batch_cpu_m)
        assert sizer.decided(Decision(1000, 1)) is False and len(pol.views) == 1
        p = submit(core)
        assert len(pol.views) == 1 and not core.sizes_per_batch and act.applied == []
        sizer.decided(Decision(1000, 1))
        assert len(pol.views) == 2
        p.future.cancel()

    run(go())


def test_applies_the_cpu_through_the_scaler_and_counts_it() -> None:
    async def go() -> None:
        answers = iter([BatchCpu(1500, 3), BatchCpu(400, 1)])
        pol = Scripted(lambda v: next(answers))
        core, replica, act, scaler, _ = build(pol.batch_cpu_m, max_batch=2)
        core.size_batch(force=True)
        assert core.cpu_m["r0"] == 1500 and act.applied == [1500] and replica.threads == 2
        assert core.batcher.batch_size == 2, "bounded by --max-batch"
        core.size_batch(force=True)
        assert core.cpu_m["r0"] == 400 and replica.threads == 1 and core.batcher.batch_size == 1
        m = core.metrics.registry.get_sample_value
        assert m("sponge_batch_resizes_total", {"direction": "up"}) == 1
        assert m("sponge_batch_resizes_total", {"direction": "down"}) == 1
        assert m("sponge_replica_cpu_millicores", {"replica": "r0"}) == 400
        assert m("sponge_per_batch_active") == 1
        assert m("sponge_batch_sizing_seconds_count", {"resized": "true"}) == 2

    run(go())


def test_while_a_batch_runs_the_cpu_only_goes_up_and_comes_down_when_it_ends() -> None:
    async def go() -> None:
        want = {"cpu": 1200}
        pol = Scripted(lambda v: BatchCpu(want["cpu"], 1))
        core, replica, act, _, _ = build(pol.batch_cpu_m)
        core.start()
        try:
            p = submit(core)
            await until(lambda: replica.calls == [1])
            assert core.cpu_m["r0"] == 1200
            want["cpu"] = 600
            q = submit(core)  # an arrival mid-batch that needs less: not lowered under the running batch
            assert core.cpu_m["r0"] == 1200
            want["cpu"] = 1800
            r = submit(core)  # one that needs more: raised at once
            assert core.cpu_m["r0"] == 1800
            want["cpu"] = 600
            replica.release()  # the batch ends: down to what the queue needs
            await until(lambda: len(replica.calls) == 2)
            assert core.cpu_m["r0"] == 600
            replica.release()
            await until(lambda: len(replica.calls) == 3)
            replica.release()
            await asyncio.gather(p.future, q.future, r.future)
        finally:
            await core.close()

    run(go())


def test_straddling_batches_are_not_samples_but_batches_sized_before_they_start_are() -> None:
    async def go() -> None:
        want = {"cpu": 800}
        pol = Scripted(lambda v: BatchCpu(want["cpu"], 1))
        core, replica, _, _, _ = build(pol.batch_cpu_m)
        core.start()
        try:
            p = submit(core)  # sized at its arrival, before it starts: one allocation throughout
            await until(lambda: replica.calls == [1])
            replica.release()
            await p.future
            await until(lambda: not core.running)
            assert [(s.images, s.cpu_m) for s in core.recent_batches] == [(1, 800)]
            p = submit(core)
            await until(lambda: len(replica.calls) == 2)
            want["cpu"] = 1600
            q = submit(core)  # raised mid-batch: the running batch measured two allocations
            replica.release()
            await p.future
            assert len(core.recent_batches) == 1
            assert metric_value(core, "sponge_batches_straddled_total", {"model": "m"}) == 1
            await until(lambda: len(replica.calls) == 3)
            replica.release()
            await q.future
            await until(lambda: len(core.recent_batches) == 2)
            assert core.recent_batches[-1].cpu_m == 1600
        finally:
            await core.close()

    run(go())


# ---- with the real sponge policy ---------------------------------------------------------------------------
def decided_sponge(rate: float = 30.0):
    pol = make_policy("sponge", MODEL, min_cpu_m=100, max_cpu_m=2000, max_batch=8, safety=0.9)
    d = pol.decide(Observation(1000.0, 1000.0, rate, (rate,) * 5, (300.0,) * 60, (), Decision(2000, 4)))
    return pol, d


def test_never_below_the_decision_and_the_minimum_when_idle() -> None:
    async def go() -> None:
        pol, d = decided_sponge()
        assert 100 < d.cpu_m < 2000
        core, replica, act, _, _ = build(pol.batch_cpu_m, cpu_m=2000)
        core.size_batch(force=True)
        assert core.cpu_m["r0"] == 100, "idle: the minimum"
        core.start()
        try:
            pending = [submit(core, 300.0)]
            assert core.cpu_m["r0"] >= d.cpu_m, "work present: never below the interval decision"
            tight = submit(core, 45.0)  # a tight one: the sizer raises the CPU for it
            pending.append(tight)
            assert core.cpu_m["r0"] > d.cpu_m
            while not all(p.future.done() for p in pending):
                if replica.busy:
                    assert core.cpu_m["r0"] >= d.cpu_m
                    replica.release()
                    await until(lambda: not replica.busy)
                await asyncio.sleep(0.001)
            await asyncio.gather(*(p.future for p in pending))
            await until(lambda: not core.running)
            assert core.cpu_m["r0"] == 100, "idle again: back to the minimum"
            assert all(c >= d.cpu_m for c in act.applied[1:-1])
        finally:
            await core.close()

    run(go())


def test_expiry_judges_at_the_reachable_allocation_while_sizing_per_batch() -> None:
    async def go() -> None:
        sizing = {"on": False}
        pol = Scripted(lambda v: BatchCpu(v.current_cpu_m, 1) if sizing["on"] else None)
        core, replica, _, _, _ = build(pol.batch_cpu_m, cpu_m=100, admission=False)
        core.estimate.observe(1, 100.0)  # 100 ms for one image at the 100 m in force
        core.reachable_latency = lambda images: 10.0  # 10 ms at max_cpu_m
        assert core.size_batch(force=True) is False and not core.sizes_per_batch
        with pytest.raises(DeadlineExpired):
            submit(core, 50.0)  # judged at the allocation in force: hopeless
        sizing["on"] = True
        core.size_batch(force=True)
        assert core.sizes_per_batch
        p = submit(core, 50.0)  # judged at the reachable allocation: the sizer raises the CPU for it
        assert len(core.queue) == 1
        assert core.batcher.expire(core.queue, core.clock()) == []
        assert core.batcher.expiry_estimate_ms(1) == pytest.approx(10.0 + core.dispatch_overhead_ms)
        p.future.cancel()

    run(go())


# ---- LearningPolicy --------------------------------------------------------------------------------------
def view(n: int = 2) -> QueueView:
    return QueueView([200.0] * n, [1] * n, None, 500, 16.0)


def learning(per_batch: bool = True, inner: str = "sponge") -> tuple[LearningPolicy, FakeLearner]:
    learner = FakeLearner()

    def factory(model, safety):
        if inner == "paper":
            return make_policy("paper", model, max_cores=2, max_batch=8)
        return make_policy("sponge", model, min_cpu_m=100, max_cpu_m=2000, max_batch=8, safety=safety)

    return LearningPolicy("sponge", learner, factory, SAFE, per_batch=per_batch, reach_cpu_m=2000), learner


def test_learning_policy_forwards_per_batch_cpu_in_model_mode_only() -> None:
    pol, learner = learning()
    assert pol.batch_cpu_m(view()) is None and pol.mode == "safe"  # nothing decided yet
    pol.decide(obs(1000, (sample(1),)))
    assert pol.mode == "safe" and pol.batch_cpu_m(view()) is None
    assert pol.max_cpu_m == 2000  # what it will reach (a simulator reads it once, at its start)
    pol.decide(obs(2000, (sample(2), sample(3))))
    assert pol.mode == "model"
    got = pol.batch_cpu_m(view())
    assert isinstance(got, BatchCpu) and got == pol.inner.batch_cpu_m(view())  # type: ignore[union-attr]
    assert pol.batch_cpu_m(QueueView([], [], None, 500, 16.0)).cpu_m == 100  # idle: the minimum
    assert pol.max_cpu_m == pol.inner.max_cpu_m == 2000  # type: ignore[union-attr]
    learner.broken = True  # the model degrades: back to the safe allocation, no per-batch sizing
    pol.decide(obs(3000))
    assert pol.mode == "safe" and pol.batch_cpu_m(view()) is None


def test_learning_policy_explore_mode_keeps_the_interval_decision() -> None:
    from sponge.perf.online import OnlineLatencyLearner
    from sponge.perf.samples import BatchSample

    made: list[str] = []

    def factory(kind):
        def make(m, s):
            made.append(kind)
            return make_policy("sponge", m, min_cpu_m=100, max_cpu_m=2000, max_batch=8, safety=s)
        return make

    pol = LearningPolicy("sponge", OnlineLatencyLearner(), factory("inner"), SAFE, per_batch=True,
                         make_explorer=factory("explorer"))
    served = tuple(BatchSample(b, 2000, 4.0 * b + 2.0, float(i)) for i in range(6) for b in (1, 4, 8))
    pol.decide(obs(1000, served, rate=40.0))
    assert pol.mode == "explore" and made == ["explorer"]
    assert pol.batch_cpu_m(view()) is None


def test_without_per_batch_or_with_paper_nothing_is_forwarded() -> None:
    pol, _ = learning(per_batch=False)
    assert getattr(pol, "batch_cpu_m", None) is None and pol.max_cpu_m is None
    pol.decide(obs(1000, (sample(1), sample(2), sample(3))))
    assert pol.mode == "model" and getattr(pol, "batch_cpu_m", None) is None
    paper, _ = learning(inner="paper")
    paper.decide(obs(1000, (sample(1), sample(2), sample(3))))
    assert paper.mode == "model" and paper.batch_cpu_m(view()) is None


# ---- the controller's decisions ------------------------------------------------------------------------
def test_decisions_are_the_sizers_floor_and_come_back_when_it_stops() -> None:
    async def go() -> None:
        mode = {"sizing": True}
        pol = Scripted(lambda v: BatchCpu(300, 2) if mode["sizing"] else None)
        core, replica, act, scaler, sizer = build(pol.batch_cpu_m, cpu_m=1000)
        applier = LiveApplier(core, scaler, 8, sizer)
        core.size_batch(force=True)
        assert core.cpu_m["r0"] == 300
        # a new decision while the policy sizes per batch: the applier leaves the CPU to the sizer ...
        applier.apply(Decision(800, 4))
        assert core.cpu_m["r0"] == 300 and act.applied == [300]
        assert sizer.decided(Decision(800, 4)) and core.batcher.batch_size == 2  # ... which sizes at once
        assert "per-batch CPU: 1 resize(s)" in sizer.take_window()
        # the policy leaves the learned model: the decision's allocation comes back
        mode["sizing"] = False
        applier.apply(Decision(900, 4))
        assert not sizer.decided(Decision(900, 4))
        assert core.cpu_m["r0"] == 900 and not core.sizes_per_batch
        assert core.metrics.registry.get_sample_value("sponge_per_batch_active") == 0
        # and decisions are applied by the applier again
        applier.apply(Decision(1100, 4))
        assert core.cpu_m["r0"] == 1100

    run(go())


# ---- the idle prober --------------------------------------------------------------------------------------
def test_a_probe_keeps_its_allocation_and_an_arrival_mid_probe_is_sized_with_the_probe_in_flight() -> None:
    async def go() -> None:
        clock = Clock()
        pol = Scripted(lambda v: BatchCpu(100 if v.running is None and not v.queue_images else 1200, 1))
        core, replica, act, scaler, _ = build(pol.batch_cpu_m, cpu_m=2000, clock=clock)
        core.size_batch(force=True)
        assert core.cpu_m["r0"] == 100  # idle: the minimum
        got: list = []
        prober = IdleProber(core, scaler, lambda levels, batches, limit: [(2, 500)], got.append,
                            cpu_levels=[500, 1000, 2000], batch_sizes=[1, 2], clock=clock)
        prober._batch = lambda r, b: {"x": np.ones((b, 4), np.float32)}  # type: ignore[method-assign]
        core.start()
        try:
            clock.t += 10
            probe = asyncio.ensure_future(prober.probe_once(replica, 2, 500))  # type: ignore[arg-type]
            await until(lambda: replica.calls == [2])
            assert core.cpu_m["r0"] == 500 and "r0" in core.probing
            n = len(pol.views)
            clock.t += 10
            assert core.size_batch(force=True)  # nothing queued: the probe holds the allocation
            assert len(pol.views) == n and core.cpu_m["r0"] == 500
            clock.t += 10
            p = submit(core)  # arrival mid-probe: sized with the probe as the batch in flight
            v = pol.views[-1]
            assert v.running is not None and v.running.images == 2 and v.running.deadline_ms == float("inf")
            assert core.cpu_m["r0"] == 1200
            await asyncio.sleep(0.03)  # the prober notices the arrival (it looks every 5 ms) ...
            assert core.cpu_m["r0"] == 1200, "... and leaves the allocation to the sizer: no restore to 100 m"
            assert replica.calls == [2], "the dispatch loop waits for the probe"
            clock.t += 10
            replica.release()  # the probe ends (sample discarded: disturbed)
            assert await probe is None and got == [] and prober.stats.disturbed == 1
            await until(lambda: len(replica.calls) == 2)
            assert "r0" not in core.probing
            clock.t += 10
            replica.release()
            await p.future
            await until(lambda: not core.running)
            clock.t += 10
            assert core.cpu_m["r0"] == 100
            # billing: what was applied, when
            hist = [(1000.0, 2000)] + act.history
            billed = sum(c * (t1 - t0) for (t0, c), (t1, _) in zip(hist, hist[1:] + [(clock.t, 0)]))
            assert scaler.allocation.integral_mms(clock.t) == pytest.approx(billed)
        finally:
            await core.close()

    run(go())


def test_an_undisturbed_probe_restores_then_the_sizer_decides() -> None:
    async def go() -> None:
        pol = Scripted(lambda v: BatchCpu(100, 1))
        core, replica, act, scaler, _ = build(pol.batch_cpu_m, cpu_m=2000)
        core.size_batch(force=True)
        got: list = []
        prober = IdleProber(core, scaler, lambda levels, batches, limit: [(1, 1000)], got.append,
                            cpu_levels=[500, 1000, 2000], batch_sizes=[1])
        prober._batch = lambda r, b: {"x": np.ones((b, 4), np.float32)}  # type: ignore[method-assign]
        probe = asyncio.ensure_future(prober.probe_once(replica, 1, 1000))  # type: ignore[arg-type]
        await until(lambda: replica.calls == [1])
        assert core.cpu_m["r0"] == 1000
        replica.release()
        sample_ = await probe
        assert sample_ is not None and (sample_.images, sample_.cpu_m) == (1, 1000) and got == [sample_]
        assert core.cpu_m["r0"] == 100 and act.applied == [100, 1000, 100] and not core.probing

    run(go())


def test_a_hung_probe_is_a_hung_replica_killed_by_the_dispatch_loop() -> None:
    async def go() -> None:
        pol = Scripted(lambda v: BatchCpu(1000, 1))
        core, replica, _, scaler, _ = build(pol.batch_cpu_m, replica_timeout_floor_ms=50.0)
        prober = IdleProber(core, scaler, lambda levels, batches, limit: [(1, 1000)], lambda s: None,
                            cpu_levels=[1000], batch_sizes=[1])
        prober._batch = lambda r, b: {"x": np.ones((b, 4), np.float32)}  # type: ignore[method-assign]
        core.start()
        try:
            probe = asyncio.ensure_future(prober.probe_once(replica, 1, 1000))  # type: ignore[arg-type]
            await until(lambda: replica.calls == [1])
            p = submit(core)  # waits for the probe, which never ends ...
            assert await probe is None and prober.stats.failed == 1  # ... until the watchdog kills the replica
            assert not core.probing
            await until(lambda: replica.restarts == 1)
            await until(lambda: len(replica.calls) == 2)  # restarted, then the request is served
            replica.release()
            await p.future
        finally:
            await core.close()

    run(go())


# ---- configuration ------------------------------------------------------------------------------------------
def test_serve_installs_the_sizer_only_where_it_can_run(monkeypatch, tmp_path: Path) -> None:
    from sponge.config import ServerConfig
    from sponge.server import serve

    monkeypatch.setattr(serve, "load_offline_profile", lambda cfg, path: (None, "no profile (test)"))

    def core_of(**kw):
        app = serve.build_app(ServerConfig(actuator="none", auto_profile=False, **kw))
        return app.state.scaler.core

    assert core_of(policy="sponge").batch_sizer is not None
    assert core_of(policy="sponge", per_batch=False).batch_sizer is None
    assert core_of(policy="static").batch_sizer is None
    assert core_of(policy="paper").batch_sizer is None
    assert core_of(policy="sponge", replicas=2).batch_sizer is None


# ---- end to end -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_live_server_sizes_cpu_per_batch(tmp_path: Path) -> None:
    """A real `sponge serve` seeded with a synthetic profile (model mode from its first decision): a burst of
    requests with mixed budgets is answered in full, the replica's real cgroup quota goes up during the
    burst and back to the minimum after it, and /metrics counts the per-batch resizes."""
    import httpx
    import orjson

    from serverproc import ServerProcess
    from test_live_control import CGROUP_V1, quota_m, synthetic_profile

    if not (CGROUP_V1 / "cpu.cfs_quota_us").exists():
        pytest.skip("needs the cgroup v1 cpu controller")
    profile = synthetic_profile(tmp_path)
    srv = ServerProcess("--policy", "sponge", "--profile", str(profile), "--interval-ms", "500",
                        "--min-cpu-m", "200", "--max-batch", "8", "--no-auto-profile")
    try:
        def metrics() -> str:
            return httpx.get(f"{srv.url}/metrics", timeout=10).text

        def value(text: str, name: str, labels: str = "") -> float:
            m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
            return float(m.group(1)) if m else 0.0

        deadline = time.monotonic() + 60
        while value(metrics(), "sponge_per_batch_active") != 1.0:  # first decision on the seeded model
            assert time.monotonic() < deadline, srv.log_path.read_text()[-3000:]
            time.sleep(0.2)
        pid = srv.admin("GET", "/admin/replicas").json()["replicas"][0]["pid"]
        while quota_m(pid) != 200:  # idle: the minimum
            assert time.monotonic() < deadline, (quota_m(pid), srv.log_path.read_text()[-3000:])
            time.sleep(0.1)

        img = np.zeros((1, 224, 224, 3), np.uint8)
        url = f"{srv.url}/v2/models/efficientnet-lite0/infer"

        def body(budget_ms: float) -> tuple[bytes, dict[str, str]]:
            h = orjson.dumps({"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8",
                                          "parameters": {"binary_data_size": img.nbytes}}],
                              "parameters": {"slo_ms": budget_ms + 50, "network_ms": 50}})
            return h + img.tobytes(), {"Inference-Header-Content-Length": str(len(h))}

        quotas: list[int] = []

        async def watch(stop: asyncio.Event) -> None:
            while not stop.is_set():
                q = quota_m(pid)
                if q is not None:
                    quotas.append(q)
                await asyncio.sleep(0.005)

        async def burst() -> list[int]:
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch(stop))
            budgets = [150.0, 300.0, 600.0, 1500.0]
            async with httpx.AsyncClient(timeout=30) as c:
                tasks = []
                for i in range(60):  # ~2 s at 30 req/s, budgets mixed
                    b, h = body(budgets[i % len(budgets)])
                    tasks.append(asyncio.create_task(c.post(url, content=b, headers=h)))
                    await asyncio.sleep(1 / 30)
                codes = [r.status_code for r in await asyncio.gather(*tasks)]
            stop.set()
            await watcher
            return codes

        codes = asyncio.run(burst())
        assert len(codes) == 60
        # every request answered: served, or refused for its deadline (admission 503/504), never failed
        assert set(codes) <= {200, 503, 504} and codes.count(200) >= 30, codes
        assert max(quotas) > 200, "the quota went up with the burst"
        deadline = time.monotonic() + 10
        while quota_m(pid) != 200:  # the burst is over: idle again, back to the minimum
            assert time.monotonic() < deadline, quota_m(pid)
            time.sleep(0.05)
        text = metrics()
        ups = value(text, "sponge_batch_resizes_total", '{direction="up"}')
        downs = value(text, "sponge_batch_resizes_total", '{direction="down"}')
        assert ups >= 1 and downs >= 1, text
        # sized before they start, most batches run at one allocation: the learner keeps getting samples
        batches = value(text, "sponge_batch_size_count", '{model="efficientnet-lite0"}')
        straddled = value(text, "sponge_batches_straddled_total", '{model="efficientnet-lite0"}')
        assert batches > 0 and straddled <= batches / 2, (batches, straddled)
        assert value(text, "sponge_replica_cpu_millicores", '{replica="r0"}') == 200
        info = srv.admin("GET", "/admin/replicas").json()["replicas"][0]
        assert info["pid"] == pid and info["cpu_m"] == 200
        log = srv.admin("GET", "/admin/decisions").json()["decisions"]
        assert any("per-batch CPU:" in d["explanation"] for d in log)
    finally:
        srv.stop()
