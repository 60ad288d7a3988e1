"""Horizontal scaling of the local server: replicas are worker processes, each in its own cgroup, added
and removed while serving (the in-place vertical moves stay with ReplicaScaler).

A new replica pays a real cold start — process spawn, model load, one warm-up batch — and gets no work
until it is ready (ServingCore.add_replica); a removed one drains: it finishes its batch in flight and
stops (ServingCore.remove_replica). Scaling in cancels starting replicas first (they cost without
serving), then drains the newest ready ones; scaling out first takes back a draining replica that has not
stopped yet (it is warm), then starts new ones. Replica names are never reused (r0, r1, ...), so metric
series and cgroups of a gone replica never mix with a new one's.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from sponge.protocol.v2 import DTYPES
from sponge.runtime.replica import Replica
from sponge.scaling.base import CpuActuator
from sponge.server.core import DRAINING, READY, STARTING, ServingCore
from sponge.server.scaler import ReplicaScaler

log = logging.getLogger("sponge.pool")


async def warm_up(replica: Replica) -> None:
    """One batch of a single zero input through the new replica: the first run of an ONNX Runtime
    session pays its allocations and kernel selection, which would otherwise land on a real request."""
    inputs = {s.name: np.zeros(tuple(1 if d < 0 else d for d in (s.shape or (1,))), DTYPES[s.datatype])
              for s in replica.inputs if s.datatype != "BYTES"}
    if len(inputs) == len(replica.inputs):
        await replica.infer(inputs)


class ReplicaPool:
    """Keeps the number of replicas the controller orders: `scale_to(n, cpu_m)`."""

    def __init__(self, core: ServingCore, scaler: ReplicaScaler, make_replica: Callable[[str, int], Replica],
                 make_actuator: Callable[[str, int], CpuActuator], max_replicas: int, min_replicas: int = 1) -> None:
        if not 1 <= min_replicas <= max_replicas:
            raise ValueError(f"need 1 <= min_replicas ({min_replicas}) <= max_replicas ({max_replicas})")
        self.core = core
        self.scaler = scaler
        self.make_replica = make_replica
        self.make_actuator = make_actuator
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self._next_index = len(core.replicas)
        self.started = 0  # replicas added while serving
        self.removed = 0  # replicas asked to go (cancelled starts and drains)

    def ordered(self) -> int:
        """Replicas that count for the controller's decision: starting and ready, not draining."""
        return sum(1 for r in self.core.replicas if self.core.state.get(r.name) != DRAINING)

    def starting(self) -> int:
        return sum(1 for r in self.core.replicas if self.core.state.get(r.name) == STARTING)

    def scale_to(self, n: int, cpu_m: int) -> int:
        """Order `n` replicas (clamped to [min, max]) at `cpu_m` each; returns the count ordered."""
        n = min(max(n, self.min_replicas), self.max_replicas)
        have = self.ordered()
        if n > have:
            have += self._undrain(n - have)
            for _ in range(n - have):
                self._add(cpu_m)
        elif n < have:
            self._remove(have - n)
        return n

    def _undrain(self, k: int) -> int:
        """Take back up to k draining replicas whose dispatch loop still runs (their batch in flight)."""
        back = 0
        for r in reversed(list(self.core.replicas)):
            if back == k:
                break
            if self.core.undrain(r.name):
                back += 1
                log.info("replica %s: drain cancelled (scaled out again while it finished its batch)", r.name)
        return back

    def _add(self, cpu_m: int) -> None:
        name = f"r{self._next_index}"
        self._next_index += 1
        actuator = self.make_actuator(name, cpu_m)
        replica = self.make_replica(name, cpu_m)
        self.scaler.add(replica, actuator, cpu_m)
        self.core.add_replica(replica, cpu_m, warm_up)
        self.started += 1
        log.info("replica %s ordered at %d m (cold start: no work until it is ready)", name, cpu_m)

    def _remove(self, k: int) -> None:
        order = {STARTING: 0, READY: 1}
        victims = sorted((r for r in self.core.replicas if self.core.state.get(r.name) in order),
                         key=lambda r: (order[self.core.state[r.name]], -int(r.name[1:]) if r.name[1:].isdigit() else 0))
        for r in victims[:k]:
            was = self.core.state[r.name]
            try:
                self.core.remove_replica(r.name)
            except ValueError:  # the last serving replica stays
                break
            self.removed += 1
            log.info("replica %s removed (%s)", r.name,
                     "cold start cancelled" if was == STARTING else "draining its batch in flight")
