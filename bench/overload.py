"""Overload (issue 9): the server's capacity, then 3x capacity open-loop with the Ghent 4G budget mix.

One real server process (`sponge serve --policy static --cpu-m <all cores but one>`, the default model, batch 8)
on loopback:
1. capacity: closed loop (32 clients, budgets of 60 s so nothing is refused) after a warm-up: served req/s;
   the replica gets all cores but one (`--cpu-m`): the front door and this load generator share the machine
   and need the rest at 3x (given every core under its high CPU weight, the replica leaves the front door
   too little to keep up with 3x its capacity: at 2000 m on 2 cores, 20 s, 80 % of capacity on time but the
   replica idle 30 % of the time waiting for the front door, and 503s p99 227 ms as the client saw them);
2. overload: `--factor` (3) x capacity, Poisson arrivals, for `--seconds` (60), each request with the
   budget `sponge load` gives it (SLO 1 s minus its Ghent 4G upload delay: sponge.workload.scenario);
   `--synthetic-budgets` draws the network delay uniformly in 0-600 ms instead (no shared data needed);
3. memory: RSS of the front door and of the replica before the overload, at its peak, and after the load
   stops (settled for `--settle-s`).

Reported: on-time answers per second vs capacity (target >= 80 %), refusals' latency p99 (target <= 10 ms;
server side from `sponge_admission_refusal_latency_seconds`, a bucket bound, and as the client saw it),
status counts, memory (target: back within 10 % of the pre-load level). `--baseline` repeats the overload
with `--no-admission` (requests queue until they expire: the behaviour issue 9 measured).

Usage: python bench/overload.py [--seconds 60] [--factor 3] [--synthetic-budgets] [--baseline]
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orjson

from sponge.report.jsonline import json_line
from sponge.server.process import ServerProcess
from sponge.workload.httpclient import Pool, closed_loop
from sponge.workload.loadgen import _photos, _request
from sponge.workload.requests import PlannedRequest
from sponge.workload.scenario import Scenario

MODEL = "efficientnet-lite0"
PATH = f"/v2/models/{MODEL}/infer"


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return math.nan


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    """Peak RSS of some processes, sampled every 200 ms while running."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = {k: 0.0 for k in pids}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.2):
            for k, pid in self.pids.items():
                v = rss_mb(pid)
                if not math.isnan(v):
                    self.peak[k] = max(self.peak[k], v)

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.join(2)
        return self.peak


def photo_request(slo_ms: float) -> tuple[bytes, dict[str, str]]:
    img = _photos()[0][0]
    header = orjson.dumps({"inputs": [{"name": "image", "shape": [1, *img.shape], "datatype": "UINT8",
                                       "parameters": {"binary_data_size": img.nbytes}}],
                           "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
                           "parameters": {"slo_ms": slo_ms}})
    return header + img.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def warm_up(port: int, concurrency: int, seconds: float = 3.0) -> None:
    """Full batches for a while: the runtime's buffers and the latency estimate are in place before anything
    is measured (the same for every contender)."""
    body, headers = photo_request(60_000)
    asyncio.run(closed_loop("127.0.0.1", port, PATH, body, headers, concurrency, seconds, 100_000))


def measure_capacity(port: int, seconds: float, concurrency: int) -> float:
    body, headers = photo_request(60_000)
    lat, errors = asyncio.run(closed_loop("127.0.0.1", port, PATH, body, headers, concurrency, seconds, 1_000_000))
    if errors:
        print(f"  (capacity run: {errors} non-200 answers)")
    return len(lat) / seconds


def overload_plan(rate: float, seconds: int, seed: int, synthetic: bool) -> tuple[list[PlannedRequest], str]:
    """Poisson arrivals at `rate` for `seconds`, budgets as `sponge load` gives them (Ghent 4G upload of a
    200 KiB image, SLO 1 s), or with a uniform 0-600 ms network delay (`synthetic`)."""
    if not synthetic:
        sc = Scenario(trace=f"constant:{rate:.3f}", duration_s=seconds, seed=seed)
        return sc.plan(), f"Ghent 4G budget mix ({sc.summary()})"
    sc = Scenario(trace=f"constant:{rate:.3f}", duration_s=seconds, seed=seed, network="none")
    rng = np.random.default_rng(seed)
    plan = []
    for p in sc.plan():
        net = float(rng.uniform(0.0, 600.0))
        plan.append(dataclasses.replace(p, network_ms=net, budget_ms=p.slo_ms - net))
    return plan, "synthetic budget mix (SLO 1 s minus a uniform 0-600 ms network delay)"


