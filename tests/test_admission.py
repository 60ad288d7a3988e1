"""Deadline-aware admission (issue 9, build item 2) and the deadline timer (item 3): the pure estimate
(scheduling/admission.py), the serving core under 3x overload with a fake replica of known service
time, refusals over HTTP (503 + Retry-After, 504), and a queued request answered at its deadline while
the replica is busy."""

from __future__ import annotations

import asyncio
import math
import random
import time

import httpx
import numpy as np
import pytest

from sponge.runtime.replica import BatchResult
from sponge.scheduling.admission import ADMIT, HOPELESS, OVERLOADED, AdmissionControl, play, retry_after_s
from sponge.scheduling.batcher import ExpiryPolicy
from sponge.server.core import DeadlineExpired, ServerBusy, ServingCore
from sponge.server.memory import IdleTrimmer
from sponge.server.metrics import Metrics
from sponge.server.slo import Budget

from test_front_door_fixes import FakeReplica, counter, infer_body, make_app, make_core, until


def submit_one(core, budget_ms: float):
    """Submit a 1-image request arriving now with a `budget_ms` budget."""
    now = core.clock()
    return core.submit({"x": np.ones((1, 4), np.float32)}, 1, Budget(budget_ms, 0, budget_ms, now + budget_ms), now)


def flat(ms: float):
    return lambda k: ms


def linear(fixed: float, per_image: float):
    return lambda k: fixed + per_image * k


# ---- the pure estimate ---------------------------------------------------------------------------------
def test_play_serves_like_the_batcher_greedy_batches_to_the_first_free_replica():
    q = [(100.0, 1), (110.0, 2), (120.0, 1), (130.0, 3)]
    # one replica free at 0, b = 4: [1, 2, 1] -> 10 + 4 = 14; then [3] -> 14 + 13 = 27
    assert play(q, [0.0], 4, linear(10, 1), expire=False) == [14.0, 14.0, 14.0, 27.0]
    # two replicas (free at 0 and 5), b = 1, 10 ms each
    assert play(q, [5.0, 0.0], 1, flat(10), expire=False) == [10.0, 15.0, 20.0, 25.0]
    # a request larger than b runs alone
    assert play([(50.0, 6)], [0.0], 4, linear(0, 2), expire=False) == [12.0]


def test_play_drops_a_head_that_cannot_finish_even_alone_as_the_batcher_expires_it():
    q = [(5.0, 1), (30.0, 1)]  # the first cannot finish by 5 when started at 0 with 10 ms: no service time
    fin = play(q, [0.0], 1, flat(10), expire=True)
    assert math.isinf(fin[0]) and fin[1] == 10.0
    assert play(q, [0.0], 1, flat(10), expire=False) == [10.0, 20.0]  # serve_late: it is served


def test_unknown_latency_admits():
    ac = AdmissionControl()
    assert ac.check(0.0, 1.0, 1, [(0.5, 1)] * 10, [100.0], 1, None).admit
    assert ac.check(0.0, 1.0, 1, [(0.5, 1)] * 10, [100.0], 1, flat(0.0)).admit  # nothing measured yet


def test_budget_shorter_than_one_inference_on_an_idle_replica_is_504():
    v = AdmissionControl().check(1000.0, 1040.0, 2, [], [1000.0], 8, linear(10, 20))
    assert v.status == HOPELESS and "takes ~50.0 ms" in v.reason
    assert AdmissionControl().check(1000.0, 1050.0, 2, [], [1000.0], 8, linear(10, 20)).status == ADMIT


