"""CPU-affinity fallback for when no cgroup is writable (not root, no delegation).

!!! WHOLE-CORE GRANULARITY !!!
This actuator can only grant whole CPUs: `apply(cpu_m)` pins the replica to ceil(cpu_m / 1000) CPUs,
so 250 m and 1000 m both mean one full core, and 1001 m means two. It also cannot grant more CPUs than
the process was allowed when attached. Policies that rely on fractional CPU (DESIGN §4) lose their edge
here; the selection reason says so, and `granularity_m == 1000` lets a policy round its decisions.

Replicas are spread: replica `index` of `replicas` starts its CPUs at an evenly spaced offset of the
pool (and wraps), so two replicas at 1000 m on two CPUs sit on different CPUs instead of both on the
first one. A replica has one process: `attach` of a restarted replica's new pid replaces the old one.
"""

from __future__ import annotations

import logging
import math
import os

from sponge.scaling.base import ActuatorError
from sponge.scaling.procfs import pid_alive, proc_cpu_ns, task_ids

log = logging.getLogger(__name__)


class AffinityActuator:
    """Pins every thread of a replica to ceil(cpu_m/1000) CPUs of its allowed set, from its own offset.

    Threads created later inherit the affinity of the thread that creates them, and each `apply`
    re-pins every thread listed in /proc/<pid>/task, so a thread born during a change is caught
    by the re-scan.
    """

    kind = "affinity"
    granularity_m = 1000

    def __init__(self, replica_name: str, cpus: list[int] | None = None, index: int = 0, replicas: int = 1) -> None:
        """`cpus`: the pool to pin from (default = the attached process's own set); `index` of
        `replicas`: this replica's place among its siblings, which picks where in the pool it starts."""
        if replicas < 1 or index < 0:
            raise ValueError(f"need index >= 0 and replicas >= 1, got index={index}, replicas={replicas}")
        self.replica_name = replica_name
        self.index = index
        self.replicas = replicas
        self._pool = list(cpus) if cpus is not None else None
        self._pids: list[int] = []
        self._original: dict[int, set[int]] = {}
        self._usage_ns: dict[int, int] = {}  # last utime+stime read per attached pid
        self._retired_ns = 0  # usage of processes no longer attached, so the counter never goes back
        log.warning(
            "affinity actuator for %s: whole-core granularity (cpu_m is rounded UP to whole CPUs)",
            replica_name,
        )

    def attach(self, pid: int) -> None:
        """Take `pid` as the replica's process (replacing an earlier one) and remember its affinity.

        A replica has one process; after a restart the old pid is dead (or, if still alive, no longer
        ours: its original affinity is restored). The first attach also fixes the pool, if not given.
        """
        try:
            allowed = os.sched_getaffinity(pid)
        except OSError as e:
            raise ActuatorError(f"affinity: cannot read the CPU affinity of pid {pid}: {e.strerror}") from e
        for old in [p for p in self._pids if p != pid]:
            self._release(old)
        self._original.setdefault(pid, allowed)
        if self._pool is None:
            self._pool = sorted(allowed)
        if pid not in self._pids:
            self._pids.append(pid)
            self._usage_ns[pid] = proc_cpu_ns(pid)

    def _release(self, pid: int) -> None:
        """Stop managing `pid`: restore its affinity if it lives on, keep its CPU time in the total."""
        self._pids.remove(pid)
        self._retired_ns += max(self._usage_ns.pop(pid, 0), proc_cpu_ns(pid))
        original = self._original.pop(pid, None)
        if original is not None and pid_alive(pid):
            try:
                _pin_all_threads(pid, original)
            except ActuatorError as e:
                log.warning("%s", e)

    def cpus_for(self, cpu_m: int) -> set[int]:
        """The CPUs that `cpu_m` maps to: ceil(cpu_m/1000) of the pool (at least one), taken in order
        from this replica's offset `index * len(pool) // replicas` and wrapping around, so replicas
        whose allocations fit the pool together get disjoint CPUs."""
        if not isinstance(cpu_m, int) or cpu_m <= 0:
            raise ValueError(f"cpu_m must be a positive integer of millicores, got {cpu_m!r}")
        pool = self._pool if self._pool is not None else sorted(os.sched_getaffinity(0))
        n = min(max(1, math.ceil(cpu_m / 1000)), len(pool))
        if n * 1000 < cpu_m:
            log.warning("affinity: %d m asked but only %d CPUs in the pool", cpu_m, len(pool))
        start = (self.index * len(pool) // self.replicas) % len(pool)
        return set((pool[start:] + pool[:start])[:n])

    def apply(self, cpu_m: int) -> None:
        """Pin every thread of every live attached process to `cpus_for(cpu_m)`; dead ones are dropped.

        A replica whose process died is restarted and re-attached; until then there is nothing to pin,
        which is not an error (raising here made every resize after a crash fail)."""
        cpus = self.cpus_for(cpu_m)
        for pid in list(self._pids):
            if not pid_alive(pid):
                self._release(pid)
                continue
            try:
                _pin_all_threads(pid, cpus)
            except ActuatorError:
                if pid_alive(pid):
                    raise
                self._release(pid)  # it died during the pinning

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
        """utime+stime of the attached processes from /proc, in ns (tick resolution); cumulative over
        restarts (a replaced process counts with its last reading, so the counter never goes back)."""
        for p in self._pids:
            self._usage_ns[p] = max(self._usage_ns.get(p, 0), proc_cpu_ns(p))
        return self._retired_ns + sum(self._usage_ns[p] for p in self._pids)

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
        self._usage_ns.clear()


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
