"""Issue 11, build item 1: several live replicas behind one EDF queue, added and removed while serving.

Unit tests run the serving core against fake replicas whose batch takes `ms_per_image * 1000 / cpu_m`
(so a replica with more CPU really finishes first); the slow one starts real worker processes on the
trivial ONNX model and scales 1 -> 2 -> 1 under load."""

from __future__ import annotations

import asyncio
import itertools
import time

import numpy as np
import pytest

from helpers import until
from sponge.config import ConfigError, ServerConfig
from sponge.runtime.base import TensorSpec
from sponge.runtime.replica import BatchResult, Replica
from sponge.scheduling.batcher import ExpiryPolicy
from sponge.server.core import ServingCore
from sponge.server.metrics import Metrics
from sponge.server.pool import ReplicaPool
from sponge.server.scaler import NullActuator, ReplicaScaler
from sponge.server.slo import Budget

MS_PER_IMAGE_AT_1_CORE = 20.0


class FakeReplica:
    """Serves `x -> x * 2` after MS_PER_IMAGE_AT_1_CORE * images * 1000 / cpu ms; records every request id
    it served (column 0 of x) and when each batch started. `start()` waits for `gate` when one is given."""

    def __init__(self, name: str, core_ref: list[ServingCore], gate: asyncio.Event | None = None,
                 speed: float = 1.0) -> None:
        self.name = name
        self.speed = speed  # > 1: finishes sooner than the latency model says (slack for a busy host)
        self.core_ref = core_ref
        self.gate = gate
        self.inputs = [TensorSpec("x", "FP32", (-1, 1))]
        self.outputs = [TensorSpec("y", "FP32", (-1, 1))]
        self.labels = None
        self.threads = 1
        self.restarts = 0
        self.pid = -1  # no process: the actuators here (NullActuator) never use it
        self.on_start = None
        self.on_death = None
        self._ready = False
        self.busy = False
        self.served: list[int] = []
        self.batches: list[tuple[float, list[int]]] = []  # (start ms, ids)
        self.started = self.stopped = 0

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self._ready = True
        self.started += 1
        if self.on_start is not None:
            self.on_start(self)

    async def infer(self, inputs: dict[str, np.ndarray]) -> BatchResult:
        core = self.core_ref[0]
        x = inputs["x"]
        ids = [int(v) for v in x[:, 0]]
        self.batches.append((core.clock(), ids))
        self.busy = True
        ms = MS_PER_IMAGE_AT_1_CORE * len(x) * 1000.0 / core.cpu_m[self.name] / self.speed
        try:
            await asyncio.sleep(ms / 1000.0)
        finally:
            self.busy = False
        self.served.extend(ids)
        return BatchResult({"y": x * 2}, ms, 1)

    def set_threads(self, n: int) -> None:
        self.threads = n

    def kill(self) -> None:
        self._ready = False

    async def stop(self) -> None:
        self._ready = False
        self.stopped += 1

    async def restart(self) -> None:
        await self.stop()
        await self.start()


def model_latency(images: int, cpu_m: int) -> float:
    return MS_PER_IMAGE_AT_1_CORE * images * 1000.0 / cpu_m


def make_core(replicas: list, core_ref: list, batch: int = 4) -> ServingCore:
    core = ServingCore("m", replicas, batch, 4096, ExpiryPolicy.REJECT, 0.0, Metrics(), 1000, admission=False)
    core.latency_at = model_latency  # the dispatcher's "who finishes first" uses the latency model
    core_ref.append(core)
    return core


_ids = itertools.count()


def submit(core: ServingCore, budget_ms: float = 60_000.0, rid: int | None = None):
    now = core.clock()
    rid = next(_ids) if rid is None else rid
    x = np.array([[rid]], np.float32)
    return rid, core.submit({"x": x}, 1, Budget(budget_ms, 0, budget_ms, now + budget_ms), now)


def gauge(core: ServingCore, state: str) -> float:
    return core.metrics.registry.get_sample_value("sponge_replicas", {"state": state})



def test_global_edf_order_across_replicas():
    """Requests queued with shuffled deadlines: whichever replica takes the next batch takes the earliest
    deadlines left, so the batches, in the order they start, cover ascending deadlines."""
    async def run():
        ref: list = []
        reps = [FakeReplica("r0", ref), FakeReplica("r1", ref)]
        for r in reps:
            await r.start()
        core = make_core(reps, ref, batch=2)
        rng = np.random.default_rng(1)
        budgets = rng.permutation(np.arange(24)) * 100 + 5_000
        pending = {}
        for i, b in enumerate(budgets):
            rid, p = submit(core, float(b), rid=i)
            pending[rid] = (b, p)
        core.start()
        try:
            await asyncio.wait_for(asyncio.gather(*(p.future for _, p in pending.values())), 10)
        finally:
            await core.close()
        starts = sorted((t, ids) for r in reps for t, ids in r.batches)
        order = [budgets[i] for _, ids in starts for i in sorted(ids, key=lambda i: budgets[i])]
        assert order == sorted(order)
        assert all(r.batches for r in reps)  # both replicas served
    asyncio.run(run())


