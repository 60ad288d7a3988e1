"""In-place CPU limits with a CFS quota: one child cgroup per replica (cgroup v1 or v2).

Why a quota: it is what Kubernetes sets for a pod's CPU limit, it has 1-millicore granularity, and a
change takes effect within one period (100 ms) without restarting the process. The application is not
told; a replica notices through `sponge.scaling.self_limit`.

Each replica's cgroup is `<root>/sponge-<server pid>-<replica name>`, so that after a crash the next
server can recognise leftovers whose owner is dead and remove them (`cleanup_stale`).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Callable

from sponge.scaling.base import ActuatorError
from sponge.scaling.procfs import (
    find_mount,
    hierarchy_top,
    pid_alive,
    proc_cgroup_path,
    proc_cpu_ns,
    read_ints,
    task_ids,
)

log = logging.getLogger(__name__)

PERIOD_US = 100_000  # the kernel's and Kubernetes' default CFS period
MIN_QUOTA_US = 1_000  # the kernel refuses a quota below 1 ms
MIN_PERIOD_US, MAX_PERIOD_US = 1_000, 1_000_000
NAME_PREFIX = "sponge-"
_NAME_RE = re.compile(r"^sponge-(\d+)-(.+)$")

DEFAULT_V1_ROOT = Path("/sys/fs/cgroup/cpu/sponge")
DEFAULT_V2_MOUNT = Path("/sys/fs/cgroup/unified")


def default_v1_root() -> Path:
    """`<cpu v1 mount>/sponge` (the mount is read from mountinfo; it may be `cpu,cpuacct`)."""
    m = find_mount("cpu")
    return m.mount_point / "sponge" if m else DEFAULT_V1_ROOT


def default_v2_root() -> Path:
    """`<cgroup2 mount>/sponge` (the unified mount is read from mountinfo)."""
    m = find_mount(None)
    return (m.mount_point if m else DEFAULT_V2_MOUNT) / "sponge"


def cgroup_name(replica_name: str, owner_pid: int) -> str:
    """`sponge-<owner pid>-<replica name>`, with characters unsafe in a directory name replaced."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", replica_name) or "_"
    return f"{NAME_PREFIX}{owner_pid}-{safe}"


def parse_cgroup_name(name: str) -> tuple[int, str] | None:
    """(owner pid, replica name) from a directory name made by `cgroup_name`, or None."""
    m = _NAME_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def quota_us_for(cpu_m: int, period_us: int = PERIOD_US) -> int:
    """CFS quota for `cpu_m` millicores: cpu_m * period / 1000, rounded up, at least 1 ms."""
    return max(MIN_QUOTA_US, math.ceil(cpu_m * period_us / 1000))


def cpu_m_for(quota_us: int, period_us: int) -> int:
    """Millicores granted by a quota (inverse of `quota_us_for`)."""
    return round(quota_us * 1000 / period_us)


