"""Batches are sized in images (a request's first-axis rows), not requests: l(b, c) counts images.

The EDF queue knows each entry's size, the batcher forms batches of at most b images from the head
(never splitting a request; an oversized request runs alone), the service estimate and the metrics are
keyed by images, and the simulator batches through the same rule."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sponge.perf.latency_model import LatencyModel
from sponge.perf.samples import BatchSample
from sponge.policy import make_policy
from sponge.runtime.replica import BatchResult
from sponge.scheduling.batcher import Batcher, Dispatch, ExpiryPolicy, Wait
from sponge.scheduling.edf import EDFQueue
from sponge.server.core import ServingCore
from sponge.server.metrics import Metrics
from sponge.server.slo import Budget
from sponge.sim import RequestSet, SimConfig, simulate


def per_image(ms: float):
    return lambda b: ms * b


def sizes(entries) -> list[int]:
    return [e.size for e in entries]


# ---- the queue and the batcher (pure) -------------------------------------------------------------------
def test_queue_entries_carry_their_size_and_default_to_one():
    q: EDFQueue[str] = EDFQueue(10)
    a = q.push("a", deadline_ms=100, arrival_ms=0)
    b = q.push("b", deadline_ms=50, arrival_ms=0, size=7)
    assert a.size == 1 and b.size == 7
    assert q.images == 8 and len(q) == 2
    q.pop()
    assert q.images == 1
    q.remove(a)
    assert q.images == 0


def test_two_requests_of_four_images_fill_a_batch_of_eight():
    # By request count 2 < 8 the batcher would wait for more; by images the batch is full.
    q: EDFQueue[str] = EDFQueue(10)
    q.push("x", 1000, 0, size=4)
    q.push("y", 1000, 0, size=4)
    act = Batcher(8, per_image(1.0), max_wait_ms=50).next_action(q, now_ms=0)
    assert isinstance(act.step, Dispatch) and [e.payload for e in act.step.entries] == ["x", "y"]


def test_batch_takes_the_head_up_to_b_images_without_splitting_or_skipping():
    q: EDFQueue[str] = EDFQueue(10)
    for name, d, n in [("a", 10, 3), ("b", 20, 3), ("c", 30, 3), ("d", 40, 1)]:
        q.push(name, d, 0, size=n)
    act = Batcher(8, per_image(1.0)).next_action(q, now_ms=0)
    # a + b = 6 images; c (3) does not fit; d would, but it is behind c in EDF order: not taken.
    assert isinstance(act.step, Dispatch) and [e.payload for e in act.step.entries] == ["a", "b"]
    assert q.images == 4 and [e.payload for e in q] == ["c", "d"]


def test_a_request_larger_than_b_is_dispatched_alone():
    q: EDFQueue[str] = EDFQueue(10)
    q.push("big", 100, 0, size=20)
    q.push("small", 200, 0, size=1)
    b = Batcher(8, per_image(1.0), max_wait_ms=50)
    act = b.next_action(q, now_ms=0)
    assert isinstance(act.step, Dispatch) and [e.payload for e in act.step.entries] == ["big"]
    act = b.next_action(q, now_ms=0)  # the small one waits for company as before
    assert act.expired == [] and isinstance(act.step, Wait) and act.step.until_ms == 50


def test_partial_batch_waits_by_images_and_slack_of_a_full_batch():
    # 3 images queued of b = 8: wait, bounded by the head's slack for a full batch of 8 images (80 ms).
    q: EDFQueue[str] = EDFQueue(10)
    q.push("h", deadline_ms=100, arrival_ms=0, size=3)
    act = Batcher(8, per_image(10.0), max_wait_ms=50).next_action(q, now_ms=1)
    assert isinstance(act.step, Wait) and act.step.until_ms == 20  # 100 - 8 * 10


def test_expiry_uses_the_requests_own_size():
    # Served next and alone, a 4-image request takes 40 ms: with 20 ms left it cannot make it.
    q: EDFQueue[str] = EDFQueue(10)
    q.push("four", deadline_ms=120, arrival_ms=0, size=4)
    q.push("one", deadline_ms=125, arrival_ms=0, size=1)
    act = Batcher(8, per_image(10.0), ExpiryPolicy.REJECT).next_action(q, now_ms=100)
    assert [e.payload for e in act.expired] == ["four"]
    assert isinstance(act.step, Dispatch) and [e.payload for e in act.step.entries] == ["one"]


def test_unit_sizes_behave_exactly_as_request_counts():
    q: EDFQueue[int] = EDFQueue(10)
    for i in range(5):
        q.push(i, 100 + i, 0)
    act = Batcher(3, per_image(1.0)).next_action(q, now_ms=0)
    assert isinstance(act.step, Dispatch) and sizes(act.step.entries) == [1, 1, 1] and len(q) == 2


# ---- the serving core: estimate, metrics, Served, batch samples keyed by images ---------------------------
class FakeReplica:
    name = "r0"
    ready = True
    on_death = None

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def infer(self, inputs):
        x = inputs["x"]
        self.batches.append(x.shape[0])
        await asyncio.sleep(0)
        return BatchResult({"y": x * 2}, infer_ms=5.0, threads=1)

    async def stop(self) -> None:
        pass


def _budget(now: float) -> Budget:
    return Budget(slo_ms=10_000.0, network_ms=0.0, budget_ms=10_000.0, deadline_ms=now + 10_000.0)


@pytest.mark.parametrize("batch,expect", [(8, [5]), (4, [3, 2])])
def test_core_batches_by_images_and_reports_images(batch, expect):
    async def main():
        t = [0.0]
        rep = FakeReplica()
        metrics = Metrics()
        core = ServingCore("m", [rep], batch, 16, ExpiryPolicy.REJECT, 0.0, metrics, 1500, clock=lambda: t[0])
        a = core.submit({"x": np.arange(3, dtype=np.float32)}, 3, _budget(0.0), 0.0)
        b = core.submit({"x": np.arange(10, 12, dtype=np.float32)}, 2, _budget(0.0), 0.0)
        core.start()
        sa, sb = await asyncio.wait_for(asyncio.gather(a.future, b.future), 5)
        await core.close()
        return rep, core, metrics, sa, sb

    rep, core, metrics, sa, sb = asyncio.run(main())
    assert rep.batches == expect
    np.testing.assert_array_equal(sa.outputs["y"], [0, 2, 4])
    np.testing.assert_array_equal(sb.outputs["y"], [20, 22])
    assert sa.batch_size == expect[0] and sb.batch_size == expect[-1]
    assert sa.batch_requests == (2 if len(expect) == 1 else 1)
    assert set(core.estimate._ewma) == set(expect)  # keyed by images
    assert metrics.batch_size.labels("m")._sum.get() == sum(expect)
    assert [(s.images, s.cpu_m, s.latency_ms) for s in core.recent_batches] == [(n, 1500, 5.0) for n in expect]
    assert all(isinstance(s, BatchSample) for s in core.recent_batches)


# ---- the simulator batches through the same rule ------------------------------------------------------------
MODEL = LatencyModel(g=100.0, d=0.0, e=0.0, h=20.0)  # l(b, 1000 m) = 100 b + 20 ms


def test_request_set_images_default_to_one():
    r = RequestSet.from_arrays([0.0, 1.0], budget_ms=100.0)
    assert r.images.tolist() == [1, 1]
    with pytest.raises(ValueError):
        RequestSet.from_arrays([0.0], budget_ms=100.0, images=[0])


def test_simulator_batches_multi_image_requests_by_images():
    # All at t=0, equal deadlines (FIFO), b = 6 images at 1000 m; the first (3 images) waits up to 10 ms for
    # company, the second fills the batch:
    #   [3, 3] -> 6 images, 620 ms; then [2] (5 does not fit) -> 220 ms, ends 840; then [5] -> 520, ends 1360;
    #   then [9] alone (more than b) -> 920 ms, ends 2280.
    req = RequestSet.from_arrays(np.zeros(5), budget_ms=5000.0, duration_ms=3000.0, images=[3, 3, 2, 5, 9])
    r = simulate(req, MODEL, make_policy("static", MODEL, cpu_m=1000, batch=6),
                 SimConfig(initial_cpu_m=1000, initial_batch=6, max_wait_ms=10.0))
    assert r.server_ms.tolist() == [620.0, 620.0, 840.0, 1360.0, 2280.0]
    assert r.batch.tolist() == [6, 6, 2, 5, 9]  # the batch each request was served in, in images
    assert r.counts()["ok"] == 5


def test_simulator_admission_expiry_uses_the_request_size():
    # l(1) = 120 ms, l(4) = 420 ms: a 4-image request with a 300 ms budget is hopeless, a 1-image one is not.
    req = RequestSet.from_arrays([0.0, 1000.0], budget_ms=300.0, duration_ms=2000.0, images=[4, 1])
    r = simulate(req, MODEL, make_policy("static", MODEL, cpu_m=1000, batch=8),
                 SimConfig(initial_cpu_m=1000, initial_batch=8))
    assert [x.outcome for x in r.records()] == ["expired", "ok"]
