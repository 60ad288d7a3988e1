"""`sponge load`: open-loop replay of a scenario against a running server (arrivals never wait for
responses), real photos, each request carrying its own SLO and network delay; every request's
outcome is recorded against its own budget and written in the shared run format."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import orjson
from tqdm import tqdm

from sponge.report.results import RequestRecord, TimelineRecord, write_run
from sponge.workload.httpclient import Pool
from sponge.workload.requests import PlannedRequest
from sponge.workload.scenario import Scenario, add_scenario_args, scenario_from_args, warn_notes

CAT_LABELS = ("tabby", "tiger cat", "Egyptian cat")
PHOTOS = {"chelsea": CAT_LABELS, "coffee": ("espresso", "cup")}


def _photos() -> list[tuple[np.ndarray, tuple[str, ...]]]:
    from sponge.client import load_image, sample_image

    return [(load_image(sample_image(name)), labels) for name, labels in PHOTOS.items()]


def _request(img: np.ndarray, p: PlannedRequest) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps({
        "id": str(p.id),
        "inputs": [{"name": "image", "shape": [1, *img.shape], "datatype": "UINT8",
                    "parameters": {"binary_data_size": img.nbytes}}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
        "parameters": {"slo_ms": p.slo_ms, "network_ms": max(0.0, p.network_ms)},
    })
    return header + img.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


class LoadRun:
    """Replays a plan; `records` ends with exactly one RequestRecord per planned request."""

    def __init__(self, url: str, model: str, plan: list[PlannedRequest], max_in_flight: int, timeout_s: float,
                 progress: bool = True) -> None:
        u = urlparse(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.path = f"/v2/models/{model}/infer"
        self.plan = plan
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.records: list[RequestRecord | None] = [None] * len(plan)
        self.wrong_labels = 0
        self.progress = progress

    def _record(self, p: PlannedRequest, outcome: str, server_ms: float = math.nan, batch: int = 0,
                cpu_m: int = 0) -> None:
        e2e = p.network_ms + server_ms if not math.isnan(server_ms) else math.nan
        self.records[p.id] = RequestRecord(p.id, p.send_ms, p.slo_ms, p.network_ms, p.budget_ms, server_ms, e2e,
                                           outcome, batch, cpu_m)  # type: ignore[arg-type]

    async def _one(self, pool: Pool, p: PlannedRequest, img: np.ndarray, labels: tuple[str, ...]) -> None:
        body, headers = _request(img, p)
        t0 = time.perf_counter()
        try:
            status, data = await asyncio.wait_for(pool.post(self.path, body, headers), self.timeout_s)
        except Exception:  # timeout, connection error, garbage: a failed request, never a lost one
            self._record(p, "error")
            return
        server_ms = (time.perf_counter() - t0) * 1000.0
        if status == 200:
            doc = orjson.loads(data)
            params = doc.get("parameters", {})
            top = doc["outputs"][0]["data"][0]
            if not any(top.endswith(":" + lbl) for lbl in labels):
                self.wrong_labels += 1
                self._record(p, "error", server_ms)
                return
            outcome = "ok" if server_ms <= p.budget_ms else "late"
            self._record(p, outcome, server_ms, int(params.get("batch_size", 0)), int(params.get("cpu_m", 0)))
        elif status == 504:
            self._record(p, "expired", server_ms)
        elif status == 503:
            self._record(p, "rejected", server_ms)
        else:
            self._record(p, "error", server_ms)

    async def run(self) -> None:
        photos = _photos()
        pool = Pool(self.host, self.port, self.max_in_flight)
        bar = tqdm(total=len(self.plan), unit="req", desc="load", disable=not self.progress, mininterval=1.0)
        tasks: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        try:
            for p in self.plan:
                delay = start + p.send_ms / 1000.0 - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(tasks) >= self.max_in_flight:  # bounded: the client, not the server, is saturated
                    self._record(p, "error")
                    bar.update()
                    continue
                img, labels = photos[p.id % len(photos)]
                t = asyncio.create_task(self._one(pool, p, img, labels))
                tasks.add(t)
                t.add_done_callback(lambda t: (tasks.discard(t), bar.update()))
            await asyncio.gather(*tasks)
        finally:
            bar.close()
            pool.close()


def fetch_timeline(url: str, token: str | None, since_server_ms: float) -> list[TimelineRecord]:
    """The server's decision log as a timeline (experiment time = server time - run start).

    Each row's `total_cpu_m` is what the server applied over the interval ending at that tick (all
    replicas, time-weighted), so `core_seconds` of the timeline is the integral of the applied CPU; a
    server too old to report it is billed with its decision at the tick instead. `front_door_cpu_m` is
    the CPU the server process itself used over the interval (NaN from a server that does not report it)."""
    if token is None:
        return []
    r = httpx.get(f"{url}/admin/decisions", params={"since_ms": since_server_ms},
                  headers={"Authorization": f"Bearer {token}"}, timeout=10)
    r.raise_for_status()
    return [TimelineRecord(e["t_ms"] - since_server_ms, e["arrival_rate_rps"], e["cpu_m"], e["replicas"],
                           e.get("total_cpu_m", e["cpu_m"] * e["replicas"]), e["batch"], e["queue_len"],
                           e["feasible"], front_door_cpu_m=_nan_if_none(e.get("front_door_cpu_m")))
            for e in r.json()["decisions"]]


def _nan_if_none(v: float | None) -> float:
    return math.nan if v is None else float(v)


def server_now_ms(url: str, token: str | None) -> float | None:
    if token is None:
        return None
    r = httpx.get(f"{url}/admin/decisions", params={"since_ms": 1e18}, headers={"Authorization": f"Bearer {token}"},
                  timeout=10)
    r.raise_for_status()
    return float(r.json()["now_ms"])


def run_load(scenario: Scenario, url: str, model: str, out: str | Path, token: str | None,
             max_in_flight: int = 512, timeout_s: float = 30.0, progress: bool = True,
             label: str | None = None) -> dict[str, Any]:
    """Replay `scenario` against `url`; write the run to `out`; return its summary figures."""
    from sponge.report.summary import summarize

    plan = scenario.plan()
    t_server0 = server_now_ms(url, token)
    run = LoadRun(url, model, plan, max_in_flight, timeout_s, progress)
    wall0 = time.time()
    asyncio.run(run.run())
    timeline = fetch_timeline(url, token, t_server0) if t_server0 is not None else []
    records = [r for r in run.records if r is not None]
    assert len(records) == len(plan), "every planned request ends exactly once"
    meta = {"kind": "live", "label": label, "url": url, "model": model, "scenario": scenario.describe(),
            "requests": len(plan), "wrong_labels": run.wrong_labels, "started_unix": wall0,
            "trace": scenario.rate_trace().description}
    write_run(out, records, timeline, meta)
    return summarize(records, timeline).as_dict()


def _load(args: argparse.Namespace) -> int:
    try:
        scenario = scenario_from_args(args)
        warn_notes(scenario, "sponge load")  # reads the trace and network files: a malformed one fails here
        scenario.network_model()
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"sponge load: {e}", file=sys.stderr)
        return 2
    figures = run_load(scenario, args.url, args.model, args.out, args.admin_token, args.max_in_flight,
                       args.timeout_s)
    from sponge.report.results import read_run
    from sponge.report.summary import format_table, summarize

    reqs, tl, _ = read_run(args.out)
    print(format_table({Path(args.out).name: summarize(reqs, tl)}))
    print(f"run written to {args.out}")
    print(json.dumps({"run": str(args.out), **figures}, default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("load", help="replay a trace open-loop against a running server and record outcomes")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--admin-token", default=None, help="to fetch the server's allocation timeline")
    p.add_argument("--out", default="runs/load", help="run directory (requests.csv, timeline.csv, run.json)")
    p.add_argument("--max-in-flight", type=int, default=512)
    p.add_argument("--timeout-s", type=float, default=30.0)
    add_scenario_args(p)
    p.set_defaults(func=_load)

