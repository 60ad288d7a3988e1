"""How fast does an in-place CPU resize take effect under load? (issue 3)

One real replica of the default model runs batches back to back (continuous load) in a cgroup of the
real actuator. The allocation is stepped up and down between pairs of values (500<->1500, 250<->1000,
1000<->2000, 250<->2000 m by default), each step held `--hold-ms`. The cgroup's CPU usage
(`cpu_usage_ns`, cpuacct.usage on cgroup v1) is sampled every ~2 ms by a thread.

What "in effect" means. CFS grants a cgroup `quota` of CPU time per 100 ms period: a 500 m replica
runs at full speed for 50 ms, then is throttled for the rest of the period, so the usage rate over a
window shorter than a period says little. Over a window of whole periods, though, a saturated
cgroup uses exactly its quota whatever the phase of the window. Windows are whole periods and at
least 100 ms (with `sponge serve`'s 10 ms period: ten periods), so that sampling error stays small.
So for a step applied at time A:

- `ref` = what the replica can use at the new allocation: min(new target, its demand), where the
  demand is its usage rate over the settled tail of the step [A + hold - 500 ms, A + hold]
  (a 2-thread ONNX Runtime does not use all of 2000 m; 1 thread never uses more than 1000 m).
- **in effect** = the smallest delta (in 5 ms steps) such that the rate over the window
  [A + delta, A + delta + 100 ms] is within +-10 % of `ref`.
- **settled** (stricter) = the smallest delta such that EVERY one-period window starting in
  [delta, delta + 100 ms] (5 ms steps) is within +-10 % of `ref` or one CFS bandwidth slice (5 ms of
  CPU per period; the kernel hands out quota in slices, so a period can overshoot by about one,
  which is more than 10 % at 250 m): the new rate has held for two periods.

Why a down step is not in effect at once: writing a new quota refills the cgroup's runtime to the
NEW quota immediately but keeps the period timer running, so until the next period boundary (0-100
ms away, uniformly) the replica may use one fresh quota on top of what it already used in this
period. Up steps are granted at once by the kernel but used only when the runtime's threads follow.
- **threads follow** = time from A to the first batch result that reports the new thread count
  (ceil(cpu_m/1000); the worker notices its own quota by polling every 100 ms). An upper bound: the
  switch happened before that batch finished. Only steps that change the thread count count.

A step is *comparable* only when the old and new rates differ by more than 20 % of `ref` (otherwise
"within 10 % of the new rate" is already true before the step); other steps are reported but not in
the percentiles. Other processes on the host steal CPU from the replica; the CPU they used during each
step is measured (as in the profiler) and steps where they left the replica less than its new
allocation are flagged and excluded from the percentiles (counted in the output). By default the
replica's cgroup sits under a high-CPU-weight parent (`sponge.perf.profiler.guaranteed_roots`, like a
Kubernetes Guaranteed pod), so neighbours rarely take its allocation.

Usage: python bench/resize.py [--steps 24] [--hold-ms 1000] [--batch 1] [--pairs 500:1500,250:1000]
The last line printed is one JSON object of the figures. Target: in-effect p99 <= 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import logging
import math
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from sponge.config import ServerConfig

from sponge.perf.profiler import HostLoad, open_actuator, random_inputs
from sponge.runtime.replica import Replica
from sponge.scaling.self_limit import threads_for

PERIOD_MS = 100.0
SCAN_STEP_MS = 5.0
TOL = 0.10
TAIL_MS = 500.0
TARGET_P99_MS = 100.0


def _bandwidth_slice_ms() -> float:
    try:
        return int(open("/proc/sys/kernel/sched_cfs_bandwidth_slice_us").read()) / 1000.0
    except (OSError, ValueError):
        return 5.0  # the kernel's default


SLICE_MS = _bandwidth_slice_ms()


class UsageSampler(threading.Thread):
    """Samples (monotonic ns, cumulative CPU ns) of the replica's cgroup every `interval_s`."""

    def __init__(self, read_ns, interval_s: float = 0.002) -> None:
        super().__init__(daemon=True, name="usage-sampler")
        self.read_ns = read_ns
        self.interval_s = interval_s
        self.t: list[int] = []
        self.u: list[int] = []
        self._stop_ev = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._stop_ev.is_set():
            t0 = time.monotonic_ns()
            u = self.read_ns()
            t1 = time.monotonic_ns()
            with self._lock:
                self.t.append((t0 + t1) // 2)
                self.u.append(u)
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self._stop_ev.set()
        self.join(2)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return np.array(self.t, dtype=np.int64), np.array(self.u, dtype=np.int64)


def usage_at(t: np.ndarray, u: np.ndarray, when_ns: float) -> float:
    """Cumulative usage at `when_ns`, linearly interpolated between the neighbouring samples."""
    return float(np.interp(when_ns, t, u))


def rate(t: np.ndarray, u: np.ndarray, a_ns: float, b_ns: float) -> float:
    """Cores used over [a, b]."""
    return (usage_at(t, u, b_ns) - usage_at(t, u, a_ns)) / (b_ns - a_ns)


@dataclass
class Step:
    old_m: int
    new_m: int
    apply_ns: int
    hold_ms: float
    period_ms: float = 100.0
    old_rate: float = math.nan
    demand: float = math.nan
    ref: float = math.nan
    in_effect_ms: float | None = None
    settled_ms: float | None = None
    threads_follow_ms: float | None = None
    threads_change: bool = False
    told: bool = False  # the bench called set_threads right after apply, as `sponge serve` does
    other_cores: float = 0.0
    contended: bool = False
    comparable: bool = True
    window_rates: list[float] = field(default_factory=list)

    @property
    def direction(self) -> str:
        return "up" if self.new_m > self.old_m else "down"


def analyse(step: Step, t: np.ndarray, u: np.ndarray, results: list[tuple[int, int]]) -> None:
    """Fill in rates, in-effect/settled offsets and thread-follow time of one step."""
    a = step.apply_ns
    ms = 1_000_000
    hold = step.hold_ms
    # Windows of a whole number of CFS periods (the usage of a saturated cgroup is exact there), at least
    # 100 ms so that the ~2 ms usage sampling stays a small error (a 10 ms window of 250 m is 2.5 ms of CPU).
    period = step.period_ms * max(1, math.ceil(100.0 / step.period_ms))
    step.old_rate = rate(t, u, a - period * ms, a)
    step.demand = rate(t, u, a + (hold - TAIL_MS) * ms, a + hold * ms)
    target = step.new_m / 1000.0
    step.ref = min(target, step.demand)
    step.comparable = abs(step.old_rate - step.ref) > 2 * TOL * step.ref
    deltas = np.arange(0.0, hold - period + 1e-9, SCAN_STEP_MS)
    rates = [rate(t, u, a + d * ms, a + (d + period) * ms) for d in deltas]
    step.window_rates = [round(r, 3) for r in rates]
    ok = [abs(r - step.ref) <= TOL * step.ref for r in rates]
    step.in_effect_ms = next((float(d) for d, k in zip(deltas, ok) if k), None)
    # settled: windows starting over the next 100 ms all agree, within 10 % or one CFS bandwidth slice
    # (the kernel hands quota to CPUs in slices, so a period's usage can overshoot by about one)
    tol_settled = max(TOL * step.ref, SLICE_MS / period)
    ok_s = [abs(r - step.ref) <= tol_settled for r in rates]
    span = int(round(PERIOD_MS / SCAN_STEP_MS))
    first = int(round(step.in_effect_ms / SCAN_STEP_MS)) if step.in_effect_ms is not None else len(ok_s)
    for i in range(first, len(ok_s) - span):  # never before it is in effect
        if all(ok_s[i : i + span + 1]):
            step.settled_ms = float(deltas[i])
            break
    want_old, want_new = threads_for(step.old_m), threads_for(step.new_m)
    step.threads_change = want_old != want_new
    if step.threads_change:
        end = a + hold * ms
        for done_ns, threads in results:
            if a <= done_ns <= end and threads == want_new:
                step.threads_follow_ms = (done_ns - a) / ms
                break


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def summarize(steps: list[Step]) -> dict:
    out: dict = {}
    for key in ("up/told", "down/told", "up/self", "down/self"):
        direction, mode = key.split("/")
        sel = [s for s in steps if s.direction == direction and s.told == (mode == "told")]
        if not sel:
            continue
        used = [s for s in sel if s.comparable and not s.contended]
        eff = [s.in_effect_ms for s in used if s.in_effect_ms is not None]
        setl = [s.settled_ms for s in used if s.settled_ms is not None]
        thr = [s.threads_follow_ms for s in sel if s.threads_change and s.threads_follow_ms is not None]
        out[key] = {
            "steps": len(sel),
            "used": len(used),
            "contended_excluded": sum(1 for s in sel if s.contended),
            "not_comparable_excluded": sum(1 for s in sel if not s.comparable and not s.contended),
            "never_in_effect": sum(1 for s in used if s.in_effect_ms is None),
            "never_settled": sum(1 for s in used if s.settled_ms is None),
            "in_effect_ms": {k: pct(eff, q) for k, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))},
            "settled_ms": {k: pct(setl, q) for k, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))},
            "threads_follow_ms": {k: pct(thr, q) for k, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))},
            "threads_steps": len(thr),
            "threads_never": sum(1 for s in sel if s.threads_change and s.threads_follow_ms is None),
        }
    return out