def test_backlog_ahead_in_edf_order_and_work_in_flight_decide_503():
    ac = AdmissionControl()
    ahead = [(10.0 * (i + 1), 1) for i in range(5)]  # 5 images, 10 ms each at b = 1, each just on time
    v = ac.check(0.0, 60.0, 1, ahead, [0.0], 1, flat(10))
    assert v.admit and v.finish_ms == 60.0  # behind the five
    v = ac.check(0.0, 59.0, 1, ahead, [0.0], 1, flat(10))
    # at its turn (50) it could not finish by 59: the batcher would drop it, so it is refused now
    assert v.status == OVERLOADED and math.isinf(v.finish_ms) and v.displaced == 0
    assert "hopeless at its turn behind 5 queued" in v.reason
    v = ac.check(0.0, 25.0, 1, ahead, [0.0], 1, flat(10), expire=False)  # after 10 and 20: finish 30
    assert v.status == OVERLOADED and v.finish_ms == 30.0 and "behind 2 queued image(s)" in v.reason
    v = ac.check(0.0, 20.0, 1, [], [15.0], 1, flat(10), expire=False)  # the replica frees at 15: 25 > 20
    assert v.status == OVERLOADED and v.finish_ms == 25.0 and v.retry_after_s == 1 and "1 replica(s) busy" in v.reason
    assert ac.check(0.0, 20.0, 1, [], [15.0], 1, flat(10)).status == OVERLOADED  # (expiring: hopeless at 15)
    assert ac.check(0.0, 25.0, 1, [], [15.0], 1, flat(10)).admit
    # an earlier deadline behind: 50 queued images of later deadlines do not count when they have slack
    later = [(10_000.0 + i, 1) for i in range(50)]
    assert ac.check(0.0, 15.0, 1, later, [0.0], 1, flat(10)).admit


def test_displacing_an_admitted_request_is_refused_unless_protection_is_off():
    queued = [(20.0, 1), (40.0, 1)]  # served at 10 and 20 with 10 ms each: the second has 20 ms slack
    assert AdmissionControl().check(0.0, 15.0, 1, queued, [0.0], 1, flat(10)).admit  # all still meet
    tight = [(20.0, 1), (20.0, 1)]  # served at 10 and 20: no slack at all
    v = AdmissionControl().check(0.0, 15.0, 1, tight, [0.0], 1, flat(10))
    assert v.status == OVERLOADED and v.displaced == 1 and "push 1 admitted" in v.reason
    assert AdmissionControl(protect_admitted=False).check(0.0, 15.0, 1, tight, [0.0], 1, flat(10)).admit
    # a queued request that misses anyway (here: hopeless already, the batcher drops it) is not held
    # against the newcomer even though the newcomer goes after it
    doomed = [(5.0, 1), (200.0, 1)]
    v = AdmissionControl().check(0.0, 50.0, 1, doomed, [0.0], 1, flat(10))
    assert v.admit and v.finish_ms == 10.0


def test_batching_shares_the_batch_with_the_queue_ahead():
    ac = AdmissionControl()
    queued = [(100.0, 1)] * 3
    v = ac.check(0.0, 40.0 + 100.0, 1, queued, [0.0], 4, linear(10, 5))  # one batch of 4: 30 ms
    assert v.admit and v.finish_ms == 30.0
    v = ac.check(0.0, 140.0, 1, queued * 2, [0.0], 4, linear(10, 5))  # 6 ahead: second batch [2 + 1] ends 55
    assert v.admit and v.finish_ms == 30.0 + 25.0


def test_more_replicas_serve_the_backlog_in_parallel():
    ahead = [(500.0, 1)] * 2
    assert AdmissionControl().check(0.0, 15.0 + 500, 1, ahead, [0.0], 1, flat(10)).finish_ms == 30.0
    assert AdmissionControl().check(0.0, 15.0 + 500, 1, ahead, [0.0, 0.0, 0.0], 1, flat(10)).finish_ms == 10.0


def test_headroom_scales_the_backlog_but_not_the_hopeless_check():
    ac = AdmissionControl(headroom=1.5)
    assert ac.check(0.0, 10.0, 1, [], [0.0], 1, flat(10)).status == OVERLOADED  # 15 > 10 with headroom
    assert ac.check(0.0, 9.0, 1, [], [0.0], 1, flat(10)).status == HOPELESS
    with pytest.raises(ValueError):
        AdmissionControl(headroom=0.9)


