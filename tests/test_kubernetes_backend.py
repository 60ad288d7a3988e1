"""The front door serving through remote workers: `sponge serve --backend kubernetes` and `--backend remote`.

Kubernetes: `tests/fake_apiserver.py` plays the API server and the kubelet; its `pod_runner` hook starts a
real `sponge worker` (the trivial model) per pod of the worker Deployment, each on its own loopback
address (127.77.X.N: all of 127/8 is loopback on Linux) and one shared port, and `pod_stopper` sends it
SIGTERM when the pod starts terminating, as the kubelet does. The front door discovers the pods through
the real Kubernetes client, serves through them, resizes them in place (`pods/resize`) and scales the
Deployment; the controller's path is driven through its applier (`LiveApplier.apply`, what each tick
calls on a new decision) so the test does not wait for a policy to want something.

Remote: two workers on loopback, one SIGKILLed (its PID) while requests flow: the other serves on.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx
import numpy as np
import pytest

kubernetes = pytest.importorskip("kubernetes", reason="the 'kubernetes' client is not installed (pip install -e '.[test]')")

from fake_apiserver import FakeCluster  # noqa: E402
from helpers import wait_listening  # noqa: E402

from sponge.config import ConfigError, ServerConfig  # noqa: E402
from sponge.models.trivial import trivial_model_path, trivial_weights  # noqa: E402
from sponge.policy.baselines import StaticPolicy  # noqa: E402
from sponge.policy.types import Decision  # noqa: E402
from sponge.server.process import ServerProcess  # noqa: E402
from sponge.server.serve import build_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NS = "sponge"
SELECTOR = "app=sponge-worker"
DEPLOYMENT = "sponge-worker"
WAIT_S = 60.0  # bounds a hang (worker start on a busy host); never a timing assertion


class Workers:
    """Real `sponge worker` processes, one per pod, each on 127.77.B.N:port (B random per test run)."""

    def __init__(self) -> None:
        self.model = trivial_model_path()
        self.port = random.randint(20000, 40000)
        self.base = random.randint(1, 250)
        self._n = itertools.count(2)
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.ips: dict[str, str] = {}
        self._lock = threading.Lock()

    def start(self, name: str, ip: str | None = None) -> str:
        """Start the worker of pod `name` (on `ip`, else the next address); its IP once it listens."""
        ip = ip or f"127.77.{self.base}.{next(self._n)}"
        p = subprocess.Popen([sys.executable, "-m", "sponge.cli", "worker", "--model", str(self.model), "--host", ip,
                              "--port", str(self.port), "--max-threads", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
        with self._lock:
            self.procs[name], self.ips[name] = p, ip
        wait_listening(p)
        return ip

    def stop(self, name: str) -> None:
        """The kubelet's SIGTERM: the worker drains (not ready, batches in flight answered) and exits."""
        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)

    def kill(self, name: str) -> None:
        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)

    def close(self) -> None:
        for p in list(self.procs.values()):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def container(cpu: str = "500m") -> dict[str, Any]:
    return {"name": "worker", "image": "sponge:dev", "command": ["sponge", "worker", "--port", "9000"],
            "resources": {"requests": {"cpu": cpu, "memory": "256Mi"}, "limits": {"cpu": cpu, "memory": "256Mi"}},
            "resizePolicy": [{"resourceName": "cpu", "restartPolicy": "NotRequired"}]}


def body(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            "parameters": {"slo_ms": 10_000}}


def expected(x: np.ndarray) -> np.ndarray:
    w, b = trivial_weights()
    return x @ w + b


def check_answer(r: httpx.Response, x: np.ndarray) -> None:
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(out["shape"]), expected(x), rtol=1e-4,
                               atol=1e-4)


async def until(pred: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    end = time.monotonic() + timeout_s
    while True:
        v = pred()
        if isinstance(v, Awaitable):
            v = await v
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def sample(app: Any, name: str, **labels: str) -> float:
    v = app.state.core.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if v is None else v


# ---- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    ({"backend": "kubernetes"}, "namespace"),
    ({"backend": "kubernetes", "namespace": NS}, "selector"),
    ({"backend": "remote"}, "workers"),
    ({"backend": "remote", "workers": "a:0"}, "workers"),
    ({"workers": "a:9000"}, "workers"),
    ({"namespace": NS}, "namespace"),
    ({"backend": "remote", "workers": "a:9000", "max_replicas": 3}, "max_replicas"),
    ({"backend": "remote", "workers": "a:9000,b:9000", "replicas": 3}, "replicas"),
    ({"backend": "kubernetes", "namespace": NS, "selector": SELECTOR, "replicas": 3, "max_replicas": 2},
     "max_replicas"),
])
def test_backend_config_errors_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=f"{field}[ :]"):
        ServerConfig.load(None, overrides)


