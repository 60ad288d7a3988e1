"""Choose the best CPU actuator this host allows, and say why in one line (for `sponge serve`).

Order: cgroup v2 (only if its cpu controller is really available and writable), cgroup v1 (writable),
then the whole-core affinity fallback. A probe is the real thing: constructing the actuator creates the
replica's cgroup and writes its quota file, so "chosen" means "known to work".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sponge.scaling.affinity import AffinityActuator
from sponge.scaling.base import ActuatorError, CpuActuator
from sponge.scaling.cgroup import (
    CgroupV1Actuator,
    CgroupV2Actuator,
    cleanup_stale,
    default_v1_root,
    default_v2_root,
)
from sponge.scaling.procfs import find_mount

log = logging.getLogger(__name__)

PREFERENCES = ("auto", "cgroup-v2", "cgroup-v1", "affinity")


@dataclass(frozen=True)
class Selection:
    """The actuator chosen and a one-line human explanation of why."""

    actuator: CpuActuator
    reason: str


def select_actuator(
    replica_name: str,
    prefer: str = "auto",
    v1_root: Path | str | None = None,
    v2_root: Path | str | None = None,
    *,
    v1_acct_root: Path | str | None | bool = True,
    period_us: int | None = None,
    index: int = 0,
    replicas: int = 1,
) -> Selection:
    """Probe v2, then v1, then fall back to affinity; `prefer` forces one kind (raising if it fails).

    `period_us`: the CFS period of the quota (None = the kernel's and Kubernetes' 100 ms). A shorter
    period spreads a fractional allocation more evenly in time (see docs/ARCHITECTURE.md).
    `index` of `replicas`: this replica's place among its siblings, so the affinity fallback pins
    replicas to different CPUs (cgroup quotas need no such placement)."""
    period = {} if period_us is None else {"period_us": period_us}
    if prefer not in PREFERENCES:
        raise ValueError(f"prefer must be one of {PREFERENCES}, got {prefer!r}")
    v1 = Path(v1_root) if v1_root is not None else default_v1_root()
    v2 = Path(v2_root) if v2_root is not None else default_v2_root()

    failures: list[str] = []
    if prefer in ("auto", "cgroup-v2"):
        try:
            act = CgroupV2Actuator(replica_name, v2, **period)
            return Selection(act, f"cgroup-v2: cpu.max quota in {act.path} (1 m granularity, CFS period {act.period_us} us)")
        except ActuatorError as e:
            if prefer == "cgroup-v2":
                raise
            failures.append(f"v2 unusable ({e})")
    if prefer in ("auto", "cgroup-v1"):
        try:
            act1 = CgroupV1Actuator(replica_name, v1, acct_root=v1_acct_root, **period)
            why = "; ".join(failures + [f"cgroup-v1: cpu.cfs_quota_us in {act1.path} (1 m granularity, CFS period {act1.period_us} us)"])
            return Selection(act1, why)
        except ActuatorError as e:
            if prefer == "cgroup-v1":
                raise
            failures.append(f"v1 unusable ({e})")
    aff = AffinityActuator(replica_name, index=index, replicas=replicas)
    why = "; ".join(
        failures + ["affinity: pinning threads to whole CPUs (WHOLE-CORE granularity, cpu_m rounded up)"]
    )
    return Selection(aff, why)


def cleanup_all_stale(v1_root: Path | str | None = None, v2_root: Path | str | None = None) -> list[Path]:
    """Remove leftover sponge-* cgroups of dead servers in the v2, v1 cpu and v1 cpuacct roots."""
    v1 = Path(v1_root) if v1_root is not None else default_v1_root()
    roots = [Path(v2_root) if v2_root is not None else default_v2_root(), v1]
    cpu_m, acct_m = find_mount("cpu"), find_mount("cpuacct")
    if cpu_m and acct_m and cpu_m.mount_point != acct_m.mount_point:
        try:
            roots.append(acct_m.mount_point / v1.relative_to(cpu_m.mount_point))
        except ValueError:
            pass
    removed: list[Path] = []
    for r in roots:
        removed += cleanup_stale(r)
    return removed