def test_retry_after_is_whole_seconds_at_least_one():
    assert retry_after_s(1.0) == 1 and retry_after_s(1000.0) == 1 and retry_after_s(1001.0) == 2
    assert retry_after_s(math.inf) == 1


# ---- the serving core: 3x overload with a fake replica of known service time -----------------------------
class TimedReplica(FakeReplica):
    """Takes `service_ms` of wall time per batch (sleeping: robust to a busy host) and reports it."""

    def __init__(self, service_ms: float) -> None:
        super().__init__()
        self.service_ms = service_ms

    async def infer(self, inputs):
        self.calls.append(inputs)
        await asyncio.sleep(self.service_ms / 1000.0)
        return BatchResult({"y": inputs["x"] * 2}, self.service_ms, 1)


def test_under_3x_overload_admitted_requests_meet_their_deadlines_and_the_rest_are_refused_at_once():
    service_ms, seconds = 20.0, 2.0  # capacity 50 req/s at b = 1
    rate = 3 * 1000.0 / service_ms
    rng = random.Random(7)

    async def run():
        rep = TimedReplica(service_ms)
        core = make_core(rep)
        core.start()
        admitted, refused, hopeless, submit_ms = [], 0, 0, []
        loop_t0 = time.monotonic()
        try:
            for i in range(int(rate * seconds)):
                delay = loop_t0 + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                now = core.clock()
                budget = rng.uniform(60.0, 400.0)
                t0 = time.perf_counter()
                try:
                    p = core.submit({"x": np.ones((1, 4), np.float32)}, 1, Budget(budget, 0, budget, now + budget),
                                    now)
                    admitted.append(p)
                except ServerBusy as exc:
                    refused += 1
                    assert exc.retry_after_s >= 1
                except DeadlineExpired:
                    hopeless += 1
                submit_ms.append((time.perf_counter() - t0) * 1000.0)
            await asyncio.wait([p.future for p in admitted], timeout=10)
            on_time = late = expired = 0
            for p in admitted:
                if p.future.exception() is None:
                    done_ms = p.arrival_ms + p.future.result().queue_ms + p.future.result().infer_ms
                    on_time += done_ms <= p.budget.deadline_ms + 5.0
                    late += done_ms > p.budget.deadline_ms + 5.0
                else:
                    expired += 1
            return on_time, late, expired, refused, hopeless, submit_ms, len(rep.calls)
        finally:
            await core.close()

    on_time, late, expired, refused, hopeless, submit_ms, batches = asyncio.run(run())
    admitted = on_time + late + expired
    capacity = seconds * 1000.0 / service_ms  # 100 requests in 2 s
    assert refused > 0.5 * capacity, (refused, admitted)  # the excess is refused, at once
    assert admitted >= 0.7 * capacity
    assert on_time >= 0.7 * capacity, (on_time, late, expired, refused)  # goodput near capacity
    assert on_time >= 0.85 * admitted, (on_time, late, expired)  # most admitted ones meet their deadline
    assert sorted(submit_ms)[int(0.99 * len(submit_ms))] < 10.0  # a refusal costs no waiting
    assert hopeless == 0  # every budget here is longer than one inference