def test_backend_flags_and_defaults() -> None:
    from sponge.cli import build_parser

    args = build_parser().parse_args(["serve", "--backend", "kubernetes", "--namespace", NS, "--selector", SELECTOR,
                                      "--kube-context", "kind", "--worker-deployment", "w", "--worker-port", "9100",
                                      "--max-replicas", "4"])
    cfg = ServerConfig.load(None, {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")})
    assert (cfg.backend, cfg.namespace, cfg.selector, cfg.kube_context) == ("kubernetes", NS, SELECTOR, "kind")
    assert (cfg.worker_deployment, cfg.worker_port, cfg.replica_limit, cfg.policy) == ("w", 9100, 4, "joint")
    cfg = ServerConfig.load(None, {"backend": "remote", "workers": "10.0.0.1,10.0.0.2:9001"})
    assert cfg.worker_addresses() == [("10.0.0.1", 9000), ("10.0.0.2", 9001)]
    assert cfg.policy == "static"  # their CPU is their hosts': nothing for a CPU policy to move
    assert ServerConfig.load(None, {}).backend == "local"


def test_the_front_door_manifest_command_is_a_valid_sponge_serve() -> None:
    """deploy/kubernetes/frontdoor.yaml's command parses and validates as `sponge serve` flags."""
    yaml = pytest.importorskip("yaml")
    from sponge.cli import build_parser

    docs = list(yaml.safe_load_all((REPO / "deploy/kubernetes/frontdoor.yaml").read_text()))
    dep = next(d for d in docs if d and d.get("kind") == "Deployment")
    cmd = [a.replace("$(POD_NAMESPACE)", NS) for a in dep["spec"]["template"]["spec"]["containers"][0]["command"]]
    assert cmd[:2] == ["sponge", "serve"]
    args = build_parser().parse_args(cmd[1:])
    cfg = ServerConfig.load(None, {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")})
    assert (cfg.backend, cfg.namespace, cfg.selector, cfg.worker_deployment, cfg.worker_port) == (
        "kubernetes", NS, SELECTOR, DEPLOYMENT, 9000)


def test_remote_workers_cpu_follows_the_limit_they_report() -> None:
    """--backend remote: a worker's reported CPU limit is its allocation in the bookkeeping and the bill."""
    from sponge.scheduling.batcher import ExpiryPolicy
    from sponge.server.core import ServingCore
    from sponge.server.metrics import Metrics
    from sponge.server.scaler import NullActuator, ReplicaScaler
    from sponge.server.serve import follow_worker_limits

    class Rep:
        pid = None
        threads = None
        inputs: list = []

        def __init__(self, name: str, limit: int | None) -> None:
            self.name, self.worker_status = name, {"limit_m": limit}
            self.on_start: Any = None

        def set_threads(self, n: int) -> None:
            self.threads = n

    reps = [Rep("a:9000", 1500), Rep("b:9000", None)]
    core = ServingCore("m", reps, 4, 64, ExpiryPolicy.REJECT, 0.0, Metrics(), 4000)  # type: ignore[arg-type]
    scaler = ReplicaScaler(core, {r.name: NullActuator(4000) for r in reps}, 100, 4000)
    follow_worker_limits(core, scaler, reps)
    for r in reps:
        r.on_start(r)  # what RemoteReplica.start calls once connected
    assert core.cpu_m == {"a:9000": 1500, "b:9000": 4000}  # b reports no limit: the bookkeeping stays
    assert scaler.actuators["a:9000"].current() == 1500 and reps[0].threads == 2
    assert core.metrics.registry.get_sample_value("sponge_replica_cpu_millicores", {"replica": "a:9000"}) == 1500


# ---- the pod actuator: never blocking, latest wish wins, in force as read --------------------------------


def test_pod_actuator_never_blocks_and_the_latest_wish_wins(tmp_path: Path) -> None:
    from sponge.scaling.kubernetes import from_config
    from sponge.server.k8s_pool import PodActuator

    with FakeCluster(NS, kubelet_delay_s=0.02, actuate_delay_s=0.02) as fc:
        fc.add_pod("w0", [container("500m")], {"app": "sponge-worker"})
        kc = tmp_path / "kubeconfig"
        kc.write_text(json.dumps(fc.kubeconfig("fake")))
        backend = from_config(NS, SELECTOR, context="fake", config_file=str(kc))
        seen: list[int] = []
        act = PodActuator(backend.actuator("w0"), on_change=seen.append)
        try:
            assert act.current() == 500 and act.wish() == 500
            with fc._lock:  # the API server cannot answer now: apply must not wait for it
                t0 = time.monotonic()
                for cpu in (600, 700, 800):
                    act.apply(cpu)
                assert time.monotonic() - t0 < 0.5
                assert act.current() == 500 and act.wish() == 800  # asked, not in force
            deadline = time.monotonic() + 10
            while act.current() != 800:  # what the watcher does with each pod event it sees
                assert time.monotonic() < deadline, "800 m never came into force"
                time.sleep(0.02)
                with fc._lock:
                    pod = copy.deepcopy(fc.get_pod("w0"))
                act.observe(pod)
            assert 1 <= act.patches <= 2  # 600 perhaps (taken at once), then only the latest: 800
            assert seen[-1] == 800 and 700 not in seen
            assert sum(1 for m, path, _ in fc.requests if m == "PATCH" and path.endswith("/pods/w0/resize")) \
                == act.patches
        finally:
            act.close()
            backend.close()


def test_pod_actuator_ignores_a_read_older_than_one_seen() -> None:
    """The GET after a PATCH may answer with a pod older than a watch event already seen: not taken back."""
    from sponge.scaling.kubernetes import resize_status
    from sponge.server.k8s_pool import PodActuator

    def make_pod(rv: int, cpu: str) -> dict[str, Any]:
        res = {"requests": {"cpu": cpu}, "limits": {"cpu": cpu}}
        return {"metadata": {"name": "w0", "resourceVersion": str(rv), "generation": 1},
                "spec": {"containers": [{"name": "worker", "resources": res}]},
                "status": {"containerStatuses": [{"name": "worker", "resources": res}]}}

    class Inner:
        pod = "w0"
        last = resize_status(make_pod(1, "500m"), "worker")

        def _observe(self, p: dict[str, Any]) -> Any:
            return resize_status(p, "worker")

    seen: list[int] = []
    act = PodActuator(Inner(), on_change=seen.append)
    act.observe(make_pod(10, "1"))
    act.observe(make_pod(7, "500m"))  # older: ignored
    assert act.current() == 1000 and seen == [1000]
    act.observe(make_pod(11, "1500m"))
    assert act.current() == 1500 and seen == [1000, 1500]


# ---- kubernetes, in process ---------------------------------------------------------------------------


@pytest.fixture
def workers():
    w = Workers()
    yield w
    w.close()


@pytest.fixture
def cluster(workers: Workers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeCluster(NS, allocatable_cpu_m=4000, kubelet_delay_s=0.05, actuate_delay_s=0.05, cold_start_s=0.05,
                     terminate_s=0.5) as fc:
        fc.pod_runner = workers.start
        fc.pod_stopper = workers.stop
        kc = tmp_path / "kubeconfig"
        kc.write_text(json.dumps(fc.kubeconfig("fake")))
        monkeypatch.setenv("KUBECONFIG", str(kc))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield fc


async def no_worker_yet_over_grpc(app: Any) -> None:
    """gRPC's model metadata and inference say UNAVAILABLE (not INTERNAL) while no worker is known."""
    grpc = pytest.importorskip("grpc")
    from sponge.protocol import grpc_v2 as pb

    service = app.state.grpc
    port = await service.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb.Stub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.ModelMetadata(pb.ModelMetadataRequest(name="trivial"))
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "not available yet" in exc.value.details()
            req = pb.ModelInferRequest(model_name="trivial")
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.ModelInfer(req)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "not available yet" in exc.value.details()
    finally:
        await service.stop(0.5)


def k8s_config(workers: Workers, **kw: Any) -> ServerConfig:
    base = dict(backend="kubernetes", namespace=NS, selector=SELECTOR, kube_context="fake", worker_port=workers.port,
                model_name="trivial", cpu_m=500, min_cpu_m=100, max_cpu_m=3000, max_replicas=2, policy="static",
                interval_ms=3_600_000.0, batch=4)  # no controller tick during the test: its applier is driven
    base.update(kw)
    return ServerConfig.load(None, base)


def resize_patches(fc: FakeCluster, pod: str) -> int:
    return sum(1 for m, p, _ in list(fc.requests) if m == "PATCH" and p == f"/api/v1/namespaces/{NS}/pods/{pod}/resize")


def scale_patches(fc: FakeCluster) -> int:
    return sum(1 for m, p, _ in list(fc.requests)
               if m == "PATCH" and p == f"/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOYMENT}/scale")


@pytest.mark.slow
def test_kubernetes_backend_discovers_serves_resizes_scales_and_drops(cluster: FakeCluster, workers: Workers) -> None:
    app = build_app(k8s_config(workers))
    rng = np.random.default_rng(7)

    async def main() -> None:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://sponge", timeout=WAIT_S) as client:
            core, pool, ctl = app.state.core, app.state.pool, app.state.controller
            x = rng.standard_normal((2, 16)).astype(np.float32)
            # no worker yet: live, not ready, metadata and inference a clear 503 (no crash)
            assert (await client.get("/v2/health/live")).status_code == 200
            assert (await client.get("/v2/health/ready")).status_code == 503
            r = await client.get("/v2/models/trivial")
            assert r.status_code == 503 and "no replica (worker) is ready" in r.json()["error"]
            r = await client.post("/v2/models/trivial/infer", json=body(x))
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert core.replicas == []
            await no_worker_yet_over_grpc(app)

            # the Deployment appears: its pod is discovered, connected, serves
            cluster.add_deployment(DEPLOYMENT, 1, [container("500m")], {"app": "sponge-worker"})
            await until(lambda: core.can_serve(), "the first worker pod to serve")
            first = core.replicas[0].name
            assert first.startswith(f"{DEPLOYMENT}-") and core.replicas[0].host == workers.ips[first]
            assert (await client.get("/v2/health/ready")).status_code == 200
            meta = (await client.get("/v2/models/trivial")).json()
            assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
            check_answer(await client.post("/v2/models/trivial/infer", json=body(x)), x)
            assert core.cpu_m[first] == 500 and pool.ordered() == 1 and pool.starting() == 0

            # a controller resize is a pods/resize PATCH; the core follows once the kubelet has put it in force
            ctl.policy = StaticPolicy(cpu_m=1000, batch=4, replicas=1)  # a tick of the controller itself
            entry = ctl.tick()
            assert (entry.cpu_m, entry.replicas) == (1000, 1)
            await until(lambda: core.cpu_m[first] == 1000, "1000 m in force")
            assert resize_patches(cluster, first) == 1
            assert cluster.pods[first]["status"]["containerStatuses"][0]["resources"]["limits"]["cpu"] == "1"
            assert sample(app, "sponge_k8s_resizes_total", outcome="applied") == 1

            # an infeasible one: asked, refused by the kubelet, counted; the allocation in force stays
            cluster.allocatable_cpu_m = 2500
            ctl.applier.apply(Decision(3000, 4, 1))
            await until(lambda: sample(app, "sponge_k8s_resizes_total", outcome="infeasible") == 1, "infeasible")
            await asyncio.sleep(0.3)
            assert core.cpu_m[first] == 1000
            check_answer(await client.post("/v2/models/trivial/infer", json=body(x)), x)
            text = (await client.get("/metrics")).text
            assert 'sponge_k8s_resizes_total{outcome="infeasible"} 1.0' in text
            assert f'sponge_k8s_pod_cpu_millicores{{pod="{first}",source="actual"}} 1000.0' in text

            # scale-out: the Deployment is patched, its new pod discovered, resized to the decision, serving
            patches, scales = resize_patches(cluster, first), scale_patches(cluster)
            ctl.applier.apply(Decision(1000, 4, 2))  # also takes the pending 3000 m wish back to 1000
            await until(lambda: scale_patches(cluster) == scales + 1, "the scale PATCH")
            assert pool.ordered() == 2 and cluster.deployments[DEPLOYMENT]["spec"]["replicas"] == 2
            await until(lambda: resize_patches(cluster, first) == patches + 1, "the 3000 m wish taken back")
            await until(lambda: len(core.serving()) == 2, "the second pod serving")
            second = next(r.name for r in core.replicas if r.name != first)
            await until(lambda: core.cpu_m[second] == 1000, "the new pod resized to the decision's 1000 m")
            assert pool.starting() == 0
            xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(16)]
            rs = await asyncio.gather(*(client.post("/v2/models/trivial/infer", json=body(v)) for v in xs))
            for r, v in zip(rs, xs):
                check_answer(r, v)

            # a pod deleted while requests flow: dropped (drained), no request lost or answered twice
            xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(60)]
            sem = asyncio.Semaphore(4)

            async def one(v: np.ndarray) -> httpx.Response:
                async with sem:
                    return await client.post("/v2/models/trivial/infer", json=body(v))

            tasks = [asyncio.ensure_future(one(v)) for v in xs]
            await until(lambda: sum(t.done() for t in tasks) >= 10, "some answers before the deletion")
            cluster.delete_pod(second)
            rs = await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
            assert len(rs) == len(xs)
            for r, v in zip(rs, xs):
                check_answer(r, v)  # each request answered once, with its own result
            await until(lambda: second not in [r.name for r in core.replicas], "the deleted pod's replica dropped")
            assert second not in app.state.scaler.actuators
            # its ReplicaSet replaced it: the new pod is discovered and serves
            await until(lambda: len(core.serving()) == 2, "the replacement pod serving")
            assert pool.ordered() == 2 and scale_patches(cluster) == scales + 1
            check_answer(await client.post("/v2/models/trivial/infer", json=body(x)), x)

    asyncio.run(asyncio.wait_for(main(), 300))


@pytest.mark.slow
def test_kubernetes_backend_keeps_the_last_replica_when_its_pod_goes(cluster: FakeCluster, workers: Workers) -> None:
    """The only worker pod is deleted: its replica is not removed while it is the last one that serves,
    requests then fail cleanly (or wait for a new one) rather than hang; a new pod takes over."""
    app = build_app(k8s_config(workers, max_replicas=1))

    async def main() -> None:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://sponge", timeout=WAIT_S) as client:
            core = app.state.core
            cluster.add_deployment(DEPLOYMENT, 1, [container("500m")], {"app": "sponge-worker"})
            await until(lambda: core.can_serve(), "the first worker pod to serve")
            first = core.replicas[0].name
            x = np.ones((1, 16), np.float32)
            check_answer(await client.post("/v2/models/trivial/infer", json=body(x)), x)
            cluster.delete_pod(first)  # the deployment controller replaces it
            await until(lambda: any(r.name != first for r in core.serving()), "the replacement pod serving")
            await until(lambda: [r.name for r in core.replicas] != [first] and first not in
                        [r.name for r in core.replicas], "the old replica dropped")
            check_answer(await client.post("/v2/models/trivial/infer", json=body(x)), x)

    asyncio.run(asyncio.wait_for(main(), 180))


@pytest.mark.slow
def test_kubernetes_backend_follows_a_pod_readiness_flap(cluster: FakeCluster, workers: Workers) -> None:
    """A pod that turns unready (its readiness probe fails) is drained out of service while another serves;
    Ready again, it serves again (a fresh replica, or its drain taken back)."""
    app = build_app(k8s_config(workers, replicas=2, max_replicas=2))

    async def main() -> None:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://sponge", timeout=WAIT_S) as client:
            core = app.state.core
            cluster.add_deployment(DEPLOYMENT, 2, [container("500m")], {"app": "sponge-worker"})
            await until(lambda: len(core.serving()) == 2, "two worker pods serving")
            flap = sorted(r.name for r in core.replicas)[0]
            cluster.set_ready(flap, False)
            await until(lambda: flap not in [r.name for r in core.serving()], "the unready pod out of service")
            assert app.state.pool.starting() == 1  # ordered, not Ready: starting for the controller
            x = np.ones((2, 16), np.float32)
            for _ in range(3):
                check_answer(await client.post("/v2/models/trivial/infer", json=body(x)), x)
            cluster.set_ready(flap, True)
            await until(lambda: flap in [r.name for r in core.serving()], "the pod back in service")
            assert app.state.pool.starting() == 0
            check_answer(await client.post("/v2/models/trivial/infer", json=body(x)), x)

    asyncio.run(asyncio.wait_for(main(), 180))


@pytest.mark.slow
def test_sponge_serve_backend_kubernetes_subprocess(cluster: FakeCluster, workers: Workers, tmp_path: Path) -> None:
    """The real command: `sponge serve --backend kubernetes` with KUBECONFIG pointing at the fake."""
    cluster.add_deployment(DEPLOYMENT, 1, [container("500m")], {"app": "sponge-worker"})
    with ServerProcess("--backend", "kubernetes", "--namespace", NS, "--selector", SELECTOR, "--kube-context", "fake",
                       "--worker-port", str(workers.port), "--model-name", "trivial", "--cpu-m", "500",
                       "--max-cpu-m", "2000", env={"KUBECONFIG": os.environ["KUBECONFIG"]}) as srv:
        x = np.arange(32, dtype=np.float32).reshape(2, 16) / 32
        check_answer(httpx.post(f"{srv.url}/v2/models/trivial/infer", json=body(x), timeout=30), x)
        reps = srv.admin("GET", "/admin/replicas").json()["replicas"]
        assert len(reps) == 1 and reps[0]["pid"] is None and reps[0]["name"].startswith(DEPLOYMENT)
        r = srv.admin("PUT", f"/admin/replicas/{reps[0]['name']}/cpu", json={"cpu_m": 1000})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + WAIT_S
        while srv.admin("GET", "/admin/replicas").json()["replicas"][0]["cpu_m"] != 1000:
            assert time.monotonic() < deadline, "the resize never came into force"
            time.sleep(0.1)
        text = httpx.get(f"{srv.url}/metrics").text
        assert 'sponge_k8s_resizes_total{outcome="applied"} 1.0' in text
        assert 'sponge_k8s_pod_relists_total' in text


# ---- remote -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sponge_serve_backend_remote_survives_a_killed_worker(workers: Workers) -> None:
    """Two workers on loopback, a third address nobody listens on (the server starts anyway); one worker
    SIGKILLed mid-run: the other keeps serving, no request hangs or fails (the batch in flight on the killed
    one is queued again), each is answered once with its own result."""
    ips = [workers.start("a"), workers.start("b")]
    down = f"127.77.{workers.base}.250:{workers.port}"
    spec = ",".join(f"{ip}:{workers.port}" for ip in ips) + "," + down
    with ServerProcess("--backend", "remote", "--workers", spec, "--model-name", "trivial", "--batch", "2") as srv:
        reps = {r["name"]: r for r in srv.admin("GET", "/admin/replicas").json()["replicas"]}
        assert len(reps) == 3 and not reps[down]["ready"] and all(reps[f"{ip}:{workers.port}"]["ready"] for ip in ips)
        rng = np.random.default_rng(3)
        xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(80)]

        async def run() -> list[httpx.Response]:
            sem = asyncio.Semaphore(4)
            async with httpx.AsyncClient(timeout=WAIT_S) as client:
                async def one(v: np.ndarray) -> httpx.Response:
                    async with sem:
                        return await client.post(f"{srv.url}/v2/models/trivial/infer", json=body(v))

                tasks = [asyncio.ensure_future(one(v)) for v in xs]
                await until(lambda: sum(t.done() for t in tasks) >= 20, "some answers before the kill")
                workers.kill("a")
                return await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)

        rs = asyncio.run(run())
        assert len(rs) == len(xs)
        for r, v in zip(rs, xs):  # a batch in flight on the killed worker was queued again for the other one
            check_answer(r, v)
        x = np.ones((3, 16), np.float32)
        for _ in range(5):
            check_answer(httpx.post(f"{srv.url}/v2/models/trivial/infer", json=body(x), timeout=30), x)
        assert httpx.get(f"{srv.url}/v2/health/ready").status_code == 200
        # the worker that was down at start comes up: reconnected in the background, it serves too
        workers.start("c", down.rsplit(":", 1)[0])
        deadline = time.monotonic() + WAIT_S
        while not {r["name"]: r for r in srv.admin("GET", "/admin/replicas").json()["replicas"]}[down]["ready"]:
            assert time.monotonic() < deadline, "the late worker was never reconnected"
            time.sleep(0.2)
        for _ in range(5):
            check_answer(httpx.post(f"{srv.url}/v2/models/trivial/infer", json=body(x), timeout=30), x)
