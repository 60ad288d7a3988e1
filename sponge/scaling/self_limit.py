"""Inside a replica: what CPU am I allowed right now? (for sizing runtime threads)

An external resizer (the kubelet, or Sponge's own actuator in another process) changes the quota
without telling the application, so a replica polls `read_own_cpu_limit_m()` every 100-200 ms (each
call reads a handful of small /proc and cgroup files) and calls `runtime.set_threads(threads_for(m))`
when the answer changes.

The limit is the tightest quota on the path from the process's cgroup up to the top of the mounted
hierarchy (a parent's quota caps its children), intersected with the CPU affinity. `root` re-roots
every path so tests can use a fake /proc and /sys/fs/cgroup.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable

from sponge.scaling.cgroup import cpu_m_for, parse_cpu_max
from sponge.scaling.procfs import CgroupMount, parse_mountinfo, parse_proc_cgroup


def read_own_cpu_limit_m(root: Path | str = "/", affinity: set[int] | None = None) -> int | None:
    """This process's effective CPU limit in millicores, or None when nothing limits it.

    `affinity` overrides os.sched_getaffinity(0) (for tests). A restricted affinity counts as a limit
    of 1000 m per allowed CPU; an affinity covering every online CPU does not.
    """
    quota_m = _cgroup_limit_m(Path(root))
    cpus = affinity if affinity is not None else os.sched_getaffinity(0)
    total = os.cpu_count() or len(cpus)
    aff_m = 1000 * len(cpus) if len(cpus) < total else None
    limits = [x for x in (quota_m, aff_m) if x is not None]
    return min(limits) if limits else None


def threads_for(cpu_m: int | None) -> int:
    """Runtime threads for an allocation: clamp(ceil(cpu_m/1000), 1, os.cpu_count()); None = all."""
    n_cpu = os.cpu_count() or 1
    if cpu_m is None:
        return n_cpu
    return min(max(1, math.ceil(cpu_m / 1000)), n_cpu)


def _cgroup_limit_m(root: Path) -> int | None:
    try:
        entries = parse_proc_cgroup((root / "proc/self/cgroup").read_text())
    except OSError:
        return None  # no cgroups at all
    try:
        mounts = _mounts((root / "proc/self/mountinfo").read_text(), str(root))
    except OSError:
        mounts = ()
    if "cpu" in entries:  # v1 (or hybrid with cpu on v1): the cpu controller lives on a v1 hierarchy
        mount = next((m for m in mounts if m.version == 1 and "cpu" in m.controllers), None)
        fallback = [root / "sys/fs/cgroup/cpu", root / "sys/fs/cgroup/cpu,cpuacct"]
        return _walk(_cgroup_dir(entries["cpu"], mount, fallback), mount, fallback, _v1_level)
    if "" in entries:
        mount = next((m for m in mounts if m.version == 2), None)
        fallback = [root / "sys/fs/cgroup"]
        return _walk(_cgroup_dir(entries[""], mount, fallback), mount, fallback, _v2_level)
    return None


@lru_cache(maxsize=8)
def _mounts(mountinfo: str, root: str) -> tuple[CgroupMount, ...]:
    """Parsed mountinfo, cached by its text: it almost never changes while we poll."""
    return tuple(parse_mountinfo(mountinfo, root))


def _cgroup_dir(path: str, mount: CgroupMount | None, fallback: list[Path]) -> Path | None:
    """Directory of hierarchy path `path` under its mount (mount.root is what the mount shows)."""
    if mount is None:
        top = next((p for p in fallback if p.is_dir()), None)
        return None if top is None else top / path.lstrip("/")
    rel = path
    if mount.root != "/" and (path == mount.root or path.startswith(mount.root.rstrip("/") + "/")):
        rel = path[len(mount.root) :]
    d = mount.mount_point / rel.lstrip("/")
    return d if d.is_dir() else mount.mount_point  # e.g. a cgroup namespace hides the outer path


def _walk(
    d: Path | None, mount: CgroupMount | None, fallback: list[Path], level: Callable[[Path], int | None]
) -> int | None:
    """min over `d` and its ancestors up to the mount point of each level's quota in millicores."""
    if d is None:
        return None
    top = mount.mount_point if mount is not None else next(p for p in fallback if p.is_dir())
    best: int | None = None
    while True:
        m = level(d)
        if m is not None:
            best = m if best is None else min(best, m)
        if d == top or d.parent == d or top not in d.parents:
            break
        d = d.parent
    return best


def _v1_level(d: Path) -> int | None:
    try:
        q = int((d / "cpu.cfs_quota_us").read_text())
        p = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if q < 0 or p <= 0 else cpu_m_for(q, p)


def _v2_level(d: Path) -> int | None:
    try:
        q, p = parse_cpu_max((d / "cpu.max").read_text())
    except (OSError, ValueError):
        return None  # the root cgroup has no cpu.max; or cpu is not enabled here
    return None if q is None or p <= 0 else cpu_m_for(q, p)
