"""Serve first, learn the latency model while serving: with no profile, or a corrupt one, `sponge serve`
is ready at once at the safe allocation (log, /metrics and the decision log say so), answers requests,
and its controller switches to the sponge policy once the online model — filled by idle-gap probes and
served batches — meets its readiness criterion."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from serverproc import ServerProcess

pytestmark = pytest.mark.slow

LEARN_TIMEOUT_S = 150.0  # the bar is 3 minutes on a busy 2-core machine


def metric(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def infer(url: str) -> httpx.Response:
    img = np.zeros((1, 224, 224, 3), np.uint8)
    h = orjson.dumps({"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8",
                                  "parameters": {"binary_data_size": img.nbytes}}],
                      "parameters": {"slo_ms": 2000, "network_ms": 100}})
    return httpx.post(f"{url}/v2/models/efficientnet-lite0/infer", content=h + img.tobytes(),
                      headers={"Inference-Header-Content-Length": str(len(h))}, timeout=30)


def wait_for_model_mode(srv: ServerProcess) -> tuple[float, str]:
    t0 = time.monotonic()
    text = ""
    while time.monotonic() - t0 < LEARN_TIMEOUT_S:
        text = httpx.get(f"{srv.url}/metrics", timeout=10).text
        if metric(text, "sponge_controller_mode", '{mode="model"}') == 1.0:
            return time.monotonic() - t0, text
        time.sleep(1.0)
    pytest.fail(f"controller still in safe mode after {LEARN_TIMEOUT_S:.0f} s; metrics:\n"
                + "\n".join(line for line in text.splitlines() if "latency_model" in line or "probe" in line)
                + f"\nlog:\n{srv.log_path.read_text()[-3000:]}")


@pytest.mark.parametrize("profile_content", [None, b"{ this is not json"], ids=["no-profile", "corrupt-profile"])
def test_serves_at_once_then_runs_on_the_learned_model(tmp_path: Path, profile_content: bytes | None) -> None:
    profile = tmp_path / "model.profile.json"
    if profile_content is not None:
        profile.write_bytes(profile_content)
    t_start = time.monotonic()
    srv = ServerProcess("--policy", "sponge", "--profile", str(profile), "--interval-ms", "500",
                        "--min-cpu-m", "250", "--log-level", "info")
    try:
        ready_s = time.monotonic() - t_start
        assert ready_s < 60, f"not ready for {ready_s:.0f} s"  # no profiling before serving (was ~30-60 s)
        r = infer(srv.url)
        assert r.status_code == 200, r.text
        assert r.json()["parameters"]["deadline_met"] is True
        text = httpx.get(f"{srv.url}/metrics", timeout=10).text
        log = srv.log_path.read_text()
        assert "safe allocation" in log and ("no offline profile" in log or "not used" in log), log[-2000:]
        first: list = []
        deadline = time.monotonic() + 10
        while not first and time.monotonic() < deadline:
            time.sleep(0.2)
            first = srv.admin("GET", "/admin/decisions").json()["decisions"]
        assert first and "safe allocation" in first[0]["explanation"], first

        took_s, text = wait_for_model_mode(srv)
        assert metric(text, "sponge_latency_model_ready") == 1.0
        assert (metric(text, "sponge_latency_model_cells") or 0) >= 6
        assert (metric(text, "sponge_idle_probes", '{outcome="run"}') or 0) > 0
        safety = metric(text, "sponge_latency_model_safety_ratio")
        assert safety is not None and 0.5 <= safety <= 0.95
        assert "controller runs sponge on the learned latency model" in srv.log_path.read_text()
        # Idle: on the learned model the controller gives CPU back (it served at the full allocation).
        deadline = time.monotonic() + 20
        cpu = None
        while time.monotonic() < deadline:
            cpu = srv.admin("GET", "/admin/replicas").json()["replicas"][0]["cpu_m"]
            if cpu < 1000:
                break
            time.sleep(0.5)
        assert cpu is not None and cpu < 1000, f"still at {cpu} m"
        r = infer(srv.url)
        assert r.status_code == 200 and r.json()["parameters"]["deadline_met"] is True
        print(f"ready after {ready_s:.1f} s, model mode after {took_s:.1f} s more")
    finally:
        srv.stop()
