"""Vertical scaling of the live replicas: one actuator per replica process, threads kept in step.

The runtime's threads follow the allocation twice over: the worker polls its own quota (as it must
under an external resizer such as the kubelet) and, since we know, we also tell it at once."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sponge.observe import AllocationMeter
from sponge.runtime.replica import Replica
from sponge.scaling.base import CpuActuator
from sponge.scaling.self_limit import threads_for
from sponge.server.core import ServingCore

log = logging.getLogger("sponge.scaler")


@dataclass
class ResizeResult:
    replica: str
    cpu_m: int  # what the actuator reads back
    threads: int
    apply_ms: float


class NullActuator:
    """`--actuator none`: allocations are bookkeeping only (e.g. when something else enforces CPU)."""

    kind = "none"
    granularity_m = 1

    def __init__(self, cpu_m: int) -> None:
        self._cpu_m = cpu_m

    def attach(self, pid: int) -> None:
        pass

    def apply(self, cpu_m: int) -> None:
        self._cpu_m = cpu_m

    def current(self) -> int:
        return self._cpu_m

    def close(self) -> None:
        pass


class ReplicaScaler:
    """Applies CPU allocations to replicas in place and keeps the core's bookkeeping in step."""

    def __init__(self, core: ServingCore, actuators: dict[str, CpuActuator], min_cpu_m: int, max_cpu_m: int) -> None:
        self.core = core
        self.actuators = actuators
        self.min_cpu_m = min_cpu_m
        self.max_cpu_m = max_cpu_m
        # what was applied, when: the live run's bill (core-seconds), as the simulator integrates it
        self.allocation = AllocationMeter(core.clock(), {r.name: core.cpu_m[r.name] for r in core.replicas})
        for r in core.replicas:
            r.on_start = self._attach
        core.on_replica_gone = self._release

    def add(self, replica: Replica, actuator: CpuActuator, cpu_m: int) -> None:
        """A new replica's actuator (before it starts: its process joins the cgroup when it does). It is
        billed from now: a starting replica costs its allocation (DESIGN §5), as in the simulator."""
        self.actuators[replica.name] = actuator
        replica.on_start = self._attach
        self.allocation.set(self.core.clock(), replica.name, cpu_m)
        self.core.metrics.cpu.labels(replica.name).set(cpu_m)

    def _release(self, replica: Replica) -> None:
        """The replica is gone (drained, or failed to start): its bill stops, its cgroup goes."""
        self.allocation.set(self.core.clock(), replica.name, None)
        act = self.actuators.pop(replica.name, None)
        if act is not None:
            try:
                act.close()
            except Exception:
                log.exception("closing the actuator of replica %s failed", replica.name)
        for g in (self.core.metrics.cpu, self.core.metrics.threads):
            try:
                g.remove(replica.name)
            except KeyError:
                pass

    def _attach(self, replica: Replica) -> None:
        """A (re)started replica process joins its cgroup at the allocation in force."""
        act = self.actuators[replica.name]
        if replica.pid is not None:  # a remote worker (pid None) is its host's or the kubelet's to place
            act.attach(replica.pid)
        # a pod's resize still on its way (not yet in force) stays the wish: a reconnect does not take it back
        act.apply(self.wish(replica.name) or self.core.cpu_m[replica.name])
        replica.set_threads(threads_for(self.core.cpu_m[replica.name]))

    def resize(self, name: str, cpu_m: int) -> ResizeResult:
        if name not in self.actuators:
            raise KeyError(f"no replica named '{name}' (have {sorted(self.actuators)})")
        if not self.min_cpu_m <= cpu_m <= self.max_cpu_m:
            raise ValueError(f"cpu_m must be in [{self.min_cpu_m}, {self.max_cpu_m}], got {cpu_m}")
        act = self.actuators[name]
        t0 = time.perf_counter()
        act.apply(cpu_m)
        applied = act.current()
        apply_ms = (time.perf_counter() - t0) * 1000
        threads = self._book(name, applied, resized=True)
        self.core.metrics.resize_duration.observe(apply_ms / 1000)
        log.debug("replica %s resized to %d m (%d threads) in %.2f ms", name, applied, threads, apply_ms)
        return ResizeResult(name, applied, threads, apply_ms)

    def _book(self, name: str, applied: int, resized: bool = False) -> int:
        """The allocation in force of replica `name` is `applied`: threads, the core's bookkeeping, the bill,
        metrics. Returns the thread count for it."""
        replica = next((r for r in self.core.replicas if r.name == name), None)
        threads = threads_for(applied)
        if replica is not None and replica.threads != threads:  # per-batch sizing resizes often, mostly within one thread count
            replica.set_threads(threads)
        if resized or self.core.cpu_m.get(name) != applied:
            self.core.note_resize(name, applied)  # before cpu_m changes: the running work's progress so far
            self.core.estimate.resized(applied)  # latencies seen at the old allocation now only bound it
        self.core.cpu_m[name] = applied
        self.allocation.set(self.core.clock(), name, applied)
        m = self.core.metrics
        m.cpu.labels(name).set(applied)
        m.threads.labels(name).set(threads)
        return threads

    def observed(self, name: str, cpu_m: int) -> None:
        """An actuator that applies asynchronously (a pod resized by the kubelet) read a new allocation in
        force for replica `name`: from now on the core plans with it and bills it. On the event loop."""
        if name not in self.actuators or name not in self.core.cpu_m or self.core.cpu_m[name] == cpu_m:
            return
        old = self.core.cpu_m[name]
        self._book(name, cpu_m)
        log.info("replica %s: %d m now in force (was %d m)", name, cpu_m, old)

    def wish(self, name: str) -> int | None:
        """The allocation last asked of an actuator that applies asynchronously (a pod's resize may still be
        pending, deferred or infeasible); None for the others (what they apply is in force at once)."""
        wish = getattr(self.actuators.get(name), "wish", None)
        return wish() if callable(wish) else None

    def resize_all(self, cpu_m: int) -> list[ResizeResult]:
        return [self.resize(name, cpu_m) for name in self.actuators]

    def cpu_usage_ns(self, name: str) -> int | None:
        act = self.actuators.get(name)
        usage = getattr(act, "cpu_usage_ns", None)
        return usage() if usage is not None else None

    def close(self) -> None:
        for act in self.actuators.values():
            try:
                act.close()
            except Exception:  # cleanup must go on for the others
                log.exception("closing actuator %s failed", act.kind)
