"""CPU-affinity fallback for when no cgroup is writable (not root, no delegation).

!!! WHOLE-CORE GRANULARITY !!!
This actuator can only grant whole CPUs: `apply(cpu_m)` pins the replica to ceil(cpu_m / 1000) CPUs,
so 250 m and 1000 m both mean one full core, and 1001 m means two. It also cannot grant more CPUs than
the process was allowed when attached. Policies that rely on fractional CPU (DESIGN §4) lose their edge
here; the selection reason says so, and `granularity_m == 1000` lets a policy round its decisions.
"""

from __future__ import annotations

import logging
import math
import os

from sponge.scaling.base import ActuatorError
from sponge.scaling.procfs import pid_alive, proc_cpu_ns, task_ids

log = logging.getLogger(__name__)


class AffinityActuator:
    """Pins every thread of a replica to the first ceil(cpu_m/1000) CPUs of its allowed set.

    Threads created later inherit the affinity of the thread that creates them, and each `apply`
    re-pins every thread listed in /proc/<pid>/task, so a thread born during a change is caught
    by the re-scan.
    """

    kind = "affinity"
    granularity_m = 1000

    def __init__(self, replica_name: str, cpus: list[int] | None = None) -> None:
        """`cpus`: the pool (in preference order) to pin from; default = the process's own set."""
        self.replica_name = replica_name
        self._pool = list(cpus) if cpus is not None else None
        self._pids: list[int] = []
        self._original: dict[int, set[int]] = {}
        log.warning(
            "affinity actuator for %s: whole-core granularity (cpu_m is rounded UP to whole CPUs)",
            replica_name,
        )

    def attach(self, pid: int) -> None:
        """Remember the process's current affinity (restored on close) and take its CPUs as the pool."""
        try:
            allowed = os.sched_getaffinity(pid)
        except OSError as e:
            raise ActuatorError(f"affinity: cannot read the CPU affinity of pid {pid}: {e.strerror}") from e
        self._original[pid] = allowed
        if self._pool is None:
            self._pool = sorted(allowed)
        if pid not in self._pids:
            self._pids.append(pid)

    def cpus_for(self, cpu_m: int) -> set[int]:
        """The CPUs that `cpu_m` maps to: the first ceil(cpu_m/1000) of the pool (at least one)."""
        if not isinstance(cpu_m, int) or cpu_m <= 0:
            raise ValueError(f"cpu_m must be a positive integer of millicores, got {cpu_m!r}")
        pool = self._pool if self._pool is not None else sorted(os.sched_getaffinity(0))
        n = min(max(1, math.ceil(cpu_m / 1000)), len(pool))
        if n * 1000 < cpu_m:
            log.warning("affinity: %d m asked but only %d CPUs in the pool", cpu_m, len(pool))
        return set(pool[:n])

    def apply(self, cpu_m: int) -> None:
        """Pin every thread of every attached process to `cpus_for(cpu_m)`."""
        cpus = self.cpus_for(cpu_m)
        for pid in self._pids:
            _pin_all_threads(pid, cpus)

    def current(self) -> int:
        """1000 x the number of CPUs in the union of the attached threads' affinity masks."""
        union: set[int] = set()
        for pid in self._pids:
            for tid in task_ids(pid):
                try:
                    union |= os.sched_getaffinity(tid)
                except OSError:
                    pass  # the thread just exited
        if not union:
            raise ActuatorError(f"affinity: no live attached process for {self.replica_name}")
        return 1000 * len(union)

    def cpu_usage_ns(self) -> int:
        """utime+stime of the attached processes from /proc, in ns (tick resolution)."""
        return sum(proc_cpu_ns(p) for p in self._pids)

    def close(self) -> None:
        """Restore the affinity each process had when attached (if it is still alive)."""
        for pid, cpus in self._original.items():
            if pid_alive(pid):
                try:
                    _pin_all_threads(pid, cpus)
                except ActuatorError as e:
                    log.warning("%s", e)
        self._pids.clear()
        self._original.clear()


def _pin_all_threads(pid: int, cpus: set[int]) -> None:
    """sched_setaffinity for every TID; re-scan until no new thread appears."""
    done: set[int] = set()
    for _ in range(5):
        tids = [t for t in task_ids(pid) if t not in done]
        if not tids:
            break
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:
                pass  # thread exited meanwhile
            except OSError as e:
                raise ActuatorError(f"affinity: sched_setaffinity({tid}, {sorted(cpus)}) failed: {e.strerror}") from e
            done.add(tid)
    if not done and not pid_alive(pid):
        raise ActuatorError(f"affinity: pid {pid} is gone")
