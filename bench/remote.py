"""What does a remote replica cost per batch, and how fast does a remote worker follow its CPU quota?
(issue 12, item 1)

1. Added latency per batch: a `sponge worker` in its own network namespace, reached over a veth pair
   (private /30), against a local `Replica` (worker process over a socketpair) of the same model with
   the same thread count, and the same worker over loopback; batch sizes 1/8/32, measured round robin
   in one run (local, veth, loopback, local, ...) so that drift on the shared host hits all alike.
   "added" = the batch's wall time at the caller minus the runtime's own `infer_ms` (as ServingCore's
   dispatch overhead): encoding, the kernel's socket path, decoding, the worker's event loop. The
   table gives medians and p99 and the ratio remote/local of the medians.
2. Quota -> threads: the worker is moved into a cgroup v1 cpu group (sponge-t-<random>) whose quota is
   stepped between 1000 m and 2000 m; the time from the quota write to the first status answer (a
   PING over the veth, polled every 2 ms) reporting the new thread count. The worker polls its own
   limit every `--limit-poll-ms` (100 by default, as in production).

Needs root (netns, cgroup). The worker shares this host's CPUs: it measures the protocol and the
kernel's network path, not a real network's latency. Usage:
    python bench/remote.py [--model default|payload|trivial|PATH] [--rounds 20] [--steps 10] [--limit-poll-ms 100]
Prints a table; the last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sponge.runtime.remote import RemoteReplica  # noqa: E402
from sponge.runtime.replica import Replica  # noqa: E402

V1_CPU = Path("/sys/fs/cgroup/cpu")


def sh(*cmd: str, check: bool = True) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


class Link:
    """One namespace sponge-t-<hex> joined to the host by a veth pair on 10.a.b.0/30."""

    def __init__(self) -> None:
        s = secrets.token_hex(3)
        self.ns, self.host_if, self.peer_if = f"sponge-t-{s}", f"stb{s}h", f"stb{s}n"
        a, b = 100 + secrets.randbelow(150), secrets.randbelow(250)
        self.host_ip, self.ip = f"10.{a}.{b}.1", f"10.{a}.{b}.2"
        self.made = False

    def __enter__(self) -> "Link":
        sh("ip", "netns", "add", self.ns)
        self.made = True
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        sh("ip", "link", "set", self.peer_if, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        for c in (["addr", "add", f"{self.ip}/30", "dev", self.peer_if], ["link", "set", self.peer_if, "up"],
                  ["link", "set", "lo", "up"]):
            sh("ip", "netns", "exec", self.ns, "ip", *c)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.made:
            sh("ip", "netns", "del", self.ns, check=False)
            sh("ip", "link", "del", self.host_if, check=False)


def start_worker(model: str, link: Link, threads: int, max_threads: int, poll_ms: float
                 ) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen(["nsenter", f"--net=/run/netns/{link.ns}", sys.executable, "-m", "sponge.cli", "worker",
                          "--model", model, "--host", "0.0.0.0", "--port", "9000", "--threads", str(threads),
                          "--max-threads", str(max_threads), "--limit-poll-ms", str(poll_ms)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith("listening"):
        raise RuntimeError(f"worker did not start (exit code {p.poll()})")
    return p, 9000


def payload_model() -> str:
    """EfficientNet-Lite0's input (UINT8 [N, 224, 224, 3]) -> ReduceMax per image ([N, 1, 1, 1]):
    the same bytes travel, the runtime does next to nothing, so `added` is the transport alone."""
    import tempfile

    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 224, 224, 3])
    y = helper.make_tensor_value_info("peak", TensorProto.UINT8, ["N", 1, 1, 1])
    graph = helper.make_graph([helper.make_node("ReduceMax", ["image"], ["peak"], axes=[1, 2, 3], keepdims=1)],
                              "payload", [x], [y])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    path = Path(tempfile.mkdtemp(prefix="sponge-bench-")) / "payload.onnx"
    onnx.save(m, str(path))
    return str(path)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


async def latency(model_path: str, link: Link, rounds: int, sizes: list[int]) -> dict:
    local = Replica("local", model_path, threads=1, max_threads=1, follow_own_limit=False)
    await local.start()
    veth = RemoteReplica("veth", link.ip, 9000)
    await veth.start()
    # the worker (max 2 threads, for the quota part) builds its 2-thread session in the background at
    # start: measure only once that is done, or it competes with the first batches
    while len((await veth.status()).get("sessions") or []) < 2:
        await asyncio.sleep(0.1)
    # loopback: a second worker of the same model in the host namespace (the first listens in its own)
    loop_r = RemoteReplica("loopback", "127.0.0.1", 0)
    spec = local.inputs[0]
    rng = np.random.default_rng(0)
    out: dict = {}
    lo_proc = None
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        lo_proc = subprocess.Popen([sys.executable, "-m", "sponge.cli", "worker", "--model", model_path, "--host",
                                    "127.0.0.1", "--port", "0", "--threads", "1", "--max-threads", "1",
                                    "--no-follow-limit"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   text=True, env=env)
        assert lo_proc.stdout is not None
        loop_r.port = int(lo_proc.stdout.readline().split()[1])
        await loop_r.start()
        reps = {"local": local, "veth": veth, "loopback": loop_r}
        for b in sizes:
            shape = [b if d == -1 and i == 0 else (d if d > 0 else 1) for i, d in enumerate(spec.shape)]
            dtype = {"UINT8": np.uint8, "FP32": np.float32}[spec.datatype]
            x = (rng.integers(0, 255, shape) if dtype == np.uint8 else rng.standard_normal(shape)).astype(dtype)
            nbytes = x.nbytes
            for r in reps.values():  # warm-up (first batch of a size allocates)
                await r.infer({spec.name: x})
            rows: dict[str, dict[str, list[float]]] = {k: {"wall": [], "infer": [], "added": []} for k in reps}
            for _ in range(rounds):
                for k, r in reps.items():
                    t0 = time.perf_counter()
                    res = await r.infer({spec.name: x})
                    wall = (time.perf_counter() - t0) * 1000.0
                    rows[k]["wall"].append(wall)
                    rows[k]["infer"].append(res.infer_ms)
                    rows[k]["added"].append(wall - res.infer_ms)
            out[b] = {"input_bytes": nbytes, **{k: {f"{m}_{s}": round(pct(v, q), 3) for m, v in d.items()
                                                     for s, q in (("p50", 50), ("p99", 99))}
                                                 for k, d in rows.items()}}
            for k in ("veth", "loopback"):
                out[b][f"{k}_over_local_added_p50"] = round(out[b][k]["added_p50"] / out[b]["local"]["added_p50"], 2)
    finally:
        await local.stop()
        await veth.stop()
        await loop_r.stop()
        if lo_proc is not None:
            lo_proc.kill()
            lo_proc.wait()
    return out


async def quota_follow(worker_pid: int, link: Link, steps: int) -> dict:
    group = V1_CPU / f"sponge-t-{secrets.token_hex(4)}"
    group.mkdir()
    rep = RemoteReplica("veth", link.ip, 9000)
    await rep.start()
    times: list[float] = []
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("200000")
        (group / "cgroup.procs").write_text(str(worker_pid))
        while (await rep.status())["threads"] != 2:
            await asyncio.sleep(0.01)
        for i in range(steps):
            quota, want = (100000, 1) if i % 2 == 0 else (200000, 2)
            await asyncio.sleep(0.05 + 0.1 * secrets.randbelow(100) / 100)  # a random phase vs the poll
            t0 = time.perf_counter()
            (group / "cpu.cfs_quota_us").write_text(str(quota))
            while True:
                st = await rep.status()
                if st["threads"] == want and st["limit_m"] == quota // 100:
                    break
                await asyncio.sleep(0.002)
            times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        await rep.stop()
        try:
            (V1_CPU / "cgroup.procs").write_text(str(worker_pid))
        except OSError:
            pass
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                await asyncio.sleep(0.1)
    return {"steps": len(times), "p50_ms": round(pct(times, 50), 1), "p99_ms": round(pct(times, 99), 1),
            "max_ms": round(max(times), 1), "all_ms": [round(t, 1) for t in times]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default",
                    help="default (EfficientNet-Lite0), payload (its input, next to no compute: the transport "
                         "alone), trivial, or an ONNX path")
    ap.add_argument("--rounds", type=int, default=20, help="batches per batch size and path")
    ap.add_argument("--sizes", default="1,8,32")
    ap.add_argument("--steps", type=int, default=10, help="quota steps (1000 m <-> 2000 m)")
    ap.add_argument("--limit-poll-ms", type=float, default=100.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/remote.py needs root (network namespaces, a cgroup)", file=sys.stderr)
        return 2
    if args.model == "payload":
        model = payload_model()
    elif args.model == "default":
        from sponge.models.efficientnet_lite0 import default_model_path
        model = str(default_model_path())
    elif args.model == "trivial":
        from sponge.models.trivial import trivial_model_path
        model = str(trivial_model_path())
    else:
        model = args.model
    sizes = [int(s) for s in args.sizes.split(",")]
    with Link() as link:
        proc, _ = start_worker(model, link, threads=1, max_threads=2, poll_ms=args.limit_poll_ms)
        try:
            import uvloop  # as `sponge serve` (uvicorn picks uvloop): the front door's loop

            lat = uvloop.run(latency(model, link, args.rounds, sizes))
            quota = uvloop.run(quota_follow(proc.pid, link, args.steps)) if V1_CPU.is_dir() else None
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"model {Path(model).name}, 1 runtime thread, {args.rounds} batches per cell; ms; "
          "added = wall - infer_ms")
    print(f"{'batch':>5} {'input':>9}  {'path':<9} {'wall p50':>9} {'p99':>8} {'infer p50':>10} "
          f"{'added p50':>10} {'p99':>8} {'x local':>8}")
    for b, row in lat.items():
        for k in ("local", "veth", "loopback"):
            r = row[k]
            ratio = "" if k == "local" else f"{row[f'{k}_over_local_added_p50']:.2f}"
            print(f"{b:>5} {row['input_bytes']:>9}  {k:<9} {r['wall_p50']:>9.2f} {r['wall_p99']:>8.2f} "
                  f"{r['infer_p50']:>10.2f} {r['added_p50']:>10.3f} {r['added_p99']:>8.3f} {ratio:>8}")
    if quota:
        print(f"quota write -> thread count reported (poll {args.limit_poll_ms:.0f} ms, {quota['steps']} steps "
              f"1000<->2000 m): p50 {quota['p50_ms']} ms, p99 {quota['p99_ms']} ms, max {quota['max_ms']} ms")
    print(json.dumps({"model": Path(model).name, "rounds": args.rounds, "latency": lat, "quota_to_threads": quota,
                      "limit_poll_ms": args.limit_poll_ms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
