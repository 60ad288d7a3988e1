"""The Kubernetes edges (sponge/scaling/kubernetes.py) through the official client, against a fake API server.

`tests/fake_apiserver.py` is a real HTTP server on loopback that answers as a Kubernetes 1.33 API server
and plays the kubelet: the actuator, the deployment scaler and the pod watcher are exercised through
the client's real requests. The fake's rules themselves are checked with the real `kubectl` (1.32+, the
first with `--subresource resize`); those tests skip when kubectl is not on PATH.

Against a real cluster (opt in): set `SPONGE_K8S_CONTEXT` to a kubeconfig context of a cluster at
Kubernetes >= 1.33 (e.g. `kind-kind`, `minikube`), optionally `SPONGE_K8S_NAMESPACE` (default `default`).
`test_real_cluster_resize` then creates a small Guaranteed pod there (image `registry.k8s.io/pause:3.10`),
resizes its CPU in place through the actuator, checks the kubelet applied it, and deletes the pod.
Without the variable it is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

kubernetes = pytest.importorskip("kubernetes", reason="the 'kubernetes' client is not installed (pip install -e '.[test]')")

from fake_apiserver import FakeCluster, qos_class  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from sponge.scaling.base import ActuatorError  # noqa: E402
from sponge.scaling.kubernetes import (  # noqa: E402
    KubernetesActuator,
    from_config,
    resize_status,
)

NS = "sponge"
SELECTOR = "app=sponge-worker"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (1.32+) is not on PATH: the fake's rules are "
                                   "checked through the real client only")


def container(cpu: str = "1", mem: str = "512Mi", cpu_request: str | None = None) -> dict[str, Any]:
    return {"name": "worker", "image": "sponge:dev", "command": ["sponge", "worker", "--port", "9000"],
            "ports": [{"containerPort": 9000, "name": "http"}],
            "resources": {"requests": {"cpu": cpu_request or cpu, "memory": mem}, "limits": {"cpu": cpu, "memory": mem}},
            "resizePolicy": [{"resourceName": "cpu", "restartPolicy": "NotRequired"},
                             {"resourceName": "memory", "restartPolicy": "RestartContainer"}]}


def eventually(pred: Callable[[], Any], timeout_s: float = 10.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def sample(metrics: Any, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if v is None else v


@pytest.fixture
def cluster():
    with FakeCluster(NS, allocatable_cpu_m=4000, kubelet_delay_s=0.03, actuate_delay_s=0.03, cold_start_s=0.2) as fc:
        fc.add_pod("w0", [container()], {"app": "sponge-worker"})
        yield fc


@pytest.fixture
def kubeconfig(cluster: FakeCluster, tmp_path: Path) -> Path:
    p = tmp_path / "kubeconfig"
    p.write_text(json.dumps(cluster.kubeconfig("fake")))  # JSON is YAML: kubectl and the client read it
    return p


@pytest.fixture
def backend(kubeconfig: Path):
    b = from_config(NS, SELECTOR, context="fake", config_file=str(kubeconfig))
    yield b
    b.close()


# -- the actuator --------------------------------------------------------------------------------


def test_apply_resizes_in_place_keeping_guaranteed(cluster, backend):
    act = backend.actuator("w0")
    assert act.current() == 1000
    act.apply(1500)
    st = act.wait(5)
    assert st.state == "applied" and act.current() == 1500
    pod = cluster.pods["w0"]
    res = pod["spec"]["containers"][0]["resources"]
    assert res["requests"]["cpu"] == res["limits"]["cpu"] == "1500m"  # requests = limits: the QoS class holds
    assert pod["status"]["qosClass"] == "Guaranteed" and qos_class(pod["spec"]) == "Guaranteed"
    cs = pod["status"]["containerStatuses"][0]
    assert cs["allocatedResources"]["cpu"] == "1500m" and cs["resources"]["limits"]["cpu"] == "1500m"
    assert not [c for c in pod["status"]["conditions"] if c["type"].startswith("PodResize")]
    # the subresource, with a strategic merge patch
    assert ("PATCH", f"/api/v1/namespaces/{NS}/pods/w0/resize", "application/strategic-merge-patch+json") in cluster.requests
    m = backend.metrics
    assert sample(m, "sponge_k8s_resizes_total", outcome="requested") == 1
    assert sample(m, "sponge_k8s_resizes_total", outcome="applied") == 1
    assert sample(m, "sponge_k8s_pod_cpu_millicores", pod="w0", source="actual") == 1500


def test_current_is_what_is_in_force_while_the_kubelet_works(cluster, backend):
    cluster.actuate_delay_s = 0.6
    act = backend.actuator("w0")
    act.apply(2000)
    assert act.current() == 1000  # accepted by the API, not yet admitted by the kubelet
    st = eventually(lambda: (s := act.refresh()).state == "in_progress" and s, what="PodResizeInProgress")
    assert st.allocated_m == 2000 and st.actual_m == 1000
    assert act.current() == 1000  # admitted, not yet in force: plan with the quota that is
    assert act.wait(5).state == "applied" and act.current() == 2000
    assert sample(backend.metrics, "sponge_k8s_resizes_total", outcome="in_progress") == 1


def test_infeasible_resize_is_detected_counted_and_the_old_allocation_kept(cluster, backend, caplog):
    act = backend.actuator("w0")
    act.apply(8000)  # above the node's allocatable 4000 m
    st = act.wait(5)
    assert st.state == "infeasible" and "capacity: 4000" in st.message
    assert act.current() == 1000
    assert sample(backend.metrics, "sponge_k8s_resizes_total", outcome="infeasible") == 1
    assert any("infeasible" in r.getMessage() for r in caplog.records)
    act.apply(1200)  # a feasible one afterwards lands, and clears the condition
    assert act.wait(5).state == "applied" and act.current() == 1200


def test_deferred_resize_lands_when_the_node_frees_cpu(cluster, backend):
    cluster.add_pod("other", [container(cpu="2500m")], {"app": "other"})
    act = backend.actuator("w0")
    act.apply(2000)  # 2000 + 2500 > 4000: fits the node, not what the other pod leaves
    st = eventually(lambda: (s := act.refresh()).state == "deferred" and s, what="Deferred")
    assert "used: 2500" in st.message and act.current() == 1000
    cluster.delete_pod("other")
    assert act.wait(5).state == "applied" and act.current() == 2000
    m = backend.metrics
    assert sample(m, "sponge_k8s_resizes_total", outcome="deferred") == 1
    assert sample(m, "sponge_k8s_resizes_total", outcome="applied") == 1


def test_deferred_switch_of_the_fake(cluster, backend):
    cluster.set_defer_resizes(True)
    act = backend.actuator("w0")
    act.apply(500)
    eventually(lambda: act.refresh().state == "deferred", what="Deferred")
    assert act.current() == 1000
    cluster.set_defer_resizes(False)
    assert act.wait(5).state == "applied" and act.current() == 500


def test_refused_and_unreachable_are_actuator_errors_and_counted(cluster, backend):
    act = backend.actuator("w0")
    cluster.delete_pod("w0")
    eventually(lambda: "w0" not in cluster.pods, what="pod gone")
    with pytest.raises(ActuatorError, match='pods "w0" not found'):
        act.apply(1500)
    assert sample(backend.metrics, "sponge_k8s_resizes_total", outcome="rejected") == 1
    cluster.stop()
    act.timeout = 1.0
    with pytest.raises(ActuatorError):
        act.apply(1500)
    assert sample(backend.metrics, "sponge_k8s_resizes_total", outcome="error") == 1
    with pytest.raises(ValueError):
        act.apply(0)


def test_actuator_refuses_a_container_whose_cpu_request_is_below_its_limit(cluster, backend):
    cluster.add_pod("burst", [container(cpu="2", cpu_request="500m")], {"app": "sponge-worker"})
    with pytest.raises(ActuatorError, match="requests = limits"):
        backend.actuator("burst")
    with pytest.raises(ActuatorError, match="no container 'nope'"):
        backend.actuator("w0", container="nope")


def test_the_api_refuses_a_qos_change_and_a_resize_through_a_plain_patch(cluster, backend):
    core = backend.core
    body = {"spec": {"containers": [{"name": "worker", "resources": {"requests": {"cpu": "500m"}}}]}}
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_pod_resize("w0", NS, body, _content_type="application/strategic-merge-patch+json")
    status = json.loads(e.value.body)
    assert e.value.status == 422 and status["kind"] == "Status" and status["reason"] == "Invalid"
    assert status["message"] == ('Pod "w0" is invalid: spec: Invalid value: "Burstable": '
                                 "Pod QOS Class may not change as a result of resizing")
    assert status["details"]["causes"][0]["field"] == "spec"
    body = {"spec": {"containers": [{"name": "worker", "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "2"}}}]}}
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_pod("w0", NS, body, _content_type="application/strategic-merge-patch+json")
    status = json.loads(e.value.body)
    assert e.value.status == 422 and status["reason"] == "Invalid"
    assert status["message"].startswith('Pod "w0" is invalid: spec: Forbidden: pod updates may not change fields other than')
    # a merge patch that would change a field besides resources through the subresource
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_pod_resize("w0", NS, {"spec": {"containers": [{"name": "worker", "image": "x"}]}},
                                         _content_type="application/merge-patch+json")
    assert e.value.status == 422
    assert cluster.pods["w0"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "1"  # nothing changed


def test_resize_status_reads_the_pods_json():
    pod = {"metadata": {"name": "p"},
           "spec": {"containers": [{"name": "worker", "resources": {"limits": {"cpu": "2"}, "requests": {"cpu": "2"}}}]},
           "status": {"containerStatuses": [{"name": "worker", "allocatedResources": {"cpu": "1500m"},
                                              "resources": {"limits": {"cpu": "1500m"}}}],
                      "conditions": [{"type": "PodResizePending", "status": "True", "reason": "Deferred",
                                      "message": "Node didn't have enough resource"}]}}
    st = resize_status(pod, "worker")
    assert (st.desired_m, st.allocated_m, st.actual_m, st.state, st.in_force_m) == (2000, 1500, 1500, "deferred", 1500)
    pod["status"]["conditions"] = []
    assert resize_status(pod, "worker").state == "pending"
    pod["status"]["containerStatuses"][0]["resources"]["limits"]["cpu"] = "2"
    assert resize_status(pod, "worker").state == "applied"
    with pytest.raises(ActuatorError):
        resize_status(pod, "other")


# -- the deployment scaler -----------------------------------------------------------------------


def test_deployment_scaler_scales_and_counts_ready_after_cold_start(cluster, backend):
    cluster.add_deployment("sponge-worker", 1, [container()], {"app": "sponge-worker"})
    sc = backend.scaler("sponge-worker")
    eventually(lambda: sc.replicas().ready == 1, what="first pod ready")
    assert sc.set_replicas(3) == 3
    r = sc.replicas()
    assert r.desired == 3 and r.ready == 1  # the new pods are cold-starting
    eventually(lambda: sc.replicas().ready == 3, what="3 ready")
    assert sc.set_replicas(1) == 1
    eventually(lambda: len([p for p in cluster.pods if p.startswith("sponge-worker-")]) == 1, what="scale-down")
    assert sc.replicas().ready == 1
    assert ("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/sponge-worker/scale",
            "application/merge-patch+json") in cluster.requests
    assert sample(backend.metrics, "sponge_k8s_scale_requests_total", outcome="ok") == 2
    with pytest.raises(ActuatorError, match="not found"):
        backend.scaler("nope").set_replicas(2)
    with pytest.raises(ValueError):
        sc.set_replicas(-1)


# -- the pod watcher -----------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def callbacks(self) -> dict[str, Callable[[Any], None]]:
        return {f"on_{k}": (lambda p, k=k: self.events.append((k, p.name))) for k in ("added", "ready", "unready",
                                                                                       "deleted")}

    def of(self, name: str) -> list[str]:
        return [k for k, n in self.events if n == name]


def test_pod_watcher_follows_pods_by_selector(cluster, backend):
    rec = Recorder()
    cluster.add_pod("not-mine", [container()], {"app": "other"})
    w = backend.watcher(**rec.callbacks()).start()
    try:
        assert w.wait_synced(5)
        assert rec.of("w0") == ["added", "ready"] and rec.of("not-mine") == []
        cluster.add_deployment("sponge-worker", 2, [container()], {"app": "sponge-worker"})
        eventually(lambda: len(w.ready_pods()) == 3, what="3 ready workers")
        for n in ("sponge-worker-0", "sponge-worker-1"):
            assert rec.of(n) == ["added", "ready"]
            assert w.pods()[n].ip and w.pods()[n].ip.startswith("127.")
        cluster.delete_pod("w0")
        eventually(lambda: rec.of("w0") == ["added", "ready", "unready", "deleted"], what="w0 deleted")
        assert "w0" not in w.pods()
        assert sample(backend.metrics, "sponge_k8s_pod_relists_total") == 1  # one list, then only watching
    finally:
        w.stop()
    assert w._thread is not None and not w._thread.is_alive()  # stop() ends a watch blocked on its stream


def test_pod_watcher_relists_after_410_gone_without_missing_a_change(cluster, backend):
    rec = Recorder()
    w = backend.watcher(**rec.callbacks()).start()
    try:
        assert w.wait_synced(5)
        with cluster._lock:  # compaction and a change at once: the watch cannot resume from its version
            cluster.expire_watches()
            cluster.add_pod("w1", [container()], {"app": "sponge-worker"})
            cluster.delete_pod("w0")
        eventually(lambda: rec.of("w0")[-1:] == ["deleted"] and rec.of("w1") == ["added", "ready"], what="relist")
        assert sample(backend.metrics, "sponge_k8s_pod_relists_total") >= 2
        cluster.add_pod("w2", [container()], {"app": "sponge-worker"})  # and it watches again afterwards
        eventually(lambda: rec.of("w2") == ["added", "ready"], what="w2 after the relist")
    finally:
        w.stop()


def test_pod_watcher_resumes_after_a_watch_timeout_without_relisting(cluster, kubeconfig):
    b = from_config(NS, SELECTOR, context="fake", config_file=str(kubeconfig))
    rec = Recorder()
    w = b.watcher(watch_timeout_s=1, **rec.callbacks()).start()
    try:
        assert w.wait_synced(5)
        time.sleep(1.3)  # the first watch request has ended
        cluster.add_pod("w1", [container()], {"app": "sponge-worker"})
        eventually(lambda: rec.of("w1") == ["added", "ready"], what="w1")
        assert sample(b.metrics, "sponge_k8s_pod_relists_total") == 1
    finally:
        w.stop()
        b.close()


def test_pod_watcher_survives_a_server_outage(cluster, kubeconfig):
    """The API server goes away: the watcher logs, backs off and relists; it never dies."""
    b = from_config(NS, SELECTOR, context="fake", config_file=str(kubeconfig))
    w = b.watcher(backoff_s=0.1, request_timeout_s=1.0).start()
    try:
        assert w.wait_synced(5)
        cluster.stop()
        time.sleep(0.5)
        assert w._thread is not None and w._thread.is_alive()
    finally:
        w.stop()
        b.close()
    assert not w._thread.is_alive()


def test_from_config_checks_its_arguments(kubeconfig):
    with pytest.raises(ValueError, match="selector"):
        from_config(NS, "", context="fake", config_file=str(kubeconfig))
    with pytest.raises(ActuatorError, match="kubeconfig"):
        from_config(NS, SELECTOR, context="no-such-context", config_file=str(kubeconfig))


def test_metrics_land_in_the_callers_registry(cluster, kubeconfig):
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    b = from_config(NS, SELECTOR, context="fake", config_file=str(kubeconfig), registry=reg)
    b.actuator("w0").apply(1100)
    text = generate_latest(reg).decode()
    assert 'sponge_k8s_resizes_total{outcome="requested"} 1.0' in text
    b.close()


# -- the fake's rules, through kubectl ---------------------------------------------------------------


def kubectl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert KUBECTL is not None
    return subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True,
                          timeout=60)


def pod_json(kubeconfig: Path, name: str) -> dict[str, Any]:
    r = kubectl(kubeconfig, "get", "pod", name, "-o", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@needs_kubectl
def test_kubectl_resize_subresource_and_the_outcome_in_get(cluster, kubeconfig):
    patch = json.dumps({"spec": {"containers": [{"name": "worker", "resources": {"requests": {"cpu": "1500m"},
                                                                                  "limits": {"cpu": "1500m"}}}]}})
    r = kubectl(kubeconfig, "patch", "pod", "w0", "--subresource", "resize", "-p", patch)
    assert r.returncode == 0, r.stderr
    assert "pod/w0 patched" in r.stdout

    def settled() -> dict[str, Any] | None:
        pod = pod_json(kubeconfig, "w0")
        cs = pod["status"]["containerStatuses"][0]
        done = cs["resources"]["limits"]["cpu"] == "1500m" and not any(
            c["type"].startswith("PodResize") for c in pod["status"]["conditions"])
        return pod if done else None

    pod = eventually(settled, what="kubectl get pods to show the resize applied")
    assert pod["status"]["containerStatuses"][0]["allocatedResources"]["cpu"] == "1500m"
    assert pod["status"]["qosClass"] == "Guaranteed"
    # an infeasible one shows as PodResizePending/Infeasible in the pod kubectl reads back
    patch = json.dumps({"spec": {"containers": [{"name": "worker", "resources": {"requests": {"cpu": "16"},
                                                                                  "limits": {"cpu": "16"}}}]}})
    assert kubectl(kubeconfig, "patch", "pod", "w0", "--subresource", "resize", "-p", patch).returncode == 0

    def pending() -> dict[str, Any] | None:
        conds = {c["type"]: c for c in pod_json(kubeconfig, "w0")["status"]["conditions"]}
        return conds.get("PodResizePending")

    cond = eventually(pending, what="PodResizePending")
    assert cond["reason"] == "Infeasible" and cond["status"] == "True"
    r = kubectl(kubeconfig, "get", "pods", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["items"][0]["metadata"]["name"] == "w0"


@needs_kubectl
def test_kubectl_plain_patch_of_cpu_is_refused_like_the_real_server(cluster, kubeconfig):
    patch = json.dumps({"spec": {"containers": [{"name": "worker", "resources": {"requests": {"cpu": "2"},
                                                                                  "limits": {"cpu": "2"}}}]}})
    r = kubectl(kubeconfig, "patch", "pod", "w0", "-p", patch)
    assert r.returncode != 0
    assert r.stderr.startswith('The Pod "w0" is invalid: spec: Forbidden: pod updates may not change fields '
                               "other than `spec.containers[*].image`"), r.stderr
    r = kubectl(kubeconfig, "patch", "pod", "w0", "--subresource", "resize", "-p",
                json.dumps({"spec": {"containers": [{"name": "worker", "resources": {"limits": {"cpu": "3"}}}]}}))
    assert r.returncode != 0 and "Pod QOS Class may not change as a result of resizing" in r.stderr, r.stderr
    r = kubectl(kubeconfig, "patch", "pod", "w0", "--subresource", "resize", "--type=json", "-p",
                '[{"op":"replace","path":"/spec/containers/0/resources/requests/cpu","value":"1500m"}]')
    assert r.returncode != 0 and r.stderr.startswith(
        'The Pod "w0" is invalid: spec.containers[0].resources.requests: Invalid value: "1500m": must be less than '
        "or equal to cpu limit of 1"), r.stderr
    r = kubectl(kubeconfig, "patch", "pod", "w0", "--subresource", "resize", "--type=json", "-p",
                '[{"op":"replace","path":"/spec/containers/0/resources/requests/cpu","value":"800m"},'
                '{"op":"replace","path":"/spec/containers/0/resources/limits/cpu","value":"800m"}]')
    assert r.returncode == 0, r.stderr
    # a plain metadata patch is fine
    assert kubectl(kubeconfig, "patch", "pod", "w0", "-p", '{"metadata":{"labels":{"x":"y"}}}').returncode == 0
    assert pod_json(kubeconfig, "w0")["metadata"]["labels"]["x"] == "y"


@needs_kubectl
def test_kubectl_scale_deployment(cluster, kubeconfig):
    cluster.add_deployment("sponge-worker", 1, [container()], {"app": "sponge-worker"})
    r = kubectl(kubeconfig, "scale", "deployment", "sponge-worker", "--replicas=3")
    assert r.returncode == 0 and "deployment.apps/sponge-worker scaled" in r.stdout, r.stderr

    def ready() -> bool:
        items = json.loads(kubectl(kubeconfig, "get", "pods", "-l", "app=sponge-worker", "-o", "json").stdout)["items"]
        owned = [p for p in items if p["metadata"]["name"].startswith("sponge-worker-")]
        return len(owned) == 3 and all(any(c["type"] == "Ready" and c["status"] == "True"
                                           for c in p["status"]["conditions"]) for p in owned)

    eventually(ready, what="3 ready pods through kubectl")
    table = kubectl(kubeconfig, "get", "pods", "-l", "app=sponge-worker").stdout.splitlines()  # the server's Table
    assert table[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert sum(1 for line in table[1:] if line.split()[1:3] == ["1/1", "Running"]) == 4  # w0 and the three
    r = kubectl(kubeconfig, "get", "deployment", "sponge-worker", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"]["readyReplicas"] == 3


# -- a real cluster (opt in) ------------------------------------------------------------------------

REAL_CONTEXT = os.environ.get("SPONGE_K8S_CONTEXT")


@pytest.mark.skipif(not REAL_CONTEXT, reason="set SPONGE_K8S_CONTEXT to a kubeconfig context of a Kubernetes >= 1.33 "
                    "cluster to run this against it (see the module docstring)")
def test_real_cluster_resize():
    ns = os.environ.get("SPONGE_K8S_NAMESPACE", "default")
    name = f"sponge-resize-test-{uuid.uuid4().hex[:6]}"
    b = from_config(ns, f"sponge-test={name}", context=REAL_CONTEXT)
    core = b.core
    pause = {"name": "worker", "image": "registry.k8s.io/pause:3.10",
             "resources": {"requests": {"cpu": "100m", "memory": "32Mi"}, "limits": {"cpu": "100m", "memory": "32Mi"}},
             "resizePolicy": [{"resourceName": "cpu", "restartPolicy": "NotRequired"}]}
    core.create_namespaced_pod(ns, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {
        "sponge-test": name}}, "spec": {"containers": [pause]}})
    try:
        eventually(lambda: core.read_namespaced_pod(name, ns).status.phase == "Running", 120, "the pod to run")
        act = KubernetesActuator(core, ns, name, "worker", metrics=b.metrics)
        assert act.current() == 100
        act.apply(200)
        st = act.wait(60)
        assert st.state == "applied", st
        assert act.current() == 200
        assert core.read_namespaced_pod(name, ns).status.qos_class == "Guaranteed"
    finally:
        core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
        b.close()


def test_in_cluster_config_is_used_in_a_pod_when_no_context_is_named(monkeypatch, tmp_path):
    """In a pod: the service account's token and CA, and the API server from KUBERNETES_SERVICE_*."""
    from kubernetes.config import incluster_config

    from sponge.scaling.kubernetes import api_client

    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("sa-token")
    ca.write_text("not really a certificate")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    api = api_client()
    try:
        cfg = api.configuration
        assert cfg.host == "https://127.0.0.1:6443" and cfg.ssl_ca_cert == str(ca)
        assert cfg.api_key["BearerToken"] == "bearer sa-token"
    finally:
        api.close()