class _CgroupActuator:
    """What v1 and v2 share: naming, directory life cycle, moving processes in and out."""

    kind = "cgroup"
    granularity_m = 1

    def __init__(self, replica_name: str, root: Path | str, owner_pid: int | None, period_us: int) -> None:
        if not MIN_PERIOD_US <= period_us <= MAX_PERIOD_US:
            raise ValueError(f"period_us={period_us} outside [{MIN_PERIOD_US}, {MAX_PERIOD_US}]")
        self.replica_name = replica_name
        self.root = Path(root)
        self.owner_pid = owner_pid if owner_pid is not None else os.getpid()
        self.period_us = period_us
        self.path = self.root / cgroup_name(replica_name, self.owner_pid)
        self._pids: list[int] = []
        self._origins: dict[int, Path] = {}
        self._closed = False
        self._fds: dict[tuple[str, int], int] = {}  # control files kept open (see `_put`)

    # -- shared mechanics -------------------------------------------------------------------------

    def _make_dir(self, path: Path) -> None:
        try:
            path.mkdir(exist_ok=True)
        except OSError as e:
            raise ActuatorError(f"{self.kind}: cannot create cgroup {path}: {e.strerror}") from e

    def _origin_of(self, pid: int, controller: str | None, cgroup_dir: Path) -> Path:
        """The cgroup `pid` lives in now (to return it there on close); the hierarchy top if unknown."""
        top = hierarchy_top(cgroup_dir.parent.parent)
        rel = proc_cgroup_path(pid, controller)
        if rel is not None:
            cand = top / rel.lstrip("/")
            if cand.is_dir() and cand != cgroup_dir:
                return cand
        return top

    def _release(self, cgroup_dir: Path, origins: dict[int, Path]) -> None:
        """Move every process still in `cgroup_dir` back where it came from, then remove the dir."""
        if not cgroup_dir.is_dir():
            return
        _evacuate(cgroup_dir, hierarchy_top(cgroup_dir.parent.parent), origins)
        _rmdir(cgroup_dir)

    def _kept(self, name: str, flags: int) -> int:
        key = (name, flags)
        fd = self._fds.get(key)
        if fd is None:
            fd = self._fds[key] = os.open(self.path / name, flags)
        return fd

    def _put(self, name: str, value: str) -> None:
        """Write a control file of this cgroup through a descriptor kept open: opening a cgroup file costs
        ~80-140 us here once it has gone cold, a write on an open one ~17 us (per-batch CPU sizing resizes
        at every batch, from the server's event loop)."""
        data = value.encode()
        try:
            fd = self._kept(name, os.O_WRONLY)
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))  # a no-op on cgroupfs; a plain file (tests' fake trees) is rewritten
        except OSError as e:
            raise ActuatorError(f"{self.kind}: cannot write {value!r} to {self.path / name}: {e.strerror}") from e

    def _get(self, name: str) -> str:
        """Read a control file of this cgroup through a descriptor kept open (see `_put`)."""
        try:
            return os.pread(self._kept(name, os.O_RDONLY), 4096, 0).decode().strip()
        except OSError as e:
            raise ActuatorError(f"{self.kind}: cannot read {self.path / name}: {e.strerror}") from e

    def _close_files(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def pids(self) -> list[int]:
        """Processes in this replica's cgroup, read back from cgroup.procs."""
        try:
            return read_ints(self.path / "cgroup.procs")
        except OSError as e:
            raise ActuatorError(f"{self.kind}: cannot read {self.path / 'cgroup.procs'}: {e.strerror}") from e

    def _check_cpu_m(self, cpu_m: int) -> None:
        if not isinstance(cpu_m, int) or cpu_m <= 0:
            raise ValueError(f"cpu_m must be a positive integer of millicores, got {cpu_m!r}")
        if self._closed:
            raise ActuatorError(f"{self.kind}: {self.path} was closed")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class CgroupV1Actuator(_CgroupActuator):
    """CFS quota through cgroup v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us` of a child cgroup.

    CPU usage is read from `cpuacct.usage`. When cpuacct is a separate hierarchy (as on this host:
    /sys/fs/cgroup/cpuacct), a cgroup of the same name is made there too and the process joins both.
    """

    kind = "cgroup-v1"

    def __init__(
        self,
        replica_name: str,
        root: Path | str | None = None,
        *,
        acct_root: Path | str | None | bool = True,
        owner_pid: int | None = None,
        period_us: int = PERIOD_US,
    ) -> None:
        """`acct_root=True` finds the matching cpuacct directory; None/False measures via /proc."""
        super().__init__(replica_name, root if root is not None else default_v1_root(), owner_pid, period_us)
        if not (self.root.parent / "cpu.cfs_quota_us").exists():
            raise ActuatorError(
                f"cgroup-v1: {self.root.parent} is not a cgroup v1 directory with the cpu controller "
                "(no cpu.cfs_quota_us)"
            )
        self._make_dir(self.root)
        self._make_dir(self.path)
        try:
            _write(self.path / "cpu.cfs_period_us", str(period_us), self.kind)
            _write(self.path / "cpu.cfs_quota_us", "-1", self.kind)  # proves the quota is writable
        except ActuatorError:
            _rmdir_quietly(self.path)
            raise
        self.acct_path = self._make_acct_dir(acct_root)
        self._acct_origins: dict[int, Path] = {}

    def _make_acct_dir(self, acct_root: Path | str | None | bool) -> Path | None:
        """The cpuacct twin of this cgroup, or None when cpu.* and cpuacct.* share a directory."""
        if (self.path / "cpuacct.usage").exists() or acct_root is None or acct_root is False:
            return None
        if acct_root is True:
            cpu_m, acct_m = find_mount("cpu"), find_mount("cpuacct")
            if cpu_m is None or acct_m is None:
                return None
            try:
                rel = self.root.relative_to(cpu_m.mount_point)
            except ValueError:
                return None
            acct_root = acct_m.mount_point / rel
        acct_root = Path(acct_root)
        path = acct_root / self.path.name
        try:
            acct_root.mkdir(exist_ok=True)
            path.mkdir(exist_ok=True)
        except OSError as e:
            log.warning("cgroup-v1: no cpuacct cgroup at %s (%s); CPU usage will be read from /proc", path, e.strerror)
            return None
        return path

    def attach(self, pid: int) -> None:
        """Move the whole thread group of `pid` in (threads it creates later inherit the cgroup)."""
        if not pid_alive(pid):
            raise ActuatorError(f"cgroup-v1: cannot attach pid {pid}: no such process")
        self._origins[pid] = self._origin_of(pid, "cpu", self.path)
        _move_process(self.path, pid, self.kind)
        if self.acct_path is not None:
            self._acct_origins[pid] = self._origin_of(pid, "cpuacct", self.acct_path)
            _move_process(self.acct_path, pid, self.kind)
        if pid not in self._pids:
            self._pids.append(pid)

    def apply(self, cpu_m: int) -> None:
        """Write the quota for `cpu_m` (>= 10 m at the default period: the kernel's 1 ms minimum)."""
        self._check_cpu_m(cpu_m)
        self._put("cpu.cfs_quota_us", str(quota_us_for(cpu_m, self.period_us)))

    def unlimit(self) -> None:
        """Remove the quota (-1)."""
        _write(self.path / "cpu.cfs_quota_us", "-1", self.kind)

    def quota(self) -> tuple[int | None, int]:
        """(quota_us or None if unlimited, period_us) read back from the cgroup files."""
        q = int(self._get("cpu.cfs_quota_us"))
        p = int(self._get("cpu.cfs_period_us"))
        return (None if q < 0 else q), p

    def current(self) -> int:
        """Millicores granted by the quota; all online CPUs (cpu_count*1000) when unlimited."""
        q, p = self.quota()
        return (os.cpu_count() or 1) * 1000 if q is None else cpu_m_for(q, p)

    def cpu_usage_ns(self) -> int:
        """Cumulative CPU time of everything in the cgroup (cpuacct.usage), in ns."""
        for d in (self.path, self.acct_path):
            if d is not None and (d / "cpuacct.usage").exists():
                return int(_read(d / "cpuacct.usage", self.kind))
        return sum(proc_cpu_ns(p) for p in self._pids)

    def close(self) -> None:
        """Move live processes back to the cgroup they came from, then remove the cgroup(s)."""
        self._closed = True
        self._close_files()
        self._release(self.path, self._origins)
        if self.acct_path is not None:
            self._release(self.acct_path, self._acct_origins)


class CgroupV2Actuator(_CgroupActuator):
    """CFS quota through cgroup v2: `cpu.max` ("<quota> <period>" or "max <period>") of a child cgroup.

    The root's parent must list `cpu` in cgroup.controllers; `+cpu` is enabled in the parent's and the
    root's cgroup.subtree_control. The root itself never holds processes (v2's no-internal-process
    rule), which is why `close` returns processes to the cgroup they came from, not to the root.
    """

    kind = "cgroup-v2"

    def __init__(
        self,
        replica_name: str,
        root: Path | str | None = None,
        *,
        owner_pid: int | None = None,
        period_us: int = PERIOD_US,
    ) -> None:
        super().__init__(replica_name, root if root is not None else default_v2_root(), owner_pid, period_us)
        parent = self.root.parent
        ctrls = _read_words(parent / "cgroup.controllers")
        if ctrls is None:
            raise ActuatorError(f"cgroup-v2: {parent} is not a cgroup v2 directory (no cgroup.controllers)")
        if "cpu" not in ctrls:
            raise ActuatorError(
                f"cgroup-v2: the cpu controller is not available in {parent / 'cgroup.controllers'} "
                f"(has: {' '.join(sorted(ctrls)) or 'nothing'}); it may be bound to a v1 hierarchy"
            )
        _enable_cpu(parent)
        self._make_dir(self.root)
        _enable_cpu(self.root)
        self._make_dir(self.path)
        try:
            _write(self.path / "cpu.max", f"max {period_us}", self.kind)  # proves cpu.max is writable
        except ActuatorError:
            _rmdir_quietly(self.path)
            raise

    def attach(self, pid: int) -> None:
        """Write `pid` to cgroup.procs: v2 moves all its threads, and later threads are born inside."""
        if not pid_alive(pid):
            raise ActuatorError(f"cgroup-v2: cannot attach pid {pid}: no such process")
        self._origins[pid] = self._origin_of(pid, None, self.path)
        _write(self.path / "cgroup.procs", str(pid), self.kind)
        if pid not in self._pids:
            self._pids.append(pid)

    def apply(self, cpu_m: int) -> None:
        """Write "<quota> <period>" to cpu.max."""
        self._check_cpu_m(cpu_m)
        self._put("cpu.max", f"{quota_us_for(cpu_m, self.period_us)} {self.period_us}")

    def unlimit(self) -> None:
        """Write "max <period>" to cpu.max."""
        _write(self.path / "cpu.max", f"max {self.period_us}", self.kind)

    def quota(self) -> tuple[int | None, int]:
        """(quota_us or None if "max", period_us) read back from cpu.max."""
        return parse_cpu_max(self._get("cpu.max"))

    def current(self) -> int:
        """Millicores granted by cpu.max; all online CPUs (cpu_count*1000) when "max"."""
        q, p = self.quota()
        return (os.cpu_count() or 1) * 1000 if q is None else cpu_m_for(q, p)

    def cpu_usage_ns(self) -> int:
        """`usage_usec` of the cgroup's cpu.stat, in ns."""
        for line in _read(self.path / "cpu.stat", self.kind).splitlines():
            key, _, val = line.partition(" ")
            if key == "usage_usec":
                return int(val) * 1000
        raise ActuatorError(f"cgroup-v2: no usage_usec in {self.path / 'cpu.stat'}")

    def close(self) -> None:
        """Move live processes back to the cgroup they came from, then remove the cgroup."""
        self._closed = True
        self._close_files()
        self._release(self.path, self._origins)


def parse_cpu_max(text: str) -> tuple[int | None, int]:
    """("max"|quota, period) from a cpu.max text; a lone value means the default period."""
    parts = text.split()
    if not parts:
        raise ValueError("empty cpu.max")
    period = int(parts[1]) if len(parts) > 1 else PERIOD_US
    return (None if parts[0] == "max" else int(parts[0])), period


def cleanup_stale(root: Path | str, *, alive: Callable[[int], bool] = pid_alive) -> list[Path]:
    """Remove `sponge-<pid>-*` cgroups under `root` whose owning server pid is dead (after a crash).

    Live tasks still inside are first moved to the top of the hierarchy. Returns what was removed;
    directories that could not be removed are logged and left. Caveat: if the dead server's pid has
    been reused by an unrelated process, its leftovers are kept (harmless, just not collected).
    """
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for d in sorted(root.iterdir()):
        parsed = parse_cgroup_name(d.name)
        if not d.is_dir() or parsed is None or alive(parsed[0]):
            continue
        try:
            _evacuate(d, hierarchy_top(root.parent), {})
            _rmdir(d)
        except (OSError, ActuatorError) as e:
            log.warning("could not remove stale cgroup %s: %s", d, e)
            continue
        log.info("removed stale cgroup %s (owner pid %d is gone)", d, parsed[0])
        removed.append(d)
    return removed


# -- file helpers ---------------------------------------------------------------------------------


def _write(path: Path, value: str, who: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise ActuatorError(f"{who}: cannot write {value!r} to {path}: {e.strerror}") from e


def _read(path: Path, who: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as e:
        raise ActuatorError(f"{who}: cannot read {path}: {e.strerror}") from e


def _read_words(path: Path) -> set[str] | None:
    try:
        return set(path.read_text().split())
    except OSError:
        return None


def _enable_cpu(cgroup_dir: Path) -> None:
    """Make sure children of `cgroup_dir` get the cpu controller (v2 subtree_control)."""
    f = cgroup_dir / "cgroup.subtree_control"
    words = _read_words(f)
    if words is not None and "cpu" in words:
        return
    try:
        with open(f, "w") as fh:
            fh.write("+cpu")
    except OSError as e:
        hint = " (processes in it? v2 forbids controllers on a cgroup with member processes)" if e.errno == errno.EBUSY else ""
        raise ActuatorError(f"cgroup-v2: cannot enable cpu in {f}: {e.strerror}{hint}") from e


def _move_process(cgroup_dir: Path, pid: int, who: str) -> None:
    """v1: cgroup.procs moves the thread group; then make sure every TID is listed in `tasks`."""
    _write(cgroup_dir / "cgroup.procs", str(pid), who)
    tasks = cgroup_dir / "tasks"
    if not tasks.exists():
        return
    for _ in range(3):  # a thread may be born while we look; it inherits, but check again
        inside = set(read_ints(tasks))
        missing = [t for t in task_ids(pid) if t not in inside]
        if not missing:
            return
        for tid in missing:
            try:
                _write(tasks, str(tid), who)
            except ActuatorError:
                if Path(f"/proc/{pid}/task/{tid}").exists():
                    raise
    raise ActuatorError(f"{who}: threads of pid {pid} keep escaping {cgroup_dir}")


def _evacuate(cgroup_dir: Path, top: Path, origins: dict[int, Path]) -> None:
    """Move every task out of `cgroup_dir`: known processes to their origin, others to `top`."""
    tasks_file = cgroup_dir / "tasks"
    use_tasks = tasks_file.exists()  # v1: threads may sit in different cgroups than their leader
    try:
        procs = read_ints(cgroup_dir / "cgroup.procs")
    except OSError:
        procs = []
    for pid in procs:
        dest = origins.get(pid, top)
        for target in (dest, top) if dest != top else (top,):
            try:
                with open(target / "cgroup.procs", "w") as f:
                    f.write(str(pid))
                break
            except OSError as e:
                if e.errno == errno.ESRCH:
                    break
                log.debug("cannot move pid %d to %s: %s", pid, target, e.strerror)
    if use_tasks:
        for tid in read_ints(tasks_file):
            try:
                with open(top / "tasks", "w") as f:
                    f.write(str(tid))
            except OSError as e:
                if e.errno != errno.ESRCH:
                    raise ActuatorError(f"cannot move task {tid} out of {cgroup_dir}: {e.strerror}") from e


def _rmdir(cgroup_dir: Path) -> None:
    """rmdir a cgroup; retry briefly while exiting tasks drain (EBUSY). Fake trees hold plain files."""
    for attempt in range(20):
        try:
            os.rmdir(cgroup_dir)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno == errno.ENOTEMPTY and not any(p.is_dir() for p in cgroup_dir.iterdir()):
                # Not cgroupfs (which answers EBUSY): a test tree of plain files. Empty it.
                for p in cgroup_dir.iterdir():
                    p.unlink()
                continue
            if e.errno != errno.EBUSY or attempt == 19:
                raise ActuatorError(f"cannot remove cgroup {cgroup_dir}: {e.strerror}") from e
            time.sleep(0.01)


def _rmdir_quietly(cgroup_dir: Path) -> None:
    """Undo a half-made cgroup; never hides the error that caused the undo."""
    try:
        _rmdir(cgroup_dir)
    except ActuatorError as e:
        log.warning("%s", e)