def test_the_dispatcher_sends_the_batch_to_the_replica_that_finishes_it_first():
    """r0 (2 cores) runs a batch of 4 images, expected to end 40 ms after it starts; then r1 (200 m) joins,
    free. One more image takes 10 ms on r0 and 100 ms on r1: waiting for r0 finishes at ~50 ms, so r1
    leaves it to r0. (r0 really runs twice as fast as the model says, so a late wakeup on a busy host does
    not put it past its expected end, where it would no longer count.)"""
    async def run():
        ref: list = []
        r0, r1 = FakeReplica("r0", ref, speed=2.0), FakeReplica("r1", ref)
        await r0.start()
        core = make_core([r0], ref, batch=4)
        core.cpu_m["r0"] = 2000
        core.start()
        try:
            long = [submit(core)[1] for _ in range(4)]
            await until(lambda: r0.busy, what="r0 busy")
            core.add_replica(r1, 200)
            await until(lambda: core.states()["ready"] == 2, what="r1 ready")
            core.set_batch(1)
            rid, late = submit(core)
            served = await asyncio.wait_for(late.future, 10)
            await asyncio.wait_for(asyncio.gather(*(p.future for p in long)), 10)
        finally:
            await core.close()
        assert served.replica == "r0"
        assert r1.batches == []
    asyncio.run(run())


def test_a_free_slow_replica_still_serves_when_the_fast_one_would_finish_later():
    """The same two replicas, but r0 busy for much longer (a batch of 40 images = 400 ms): r1 (100 ms for
    one image) finishes first, so it serves at once."""
    async def run():
        ref: list = []
        r0, r1 = FakeReplica("r0", ref), FakeReplica("r1", ref)
        await r0.start()
        core = make_core([r0], ref, batch=40)
        core.cpu_m["r0"] = 2000
        core.start()
        try:
            long = [submit(core)[1] for _ in range(40)]
            await until(lambda: r0.busy, what="r0 busy")
            core.add_replica(r1, 200)
            await until(lambda: core.states()["ready"] == 2, what="r1 ready")
            core.set_batch(1)
            _, p = submit(core)
            t0 = time.monotonic()
            served = await asyncio.wait_for(p.future, 10)
            took_ms = (time.monotonic() - t0) * 1000
            await asyncio.wait_for(asyncio.gather(*(q.future for q in long)), 10)
        finally:
            await core.close()
        assert served.replica == "r1"
        assert took_ms < 400  # not held for r0's long batch
    asyncio.run(run())


def test_a_starting_replica_gets_no_work_until_it_is_ready():
    async def run():
        ref: list = []
        r0 = FakeReplica("r0", ref)
        await r0.start()
        core = make_core([r0], ref, batch=1)
        gate = asyncio.Event()
        r1 = FakeReplica("r1", ref, gate=gate)
        core.start()
        try:
            core.add_replica(r1, 1000)
            assert core.states() == {"starting": 1, "ready": 1, "draining": 0}
            assert gauge(core, "starting") == 1 and gauge(core, "ready") == 1
            ps = [submit(core)[1] for _ in range(10)]
            await asyncio.wait_for(asyncio.gather(*(p.future for p in ps)), 10)
            assert r1.batches == [] and len(r0.served) == 10
            assert core._free_at(core.clock()) and len(core.serving()) == 1  # admission counts r0 only
            gate.set()
            await until(lambda: core.states()["ready"] == 2, what="r1 ready")
            assert len(core.cold_start_s) == 1
            ps = [submit(core)[1] for _ in range(20)]
            await asyncio.wait_for(asyncio.gather(*(p.future for p in ps)), 10)
            assert r1.batches  # now it serves
        finally:
            await core.close()
    asyncio.run(run())


