"""EDF queue and deadline-aware batcher: pure, driven by explicit times (ms)."""

import pytest

from sponge.scheduling.batcher import Batcher, Dispatch, ExpiryPolicy, Wait
from sponge.scheduling.edf import EDFQueue, QueueFull
from sponge.scheduling.estimate import OnlineServiceEstimate


def fixed(ms_per_batch: float):
    return lambda b: ms_per_batch


def test_edf_pops_earliest_deadline_first():
    q: EDFQueue[str] = EDFQueue(10)
    q.push("loose", deadline_ms=900, arrival_ms=0)
    q.push("tight", deadline_ms=100, arrival_ms=1)
    q.push("middle", deadline_ms=500, arrival_ms=2)
    assert [e.payload for e in q.pop_many(3)] == ["tight", "middle", "loose"]


def test_edf_is_fifo_among_equal_deadlines():
    q: EDFQueue[int] = EDFQueue(10)
    for i in range(5):
        q.push(i, deadline_ms=100, arrival_ms=i)
    assert [e.payload for e in q.pop_many(5)] == [0, 1, 2, 3, 4]


def test_queue_is_bounded():
    q: EDFQueue[int] = EDFQueue(2)
    q.push(1, 10, 0)
    q.push(2, 10, 0)
    with pytest.raises(QueueFull):
        q.push(3, 10, 0)
    assert len(q) == 2


def test_remaining_ms_in_edf_order():
    q: EDFQueue[int] = EDFQueue(10)
    q.push(1, 300, 0)
    q.push(2, 150, 0)
    assert q.remaining_ms(now_ms=100) == [50, 200]


def test_remove_keeps_heap_order():
    q: EDFQueue[int] = EDFQueue(10)
    entries = [q.push(i, d, 0) for i, d in enumerate([50, 10, 40, 20, 30])]
    assert q.remove(entries[3])  # deadline 20
    assert not q.remove(entries[3])
    assert [e.deadline_ms for e in q.pop_many(10)] == [10, 30, 40, 50]


def test_full_batch_dispatches_head_b_in_edf_order():
    q: EDFQueue[int] = EDFQueue(10)
    for i, d in enumerate([500, 100, 300, 200]):
        q.push(i, d, arrival_ms=0)
    act = Batcher(batch_size=3, estimate_ms=fixed(10)).next_action(q, now_ms=0)
    assert isinstance(act.step, Dispatch)
    assert [e.deadline_ms for e in act.step.entries] == [100, 200, 300]
    assert len(q) == 1


def test_partial_batch_waits_only_while_head_slack_allows():
    # Head deadline 100, a full batch of 4 takes 30 ms: latest start 70. max_wait 50 from arrival 0 -> 50.
    q: EDFQueue[int] = EDFQueue(10)
    q.push(0, deadline_ms=100, arrival_ms=0)
    b = Batcher(batch_size=4, estimate_ms=fixed(30), max_wait_ms=50)
    act = b.next_action(q, now_ms=1)
    assert isinstance(act.step, Wait) and act.step.until_ms == 50
    # Tighter head: deadline 60 -> latest start 30 < max wait: the slack bounds the wait.
    q2: EDFQueue[int] = EDFQueue(10)
    q2.push(0, deadline_ms=60, arrival_ms=0)
    act2 = b.next_action(q2, now_ms=1)
    assert isinstance(act2.step, Wait) and act2.step.until_ms == 30
    # Once that time has come, it dispatches what there is.
    act3 = b.next_action(q2, now_ms=30)
    assert isinstance(act3.step, Dispatch) and len(act3.step.entries) == 1


def test_greedy_batcher_never_waits():
    q: EDFQueue[int] = EDFQueue(10)
    q.push(0, deadline_ms=1000, arrival_ms=0)
    q.push(1, deadline_ms=1000, arrival_ms=0)
    act = Batcher(batch_size=8, estimate_ms=fixed(5), max_wait_ms=0).next_action(q, now_ms=0)
    assert isinstance(act.step, Dispatch) and len(act.step.entries) == 2


def test_empty_queue_waits_for_arrival():
    act = Batcher(4, fixed(1)).next_action(EDFQueue(4), now_ms=0)
    assert isinstance(act.step, Wait) and act.step.until_ms is None and act.expired == []


def test_reject_policy_expires_requests_that_cannot_make_it():
    # One inference takes 20 ms. At t=100: deadline 110 cannot make it (100+20 > 110); 130 can.
    q: EDFQueue[str] = EDFQueue(10)
    q.push("already late", deadline_ms=90, arrival_ms=0)
    q.push("cannot make it", deadline_ms=110, arrival_ms=0)
    q.push("fine", deadline_ms=130, arrival_ms=0)
    act = Batcher(4, fixed(20), ExpiryPolicy.REJECT).next_action(q, now_ms=100)
    assert [e.payload for e in act.expired] == ["already late", "cannot make it"]
    assert isinstance(act.step, Dispatch) and [e.payload for e in act.step.entries] == ["fine"]


def test_serve_late_policy_keeps_and_serves_them_first():
    q: EDFQueue[str] = EDFQueue(10)
    q.push("late", deadline_ms=90, arrival_ms=0)
    q.push("fine", deadline_ms=500, arrival_ms=0)
    act = Batcher(2, fixed(20), ExpiryPolicy.SERVE_LATE).next_action(q, now_ms=100)
    assert act.expired == []
    assert isinstance(act.step, Dispatch) and [e.payload for e in act.step.entries] == ["late", "fine"]


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch size"):
        Batcher(0, fixed(1))


def test_online_estimate_scales_from_nearest_known_batch():
    est = OnlineServiceEstimate(alpha=0.5)
    assert est(4) == 0.0  # nothing observed: never expire on a guess
    est.observe(2, 10.0)
    assert est(2) == 10.0
    assert est(4) == 20.0
    est.observe(2, 20.0)
    assert est(2) == 15.0
