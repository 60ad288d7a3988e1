"""End to end: a real `sponge serve` process, real HTTP, real replica process, real models."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import numpy as np
import orjson
import pytest

from serverproc import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trivial_server():
    from sponge.models.trivial import trivial_model_path

    srv = ServerProcess("--model", str(trivial_model_path()), "--batch", "4", "--queue-capacity", "64")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def default_server():
    # 500 m: ~20 ms per image, so a queue of 16 takes long enough for ordering to show.
    srv = ServerProcess("--batch", "1", "--cpu-m", "500")
    yield srv
    srv.stop()


_BIN_HEADER = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                        "parameters": {"binary_data_size": 60}}]})


def infer_json(x: np.ndarray, **params) -> dict:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            "parameters": params}


def test_metadata_and_health(trivial_server):
    s = trivial_server
    live, ready = httpx.get(f"{s.url}/v2/health/live"), httpx.get(f"{s.url}/v2/health/ready")
    assert (live.status_code, live.json()) == (200, {"live": True})  # V2 bodies (KServe's client reads them)
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    meta = httpx.get(f"{s.url}/v2").json()
    assert "binary_tensor_data" in meta["extensions"]
    m = httpx.get(f"{s.url}/v2/models/trivial").json()
    assert m["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert httpx.get(f"{s.url}/v2/models/trivial/ready").json() == {"name": "trivial", "ready": True}
    assert httpx.get(f"{s.url}/v2/models/nope").status_code == 404
    assert httpx.get(f"{s.url}/no/such/route").json() == {"error": "no route /no/such/route"}
    spec = httpx.get(f"{s.url}/openapi.json").json()
    assert "/v2/models/{model_name}/infer" in spec["paths"]


def test_json_inference_matches_runtime_and_reports_budget(trivial_server):
    import onnxruntime as ort

    from sponge.models.trivial import trivial_model_path

    x = np.random.default_rng(1).random((2, 16), dtype=np.float32)
    expected = ort.InferenceSession(str(trivial_model_path())).run(None, {"x": x})[0]
    r = httpx.post(f"{trivial_server.url}/v2/models/trivial/infer",
                   json=infer_json(x, slo_ms=800, network_ms=300))
    assert r.status_code == 200, r.text
    doc = r.json()
    y = np.array(doc["outputs"][0]["data"], np.float32).reshape(doc["outputs"][0]["shape"])
    np.testing.assert_allclose(y, expected, rtol=1e-5)
    p = doc["parameters"]
    assert p["budget_ms"] == 500 and p["slo_ms"] == 800 and p["network_ms"] == 300
    assert p["deadline_met"] is True and p["server_ms"] <= p["budget_ms"]
    assert p["batch_size"] >= 1 and p["queue_ms"] >= 0 and p["infer_ms"] > 0


def test_binary_inference_with_stock_triton_client(trivial_server):
    import tritonclient.http as tc

    client = tc.InferenceServerClient(trivial_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_model_ready("trivial")
    x = np.ones((3, 16), np.float32)
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = tc.InferRequestedOutput("y", binary_data=True)
    res = client.infer("trivial", [inp], outputs=[out], parameters={"slo_ms": 400, "network_ms": 50})
    y = res.as_numpy("y")
    assert y.shape == (3, 16)
    assert res.get_response()["parameters"]["budget_ms"] == 350
    # Same answer over JSON.
    r = httpx.post(f"{trivial_server.url}/v2/models/trivial/infer", json=infer_json(x)).json()
    np.testing.assert_allclose(y, np.array(r["outputs"][0]["data"], np.float32).reshape(3, 16), rtol=1e-6)


@pytest.mark.parametrize("payload, headers, status, words", [
    (b"{oops", {}, 400, "not valid JSON"),
    (orjson.dumps({"inputs": [{"name": "z", "shape": [1, 16], "datatype": "FP32", "data": [0] * 16}]}), {}, 400,
     "input 'z'"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0] * 8}]}), {}, 400,
     "shape [1, 8]"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "INT32", "data": [0] * 16}]}), {}, 400,
     "datatype INT32"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0] * 16}],
                   "parameters": {"slo_ms": -1}}), {}, 400, "slo_ms"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0] * 16}],
                   "parameters": {"network_ms": 1e9}}), {}, 400, "network_ms"),
    (_BIN_HEADER + b"\0" * 60, {"Inference-Header-Content-Length": str(len(_BIN_HEADER))}, 400,
     "binary_data_size"),
    (_BIN_HEADER + b"\0" * 60, {"Inference-Header-Content-Length": "ten"}, 400, "Inference-Header-Content-Length"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0] * 16}],
                   "outputs": [{"name": "nope"}]}), {}, 400, "output 'nope'"),
])
def test_bad_requests_get_4xx_naming_the_field_and_server_keeps_serving(trivial_server, payload, headers,
                                                                         status, words):
    r = httpx.post(f"{trivial_server.url}/v2/models/trivial/infer", content=payload, headers=headers)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    ok = httpx.post(f"{trivial_server.url}/v2/models/trivial/infer", json=infer_json(np.zeros((1, 16), np.float32)))
    assert ok.status_code == 200


def test_unknown_model_and_oversize_body(trivial_server):
    r = httpx.post(f"{trivial_server.url}/v2/models/other/infer", json=infer_json(np.zeros((1, 16), np.float32)))
    assert r.status_code == 404 and "other" in r.json()["error"]
    big = b"{" + b" " * (65 * 1024 * 1024) + b"}"
    r = httpx.post(f"{trivial_server.url}/v2/models/trivial/infer", content=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_already_late_request_gets_a_deadline_error(trivial_server):
    r = httpx.post(f"{trivial_server.url}/v2/models/trivial/infer",
                   json=infer_json(np.zeros((1, 16), np.float32), slo_ms=100, network_ms=150))
    assert r.status_code == 504 and "deadline" in r.json()["error"]
    metrics = httpx.get(f"{trivial_server.url}/metrics").text
    assert 'sponge_requests_total{model="trivial",outcome="expired"}' in metrics


def test_concurrent_requests_all_answered_and_batched(trivial_server):
    async def run():
        async with httpx.AsyncClient(base_url=trivial_server.url, timeout=30) as c:
            xs = [np.full((1, 16), i, np.float32) for i in range(48)]
            rs = await asyncio.gather(*(c.post("/v2/models/trivial/infer", json=infer_json(x, slo_ms=2000))
                                        for x in xs))
            return xs, rs
    xs, rs = asyncio.run(run())
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    # Each answer belongs to its own request (routing through batches is right): y is affine in x.
    ys = [np.array(r.json()["outputs"][0]["data"]) for r in rs]
    for i in range(1, 48):
        np.testing.assert_allclose(ys[i] - ys[0], i * (ys[1] - ys[0]), rtol=1e-4, atol=1e-3)
    metrics = httpx.get(f"{trivial_server.url}/metrics").text
    assert "sponge_batch_size_bucket" in metrics


def test_full_queue_answers_503_with_retry_after():
    """Capacity 2, slow runtime (default model at batch 1): a burst overflows the queue."""
    srv = ServerProcess("--batch", "1", "--queue-capacity", "2")
    try:
        img = np.zeros((1, 224, 224, 3), np.uint8)
        body = {"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8",
                            "data": img.ravel().tolist()}], "parameters": {"slo_ms": 60000}}

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                return await asyncio.gather(*(c.post("/v2/models/efficientnet-lite0/infer", json=body)
                                              for _ in range(12)))
        rs = asyncio.run(run())
        codes = [r.status_code for r in rs]
        assert 503 in codes and 200 in codes, codes
        busy = next(r for r in rs if r.status_code == 503)
        assert int(busy.headers["retry-after"]) >= 1 and "busy" in busy.json()["error"]
        assert codes.count(200) + codes.count(503) == 12
    finally:
        srv.stop()


def image_request(img: np.ndarray, slo_ms: float, network_ms: float, k: int = 0) -> tuple[bytes, dict]:
    header = {"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8",
                          "parameters": {"binary_data_size": img.nbytes}}],
              "parameters": {"slo_ms": slo_ms, "network_ms": network_ms},
              "outputs": [{"name": "probabilities", "parameters": {"classification": max(k, 1)}}]}
    h = orjson.dumps(header)
    return h + img.tobytes(), {"Inference-Header-Content-Length": str(len(h)),
                               "Content-Type": "application/octet-stream"}


def test_default_model_classifies_real_photo_over_http(default_server):
    import skimage.data

    from sponge.models.efficientnet_lite0 import preprocess

    img = preprocess(skimage.data.chelsea())[None]
    body, headers = image_request(img, 1000, 100, k=3)
    r = httpx.post(f"{default_server.url}/v2/models/efficientnet-lite0/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    top = r.json()["outputs"][0]["data"]
    assert any(lbl in top[0] for lbl in ("tabby", "tiger cat", "Egyptian cat")), top


def test_tight_requests_overtake_loose_ones_edf(default_server):
    """Batch 1, one replica: 16 loose requests queue up; 4 tight ones sent after them are served
    ahead of most of them, and every response reports its own budget."""
    import skimage.data

    from sponge.models.efficientnet_lite0 import preprocess

    img = preprocess(skimage.data.coffee())[None]
    url = f"{default_server.url}/v2/models/efficientnet-lite0/infer"

    async def timed(c, slo, net, delay):
        await asyncio.sleep(delay)
        body, headers = image_request(img, slo, net)
        r = await c.post(url, content=body, headers=headers)
        return r, time.monotonic()

    async def run():
        async with httpx.AsyncClient(timeout=60) as c:
            loose = [timed(c, 20000, 0, 0.0) for _ in range(16)]
            tight = [timed(c, 3000, 500, 0.05) for _ in range(4)]
            return await asyncio.gather(*loose, *tight)
    res = asyncio.run(run())
    assert all(r.status_code == 200 for r, _ in res), [r.text for r, _ in res]
    loose_done = sorted(t for _, t in res[:16])
    tight_done = [t for _, t in res[16:]]
    # EDF: every tight request finishes before at least half of the loose ones that arrived earlier.
    assert all(t < loose_done[8] for t in tight_done)
    for r, _ in res[16:]:
        p = r.json()["parameters"]
        assert p["budget_ms"] == 2500 and p["deadline_met"] == (p["server_ms"] <= 2500)
    assert all(r.json()["parameters"]["budget_ms"] == 20000 for r, _ in res[:16])


def test_dead_replica_fails_in_flight_with_5xx_and_restarts():
    srv = ServerProcess("--batch", "1")
    try:
        pid = srv.admin("GET", "/admin/replicas").json()["replicas"][0]["pid"]
        import skimage.data

        from sponge.models.efficientnet_lite0 import preprocess

        img = preprocess(skimage.data.chelsea())[None]
        url = f"{srv.url}/v2/models/efficientnet-lite0/infer"

        async def run(pid: int):
            async with httpx.AsyncClient(timeout=60) as c:
                body, headers = image_request(img, 60000, 0)
                tasks = [asyncio.create_task(c.post(url, content=body, headers=headers)) for _ in range(100)]
                while not await asyncio.to_thread(lambda: srv.admin("GET", "/admin/replicas").json()["queue_length"]):
                    await asyncio.sleep(0.01)  # kill only once work is queued behind the in-flight batch
                os.kill(pid, signal.SIGKILL)
                return await asyncio.gather(*tasks)

        def restarted(old_pid: int) -> dict:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                info = srv.admin("GET", "/admin/replicas").json()["replicas"][0]
                if info["ready"] and info["pid"] != old_pid:
                    break
                time.sleep(0.2)
            return info

        # On a busy host the kill can land between two batches (the front door, at ordinary CPU weight,
        # is slow to send the next one): then nothing was in flight, every request is served by the
        # restarted replica, and the kill is repeated on it (at most three times in all).
        for _attempt in range(3):
            rs = asyncio.run(run(pid))
            codes = [r.status_code for r in rs]
            assert all(c in (200, 500) for c in codes)
            if 500 in codes:
                break
            info = restarted(pid)
            assert info["pid"] != pid, info
            pid = info["pid"]
        assert 500 in codes, codes  # the in-flight batch failed fast, not hung
        assert "died" in next(r for r in rs if r.status_code == 500).json()["error"]
        info = restarted(pid)
        assert info["pid"] != pid and info["restarts"] >= 1
        body, headers = image_request(img, 5000, 0)
        assert httpx.post(url, content=body, headers=headers, timeout=30).status_code == 200
    finally:
        srv.stop()


def test_admin_api_needs_the_token(trivial_server):
    assert httpx.get(f"{trivial_server.url}/admin/replicas").status_code == 401
    r = httpx.get(f"{trivial_server.url}/admin/replicas", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert trivial_server.admin("GET", "/admin/replicas").json()["replicas"][0]["ready"] is True