# ---- over HTTP: 503 with Retry-After, 504 for a budget shorter than one inference -----------------------
def test_refusals_over_http_are_503_with_retry_after_and_504_and_counted():
    async def run():
        rep = FakeReplica(hang=True)
        core = make_core(rep)
        core.estimate.observe(1, 100.0)  # one inference: ~100 ms
        core.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(core)), base_url="http://t",
                                         timeout=30) as c:
                first = asyncio.create_task(c.post("/v2/models/m/infer", content=infer_body(slo_ms=60000)))
                await until(lambda: len(rep.calls) == 1, what="first request in flight")
                busy = await c.post("/v2/models/m/infer", content=infer_body(slo_ms=150))  # behind ~100 ms
                hopeless = await c.post("/v2/models/m/infer", content=infer_body(slo_ms=50))
                queued = asyncio.create_task(c.post("/v2/models/m/infer", content=infer_body(slo_ms=60000)))
                await until(lambda: len(core.queue) == 1, what="a request with time to spare queued")
                rep.release.set()
                ok = [await first, await queued]
                text = (await c.get("/metrics")).text
                return busy, hopeless, ok, text
        finally:
            rep.release.set()
            await core.close()

    busy, hopeless, ok, text = asyncio.run(run())
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1", busy.text
    assert "server busy: overloaded" in busy.json()["error"]
    assert hopeless.status_code == 504 and "cannot be met" in hopeless.json()["error"], hopeless.text
    assert [r.status_code for r in ok] == [200, 200]
    assert 'sponge_admission_refusals_total{model="m",reason="overloaded"} 1.0' in text
    assert 'sponge_admission_refusals_total{model="m",reason="hopeless"} 1.0' in text
    assert 'sponge_admission_refusal_latency_seconds_count{model="m"} 2.0' in text


def test_admission_off_queues_what_admission_would_refuse():
    async def run():
        rep = FakeReplica(hang=True)
        core = make_core(rep, admission=False)
        core.estimate.observe(1, 100.0)
        core.start()
        try:
            submit_one(core, 60000)
            await until(lambda: len(rep.calls) == 1, what="dispatch")
            submit_one(core, 150)  # no 503
            return len(core.queue)
        finally:
            rep.release.set()
            await core.close()
    assert asyncio.run(run()) == 1


# ---- the deadline timer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimate_ms", [0.0, 100.0])
def test_queued_request_is_answered_at_its_deadline_while_the_replica_is_busy(estimate_ms):
    """The replica holds its batch (2 s watchdog); the queued request's deadline (300 ms) can no longer
    be met at 300 - one inference: it is answered 504 then, not when the replica frees."""
    async def run():
        rep = FakeReplica(hang=True)
        core = make_core(rep, admission=False)  # the timer, not admission, is under test
        if estimate_ms:
            core.estimate.observe(1, estimate_ms)
        core.start()
        try:
            submit_one(core, 60000)
            await until(lambda: len(rep.calls) == 1, what="dispatch")
            now = core.clock()
            t0 = time.monotonic()
            q = core.submit({"x": np.ones((1, 4), np.float32)}, 1, Budget(300, 0, 300, now + 300), now)
            with pytest.raises(DeadlineExpired, match="deadline passed in the queue"):
                await asyncio.wait_for(q.future, 5)
            waited = (time.monotonic() - t0) * 1000.0
            assert rep.killed == 0 and len(rep.calls) == 1  # the replica was still busy
            assert counter(core, "expired") == 0  # (no HTTP here) ...
            expired = core.metrics.registry.get_sample_value("sponge_queue_expired_total", {"model": "m"})
            return waited, expired
        finally:
            rep.release.set()
            await core.close()

    waited, expired = asyncio.run(run())
    due = 300.0 - estimate_ms
    assert due - 5.0 <= waited <= due + 250.0, waited  # at its moment (slack for a busy host)
    assert expired == 1.0


def test_deadline_timer_rearms_when_an_earlier_deadline_arrives():
    async def run():
        rep = FakeReplica(hang=True)
        core = make_core(rep, admission=False)
        core.start()
        try:
            submit_one(core, 60000)
            await until(lambda: len(rep.calls) == 1, what="dispatch")
            late = submit_one(core, 5000)
            await asyncio.sleep(0.05)  # the timer now sleeps ~5 s for `late`
            now = core.clock()
            t0 = time.monotonic()
            soon = core.submit({"x": np.ones((1, 4), np.float32)}, 1, Budget(200, 0, 200, now + 200), now)
            with pytest.raises(DeadlineExpired):
                await asyncio.wait_for(soon.future, 3)
            return (time.monotonic() - t0) * 1000.0, late.future.done()
        finally:
            rep.release.set()
            await core.close()
    waited, late_done = asyncio.run(run())
    assert 195.0 <= waited <= 350.0 and not late_done