@dataclasses.dataclass
class Outcome:
    status: int  # 0: no answer (timeout, connection error)
    client_ms: float  # from sending to the whole answer, as the client saw it
    budget_ms: float
    server_ms: float = math.nan  # 200 only: the server's own account (arrival stamp to answer)
    queue_ms: float = math.nan
    infer_ms: float = math.nan

    @property
    def on_time(self) -> bool:
        return self.status == 200 and self.client_ms <= self.budget_ms


async def open_loop(port: int, plan: list[PlannedRequest], timeout_s: float, max_in_flight: int) -> list[Outcome]:
    """Send every planned request at its time (never waiting for answers) and record each outcome."""
    img = _photos()[0][0]
    pool = Pool("127.0.0.1", port, max_in_flight)
    out: list[Outcome] = [Outcome(0, math.nan, p.budget_ms) for p in plan]

    async def one(i: int, p: PlannedRequest) -> None:
        body, headers = _request(img, p)
        t0 = time.perf_counter()
        try:
            status, data = await asyncio.wait_for(pool.post(PATH, body, headers), timeout_s)
        except Exception:
            return
        o = out[i] = Outcome(status, (time.perf_counter() - t0) * 1000.0, p.budget_ms)
        if status == 200:
            params = orjson.loads(data)["parameters"]
            o.server_ms, o.queue_ms, o.infer_ms = params["server_ms"], params["queue_ms"], params["infer_ms"]

    tasks = []
    start = time.perf_counter()
    try:
        for i, p in enumerate(plan):
            delay = start + p.send_ms / 1000.0 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, p)))
        await asyncio.gather(*tasks)
    finally:
        pool.close()
    return out


