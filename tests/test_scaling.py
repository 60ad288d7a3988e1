"""CPU actuators: cgroup v1 for real on this host, cgroup v2 against a fake tree, affinity, selection,
and a replica's view of its own limit (sponge.scaling)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sponge.perf.profiler import HostLoad
from sponge.scaling.affinity import AffinityActuator
from sponge.scaling.base import ActuatorError
from sponge.scaling.cgroup import (
    CgroupV1Actuator,
    CgroupV2Actuator,
    cgroup_name,
    cleanup_stale,
    parse_cgroup_name,
    parse_cpu_max,
    quota_us_for,
)
from sponge.scaling.procfs import parse_mountinfo, parse_proc_cgroup, read_ints, task_ids
from sponge.scaling.select import cleanup_all_stale, select_actuator
from sponge.scaling.self_limit import read_own_cpu_limit_m, threads_for

REPO = Path(__file__).resolve().parents[1]
V1_MOUNT = Path("/sys/fs/cgroup/cpu")
V1_ACCT_MOUNT = Path("/sys/fs/cgroup/cpuacct")
N_CPU = os.cpu_count() or 1

# Two threads hashing 64 KiB blocks: hashlib releases the GIL, so this can use two whole cores.
BUSY = """
import hashlib, sys, threading
d = b"x" * (1 << 16)
def spin():
    while True:
        hashlib.sha256(d).digest()
