"""Replica cgroups under a high-CPU-weight parent, like a Kubernetes Guaranteed pod.

A CFS quota is a LIMIT, it reserves nothing: on a shared host other processes (the HTTP front door,
a load generator, neighbours) take CPU the replica is allocated. Kubernetes gives a Guaranteed pod
cpu.shares proportional to its request, so its limit is also what it gets; `open_actuator` mirrors
that by placing the replica's cgroup under a parent with a very high weight.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


GUARANTEED_ROOT = "sponge-guaranteed"
GUARANTEED_V1_SHARES = 102_400  # vs 1024 for an ordinary process (the kernel's maximum is 262144)
GUARANTEED_V2_WEIGHT = 10_000  # the maximum cpu.weight (100 = default)


def guaranteed_roots() -> dict[str, Path]:
    """Cgroup roots whose cpu.shares / cpu.weight is high, for `select_actuator(v1_root=, v2_root=)`.

    Why: a CFS quota is a LIMIT; it does not reserve anything. On a shared host other processes
    can take CPU a replica is allocated, and a profile measured then describes the neighbours.
    Kubernetes gives a Guaranteed pod cpu.shares proportional to its request, so its limit is also
    what it gets; this mirrors that for the profiled replica: its cgroup sits under a parent with a
    very high weight, so it gets its quota whenever it wants it, and the quota still caps it.
    Other processes only lose what the replica's allocation takes. The roots are created once and
    left in place (like `<mount>/sponge`); their children follow the `sponge-<pid>-<name>` naming,
    so `cleanup_stale` collects leftovers. Returns {} when no writable cgroup cpu controller exists.
    """
    from sponge.scaling.procfs import find_mount

    roots: dict[str, Path] = {}
    m1 = find_mount("cpu")
    if m1 is not None:
        root = m1.mount_point / GUARANTEED_ROOT
        try:
            root.mkdir(exist_ok=True)
            (root / "cpu.shares").write_text(str(GUARANTEED_V1_SHARES))
            roots["v1_root"] = root
        except OSError as exc:
            log.debug("no guaranteed v1 root at %s: %s", root, exc)
    m2 = find_mount(None)
    if m2 is not None:
        try:
            has_cpu = "cpu" in (m2.mount_point / "cgroup.controllers").read_text().split()
        except OSError:
            has_cpu = False
        if has_cpu:
            root = m2.mount_point / GUARANTEED_ROOT
            try:
                sub = m2.mount_point / "cgroup.subtree_control"
                if "cpu" not in sub.read_text().split():
                    sub.write_text("+cpu")
                root.mkdir(exist_ok=True)
                (root / "cpu.weight").write_text(str(GUARANTEED_V2_WEIGHT))
                roots["v2_root"] = root
            except OSError as exc:
                log.debug("no guaranteed v2 root at %s: %s", root, exc)
    return roots


def open_actuator(replica_name: str, prefer: str = "auto", guaranteed: bool = True,
                  period_us: int | None = None, index: int = 0, replicas: int = 1) -> Any:
    """`select_actuator`, under the guaranteed roots when `guaranteed` (stale children removed first).

    `period_us` None keeps the actuators' own CFS period (100 ms, the kernel's and Kubernetes'
    default); another value builds the cgroup actuator with that period. A profile is only valid for
    the period it was
    measured with. `index` of `replicas` places the replica among its siblings (see `select_actuator`).
    """
    from sponge.scaling.cgroup import cleanup_stale
    from sponge.scaling.procfs import find_mount
    from sponge.scaling.select import cleanup_all_stale, select_actuator

    try:
        removed = cleanup_all_stale()
        if removed:
            log.info("removed %d stale cgroup(s) of dead servers: %s", len(removed), removed)
    except OSError as exc:  # a read-only cgroupfs: the selection below reports it
        log.debug("stale cgroup cleanup failed: %s", exc)
    roots = guaranteed_roots() if guaranteed else {}
    stale_roots = list(roots.values())
    acct = find_mount("cpuacct")
    if "v1_root" in roots and acct is not None:
        stale_roots.append(acct.mount_point / GUARANTEED_ROOT)  # cgroup-v1's cpuacct twins
    for r in stale_roots:
        try:
            cleanup_stale(r)
        except OSError as exc:
            log.debug("stale cgroup cleanup of %s failed: %s", r, exc)
    sel = select_actuator(replica_name, prefer=prefer, period_us=period_us, index=index, replicas=replicas,
                          **roots)
    if roots and sel.actuator.kind.startswith("cgroup"):
        sel = type(sel)(sel.actuator, sel.reason + f"; under {GUARANTEED_ROOT} (high CPU weight: the replica "
                                                   "gets its quota even when other processes compete)")
    return sel
