"""deploy/kubernetes: renders with kustomize, validates offline against the Kubernetes 1.33 OpenAPI schema,
and grants the front door nothing beyond what sponge/scaling/kubernetes.py uses.

The schemas come from the `kubernetes-validate` package (it ships 1.33's, strict: unknown fields fail),
so nothing is downloaded. Rendering needs `kubectl` (its built-in kustomize); those tests skip without it,
and the files are validated one by one all the same (each names its namespace itself).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -e '.[test]')")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[test]')")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "kubernetes"
K8S_VERSION = "1.33.0"  # the first with the pods/resize subresource (in-place resize beta, on by default)
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH: `kubectl kustomize` renders "
                                   "deploy/kubernetes")

# What the front door may do: (apiGroup, resource, verb, resourceNames or None for any name).
ALLOWED = {
    ("", "pods", "get", None), ("", "pods", "list", None), ("", "pods", "watch", None),
    ("", "pods/resize", "patch", None),
    ("apps", "deployments/scale", "get", ("sponge-worker",)), ("apps", "deployments/scale", "patch", ("sponge-worker",)),
    ("apps", "deployments", "get", ("sponge-worker",)),
}


def files() -> list[Path]:
    return sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def objects_of(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def file_objects() -> list[dict[str, Any]]:
    return [o for p in files() for o in objects_of(p.read_text())]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    assert KUBECTL is not None
    r = subprocess.run([KUBECTL, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return objects_of(r.stdout)


def by_kind(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def test_kubernetes_validate_ships_the_1_33_schemas():
    assert K8S_VERSION in kv.utils.all_versions()


def test_every_file_validates_against_1_33():
    objs = file_objects()
    assert {o["kind"] for o in objs} == {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment", "Service"}
    for o in objs:
        kv.validate(o, K8S_VERSION, strict=True)
        assert o["kind"] == "Namespace" or o["metadata"]["namespace"] == "sponge"


def test_the_validator_would_catch_a_mistake():
    worker = by_kind(file_objects(), "Deployment", "sponge-worker")
    bad = copy.deepcopy(worker)
    bad["spec"]["template"]["spec"]["containers"][0]["resizePolicy"][0]["restartPolicyy"] = "NotRequired"
    with pytest.raises(kv.utils.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


@needs_kubectl
def test_kustomize_renders_and_every_rendered_object_validates(rendered):
    assert len(rendered) == len(file_objects())
    for o in rendered:
        kv.validate(o, K8S_VERSION, strict=True)
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sponge"
        assert o["kind"] == "Namespace" or o["metadata"]["namespace"] == "sponge"


def rules_granted(objs: list[dict[str, Any]]) -> set[tuple[str, str, str, tuple[str, ...] | None]]:
    role = by_kind(objs, "Role", "sponge-frontdoor")
    out = set()
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule  # no nonResourceURLs
        names = tuple(rule["resourceNames"]) if rule.get("resourceNames") else None
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    assert "*" not in (g, r, v), rule
                    out.add((g, r, v, names))
    return out


def test_the_role_grants_nothing_beyond_the_list():
    objs = file_objects()
    assert rules_granted(objs) == ALLOWED
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    rb = by_kind(objs, "RoleBinding", "sponge-frontdoor")
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sponge-frontdoor"}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "sponge-frontdoor", "namespace": "sponge"}]
    fd = by_kind(objs, "Deployment", "sponge-frontdoor")["spec"]["template"]["spec"]
    assert fd["serviceAccountName"] == "sponge-frontdoor"
    assert by_kind(objs, "Deployment", "sponge-worker")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


@needs_kubectl
def test_the_rendered_role_is_the_same(rendered):
    assert rules_granted(rendered) == ALLOWED


def test_worker_is_guaranteed_and_resizable_in_place():
    objs = file_objects()
    dep = by_kind(objs, "Deployment", "sponge-worker")
    assert dep["spec"]["selector"]["matchLabels"] == {"app": "sponge-worker"}
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["name"] == "worker"  # the actuator's default container name
    assert c["command"] == ["sponge", "worker", "--port", "9000"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 9000}
    assert c["resources"]["requests"] == c["resources"]["limits"]  # Guaranteed: resizes keep the QoS class
    assert {p["resourceName"]: p["restartPolicy"] for p in c["resizePolicy"]} == {
        "cpu": "NotRequired", "memory": "RestartContainer"}


def test_front_door_watches_the_workers_and_is_exposed():
    objs = file_objects()
    (c,) = by_kind(objs, "Deployment", "sponge-frontdoor")["spec"]["template"]["spec"]["containers"]
    cmd = c["command"]
    assert cmd[:2] == ["sponge", "serve"]
    flags = dict(zip(cmd[2::2], cmd[3::2]))
    assert flags["--backend"] == "kubernetes" and flags["--selector"] == "app=sponge-worker"
    assert flags["--namespace"] == "$(POD_NAMESPACE)"
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    svc = by_kind(objs, "Service", "sponge")
    assert svc["spec"]["selector"] == {"app": "sponge-frontdoor"}
    assert {(p["name"], p["port"]) for p in svc["spec"]["ports"]} == {("http", 8000), ("grpc", 8001)}


def test_dockerfile_installs_as_the_readme_does():
    text = (REPO / "Dockerfile").read_text()
    assert "FROM python:3.12-slim" in text
    assert "pip install -e '.[kubernetes]'" in text
    assert "pip install -e ." in (REPO / "README.md").read_text()
