"""The small interface of CPU actuators: apply an allocation in place, read it back (DESIGN §2)."""

from __future__ import annotations

from typing import Protocol


class ActuatorError(RuntimeError):
    """An actuator could not do what was asked; the message names the file or call that failed."""


class CpuActuator(Protocol):
    """Changes the CPU allocation of one running replica process without restarting it.

    Allocations are integer millicores (1000 = one core). `granularity_m` says how fine the
    actuator can be (1 for a CFS quota, 1000 for the CPU-affinity fallback).
    """

    kind: str
    granularity_m: int

    def attach(self, pid: int) -> None:
        """Put process `pid` (all its threads, present and future) under this actuator."""
        ...

    def apply(self, cpu_m: int) -> None:
        """Set the allocation to `cpu_m` millicores (rounded up to the granularity)."""
        ...

    def current(self) -> int:
        """The allocation in force, read back from the system, in millicores."""
        ...

    def close(self) -> None:
        """Release what was created (cgroup directories, affinity), idempotently."""
        ...


class CpuUsageMeter(Protocol):
    """Something that can say how much CPU the replica really used (for benchmarks, VPA-like policies).

    All actuators in sponge.scaling implement it; it is separate from CpuActuator so that test fakes
    of an actuator need not.
    """

    def cpu_usage_ns(self) -> int:
        """Cumulative CPU time consumed by the attached process(es), in nanoseconds."""
        ...
