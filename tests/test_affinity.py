"""The CPU-affinity fallback actuator: replicas get distinct CPUs, and a replica restart is survivable.

Real processes are spawned (a sleeping Python child) and killed in teardown, by PID only.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest

from sponge.scaling.affinity import AffinityActuator
from sponge.scaling.procfs import task_ids

MY_CPUS = sorted(os.sched_getaffinity(0))
needs_2_cpus = pytest.mark.skipif(len(MY_CPUS) < 2, reason="needs at least 2 CPUs in this process's affinity")


@pytest.fixture
def sleeper(spawn: Callable[..., subprocess.Popen]) -> Callable[[], subprocess.Popen]:
    """Start sleeping Python children (the shared `spawn` fixture kills exactly those PIDs at teardown)."""
    return lambda: spawn("import time; time.sleep(30)", wait_ready=False)


def _kill(p: subprocess.Popen[bytes]) -> None:
    """Kill and reap one child: its pid is then gone from /proc, as after a replica crash."""
    os.kill(p.pid, 9)
    p.wait(timeout=5)


def _affinity(pid: int) -> set[int]:
    """The union of the affinity masks of all threads of `pid`."""
    out: set[int] = set()
    for tid in task_ids(pid):
        out |= os.sched_getaffinity(tid)
    return out


@needs_2_cpus
def test_two_replicas_at_one_core_get_distinct_cpus(sleeper: Callable[[], subprocess.Popen[bytes]]) -> None:
    pool = MY_CPUS[:2]
    acts = [AffinityActuator(f"r{i}", cpus=pool, index=i, replicas=2) for i in range(2)]
    procs = [sleeper() for _ in acts]
    try:
        for act, p in zip(acts, procs):
            act.attach(p.pid)
            act.apply(1000)
        a, b = (_affinity(p.pid) for p in procs)
        assert len(a) == 1 and len(b) == 1 and a != b
        assert a | b == set(pool)
        assert all(act.current() == 1000 for act in acts)
        for act in acts:  # whole pool when one replica asks for all of it
            act.apply(2000)
        assert _affinity(procs[0].pid) == _affinity(procs[1].pid) == set(pool)
    finally:
        for act in acts:
            act.close()


def test_replicas_start_evenly_spread_in_the_pool() -> None:
    pool = [0, 1, 2, 3]
    acts = [AffinityActuator(f"r{i}", cpus=pool, index=i, replicas=2) for i in range(2)]
    assert acts[0].cpus_for(2000) == {0, 1} and acts[1].cpus_for(2000) == {2, 3}
    assert acts[0].cpus_for(1000) == {0} and acts[1].cpus_for(1000) == {2}
    assert acts[0].cpus_for(4000) == acts[1].cpus_for(4000) == set(pool)
    more = [AffinityActuator(f"q{i}", cpus=pool, index=i, replicas=5) for i in range(5)]
    assert all(len(a.cpus_for(1000)) == 1 for a in more)  # more replicas than CPUs: still valid sets
    assert AffinityActuator("solo", cpus=pool).cpus_for(3000) == {0, 1, 2}  # default: index 0 of 1


@needs_2_cpus
def test_make_actuators_spreads_affinity_replicas() -> None:
    from sponge.config import ServerConfig
    from sponge.server.serve import make_actuators

    cfg = ServerConfig(actuator="affinity", guaranteed=False)
    acts, why = make_actuators(cfg, ["a", "b"], 1000)
    try:
        assert "affinity" in why
        assert acts["a"].cpus_for(1000) != acts["b"].cpus_for(1000)  # type: ignore[attr-defined]
    finally:
        for act in acts.values():
            act.close()


def test_restarted_replica_can_be_resized(sleeper: Callable[[], subprocess.Popen[bytes]]) -> None:
    act = AffinityActuator("restart", cpus=MY_CPUS)
    first = sleeper()
    try:
        act.attach(first.pid)
        act.apply(1000)
        used_before = act.cpu_usage_ns()
        _kill(first)  # the replica crashes ...
        second = sleeper()  # ... and its dispatch loop starts a new process
        act.attach(second.pid)
        act.apply(1000)  # raised "pid ... is gone" before the fix
        assert _affinity(second.pid) == {MY_CPUS[0]}
        assert act.current() == 1000
        assert act.cpu_usage_ns() >= used_before  # a cumulative counter does not go back
        if len(MY_CPUS) >= 2:
            act.apply(2000)
            assert act.current() == 2000 and _affinity(second.pid) == set(MY_CPUS[:2])
    finally:
        act.close()


def test_apply_drops_a_dead_process_even_before_the_new_one_attaches(
        sleeper: Callable[[], subprocess.Popen[bytes]]) -> None:
    act = AffinityActuator("dead", cpus=MY_CPUS)
    p = sleeper()
    try:
        act.attach(p.pid)
        _kill(p)
        act.apply(1000)  # nothing alive to pin: not an error (the restart re-attaches and re-applies)
        second = sleeper()
        act.attach(second.pid)
        act.apply(1000)
        assert _affinity(second.pid) == {MY_CPUS[0]}
    finally:
        act.close()


def test_attach_replaces_the_previous_process_and_releases_it(
        sleeper: Callable[[], subprocess.Popen[bytes]]) -> None:
    """A replica has one process: attaching a new one lets the old one go (its affinity restored)."""
    act = AffinityActuator("replace", cpus=MY_CPUS)
    old, new = sleeper(), sleeper()
    before = os.sched_getaffinity(old.pid)
    try:
        act.attach(old.pid)
        act.apply(1000)
        act.attach(new.pid)
        act.apply(1000)
        assert os.sched_getaffinity(old.pid) == before
        assert _affinity(new.pid) == {MY_CPUS[0]}
    finally:
        act.close()
