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

    def _attach(self, replica: Replica) -> None:
        """A (re)started replica process joins its cgroup at the allocation in force."""
        act = self.actuators[replica.name]
        assert replica.pid is not None
        act.attach(replica.pid)
        act.apply(self.core.cpu_m[replica.name])
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
        replica = next(r for r in self.core.replicas if r.name == name)
        threads = threads_for(applied)
        if replica.threads != threads:  # per-batch sizing resizes often, mostly within one thread count
            replica.set_threads(threads)
        self.core.note_resize(name, applied)  # before cpu_m changes: the running work's progress so far
        self.core.cpu_m[name] = applied
        self.allocation.set(self.core.clock(), name, applied)
        self.core.estimate.resized(applied)  # latencies seen at the old allocation now only bound it
        m = self.core.metrics
        m.cpu.labels(name).set(applied)
        m.threads.labels(name).set(threads)
        m.resize_duration.observe(apply_ms / 1000)
        log.debug("replica %s resized to %d m (%d threads) in %.2f ms", name, applied, threads, apply_ms)
        return ResizeResult(name, applied, threads, apply_ms)

    def resize_all(self, cpu_m: int) -> list[ResizeResult]:
        return [self.resize(name, cpu_m) for name in self.actuators]

    def cpu_usage_ns(self, name: str) -> int | None:
        usage = getattr(self.actuators[name], "cpu_usage_ns", None)
        return usage() if usage is not None else None

    def close(self) -> None:
        for act in self.actuators.values():
            try:
                act.close()
            except Exception:  # cleanup must go on for the others
                log.exception("closing actuator %s failed", act.kind)