def test_a_removed_replica_finishes_its_batch_then_stops_and_takes_no_more_work():
    async def run():
        ref: list = []
        reps = [FakeReplica("r0", ref), FakeReplica("r1", ref)]
        for r in reps:
            await r.start()
        core = make_core(reps, ref, batch=8)
        gone = []
        core.on_replica_gone = gone.append
        core.start()
        try:
            first = [submit(core)[1] for _ in range(8)]  # one batch of 8: 160 ms on one core
            await until(lambda: reps[0].busy or reps[1].busy, what="a batch running")
            victim = reps[0] if reps[0].busy else reps[1]
            other = reps[1] if victim is reps[0] else reps[0]
            core.remove_replica(victim.name)
            assert core.states()["draining"] == 1 and gauge(core, "draining") == 1
            more = [submit(core)[1] for _ in range(8)]
            served_first = await asyncio.wait_for(asyncio.gather(*(p.future for p in first)), 10)
            await asyncio.wait_for(asyncio.gather(*(p.future for p in more)), 10)
            await until(lambda: gone, what="the drained replica gone")
        finally:
            await core.close()
        assert {s.replica for s in served_first} == {victim.name}  # its batch was answered by it
        assert len(victim.batches) == 1 and victim.stopped == 1
        assert gone == [victim] and core.replicas == [other]
        assert sorted(other.served) == sorted(int(i) for _, ids in other.batches for i in ids)
    asyncio.run(run())


def test_the_last_serving_replica_cannot_be_removed():
    async def run():
        ref: list = []
        r0 = FakeReplica("r0", ref)
        await r0.start()
        core = make_core([r0], ref)
        core.start()
        try:
            with pytest.raises(ValueError, match="last serving replica"):
                core.remove_replica("r0")
            with pytest.raises(KeyError):
                core.remove_replica("r9")
        finally:
            await core.close()
    asyncio.run(run())


def make_pool(core: ServingCore, ref: list, max_replicas: int = 3, gate: asyncio.Event | None = None):
    scaler = ReplicaScaler(core, {r.name: NullActuator(1000) for r in core.replicas}, 100, 2000)
    made: list[FakeReplica] = []

    def make_replica(name: str, cpu_m: int) -> FakeReplica:
        r = FakeReplica(name, ref, gate=gate)
        made.append(r)
        return r

    pool = ReplicaPool(core, scaler, make_replica, lambda name, cpu_m: NullActuator(cpu_m), max_replicas)
    return pool, scaler, made


def test_pool_scales_out_and_in_cancelling_cold_starts_first_and_bills_starting_replicas():
    async def run():
        ref: list = []
        r0 = FakeReplica("r0", ref)
        await r0.start()
        core = make_core([r0], ref)
        gate = asyncio.Event()
        pool, scaler, made = make_pool(core, ref, gate=gate)
        core.start()
        try:
            assert pool.scale_to(5, 500) == 3  # clamped to max_replicas
            assert pool.ordered() == 3 and pool.starting() == 2
            t0 = core.clock()
            await asyncio.sleep(0.05)
            billed = scaler.allocation.integral_mms(core.clock())
            # r0 at 1000 m and two starting replicas at 500 m each are billed while they start
            assert billed >= 0.9 * 2000 * (core.clock() - t0)
            pool.scale_to(2, 500)  # one starting replica is cancelled, r0 keeps serving
            await until(lambda: len(core.replicas) == 2, what="the cancelled start forgotten")
            assert [r.name for r in core.replicas] == ["r0", "r1"]
            gate.set()
            await until(lambda: core.states()["ready"] == 2, what="r1 ready")
            pool.scale_to(1, 500)  # the newest ready replica drains
            await until(lambda: [r.name for r in core.replicas] == ["r0"], what="r1 drained")
            pool.scale_to(2, 500)
            assert [r.name for r in core.replicas] == ["r0", "r3"]  # names are never reused
        finally:
            await core.close()
        assert made[1].started == 0  # the cancelled one never ran
    asyncio.run(run())


def test_no_request_is_lost_or_answered_twice_while_replicas_come_and_go_under_load():
    async def run():
        ref: list = []
        r0 = FakeReplica("r0", ref)
        await r0.start()
        core = make_core([r0], ref, batch=3)
        pool, _, made = make_pool(core, ref, max_replicas=3)
        core.start()
        pending = []
        try:
            plan = itertools.cycle([3, 1, 2, 3, 1, 2, 1])
            for i in range(400):
                pending.append(submit(core, rid=i + 1)[1])  # id 0 is the pool's warm-up batch
                if i % 40 == 0:
                    pool.scale_to(next(plan), 1000)
                await asyncio.sleep(0.002)
            results = await asyncio.wait_for(asyncio.gather(*(p.future for p in pending), return_exceptions=True), 30)
        finally:
            await core.close()
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == []
        served = [i for r in [r0, *made] for i in r.served if i != 0]
        assert sorted(served) == list(range(1, 401))  # each exactly once
        warm_ups = sum(1 for r in made for i in r.served if i == 0)
        assert warm_ups == sum(1 for r in made if r.started)  # one warm-up batch per replica that started
        for i, res in enumerate(results):
            assert int(res.outputs["y"][0, 0]) == 2 * (i + 1)  # each answered with its own result
        assert pool.started >= 3 and pool.removed >= 3
        assert len({r.name for r in made if r.batches}) >= 2  # added replicas did serve
    asyncio.run(run())