def test_reachable_latency_is_the_estimate_scaled_to_the_largest_allocation_or_the_learned_model():
    core = ServingCore("m", [FakeReplica()], 1, 4, ExpiryPolicy.REJECT, 0.0, Metrics(), 1000,  # type: ignore[list-item]
                       max_cpu_m=2000)
    assert core.reachable_ms(1) == 0.0  # nothing measured: admission admits
    core.estimate.observe(1, 40.0)
    assert core.reachable_ms(1) == pytest.approx(20.0)  # at 2000 m at most twice as fast as at 1000 m
    core.reachable_latency = lambda k: 7.0 * k
    assert core.reachable_ms(3) == pytest.approx(21.0)  # the learned model's, when there is one
    core.dispatch_overhead_ms = 1.5
    assert core.reachable_ms(3) == pytest.approx(22.5)  # plus what a batch costs beyond the runtime


def test_admission_follows_the_learned_model_while_the_controller_runs_on_it():
    from test_learning_policy import MODEL, FakeLearner, make, obs, sample

    from sponge.server.serve import follow_learned_model

    core = ServingCore("m", [FakeReplica()], 1, 4, ExpiryPolicy.REJECT, 0.0, Metrics(), 1000,  # type: ignore[list-item]
                       max_cpu_m=2000)
    learner = FakeLearner()
    pol = make(learner, [])
    pol.decide(obs(0, (sample(1),)))
    follow_learned_model(core, pol)
    assert pol.mode == "safe" and core.reachable_latency is None  # safe mode: the online estimate
    pol.decide(obs(1000, (sample(2), sample(3))))
    follow_learned_model(core, pol)
    assert pol.mode == "model" and core.reachable_ms(4) == pytest.approx(MODEL.latency_ms(4, 2000))
    learner.broken = True
    pol.decide(obs(2000))
    follow_learned_model(core, pol)
    assert core.reachable_latency is None


def test_queue_lists_deadlines_and_sizes_in_edf_order_ties_by_arrival():
    from sponge.scheduling.edf import EDFQueue

    q: EDFQueue[str] = EDFQueue(8)
    for payload, deadline, size in (("a", 30.0, 1), ("b", 10.0, 2), ("c", 30.0, 3), ("d", 20.0, 4)):
        q.push(payload, deadline, 0.0, size)
    assert q.deadlines_sizes() == [(10.0, 2), (20.0, 4), (30.0, 1), (30.0, 3)]


# ---- memory: a burst's freed heap is given back once idle ----------------------------------------------
def test_idle_trimmer_trims_once_after_each_busy_period():
    calls: list[int] = []
    t = [0.0]
    trim = IdleTrimmer(min_gap_s=5.0, clock=lambda: t[0], trim=lambda pad: calls.append(pad) or 1)
    assert not trim(0, 0)  # idle from the start: nothing to give back
    assert not trim(10, 3)  # busy
    t[0] = 1.0
    assert trim(10, 0) and calls == [0]  # the first idle interval after the burst
    t[0] = 20.0
    assert not trim(10, 0)  # still idle: once per busy period
    assert not trim(11, 0)  # an arrival: busy again
    t[0] = 22.0
    assert trim(11, 0) and calls == [0, 0] and trim.trims == 2  # idle after the second burst
    t[0] = 23.0
    assert not trim(12, 0)  # busy ...
    t[0] = 24.0
    assert not trim(12, 0) and trim.trims == 2  # ... idle again, but only 2 s after the last trim
    t[0] = 30.0
    assert trim(12, 0) and trim.trims == 3


def test_malloc_trim_gives_a_freed_burst_back():
    from sponge.server.memory import _malloc_trim

    fn = _malloc_trim()
    if fn is None:
        pytest.skip("not glibc")
    assert fn(0) in (0, 1)