def fmt(v: float | None) -> str:
    return "   -  " if v is None else f"{v:6.0f}"


async def run(args: argparse.Namespace) -> dict:
    from sponge.models.efficientnet_lite0 import default_model_path

    model = args.model or str(default_model_path())
    pairs = [tuple(int(x) for x in p.split(":")) for p in args.pairs.split(",")]
    sel = open_actuator("resize-bench", prefer=args.actuator, guaranteed=args.guaranteed, period_us=args.period_us)
    act = sel.actuator
    if not hasattr(act, "cpu_usage_ns"):
        act.close()
        raise SystemExit(f"actuator {act.kind} cannot measure CPU usage")
    period_ms = (getattr(act, "period_us", None) or 100_000) / 1000.0
    tol = HostLoad.TOLERANCE_CORES
    n_cpu = HostLoad(act).n_cpus
    replica = Replica("resize-bench", model, threads=n_cpu, max_threads=n_cpu)
    sampler: UsageSampler | None = None
    load_task: asyncio.Task | None = None
    stop_load = asyncio.Event()
    results: list[tuple[int, int]] = []
    steps: list[Step] = []
    print(f"actuator: {sel.reason}", flush=True)
    try:
        await replica.start()
        pid = replica.pid
        act.attach(pid)
        x = random_inputs(replica.inputs, args.batch)

        async def load() -> None:
            while not stop_load.is_set():
                res = await replica.infer(x)
                results.append((time.monotonic_ns(), res.threads))

        act.apply(pairs[0][0])
        load_task = asyncio.create_task(load())
        await asyncio.sleep(1.5)  # sessions built, first allocation settled
        sampler = UsageSampler(act.cpu_usage_ns)
        sampler.start()
        host = HostLoad(act, tolerance_cores=tol)
        await asyncio.sleep(0.5)
        modes = {"both": (True, False), "told": (True,), "self": (False,)}[args.mode]
        schedule: list[tuple[int, int, bool]] = []
        for i in range(args.steps * len(modes)):
            lo, hi = pairs[i % len(pairs)]
            told = modes[(i // len(pairs)) % len(modes)]
            schedule += [(lo, hi, told), (hi, lo, told)]
        current = pairs[0][0]
        for old, new, told in schedule:
            if current != old:  # move to the step's starting allocation and let it settle
                act.apply(old)
                await asyncio.sleep(args.hold_ms / 1000.0)
            host.sample()
            t_apply = time.monotonic_ns()
            act.apply(new)
            if told:
                replica.set_threads(threads_for(new))
            current = new
            await asyncio.sleep(args.hold_ms / 1000.0)
            other = host.sample()
            steps.append(Step(old, new, t_apply, args.hold_ms, period_ms=period_ms, told=told, other_cores=other))
            if load_task.done():
                load_task.result()  # raise what killed the load
        if replica.pid != pid:
            raise RuntimeError("the replica restarted during the benchmark")
        await asyncio.sleep(0.05)
    finally:
        stop_load.set()
        if sampler is not None:
            sampler.stop()
        if load_task is not None:
            try:
                await asyncio.wait_for(load_task, 10)
            except Exception:
                pass
        await replica.stop()
        act.close()

    t, u = sampler.snapshot()
    for st in steps:
        analyse(st, t, u, results)
        # Disturbed when others used more than the cores the replica left over. What it leaves over
        # is judged from what it really used (a 2-thread replica at 2000 m uses ~1.7 cores; others
        # running in the remaining 0.3 take nothing from it), plus the same tolerance as the profiler.
        want = min(st.new_m / 1000.0, threads_for(st.new_m), st.demand + 0.1)
        st.contended = st.other_cores > n_cpu - want + tol
    dt = np.diff(t) / 1e6
    summary = summarize(steps)
    return {"model": model, "actuator": sel.reason, "batch": args.batch, "hold_ms": args.hold_ms, "pairs": pairs,
            "cfs_period_ms": period_ms, "guaranteed": args.guaranteed,
            "sample_interval_ms": {"median": float(np.median(dt)), "p99": float(np.percentile(dt, 99))},
            "summary": summary, "steps": [asdict(s) | {"direction": s.direction} for s in steps]}


def report(res: dict, verbose: bool) -> None:
    s = res["summary"]
    print(f"model {res['model']}, batch {res['batch']} back to back, each step held {res['hold_ms']:.0f} ms; "
          f"CFS period {res['cfs_period_ms']:g} ms (rate windows of whole periods, >= 100 ms); "
          f"usage sampled every {res['sample_interval_ms']['median']:.1f} ms "
          f"(p99 {res['sample_interval_ms']['p99']:.1f})")
    if verbose:
        print("\n  dir   mode  old->new   old rate  demand  ref   in-effect  settled  threads  other cores")
        for st in res["steps"]:
            flag = " contended" if st["contended"] else ("" if st["comparable"] else " (not comparable)")
            print(f"  {st['direction']:<4}  {'told' if st['told'] else 'self'}  {st['old_m']:>5}->{st['new_m']:<5} "
                  f"{st['old_rate']:7.2f} {st['demand']:7.2f} {st['ref']:5.2f} {fmt(st['in_effect_ms'])} "
                  f"{fmt(st['settled_ms'])}   {fmt(st['threads_follow_ms'])}   {st['other_cores']:.2f}{flag}")
    print("\n  told = set_threads right after apply (sponge serve); self = the replica notices by polling (100 ms)")
    print("                          in effect (ms)              settled (ms)            threads follow (ms)")
    print("  step        used/all   p50   p95   p99   max     p50   p95   p99   max     p50   p95   p99   max")
    for key, x in s.items():
        row = f"  {key:<10} {x['used']:>4}/{x['steps']:<4} "
        for k in ("in_effect_ms", "settled_ms", "threads_follow_ms"):
            row += "".join(fmt(x[k][q]) for q in ("p50", "p95", "p99", "max")) + "  "
        print(row)
    for key, x in s.items():
        print(f"  {key}: excluded {x['contended_excluded']} contended + {x['not_comparable_excluded']} not comparable; "
              f"never in effect {x['never_in_effect']}, never settled {x['never_settled']}; "
              f"threads changed in {x['threads_steps'] + x['threads_never']} steps, "
              f"never followed {x['threads_never']}")
    for mode in ("told", "self"):
        p99s = [s[k]["in_effect_ms"]["p99"] for k in (f"up/{mode}", f"down/{mode}")
                if k in s and s[k]["in_effect_ms"]["p99"] is not None]
        if p99s:
            worst = max(p99s)
            print(f"in-effect p99, {mode}, worst direction = {worst:.1f} ms (target <= {TARGET_P99_MS:.0f} ms) -> "
                  f"{'MET' if worst <= TARGET_P99_MS else 'NOT MET'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--steps", type=int, default=24, help="up steps (and as many down steps) per mode")
    ap.add_argument("--mode", choices=["both", "told", "self"], default="both",
                    help="told: set_threads right after apply (as sponge serve does); self: the replica notices "
                         "its new quota by polling (as under an external resizer such as the kubelet)")
    ap.add_argument("--hold-ms", dest="hold_ms", type=float, default=1000.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pairs", default="500:1500,250:1000,1000:2000,250:2000")
    ap.add_argument("--actuator", default="auto", choices=["auto", "cgroup-v2", "cgroup-v1", "affinity"])
    ap.add_argument("--period-us", dest="period_us", type=int, default=ServerConfig().cfs_period_us,
                    help="CFS period of the replica's cgroup (default: what `sponge serve` uses; windows follow it)")
    ap.add_argument("--no-guarantee", dest="guaranteed", action="store_false",
                    help="do not place the replica under the high-CPU-weight parent (see sponge.perf.profiler)")
    ap.add_argument("--verbose", "-v", action="store_true", help="one line per step")
    ap.add_argument("--dump", help="write every step (with its window rates) as JSON to this file")
    args = ap.parse_args(argv)
    if args.hold_ms < TAIL_MS + 2 * PERIOD_MS:
        ap.error(f"--hold-ms must be at least {TAIL_MS + 2 * PERIOD_MS:.0f}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    res = asyncio.run(run(args))
    report(res, args.verbose)
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump(res, f)
    figures = {"actuator": res["actuator"], "batch": res["batch"], "hold_ms": res["hold_ms"], "pairs": res["pairs"],
               "cfs_period_ms": res["cfs_period_ms"], "guaranteed": res["guaranteed"],
               "sample_interval_ms": res["sample_interval_ms"], **res["summary"],
               "target_p99_ms": TARGET_P99_MS}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