def scrape(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/metrics", timeout=30).text


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(v for n, lab, v in samples(text) if n == name and all(lab.get(k) == x for k, x in labels.items()))


def hist_p99_upper_ms(text: str, name: str) -> tuple[float, int]:
    """Upper bound (ms) of the histogram bucket holding the p99, and the count."""
    buckets = sorted((float(lab["le"]), v) for n, lab, v in samples(text) if n == f"{name}_bucket")
    total = buckets[-1][1] if buckets else 0.0
    for le, cum in buckets:
        if total and cum >= 0.99 * total:
            return le * 1000.0, int(total)
    return math.nan, int(total)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else math.nan


def run_overload(capacity: float | None, args: argparse.Namespace, admission: bool) -> dict:
    label = "admission" if admission else "no admission (baseline)"
    print(f"\n== {label} ==", flush=True)
    flags = ["--policy", "static", "--cpu-m", str(args.cpu_m), "--batch", str(args.batch)]
    if not admission:
        flags.append("--no-admission")
    elif args.headroom is not None:
        flags += ["--admission-headroom", str(args.headroom)]
    srv = ServerProcess(*flags)
    try:
        replica_pid = srv.admin("GET", "/admin/replicas").json()["replicas"][0]["pid"]
        pids = {"front_door": srv.pid, "replica": replica_pid}
        start_rss = {k: rss_mb(p) for k, p in pids.items()}
        warm_up(srv.port, args.concurrency)
        if capacity is None:
            print(f"measuring capacity: closed loop, {args.concurrency} clients, {args.capacity_s:g} s ...",
                  flush=True)
            capacity = measure_capacity(srv.port, args.capacity_s, args.concurrency)
            print(f"capacity {capacity:.1f} req/s", flush=True)
        time.sleep(2.0)
        before = {k: rss_mb(p) for k, p in pids.items()}
        rate = args.factor * capacity
        plan, mix = overload_plan(rate, args.seconds, args.seed, args.synthetic_budgets)
        budgets = [p.budget_ms for p in plan]
        print(f"overload: {len(plan)} requests at {rate:.1f} req/s for {args.seconds} s; {mix}; budgets "
              f"p1/p50/p99 {pct(budgets, 1):.0f}/{pct(budgets, 50):.0f}/{pct(budgets, 99):.0f} ms", flush=True)
        m0 = scrape(srv.url)
        sampler = RssSampler(pids)
        sampler.start()
        cpu0 = {k: cpu_s(p) for k, p in pids.items()}
        client0, load0 = time.process_time(), os.getloadavg()[0]
        t0 = time.monotonic()
        recs = asyncio.run(open_loop(srv.port, plan, 30.0, 4096))
        load_s = time.monotonic() - t0
        cores_used = {k: round((cpu_s(p) - cpu0[k]) / load_s, 2) for k, p in pids.items()}
        cores_used["load_client"] = round((time.process_time() - client0) / load_s, 2)
        loadavg = (round(load0, 2), round(os.getloadavg()[0], 2))
        time.sleep(args.settle_s)
        peak = sampler.stop()
        after = {k: rss_mb(p) for k, p in pids.items()}
        m1 = scrape(srv.url)
        replica_pid_end = srv.admin("GET", "/admin/replicas").json()["replicas"][0]["pid"]
    finally:
        srv.stop()
    log_text = srv.log_path.read_text(errors="replace")
    ok = [r for r in recs if r.on_time]
    late = [r for r in recs if r.status == 200 and not r.on_time]
    fast_refusals = [r.client_ms for r in recs if r.status == 503]
    p99_server_ms, n_refusals = hist_p99_upper_ms(m1, "sponge_admission_refusal_latency_seconds")

    def delta(name: str, **labels: str) -> int:
        return int(metric(m1, name, **labels) - metric(m0, name, **labels))

    server = {f"refused_{why}": delta("sponge_admission_refusals_total", reason=why)
              for why in ("overloaded", "displaces", "queue_full", "hopeless")}
    server["expired_in_queue"] = delta("sponge_queue_expired_total")
    for outcome in ("ok", "late"):  # the server's own verdict: within the budget from its arrival stamp
        server[f"answered_{outcome}"] = delta("sponge_requests_total", outcome=outcome)
    batches = delta("sponge_batch_inference_seconds_count")
    busy_s = metric(m1, "sponge_batch_inference_seconds_sum") - metric(m0, "sponge_batch_inference_seconds_sum")
    server["batches"] = batches
    server["mean_batch_images"] = round((metric(m1, "sponge_batch_size_sum") - metric(m0, "sponge_batch_size_sum"))
                                        / max(1, batches), 2)
    server["mean_infer_ms"] = round(1000.0 * busy_s / max(1, batches), 1)
    server["replica_busy_fraction"] = round(busy_s / args.seconds, 3)
    on_time_rps = len(ok) / args.seconds
    mem = {k: {"start_mb": round(start_rss[k], 1), "before_mb": round(before[k], 1), "peak_mb": round(peak[k], 1),
               "after_mb": round(after[k], 1), "after_vs_before": round(after[k] / before[k] - 1.0, 4)}
           for k in pids}
    return {
        "label": label, "admission": admission, "capacity_rps": round(capacity, 2), "offered_rps": round(rate, 2),
        "requests": len(plan), "load_s": round(load_s, 1), "on_time_rps": round(on_time_rps, 2),
        "on_time_vs_capacity": round(on_time_rps / capacity, 4),
        "status": {"200_on_time": len(ok), "200_late": len(late),
                   "503": sum(r.status == 503 for r in recs), "504": sum(r.status == 504 for r in recs),
                   "error": sum(r.status not in (200, 503, 504) for r in recs)},
        "server": server,
        "refusal_p99_ms_server_bucket": p99_server_ms, "refusals_server_count": n_refusals,
        "refusal_p99_ms_client": round(pct(fast_refusals, 99), 3),
        "refusal_p50_ms_client": round(pct(fast_refusals, 50), 3),
        "expired_504_p50_ms_client": round(pct([r.client_ms for r in recs if r.status == 504], 50), 1),
        "late_200_p50_ms_client": round(pct([r.client_ms for r in late], 50), 1),
        # where a late answer's time went (p50s): the server's own account, its queue and inference time
        "late_200_p50_ms_server_queue_infer": [round(pct([getattr(r, k) for r in late], 50), 1)
                                               for k in ("server_ms", "queue_ms", "infer_ms")],
        "late_200_over_budget_p50_ms": round(pct([r.client_ms - r.budget_ms for r in late], 50), 1),
        "ok_200_p50_ms_client_server": [round(pct([getattr(r, k) for r in ok], 50), 1)
                                        for k in ("client_ms", "server_ms")],
        "cores_used": cores_used, "loadavg_1m_before_after": loadavg,
        "memory": mem, "replica_restarted": replica_pid_end != replica_pid, "mix": mix, "cpu_m": args.cpu_m,
        "watchdog_kills": log_text.count("did not answer within"), "server_log": str(srv.log_path),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="length of the overload (default: %(default)s)")
    ap.add_argument("--factor", type=float, default=3.0, help="offered load / capacity (default: %(default)s)")
    ap.add_argument("--capacity-s", type=float, default=10.0, help="closed-loop capacity run (default: %(default)s)")
    ap.add_argument("--capacity-rps", type=float, default=None, help="skip the capacity run: use this")
    ap.add_argument("--concurrency", type=int, default=32, help="capacity run clients (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=8, help="server batch size (default: %(default)s)")
    ap.add_argument("--cpu-m", type=int, default=None, help="the replica's CPU (default: all cores but one)")
    ap.add_argument("--settle-s", type=float, default=10.0, help="wait after the load before the memory reading")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--headroom", type=float, default=None, help="--admission-headroom (default: the server's)")
    ap.add_argument("--synthetic-budgets", action="store_true",
                    help="uniform 0-600 ms network delay instead of the Ghent 4G trace (no shared data needed)")
    ap.add_argument("--baseline", action="store_true", help="also run the overload with --no-admission")
    args = ap.parse_args()
    if args.cpu_m is None:
        args.cpu_m = max(1000, 1000 * (len(os.sched_getaffinity(0)) - 1))
    if not args.synthetic_budgets:
        try:
            Scenario().network_model()
        except FileNotFoundError as exc:
            print(f"skipped: the Ghent 4G trace is not available ({exc}); run with --synthetic-budgets for a "
                  f"synthetic budget mix")
            print(json_line({"bench": "overload", "skipped": str(exc)}))
            return 0
    rows = [run_overload(args.capacity_rps, args, admission=True)]
    if args.baseline:
        rows.append(run_overload(rows[0]["capacity_rps"], args, admission=False))

    print(f"\n{'':26}" + "".join(f"{r['label']:>26}" for r in rows))

    def line(name: str, f) -> None:
        print(f"{name:26}" + "".join(f"{f(r):>26}" for r in rows))

    line("capacity (req/s)", lambda r: f"{r['capacity_rps']:.1f}")
    line("offered (req/s)", lambda r: f"{r['offered_rps']:.1f}")
    line("on time (req/s)", lambda r: f"{r['on_time_rps']:.1f} ({r['on_time_vs_capacity']:.0%} of cap.)")
    for k in ("200_on_time", "200_late", "503", "504", "error"):
        line(f"  {k}", lambda r, k=k: f"{r['status'][k]}")
    for k in ("refused_overloaded", "refused_displaces", "refused_queue_full", "refused_hopeless", "expired_in_queue",
              "answered_ok", "answered_late", "batches", "mean_batch_images", "mean_infer_ms", "replica_busy_fraction"):
        line(f"  server: {k}", lambda r, k=k: f"{r['server'][k]}")
    line("503 p50/p99 client (ms)", lambda r: f"{r['refusal_p50_ms_client']:.1f}/{r['refusal_p99_ms_client']:.1f}")
    line("refusal p99 server (ms)", lambda r: f"<= {r['refusal_p99_ms_server_bucket']:g} (n={r['refusals_server_count']})")
    line("504 p50 client (ms)", lambda r: f"{r['expired_504_p50_ms_client']:.0f}")
    line("late 200 p50 client (ms)", lambda r: f"{r['late_200_p50_ms_client']:.0f}")
    line("  server/queue/infer p50", lambda r: "/".join(f"{x:.0f}" for x in r["late_200_p50_ms_server_queue_infer"]))
    line("  over budget p50 (ms)", lambda r: f"{r['late_200_over_budget_p50_ms']:.0f}")
    line("on-time 200 p50 client/server", lambda r: "/".join(f"{x:.0f}" for x in r["ok_200_p50_ms_client_server"]))
    line("cores: front/replica/client", lambda r: "{front_door:.2f}/{replica:.2f}/{load_client:.2f}".format(
        **r["cores_used"]))
    line("loadavg 1 min before/after", lambda r: "{:.1f}/{:.1f}".format(*r["loadavg_1m_before_after"]))
    line("watchdog kills", lambda r: f"{r['watchdog_kills']}")
    for proc in ("front_door", "replica"):
        line(f"RSS {proc} (MB)", lambda r, p=proc: "{start_mb:.0f}/{before_mb:.0f}/{peak_mb:.0f}/{after_mb:.0f}".format(
            **r["memory"][p]))
        line(f"  after vs before", lambda r, p=proc: f"{r['memory'][p]['after_vs_before']:+.1%}")
    print("RSS: start / before the overload / peak / after it stopped (settled "
          f"{args.settle_s:g} s)")
    print("targets: on time >= 80 % of capacity; refusals p99 <= 10 ms server-side; memory after within 10 % of before")
    print(json_line({"bench": "overload", "cores": len(os.sched_getaffinity(0)), "seconds": args.seconds,
                     "factor": args.factor, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
