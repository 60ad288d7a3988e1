"""The live loop end to end: a real server whose `sponge` controller resizes its replica's cgroup in
place as the load changes (no restart). The profile here is synthetic — a stated latency model
written as a profile for the real model file — so the test checks the loop, not this machine's speed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from serverproc import ServerProcess
from sponge.models.efficientnet_lite0 import default_model_path
from sponge.perf.fit import ProfilePoint, fit_latency_model
from sponge.perf.latency_model import LatencyModel
from sponge.perf.profile_store import GridCell, build_profile, save_profile

pytestmark = pytest.mark.slow

CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
# ~7 ms per image at 2 cores, ~25 ms at 500 m: close to what EfficientNet-Lite0 does here.
MODEL = LatencyModel(g=11.0, d=0.5, e=1.0, h=0.5)


def synthetic_profile(tmp_path: Path) -> Path:
    grid = [GridCell(b, c, MODEL.latency_ms(b, c) * 0.8, MODEL.latency_ms(b, c), 20)
            for b in (1, 2, 4, 8) for c in (250, 500, 1000, 2000)]
    fit = fit_latency_model([ProfilePoint(g.batch, g.cpu_m, g.p99_ms) for g in grid])
    return save_profile(build_profile(default_model_path(), grid, fit), tmp_path / "synthetic.profile.json")


def quota_m(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            q = int((CGROUP_V1 / path.lstrip("/") / "cpu.cfs_quota_us").read_text())
            p = int((CGROUP_V1 / path.lstrip("/") / "cpu.cfs_period_us").read_text())
            return None if q < 0 else q * 1000 // p
    return None


@pytest.mark.skipif(not (CGROUP_V1 / "cpu.cfs_quota_us").exists(), reason="needs the cgroup v1 cpu controller")
def test_controller_scales_the_replica_in_place_with_load(tmp_path):
    profile = synthetic_profile(tmp_path)
    # --no-auto-profile: the idle prober resizes an idle replica for a moment to measure a cell (by design,
    # tests/test_prober.py), so the real quota would differ from the controller's decision now and then —
    # more often on a busy host, where probes take longer. This test compares the two. --no-per-batch for
    # the same reason: per-batch sizing moves the quota at every batch (tests/test_per_batch_live.py).
    srv = ServerProcess("--policy", "sponge", "--profile", str(profile), "--interval-ms", "250",
                        "--min-cpu-m", "200", "--max-batch", "8", "--no-auto-profile", "--no-per-batch")
    try:
        pid = srv.admin("GET", "/admin/replicas").json()["replicas"][0]["pid"]
        # Idle: the controller brings the replica down to the minimum (after its hysteresis window).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and srv.admin("GET", "/admin/replicas").json()["replicas"][0]["cpu_m"] > 200:
            time.sleep(0.25)
        assert srv.admin("GET", "/admin/replicas").json()["replicas"][0]["cpu_m"] == 200
        assert quota_m(pid) == 200  # the real cgroup quota, not just bookkeeping

        # Load with tight budgets: ~60 req/s, 120 ms budgets -> far more than 200 m is needed.
        img = np.zeros((1, 224, 224, 3), np.uint8)
        h = orjson.dumps({"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8",
                                      "parameters": {"binary_data_size": img.nbytes}}],
                          "parameters": {"slo_ms": 200, "network_ms": 80}})
        body, headers = h + img.tobytes(), {"Inference-Header-Content-Length": str(len(h))}
        url = f"{srv.url}/v2/models/efficientnet-lite0/infer"

        async def load(seconds: float, rps: float) -> list[int]:
            async with httpx.AsyncClient(timeout=30) as c:
                tasks, t0 = [], time.monotonic()
                for i in range(int(seconds * rps)):
                    await asyncio.sleep(max(0.0, t0 + i / rps - time.monotonic()))
                    tasks.append(asyncio.create_task(c.post(url, content=body, headers=headers)))
                return [r.status_code for r in await asyncio.gather(*tasks)]

        codes = asyncio.run(load(4.0, 60))
        info = srv.admin("GET", "/admin/replicas").json()["replicas"][0]
        assert info["pid"] == pid, "the replica was resized in place, never restarted"
        assert info["cpu_m"] > 400 and quota_m(pid) == info["cpu_m"]
        # Served, or refused for its deadline while the replica grows from 200 m (admission answers 503
        # when the backlog would make it late, 504 when its own budget is too short), never failed or lost.
        assert set(codes) <= {200, 503, 504} and codes.count(200) > len(codes) // 4, codes
        log = srv.admin("GET", "/admin/decisions").json()
        assert log["policy"] == "sponge"
        assert any(d["arrival_rate_rps"] > 30 for d in log["decisions"])
        assert all(d["explanation"] for d in log["decisions"])
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'sponge_decisions_total{feasible="true",policy="sponge"}' in metrics
    finally:
        srv.stop()