for _ in range(2):
    threading.Thread(target=spin, daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:
    t = threading.Thread(target=spin, daemon=True)
    t.start()
    print(t.native_id, flush=True)
"""

# Answers every stdin line with its own view of its CPU limit.
ASK_LIMIT = """
import sys
from sponge.scaling.self_limit import read_own_cpu_limit_m, threads_for
print("ready", flush=True)
for line in sys.stdin:
    m = read_own_cpu_limit_m()
    print(m, threads_for(m), flush=True)
"""


def _v1_writable() -> bool:
    probe = V1_MOUNT / f"sponge-probe-{os.getpid()}"
    try:
        probe.mkdir()
        (probe / "cpu.cfs_quota_us").write_text("-1")
        return True
    except OSError:
        return False
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass


V1_OK = _v1_writable()
needs_v1 = pytest.mark.skipif(not V1_OK, reason=f"{V1_MOUNT} (cgroup v1 cpu controller) is not writable here")




@pytest.fixture
def v1_roots():
    """A private root in the real cpu and cpuacct hierarchies, removed afterwards."""
    name = f"sponge-test-{os.getpid()}"
    roots = (V1_MOUNT / name, V1_ACCT_MOUNT / name)
    yield roots
    for r in roots:
        if r.is_dir():
            cleanup_stale(r, alive=lambda pid: False)
            r.rmdir()


def _ask(p: subprocess.Popen, line: str = "x") -> str:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(line + "\n")
    p.stdin.flush()
    return p.stdout.readline().strip()


def _rate(act, seconds: float = 1.0) -> tuple[float, float]:
    """Cores used by the cgroup over `seconds` of wall time, and cores used meanwhile by every other
    process on the host (HostLoad: /proc/stat minus the cgroup and this process)."""
    others = HostLoad(act)
    t0 = time.monotonic()  # the wall window encloses the usage window: a delayed read never inflates the rate
    u0 = act.cpu_usage_ns()
    time.sleep(seconds)
    u1 = act.cpu_usage_ns()
    t1 = time.monotonic()
    return (u1 - u0) / 1e9 / (t1 - t0), others.sample()


def _check_quota_rate(act, cpu_m: int, threads: int) -> str:
    """The child spins on more threads than `cpu_m` allows. A quota is a limit: the rate never exceeds
    it (margin: a 1 s window spans parts of 11 periods of 100 ms), and other processes may only lower
    it. So the lower bound (the quota is reached) is asserted only over a window in which the host had
    CPU to spare for the child: other processes left it its allocation (HostLoad's rule) and did not
    keep every core busy (this child's cgroup has an ordinary weight, so on a saturated host it gets a
    fair share, which may be below its quota). A disturbed window is measured once more; if that one is
    disturbed too, only the upper bound is asserted."""
    cap = cpu_m / 1000.0
    load = HostLoad(None)
    for _attempt in range(2):
        r, others = _rate(act)
        seen = f"{cpu_m} m quota: the child used {r:.3f} cores, other processes {others:.2f} of {load.n_cpus}"
        assert r <= 1.1 * cap + 0.02, seen
        saturated = others + r > load.n_cpus - load.tolerance_cores
        if not saturated and not load.contended(others, cpu_m, threads):
            assert r >= 0.8 * cap, seen
            return seen
    return seen + " (disturbed twice: upper bound only)"


# -- pure helpers -----------------------------------------------------------------------------------


def test_quota_and_names() -> None:
    assert quota_us_for(500) == 50_000
    assert quota_us_for(1500) == 150_000
    assert quota_us_for(1) == 1_000  # kernel minimum 1 ms
    assert quota_us_for(333, 50_000) == 16_650
    assert cgroup_name("resnet/0", 42) == "sponge-42-resnet_0"
    assert parse_cgroup_name("sponge-42-resnet_0") == (42, "resnet_0")
    assert parse_cgroup_name("sponge-x-y") is None
    assert parse_cpu_max("max 100000") == (None, 100_000)
    assert parse_cpu_max("50000 100000\n") == (50_000, 100_000)


def test_parsers() -> None:
    info = (
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
        "41 31 0:38 /pod\\0401 /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
        "23 1 0:20 / /proc rw - proc proc rw\n"
    )
    m = parse_mountinfo(info, "/fake")
    assert [(x.mount_point, x.version, x.root) for x in m] == [
        (Path("/fake/sys/fs/cgroup/cpu"), 1, "/"),
        (Path("/fake/sys/fs/cgroup/unified"), 2, "/pod 1"),
    ]
    assert m[0].controllers == {"cpu", "cpuacct"}
    assert parse_proc_cgroup("2:cpu,cpuacct:/a/b\n0::/c\n") == {"cpu": "/a/b", "cpuacct": "/a/b", "": "/c"}


def test_threads_for() -> None:
    assert threads_for(1) == 1
    assert threads_for(1000) == 1
    assert threads_for(1001) == min(2, N_CPU)
    assert threads_for(10**6) == N_CPU
    assert threads_for(None) == N_CPU


# -- cgroup v1, for real ----------------------------------------------------------------------------


@needs_v1
def test_v1_quota_readback_and_measured_rate(spawn, v1_roots) -> None:
    root, acct_root = v1_roots
    act = CgroupV1Actuator("busy", root, acct_root=acct_root)
    assert act.path == root / f"sponge-{os.getpid()}-busy" and act.path.is_dir()
    assert act.acct_path == acct_root / act.path.name
    child = spawn(BUSY)
    act.attach(child.pid)

    # All threads are inside, and a thread created after attach is born inside too.
    new_tid = int(_ask(child))
    tids = task_ids(child.pid)
    assert new_tid in tids and len(tids) >= 4
    assert set(tids) <= set(read_ints(act.path / "tasks"))
    assert set(tids) <= set(read_ints(act.acct_path / "tasks"))

    threads = len(task_ids(child.pid)) - 1  # all spin but the main thread, which waits on stdin
    act.apply(500)
    assert (act.path / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert (act.path / "cpu.cfs_period_us").read_text().strip() == "100000"
    assert act.current() == 500
    time.sleep(0.15)  # let one period pass
    print(_check_quota_rate(act, 500, threads))

    act.apply(1500)  # above one core: the quota, not the GIL, is what caps it (hashlib releases the GIL)
    assert act.current() == 1500 and (act.path / "cpu.cfs_quota_us").read_text().strip() == "150000"
    assert (act.path / "cpu.cfs_period_us").read_text().strip() == "100000"
    time.sleep(0.15)
    print(_check_quota_rate(act, 1500, threads))

    act.apply(250)
    assert act.current() == 250 and (act.path / "cpu.cfs_quota_us").read_text().strip() == "25000"
    time.sleep(0.15)
    print(_check_quota_rate(act, 250, threads))

    act.unlimit()
    assert act.quota() == (None, 100_000) and act.current() == N_CPU * 1000

    act.close()
    assert not act.path.exists() and not act.acct_path.exists()
    cg = parse_proc_cgroup(Path(f"/proc/{child.pid}/cgroup").read_text())
    assert cg["cpu"] == "/" and cg["cpuacct"] == "/"  # back where it came from
    act.close()  # idempotent
    with pytest.raises(ActuatorError, match="closed"):
        act.apply(500)


@needs_v1
def test_cleanup_all_stale_covers_cpuacct_twin(v1_roots, tmp_path: Path) -> None:
    root, acct_root = v1_roots
    act = CgroupV1Actuator("crashed", root, acct_root=acct_root, owner_pid=999_999_999)
    assert act.acct_path is not None and act.acct_path.is_dir()
    removed = cleanup_all_stale(v1_root=root, v2_root=tmp_path / "no-v2" / "sponge")
    assert set(removed) == {act.path, act.acct_path}
    assert not act.path.exists() and not act.acct_path.exists()


@needs_v1
def test_v1_errors(v1_roots) -> None:
    root, acct_root = v1_roots
    act = CgroupV1Actuator("err", root, acct_root=acct_root)
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        with pytest.raises(ActuatorError, match=f"pid {dead.pid}"):
            act.attach(dead.pid)
        with pytest.raises(ValueError):
            act.apply(0)
    finally:
        act.close()
    with pytest.raises(ActuatorError, match="cpu.cfs_quota_us"):
        CgroupV1Actuator("x", "/nonexistent/sponge")


@needs_v1
def test_v1_cleanup_stale(spawn, v1_roots) -> None:
    root, _ = v1_roots
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = spawn("import sys\nprint('ready', flush=True)\nsys.stdin.read()")
    straggler = spawn("import sys\nprint('ready', flush=True)\nsys.stdin.read()")
    stale = root / f"sponge-{dead.pid}-old"
    live = root / f"sponge-{owner.pid}-keep"
    stale.mkdir()
    live.mkdir()
    (stale / "cgroup.procs").write_text(str(straggler.pid))
    other = root / "not-ours"
    other.mkdir()
    try:
        assert cleanup_stale(root) == [stale]
        assert not stale.exists() and live.is_dir() and other.is_dir()
        assert parse_proc_cgroup(Path(f"/proc/{straggler.pid}/cgroup").read_text())["cpu"] == "/"
    finally:
        for d in (live, other):
            if d.exists():
                d.rmdir()


# -- cgroup v2, fake tree ---------------------------------------------------------------------------


def _fake_v2(tmp_path: Path, controllers: str = "cpuset cpu io memory pids") -> Path:
    top = tmp_path / "unified"
    top.mkdir()
    for f, text in {
        "cgroup.controllers": controllers + "\n",
        "cgroup.subtree_control": "\n",
        "cgroup.procs": "1\n",
        "cgroup.threads": "1\n",
        "cpu.stat": "usage_usec 0\n",
    }.items():
        (top / f).write_text(text)
    return top


def test_v2_fake_tree(tmp_path: Path) -> None:
    top = _fake_v2(tmp_path)
    act = CgroupV2Actuator("r1", top / "sponge", owner_pid=4242)
    assert act.path == top / "sponge" / "sponge-4242-r1"
    assert (top / "cgroup.subtree_control").read_text() == "+cpu"
    assert (top / "sponge" / "cgroup.subtree_control").read_text() == "+cpu"
    assert (act.path / "cpu.max").read_text() == "max 100000"

    me = os.getpid()  # harmless: the "move" is a write into a plain file
    act.attach(me)
    assert (act.path / "cgroup.procs").read_text() == str(me)
    act.apply(500)
    assert (act.path / "cpu.max").read_text() == "50000 100000"
    assert act.current() == 500
    act.apply(1500)
    assert (act.path / "cpu.max").read_text() == "150000 100000"
    act.apply(5)  # below the 1 ms kernel minimum: rounded up
    assert (act.path / "cpu.max").read_text() == "1000 100000" and act.current() == 10
    act.unlimit()
    assert (act.path / "cpu.max").read_text() == "max 100000" and act.current() == N_CPU * 1000

    (act.path / "cpu.stat").write_text("usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n")
    assert act.cpu_usage_ns() == 1_234_000

    act.close()
    assert not act.path.exists()
    assert (top / "cgroup.procs").read_text() == str(me)  # moved back to the top
    act.close()


def test_v2_refuses_without_cpu_controller(tmp_path: Path) -> None:
    top = _fake_v2(tmp_path, controllers="hugetlb")
    with pytest.raises(ActuatorError, match=r"cpu controller is not available in .*cgroup.controllers"):
        CgroupV2Actuator("r1", top / "sponge")
    assert not (top / "sponge").exists()


def test_v2_cleanup_stale_fake(tmp_path: Path) -> None:
    top = _fake_v2(tmp_path)
    root = top / "sponge"
    root.mkdir()
    for name in ("sponge-999999999-a", f"sponge-{os.getpid()}-b"):
        (root / name).mkdir()
        (root / name / "cpu.max").write_text("max 100000")
        (root / name / "cgroup.procs").write_text("")
    assert cleanup_stale(root) == [root / "sponge-999999999-a"]
    assert (root / f"sponge-{os.getpid()}-b").is_dir()


# -- affinity ---------------------------------------------------------------------------------------


def test_affinity_pins_all_threads(spawn) -> None:
    child = spawn("import sys, threading, time\n"
                  "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
                  "print('ready', flush=True)\nsys.stdin.read()")
    before = os.sched_getaffinity(child.pid)
    act = AffinityActuator("aff")
    assert act.granularity_m == 1000 and act.kind == "affinity"
    act.attach(child.pid)
    act.apply(250)  # whole cores: one CPU
    assert act.current() == 1000
    tids = task_ids(child.pid)
    assert len(tids) >= 2 and all(len(os.sched_getaffinity(t)) == 1 for t in tids)
    if len(before) >= 2:
        act.apply(1001)
        assert act.current() == 2000
    act.close()
    assert os.sched_getaffinity(child.pid) == before


# -- selection --------------------------------------------------------------------------------------


@needs_v1
def test_select_picks_v1_here() -> None:
    sel = select_actuator("select-test")
    try:
        assert sel.actuator.kind == "cgroup-v1"
        assert "cgroup-v1" in sel.reason and "v2 unusable" in sel.reason
    finally:
        sel.actuator.close()
    assert not sel.actuator.path.exists()


def test_select_falls_back_to_affinity() -> None:
    sel = select_actuator("sel", v1_root="/nonexistent/cpu/sponge", v2_root="/nonexistent/unified/sponge")
    assert sel.actuator.kind == "affinity"
    assert "v1 unusable" in sel.reason and "WHOLE-CORE" in sel.reason


def test_select_honours_prefer(tmp_path: Path) -> None:
    assert select_actuator("p", prefer="affinity").actuator.kind == "affinity"
    top = _fake_v2(tmp_path)
    sel = select_actuator("p", prefer="cgroup-v2", v2_root=top / "sponge")
    assert sel.actuator.kind == "cgroup-v2"
    sel.actuator.close()
    with pytest.raises(ActuatorError):
        select_actuator("p", prefer="cgroup-v1", v1_root="/nonexistent/cpu/sponge")
    with pytest.raises(ValueError):
        select_actuator("p", prefer="kubernetes")


# -- a replica's view of its own limit --------------------------------------------------------------


def _fake_proc(root: Path, cgroup: str, mountinfo: str | None) -> None:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    if mountinfo is not None:
        (root / "proc/self/mountinfo").write_text(mountinfo)


def _v1_dir(d: Path, quota: int, period: int = 100_000) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (d / "cpu.cfs_period_us").write_text(f"{period}\n")


ALL = set(range(N_CPU))


def test_self_limit_fake_v1(tmp_path: Path) -> None:
    _fake_proc(
        tmp_path,
        "4:memory:/x\n3:cpu,cpuacct:/kubepods/pod1/ctr\n0::/\n",
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n",
    )
    top = tmp_path / "sys/fs/cgroup/cpu,cpuacct"
    _v1_dir(top, -1)
    _v1_dir(top / "kubepods", -1)
    _v1_dir(top / "kubepods/pod1", 150_000)
    _v1_dir(top / "kubepods/pod1/ctr", 250_000)
    assert read_own_cpu_limit_m(tmp_path, affinity=ALL) == 1500  # the parent caps the child
    _v1_dir(top / "kubepods/pod1", -1)
    assert read_own_cpu_limit_m(tmp_path, affinity=ALL) == 2500
    _v1_dir(top / "kubepods/pod1/ctr", 25_000, 50_000)
    assert read_own_cpu_limit_m(tmp_path, affinity=ALL) == 500
    _v1_dir(top / "kubepods/pod1/ctr", -1)
    assert read_own_cpu_limit_m(tmp_path, affinity=ALL) is None
    if N_CPU >= 2:
        assert read_own_cpu_limit_m(tmp_path, affinity={0}) == 1000  # affinity counts too


def test_self_limit_fake_v2(tmp_path: Path) -> None:
    _fake_proc(tmp_path, "0::/kubepods.slice/pod/ctr\n",
               "41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    top = tmp_path / "sys/fs/cgroup"
    (top / "kubepods.slice/pod/ctr").mkdir(parents=True)  # top has no cpu.max, like the real root
    (top / "kubepods.slice/pod/ctr/cpu.max").write_text("50000 100000\n")
    assert read_own_cpu_limit_m(tmp_path, affinity=ALL) == 500
    (top / "kubepods.slice/pod/ctr/cpu.max").write_text("max 100000\n")
    assert read_own_cpu_limit_m(tmp_path, affinity=ALL) is None
    (top / "kubepods.slice/pod/cpu.max").write_text("120000 100000\n")
    assert read_own_cpu_limit_m(tmp_path, affinity=ALL) == 1200


def test_self_limit_fake_v2_namespaced_and_no_mountinfo(tmp_path: Path) -> None:
    # In a cgroup namespace the mount shows the pod's subtree at the mount point.
    a = tmp_path / "a"
    _fake_proc(a, "0::/pod/ctr\n", "41 31 0:38 /pod /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    (a / "sys/fs/cgroup/ctr").mkdir(parents=True)
    (a / "sys/fs/cgroup/ctr/cpu.max").write_text("30000 100000\n")
    assert read_own_cpu_limit_m(a, affinity=ALL) == 300
    # Without mountinfo, the conventional /sys/fs/cgroup is assumed.
    b = tmp_path / "b"
    _fake_proc(b, "0::/ctr\n", None)
    (b / "sys/fs/cgroup/ctr").mkdir(parents=True)
    (b / "sys/fs/cgroup/ctr/cpu.max").write_text("70000 100000\n")
    assert read_own_cpu_limit_m(b, affinity=ALL) == 700


@needs_v1
def test_self_limit_real_inside_v1_child(spawn, v1_roots) -> None:
    root, acct_root = v1_roots
    child = spawn(ASK_LIMIT)
    assert _ask(child) == f"None {N_CPU}"
    act = CgroupV1Actuator("self", root, acct_root=acct_root)
    try:
        act.attach(child.pid)
        act.apply(500)
        assert _ask(child) == "500 1"
        act.apply(1500)
        assert _ask(child) == f"1500 {min(2, N_CPU)}"
        act.unlimit()
        assert _ask(child) == f"None {N_CPU}"
    finally:
        act.close()