def test_config_max_replicas_makes_joint_the_default_and_is_checked():
    assert ServerConfig.load(None, {"max_replicas": 3}).policy == "joint"
    assert ServerConfig.load(None, {"max_replicas": 3, "policy": "hpa"}).policy == "hpa"
    assert ServerConfig.load(None, {}).policy == "sponge"
    assert ServerConfig.load(None, {"max_replicas": 1}).policy == "sponge"
    with pytest.raises(ConfigError, match="max_replicas"):
        ServerConfig.load(None, {"max_replicas": 1, "replicas": 2})


@pytest.mark.slow
def test_real_worker_processes_scale_out_with_a_measured_cold_start_and_drain_back(tmp_path):
    """Real replica processes (the trivial ONNX model): a second one starts while the first serves, pays a
    measured cold start (spawn, model load, warm-up), serves, and drains away; every request answered."""
    from sponge.models.trivial import trivial_model_path

    model = str(trivial_model_path(tmp_path))

    async def run():
        r0 = Replica("r0", model, 1, 2)
        await r0.start()
        core = ServingCore("m", [r0], 4, 1024, ExpiryPolicy.REJECT, 0.0, Metrics(), 1000, admission=False)
        scaler = ReplicaScaler(core, {"r0": NullActuator(1000)}, 100, 2000)
        pool = ReplicaPool(core, scaler, lambda name, cpu_m: Replica(name, model, 1, 2),
                           lambda name, cpu_m: NullActuator(cpu_m), 2)
        core.start()
        spec = r0.inputs[0]
        shape = [1 if d < 0 else d for d in spec.shape]

        async def one() -> str:
            now = core.clock()
            p = core.submit({spec.name: np.ones(shape, np.float32)}, 1, Budget(60_000, 0, 60_000, now + 60_000), now)
            return (await p.future).replica

        try:
            pool.scale_to(2, 1000)
            assert core.states()["starting"] == 1
            who = []
            deadline = time.monotonic() + 60
            while core.states()["ready"] < 2 and time.monotonic() < deadline:
                who.append(await one())
            assert core.states()["ready"] == 2, "the second replica did not become ready in 60 s"
            assert set(who) == {"r0"}  # nothing went to the starting replica
            cold = core.cold_start_s[-1]
            assert 0.05 < cold < 60
            results = await asyncio.gather(*(one() for _ in range(200)))
            assert len(results) == 200
            pool.scale_to(1, 1000)
            results += await asyncio.gather(*(one() for _ in range(50)))
            await until(lambda: len(core.replicas) == 1, 30, "the second replica drained")
            assert core.replicas[0].name == "r0"
        finally:
            await core.close()
    asyncio.run(run())


def test_the_controller_scales_the_live_pool_and_observes_replicas_still_starting():
    """The live loop end to end on fake replicas: a decision for 3 replicas starts two (their cold start
    shows in the next Observation as replicas_starting, and they are billed meanwhile); one for 1 drains
    two; every request answered."""
    from helpers import Scripted  # noqa: I001

    from sponge.control import Controller
    from sponge.policy.types import Decision
    from sponge.server.live import LiveApplier, LiveView

    async def run():
        ref: list = []
        r0 = FakeReplica("r0", ref)
        await r0.start()
        core = make_core([r0], ref, batch=2)
        gate = asyncio.Event()
        pool, scaler, made = make_pool(core, ref, max_replicas=3, gate=gate)
        t = [0.0]
        policy = Scripted({1000.0: Decision(800, 2, 3), 3000.0: Decision(800, 2, 1)})
        ctl = Controller(policy, LiveView(core, scaler), LiveApplier(core, scaler, 8, None, pool),
                         Decision(1000, 2, 1), 1000.0, clock=lambda: t[0])
        core.start()
        try:
            t[0] = 1000.0
            ctl.tick()
            assert pool.ordered() == 3 and core.states()["starting"] == 2
            assert all(core.cpu_m[r.name] == 800 for r in core.replicas)
            t[0] = 2000.0
            ctl.tick()
            assert policy.seen[-1].replicas_starting == 2
            gate.set()
            await until(lambda: core.states()["ready"] == 3, what="three ready")
            ps = [submit(core)[1] for _ in range(30)]
            await asyncio.wait_for(asyncio.gather(*(p.future for p in ps)), 10)
            t[0] = 3000.0
            ctl.tick()
            assert core.states()["draining"] + len([r for r in made if r.stopped]) == 2
            await until(lambda: len(core.replicas) == 1, what="two drained")
            t[0] = 4000.0
            ctl.tick()
            assert policy.seen[-1].replicas_starting == 0
        finally:
            await core.close()
        assert sum(len(r.served) for r in [r0, *made]) >= 30
    asyncio.run(run())
