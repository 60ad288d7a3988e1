"""Reading /proc and cgroup files: the few parsers the actuators and self_limit share.

Every function takes paths (or a root prefix) rather than hard-coding /proc, so tests can lay out a
fake tree. Nothing here writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Clock ticks per second for utime/stime in /proc/<pid>/stat.
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup hierarchy as mounted: where, which subtree of the hierarchy, v1 controllers or v2."""

    mount_point: Path
    root: str  # the hierarchy path that appears at mount_point ("/" unless a namespace/bind mount)
    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: from the super options (e.g. {"cpu", "cpuacct"}); v2: empty


def parse_mountinfo(text: str, prefix: Path | str = "/") -> list[CgroupMount]:
    """The cgroup (v1) and cgroup2 mounts listed in a /proc/<pid>/mountinfo text.

    Mount points are re-rooted under `prefix` so a fake tree can stand in for the real one.
    """
    mounts: list[CgroupMount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, super_opts = tail[0], tail[2]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        point = _reroot(prefix, _unescape(fields[4]))
        if fstype == "cgroup2":
            mounts.append(CgroupMount(point, _unescape(fields[3]), 2, frozenset()))
        else:
            ctrls = frozenset(o for o in super_opts.split(",") if o not in ("rw", "ro"))
            mounts.append(CgroupMount(point, _unescape(fields[3]), 1, ctrls))
    return mounts


def find_mount(controller: str | None, prefix: Path | str = "/") -> CgroupMount | None:
    """The mount of the v1 hierarchy carrying `controller`, or the v2 mount if `controller` is None."""
    try:
        text = _reroot(prefix, "/proc/self/mountinfo").read_text()
    except OSError:
        return None
    for m in parse_mountinfo(text, prefix):
        if controller is None and m.version == 2:
            return m
        if controller is not None and m.version == 1 and controller in m.controllers:
            return m
    return None


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Map controller -> cgroup path from a /proc/<pid>/cgroup text; the v2 entry is under key ""."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if ctrls == "":
            out[""] = path
        for c in ctrls.split(","):
            if c:
                out[c] = path
    return out


def proc_cgroup_path(pid: int | str, controller: str | None, prefix: Path | str = "/") -> str | None:
    """The cgroup path of `pid` in the hierarchy of `controller` (None = v2), or None if unknown."""
    try:
        text = _reroot(prefix, f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    return parse_proc_cgroup(text).get(controller if controller is not None else "")


def task_ids(pid: int) -> list[int]:
    """All thread ids of process `pid` (empty if it is gone)."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        return []


def pid_alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (a zombie's cgroup and affinity no longer matter)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the last ')' (the command name may contain spaces and parentheses).
    state = stat.rpartition(")")[2].split()[0:1]
    return state != ["Z"] and state != ["X"]


def proc_cpu_ns(pid: int) -> int:
    """utime+stime of process `pid` (all its threads, including exited ones) in ns; 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0
    # After the ')' the fields start at index 3 (state); utime is field 14, stime field 15 (1-based).
    ticks = int(fields[11]) + int(fields[12])
    return ticks * 1_000_000_000 // _CLK_TCK


def hierarchy_top(cgroup_dir: Path) -> Path:
    """The top directory of the cgroup hierarchy containing `cgroup_dir` (walk up while a cgroup).

    Start from a directory known to be a cgroup (one with cgroup.procs).
    """
    top = cgroup_dir
    while top.parent != top and (top.parent / "cgroup.procs").exists():
        top = top.parent
    return top


def read_ints(path: Path) -> list[int]:
    """The whitespace-separated integers in a cgroup file such as `tasks` or `cgroup.procs`."""
    return [int(x) for x in path.read_text().split()]


def _reroot(prefix: Path | str, path: str) -> Path:
    return Path(prefix) / path.lstrip("/")


def _unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    if "\\" not in s:
        return s
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)
