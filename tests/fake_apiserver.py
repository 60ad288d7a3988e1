"""A protocol-level fake Kubernetes API server (and kubelet) for Sponge's tests.

Why a fake at the protocol level: the Kubernetes actuator, scaler and watcher must be tested through the
official client's real HTTP requests, and the rules of the resize subresource checked with the real
`kubectl` (1.32) — neither of which a mock of the Python client would exercise. No cluster exists here.

It serves only what Sponge and those kubectl commands use (found with `kubectl -v=8` against it):

* discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/apps/v1` (plain, non-aggregated documents:
  kubectl falls back to them when the server does not answer the aggregated kind it asks for first);
* pods: list (label and `metadata.name` field selectors), get, watch (a chunked stream of JSON events,
  `?watch=true`, from a `resourceVersion`, `timeoutSeconds`; a version older than the kept history is
  an ERROR event carrying a 410 `Expired` Status, as etcd compaction gives), plain PATCH (metadata only:
  a spec change other than an image is refused like the real server), `pods/{name}/resize` GET/PATCH;
* deployments: get, and `deployments/{name}/scale` GET/PATCH;
* for kubectl's human output, pods as a server-side `meta.k8s.io/v1` Table (NAME READY STATUS RESTARTS AGE).

Patches: strategic-merge (merge keys for the lists that occur here), JSON merge patch and JSON Patch
(add/replace/remove/test); apply patches are 415.

Rules enforced as Kubernetes 1.33 enforces them (messages in the real Status shape):

* a CPU/memory change through a plain pod PATCH: 422 Invalid, `spec: Forbidden: pod updates may not
  change fields other than ...`;
* a resize that changes anything but `resources`, or puts a request above its limit, or would change
  the pod's QoS class: 422 Invalid (`Pod QOS Class may not change as a result of resizing`);
* an accepted resize updates `spec`; after `kubelet_delay_s` the fake kubelet either marks it
  `PodResizePending` (`Infeasible`: the pod's requests exceed the node's allocatable CPU; `Deferred`:
  they exceed what the other pods leave free, or `defer_resizes` is set — retried when that changes)
  or allocates it (`status.containerStatuses[].allocatedResources`, condition `PodResizeInProgress`),
  and after `actuate_delay_s` reports it in `status.containerStatuses[].resources` with no condition.

Scaling a deployment creates or deletes its pods (named `<deployment>-<n>`); a new pod is Running and
Ready after `cold_start_s`; a deleted one is first marked (`deletionTimestamp`, not ready), then gone.
A deleted deployment pod is replaced, as its ReplicaSet does; `set_ready` flips a pod's readiness. The
kubelet's resize conditions carry `observedGeneration` (the pod generation they judged), as 1.33 writes.
Hooks for end-to-end tests: `pod_runner(name) -> podIP` starts a real process for each new deployment pod
(the pod turns Ready once it returns, as after a readiness probe) and `pod_stopper(name)` is the kubelet's
SIGTERM when a pod starts terminating (tests/test_kubernetes_backend.py runs a `sponge worker` per pod).
Everything runs on loopback in threads; `FakeCluster` is a context manager that starts and stops it.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

Obj = dict[str, Any]

FORBIDDEN_POD_UPDATE = (
    "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,"
    "`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),"
    "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)"
)
FORBIDDEN_RESIZE = "only cpu and memory resources are mutable"
QOS_CHANGE = "Pod QOS Class may not change as a result of resizing"
SMP_KEYS = {  # strategic-merge-patch merge keys of the lists that occur in these objects
    "containers": "name", "initContainers": "name", "resizePolicy": "resourceName", "env": "name",
    "ports": "containerPort", "volumeMounts": "mountPath", "volumes": "name", "conditions": "type",
    "containerStatuses": "name", "tolerations": None,
}
_SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def quantity(q: str | int | float) -> Decimal:
    """A Kubernetes quantity ('500m', '1.5', '256Mi') as a Decimal of base units."""
    s = str(q)
    m = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", s)
    if not m:
        raise ValueError(f"quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {s!r}")
    num, suf = Decimal(m.group(1)), m.group(2) or ""
    return num / 1000 if suf == "m" else num * _SUFFIX[suf]


def cpu_text(cpu_m: int) -> str:
    """Millicores in the apiserver's canonical form: '2' for 2000 m, '500m' otherwise."""
    return str(cpu_m // 1000) if cpu_m % 1000 == 0 else f"{cpu_m}m"


def cpu_m_of(q: str | int | float | None) -> int:
    return 0 if q is None else int(quantity(q) * 1000)


def canonical_cpu(q: str | int | float) -> str:
    return cpu_text(cpu_m_of(q))


def status_obj(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    """A metav1.Status, the body of every error answer."""
    s: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
              "reason": reason, "code": code}
    if details is not None:
        s["details"] = details
    return s


def invalid(kind: str, name: str, field: str, cause_reason: str, detail: str) -> "ApiError":
    """422 Invalid in the shape of apimachinery's NewInvalid (one cause)."""
    msg = f'{kind} "{name}" is invalid: {field}: {detail}'
    cause = {"reason": cause_reason, "message": detail, "field": field}
    return ApiError(status_obj(422, "Invalid", msg, {"name": name, "kind": kind, "causes": [cause]}))


class ApiError(Exception):
    def __init__(self, status: Obj) -> None:
        super().__init__(status["message"])
        self.status = status


def not_found(resource: str, name: str, group: str = "") -> ApiError:
    res = f"{resource}.{group}" if group else resource
    return ApiError(status_obj(404, "NotFound", f'{res} "{name}" not found', {"name": name, "group": group or None,
                                                                                  "kind": resource}))


# -- patches --------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def strategic_merge_patch(target: Any, patch: Any, key: str | None = None) -> Any:
    """Strategic merge patch for the fields used here: lists with a merge key merge element by element."""
    if isinstance(patch, dict):
        out = copy.deepcopy(target) if isinstance(target, dict) else {}
        for k, v in patch.items():
            if k.startswith("$"):
                continue
            if v is None:
                out.pop(k, None)
            else:
                out[k] = strategic_merge_patch(out.get(k), v, k)
        return out
    if isinstance(patch, list) and SMP_KEYS.get(key or "") and isinstance(target, list):
        mk = SMP_KEYS[key or ""]
        out_l = copy.deepcopy(target)
        for item in patch:
            if not isinstance(item, dict) or mk not in item:
                raise ApiError(status_obj(400, "BadRequest", f"map: {item} does not contain declared merge key: {mk}"))
            idx = next((i for i, t in enumerate(out_l) if t.get(mk) == item[mk]), None)
            if item.get("$patch") == "delete":
                if idx is not None:
                    del out_l[idx]
            elif idx is None:
                out_l.append(strategic_merge_patch({}, item))
            else:
                out_l[idx] = strategic_merge_patch(out_l[idx], item)
        return out_l
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ApiError(status_obj(422, "Invalid", f"JSON pointer {path!r} must start with '/'"))
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(target: Obj, ops: Any) -> Obj:
    """RFC 6902 JSON Patch, the operations kubectl `--type=json` sends (add, replace, remove, test)."""
    if not isinstance(ops, list):
        raise ApiError(status_obj(400, "BadRequest", "json: cannot unmarshal object into Go value of type "
                                  "jsonpatch.Patch"))
    doc = copy.deepcopy(target)
    for op in ops:
        parts = _pointer(op.get("path", ""))
        parent: Any = doc
        try:
            for k in parts[:-1]:
                parent = parent[int(k)] if isinstance(parent, list) else parent[k]
            last = parts[-1]
            kind = op.get("op")
            if isinstance(parent, list):
                idx = len(parent) if last == "-" else int(last)
                if kind == "add":
                    parent.insert(idx, op["value"])
                elif kind == "replace":
                    parent[idx] = op["value"]
                elif kind == "remove":
                    del parent[idx]
                elif kind == "test" and parent[idx] != op["value"]:
                    raise ApiError(status_obj(422, "Invalid", f"testing value {op['path']} failed"))
            elif kind in ("add", "replace"):
                if kind == "replace" and last not in parent:
                    raise KeyError(last)
                parent[last] = op["value"]
            elif kind == "remove":
                del parent[last]
            elif kind == "test":
                if parent[last] != op["value"]:
                    raise ApiError(status_obj(422, "Invalid", f"testing value {op['path']} failed"))
            else:
                raise ApiError(status_obj(422, "Invalid", f"Unexpected kind: {kind}"))
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(status_obj(422, "Invalid", f"the server rejected our request due to an error in our "
                                      f"request: {op.get('op')} operation does not apply: doc is missing path: "
                                      f"\"{op.get('path')}\""))
    return doc


def apply_patch(obj: Obj, content_type: str, body: bytes) -> Obj:
    try:
        patch = json.loads(body or b"null")
    except ValueError as e:
        raise ApiError(status_obj(400, "BadRequest", f"error decoding patch: {e}"))
    ct = content_type.split(";")[0].strip()
    if ct == "application/strategic-merge-patch+json":
        return strategic_merge_patch(obj, patch)
    if ct == "application/merge-patch+json":
        return merge_patch(obj, patch)
    if ct == "application/json-patch+json":
        return json_patch(obj, patch)
    raise ApiError(status_obj(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                              f"accepted media types include: application/json-patch+json, "
                              f"application/merge-patch+json, application/strategic-merge-patch+json"))


# -- pods -----------------------------------------------------------------------------------------


def _resources(c: Obj) -> tuple[dict[str, str], dict[str, str]]:
    r = c.get("resources") or {}
    limits = dict(r.get("limits") or {})
    requests = dict(r.get("requests") or {})
    for k, v in limits.items():  # a limit without a request defaults the request (as the API defaults it)
        requests.setdefault(k, v)
    return requests, limits


def qos_class(spec: Obj) -> str:
    """Guaranteed, Burstable or BestEffort, computed from the containers as the API server does."""
    cs = spec.get("containers", [])
    reqs = [_resources(c) for c in cs]
    if not any(r or lim for r, lim in reqs):
        return "BestEffort"
    for r, lim in reqs:
        for res in ("cpu", "memory"):
            if res not in lim or res not in r or quantity(r[res]) != quantity(lim[res]):
                return "Burstable"
    return "Guaranteed"


def pod_cpu_request_m(spec: Obj) -> int:
    return sum(cpu_m_of(_resources(c)[0].get("cpu")) for c in spec.get("containers", []))


def _canonical_resources(res: Obj) -> Obj:
    out: Obj = {}
    for part in ("requests", "limits"):
        if part in res and res[part] is not None:
            out[part] = {k: (canonical_cpu(v) if k == "cpu" else str(v)) for k, v in res[part].items()}
    return out


def _cond(ctype: str, status: str = "True", reason: str | None = None, message: str | None = None) -> Obj:
    c: Obj = {"type": ctype, "status": status, "lastProbeTime": None, "lastTransitionTime": now_rfc3339()}
    if reason:
        c["reason"] = reason
    if message:
        c["message"] = message
    return c


def match_labels(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors (`a=b,c!=d,e`), the kind Sponge and kubectl send here."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@dataclass
class WatchEvent:
    rv: int
    type: str
    kind: str  # "pods" or "deployments"
    obj: Obj


class FakeCluster:
    """One namespace's pods and deployments on one fake node, behind a real HTTP server on loopback."""

    def __init__(
        self,
        namespace: str = "sponge",
        *,
        allocatable_cpu_m: int = 4000,
        kubelet_delay_s: float = 0.05,
        actuate_delay_s: float = 0.05,
        cold_start_s: float = 0.2,
        terminate_s: float = 0.05,
        history: int = 1000,
    ) -> None:
        self.namespace = namespace
        self.allocatable_cpu_m = allocatable_cpu_m
        self.kubelet_delay_s = kubelet_delay_s
        self.actuate_delay_s = actuate_delay_s
        self.cold_start_s = cold_start_s
        self.terminate_s = terminate_s
        self.history = history
        self.defer_resizes = False  # the "deferred" case: the kubelet keeps every resize pending
        self.pods: dict[str, Obj] = {}
        self.deployments: dict[str, Obj] = {}
        self.events: list[WatchEvent] = []
        self.compacted_rv = 0  # watches from a version at or below this get 410 Expired
        self.requests: list[tuple[str, str, str]] = []  # (method, path, content type) seen, for assertions
        self._rv = itertools.count(100)
        # Hooks for tests that run a real process per pod (e.g. a `sponge worker`): `pod_runner(name)` starts
        # a new deployment pod's process and returns its podIP once it listens (called on its own thread,
        # outside the lock: the pod turns Ready when it returns, as after a readiness probe; if it raises, the
        # pod never turns Ready); `pod_stopper(name)` is called when a pod starts terminating (the kubelet's
        # SIGTERM; under the lock: keep it quick).
        self.pod_runner: Callable[[str], str] | None = None
        self.pod_stopper: Callable[[str], None] | None = None
        self._ips = itertools.count(2)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._timers: list[threading.Timer] = []
        self._watch_epoch = 0  # bumping it ends every open watch stream
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._conns: set[socket.socket] = set()

    # -- life cycle --------------------------------------------------------------------------------

    def start(self) -> "FakeCluster":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-apiserver", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        with self._lock:
            self._closed = True
            for t in self._timers:
                t.cancel()
            self._watch_epoch += 1
            self._changed.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:  # keep-alive connections too: a stopped server answers nothing
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "FakeCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self, context: str = "fake") -> Obj:
        """A kubeconfig (as a dict; dump it as JSON or YAML) pointing at this server."""
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": {"token": "fake-token"}}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context,
                                                        "namespace": self.namespace}}],
        }

    # -- bookkeeping -------------------------------------------------------------------------------

    def _later(self, delay_s: float, fn: Callable[[], None]) -> None:
        def run() -> None:
            with self._lock:
                if not self._closed:
                    fn()
        t = threading.Timer(delay_s, run)
        t.daemon = True
        with self._lock:
            if self._closed:
                return
            self._timers = [x for x in self._timers if x.is_alive()] + [t]
        t.start()

    def _record(self, etype: str, kind: str, obj: Obj) -> None:
        """Give `obj` a new resourceVersion and append the event the watches will send."""
        rv = next(self._rv)
        obj["metadata"]["resourceVersion"] = str(rv)
        self.events.append(WatchEvent(rv, etype, kind, copy.deepcopy(obj)))
        if len(self.events) > self.history:
            drop = self.events[: len(self.events) - self.history]
            self.compacted_rv = drop[-1].rv
            del self.events[: len(drop)]
        self._changed.notify_all()

    def current_rv(self) -> int:
        with self._lock:
            return self.events[-1].rv if self.events else next(self._rv)

    def expire_watches(self) -> None:
        """As an etcd compaction does: end open watches and make every version seen so far too old."""
        with self._lock:
            self.compacted_rv = next(self._rv)  # beyond every version handed out so far
            self.events.clear()
            self._watch_epoch += 1
            self._changed.notify_all()

    def set_defer_resizes(self, defer: bool) -> None:
        """Turn the Deferred case on or off; off retries the pending resizes, as the kubelet does."""
        with self._lock:
            self.defer_resizes = defer
            if not defer:
                self._retry_deferred()

    # -- objects -----------------------------------------------------------------------------------

    def _meta(self, name: str, labels: dict[str, str] | None) -> Obj:
        return {"name": name, "namespace": self.namespace, "uid": str(uuid.uuid4()), "generation": 1,
                "creationTimestamp": now_rfc3339(), "labels": dict(labels or {})}

    def add_pod(self, name: str, containers: list[Obj], labels: dict[str, str] | None = None, *,
                ready: bool = True, owner: str | None = None) -> Obj:
        """Create a pod (scheduled to `fake-node`); Running and Ready at once unless `ready` is False."""
        with self._lock:
            meta = self._meta(name, labels)
            if owner:
                meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{owner}-rs",
                                            "uid": str(uuid.uuid4()), "controller": True, "blockOwnerDeletion": True}]
            containers = copy.deepcopy(containers)
            for c in containers:
                if "resources" in c:
                    requests, limits = _resources(c)
                    c["resources"] = _canonical_resources({"requests": requests, "limits": limits} if limits
                                                          else {"requests": requests})
                c.setdefault("imagePullPolicy", "IfNotPresent")
                c.setdefault("terminationMessagePath", "/dev/termination-log")
                c.setdefault("terminationMessagePolicy", "File")
            spec = {"containers": containers, "nodeName": "fake-node", "restartPolicy": "Always",
                    "schedulerName": "default-scheduler", "dnsPolicy": "ClusterFirst",
                    "terminationGracePeriodSeconds": 30, "serviceAccountName": "default",
                    "securityContext": {}, "enableServiceLinks": True, "preemptionPolicy": "PreemptLowerPriority",
                    "priority": 0}
            pod: Obj = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec,
                        "status": {"phase": "Pending", "qosClass": qos_class(spec),
                                   "conditions": [_cond("PodScheduled")]}}
            self.pods[name] = pod
            self._record("ADDED", "pods", pod)
            if ready:
                self._start_pod(name)
            elif self.pod_runner is not None and owner:
                threading.Thread(target=self._run_pod, args=(name,), name=f"fake-kubelet-{name}", daemon=True).start()
            else:
                self._later(self.cold_start_s, lambda: self._start_pod(name))
            return copy.deepcopy(pod)

    def _run_pod(self, name: str) -> None:
        """`pod_runner` starts the pod's process; Ready once it returns (and `cold_start_s` passed)."""
        t0 = time.monotonic()
        runner = self.pod_runner
        assert runner is not None
        try:
            ip = runner(name)
        except Exception as e:  # the pod stays not Ready, as after failing readiness probes
            import logging

            logging.getLogger(__name__).warning("fake kubelet: pod %s did not start: %s", name, e)
            return
        self._later(max(0.0, self.cold_start_s - (time.monotonic() - t0)), lambda: self._start_pod(name, ip))

    def _start_pod(self, name: str, ip: str | None = None) -> None:
        """The kubelet started the containers: Running, Ready, resources allocated as requested."""
        pod = self.pods.get(name)
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return
        started = now_rfc3339()
        statuses = []
        for c in pod["spec"]["containers"]:
            requests, _ = _resources(c)
            st: Obj = {"name": c["name"], "image": c.get("image", ""), "imageID": f"docker.io/{c.get('image', '')}@sha256:"
                       + "0" * 64, "containerID": f"containerd://{uuid.uuid4().hex}", "ready": True, "started": True,
                       "restartCount": 0, "state": {"running": {"startedAt": started}}, "lastState": {}}
            if "resources" in c:
                st["allocatedResources"] = dict(requests)
                st["resources"] = copy.deepcopy(c["resources"])
            statuses.append(st)
        ip = ip or f"127.0.1.{next(self._ips)}"  # loopback: nothing is sent there unless `pod_runner` chose it
        pod["status"].update({
            "phase": "Running", "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}], "podIP": ip,
            "podIPs": [{"ip": ip}], "startTime": started, "containerStatuses": statuses,
            "conditions": [_cond("PodReadyToStartContainers"), _cond("Initialized"), _cond("Ready"),
                           _cond("ContainersReady"), _cond("PodScheduled")],
        })
        self._record("MODIFIED", "pods", pod)
        self._refresh_deployments()

    def set_ready(self, name: str, ready: bool) -> None:
        """A readiness probe starts failing (or passing again): the pod's Ready conditions follow."""
        with self._lock:
            pod = self.pods[name]
            for c in pod["status"].get("conditions", []):
                if c["type"] in ("Ready", "ContainersReady"):
                    c["status"] = "True" if ready else "False"
            for st in pod["status"].get("containerStatuses", []):
                st["ready"] = ready
            self._record("MODIFIED", "pods", pod)
            self._refresh_deployments()

    def delete_pod(self, name: str, *, replace: bool = True) -> None:
        """Graceful deletion: marked terminating (not ready) now, gone after `terminate_s`. A deployment's pod
        is replaced by a new one (`replace`), as its ReplicaSet does."""
        with self._lock:
            pod = self.pods.get(name)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                return
            pod["metadata"]["deletionTimestamp"] = now_rfc3339()
            pod["metadata"]["deletionGracePeriodSeconds"] = 30
            for c in pod["status"].get("conditions", []):
                if c["type"] in ("Ready", "ContainersReady"):
                    c["status"] = "False"
            for st in pod["status"].get("containerStatuses", []):
                st["ready"] = False
            self._record("MODIFIED", "pods", pod)
            self._refresh_deployments()
            if self.pod_stopper is not None:
                self.pod_stopper(name)
            self._later(self.terminate_s, lambda: self._remove_pod(name))
            if replace:
                for dep in self.deployments:
                    if any(o.get("name") == f"{dep}-rs" for o in pod["metadata"].get("ownerReferences", [])):
                        self._reconcile(dep)

    def _remove_pod(self, name: str) -> None:
        pod = self.pods.pop(name, None)
        if pod is not None:
            self._record("DELETED", "pods", pod)
            self._retry_deferred()  # freed CPU may let a deferred resize through

    def add_deployment(self, name: str, replicas: int, containers: list[Obj], labels: dict[str, str]) -> Obj:
        """A Deployment whose pods carry `labels`; its pods are created as the controller would."""
        with self._lock:
            dep: Obj = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": self._meta(name, labels),
                        "spec": {"replicas": replicas, "selector": {"matchLabels": dict(labels)},
                                 "template": {"metadata": {"labels": dict(labels)},
                                              "spec": {"containers": copy.deepcopy(containers)}},
                                 "strategy": {"type": "RollingUpdate"}, "revisionHistoryLimit": 10,
                                 "progressDeadlineSeconds": 600},
                        "status": {}}
            self.deployments[name] = dep
            self._counter_for = getattr(self, "_counter_for", {})
            self._counter_for[name] = itertools.count()
            self._record("ADDED", "deployments", dep)
            self._reconcile(name)
            return copy.deepcopy(dep)

    def _pods_of(self, dep_name: str) -> list[Obj]:
        """The pods this deployment owns (through its ReplicaSet), not every pod its selector matches."""
        return [p for p in self.pods.values()
                if any(o.get("name") == f"{dep_name}-rs" for o in p["metadata"].get("ownerReferences", []))]

    def _reconcile(self, dep_name: str) -> None:
        """The deployment controller: as many live pods as spec.replicas (newest deleted first)."""
        dep = self.deployments[dep_name]
        live = [p for p in self._pods_of(dep_name) if not p["metadata"].get("deletionTimestamp")]
        want = dep["spec"]["replicas"]
        for _ in range(want - len(live)):
            name = f"{dep_name}-{next(self._counter_for[dep_name])}"
            tmpl = dep["spec"]["template"]
            self.add_pod(name, tmpl["spec"]["containers"], tmpl["metadata"]["labels"], ready=False, owner=dep_name)
        for p in sorted(live, key=lambda p: p["metadata"]["creationTimestamp"] + p["metadata"]["name"])[want:][::-1]:
            self.delete_pod(p["metadata"]["name"], replace=False)
        self._refresh_deployments()

    def _refresh_deployments(self) -> None:
        for name, dep in self.deployments.items():
            pods = self._pods_of(name)
            live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
            ready = [p for p in live if _is_ready(p)]
            st = {"observedGeneration": dep["metadata"]["generation"], "replicas": len(live),
                  "updatedReplicas": len(live), "readyReplicas": len(ready), "availableReplicas": len(ready),
                  "unavailableReplicas": max(0, dep["spec"]["replicas"] - len(ready))}
            st = {k: v for k, v in st.items() if v or k in ("observedGeneration", "replicas")}
            if st != dep["status"]:
                dep["status"] = st
                self._record("MODIFIED", "deployments", dep)

    # -- the kubelet's side of a resize --------------------------------------------------------------

    def _kubelet_resize(self, name: str) -> None:
        pod = self.pods.get(name)
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return
        want = pod_cpu_request_m(pod["spec"])
        statuses = {s["name"]: s for s in pod["status"].get("containerStatuses", [])}
        conds = [c for c in pod["status"].get("conditions", [])
                 if c["type"] not in ("PodResizePending", "PodResizeInProgress")]
        others = sum(_allocated_cpu_m(p) for n, p in self.pods.items() if n != name)
        gen = pod["metadata"]["generation"]  # conditions say which spec they judged (1.33 observedGeneration)
        if want > self.allocatable_cpu_m:
            conds.append({**_cond("PodResizePending", reason="Infeasible", message=(
                f"Node didn't have enough capacity: cpu, requested: {want}, capacity: {self.allocatable_cpu_m}")),
                "observedGeneration": gen})
        elif self.defer_resizes or want > self.allocatable_cpu_m - others:
            conds.append({**_cond("PodResizePending", reason="Deferred", message=(
                f"Node didn't have enough resource: cpu, requested: {want}, used: {others}, "
                f"capacity: {self.allocatable_cpu_m}")), "observedGeneration": gen})
        else:
            for c in pod["spec"]["containers"]:
                st = statuses.get(c["name"])
                if st is not None and "resources" in c:
                    st["allocatedResources"] = dict(_resources(c)[0])
            conds.append({**_cond("PodResizeInProgress"), "observedGeneration": gen})
            self._later(self.actuate_delay_s, lambda: self._kubelet_actuated(name, gen))
        pod["status"]["conditions"] = conds
        self._record("MODIFIED", "pods", pod)

    def _kubelet_actuated(self, name: str, generation: int) -> None:
        """The runtime applied the allocation: status.resources follows it, the condition goes."""
        pod = self.pods.get(name)
        if pod is None:
            return
        statuses = {s["name"]: s for s in pod["status"].get("containerStatuses", [])}
        for c in pod["spec"]["containers"]:
            st = statuses.get(c["name"])
            if st is not None and "allocatedResources" in st:
                res = copy.deepcopy(c.get("resources", {}))
                res["requests"] = {**res.get("requests", {}), **st["allocatedResources"]}
                st["resources"] = _canonical_resources(res)
        if pod["metadata"]["generation"] == generation:
            pod["status"]["conditions"] = [c for c in pod["status"]["conditions"] if c["type"] != "PodResizeInProgress"]
        self._record("MODIFIED", "pods", pod)

    def _retry_deferred(self) -> None:
        for name, pod in list(self.pods.items()):
            if any(c["type"] == "PodResizePending" and c.get("reason") == "Deferred"
                   for c in pod["status"].get("conditions", [])):
                self._later(self.kubelet_delay_s, lambda n=name: self._kubelet_resize(n))

    # -- API operations (called by the handler, under the lock) ------------------------------------

    def get_pod(self, name: str) -> Obj:
        if name not in self.pods:
            raise not_found("pods", name)
        return self.pods[name]

    def patch_pod(self, name: str, content_type: str, body: bytes) -> Obj:
        """Plain PATCH: metadata and images only; the spec's resources are the resize subresource's."""
        old = self.get_pod(name)
        new = apply_patch(old, content_type, body)
        _ensure_same_identity(old, new, "Pod")
        if _strip_images(new["spec"]) != _strip_images(old["spec"]):
            raise invalid("Pod", name, "spec", "FieldValueForbidden", f"Forbidden: {FORBIDDEN_POD_UPDATE}\n"
                          + _spec_diff(old["spec"], new["spec"]))
        new["status"] = old["status"]
        if new == old:
            return old
        self.pods[name] = new
        self._record("MODIFIED", "pods", new)
        return new

    def resize_pod(self, name: str, content_type: str, body: bytes) -> Obj:
        """PATCH pods/{name}/resize: only containers' cpu/memory resources may change (1.33 rules)."""
        old = self.get_pod(name)
        new = apply_patch(old, content_type, body)
        _ensure_same_identity(old, new, "Pod")
        new["metadata"], new["status"] = copy.deepcopy(old["metadata"]), old["status"]  # the subresource ignores them
        for c in new["spec"].get("containers", []):
            if "resources" in c:
                c["resources"] = _canonical_resources(c["resources"])
        if _strip_resources(new["spec"]) != _strip_resources(old["spec"]):
            raise invalid("Pod", name, "spec", "FieldValueForbidden", f"Forbidden: {FORBIDDEN_RESIZE}")
        for i, c in enumerate(new["spec"]["containers"]):
            res = c.get("resources") or {}
            bad = set(res.get("requests") or {}) | set(res.get("limits") or {})
            if bad - {"cpu", "memory"}:
                raise invalid("Pod", name, f"spec.containers[{i}].resources", "FieldValueForbidden",
                              f"Forbidden: {FORBIDDEN_RESIZE}")
            requests, limits = _resources(c)
            for r, v in requests.items():
                if r in limits and quantity(v) > quantity(limits[r]):
                    raise invalid("Pod", name, f"spec.containers[{i}].resources.requests", "FieldValueInvalid",
                                  f'Invalid value: "{v}": must be less than or equal to {r} limit of {limits[r]}')
        new_qos = qos_class(new["spec"])
        if new_qos != old["status"].get("qosClass"):
            raise invalid("Pod", name, "spec", "FieldValueInvalid", f'Invalid value: "{new_qos}": {QOS_CHANGE}')
        if new["spec"] == old["spec"]:
            return old
        new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        self.pods[name] = new
        self._record("MODIFIED", "pods", new)
        self._later(self.kubelet_delay_s, lambda: self._kubelet_resize(name))
        return new

    def get_deployment(self, name: str) -> Obj:
        if name not in self.deployments:
            raise not_found("deployments", name, "apps")
        return self.deployments[name]

    def scale_of(self, name: str) -> Obj:
        dep = self.get_deployment(name)
        m = dep["metadata"]
        sel = ",".join(f"{k}={v}" for k, v in dep["spec"]["selector"]["matchLabels"].items())
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {k: m[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")},
                "spec": {"replicas": dep["spec"]["replicas"]},
                "status": {"replicas": dep["status"].get("replicas", 0), "selector": sel}}

    def patch_scale(self, name: str, content_type: str, body: bytes) -> Obj:
        scale = apply_patch(self.scale_of(name), content_type, body)
        replicas = scale.get("spec", {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise invalid("Scale", name, "spec.replicas", "FieldValueInvalid",
                          f"Invalid value: {json.dumps(replicas)}: must be greater than or equal to 0")
        dep = self.deployments[name]
        if replicas != dep["spec"]["replicas"]:
            dep["spec"]["replicas"] = replicas
            dep["metadata"]["generation"] += 1
            self._record("MODIFIED", "deployments", dep)
            self._reconcile(name)
        return self.scale_of(name)

    def list_of(self, kind: str, label_selector: str, field_selector: str) -> list[Obj]:
        objs = self.pods if kind == "pods" else self.deployments
        return [o for o in objs.values() if _selected(o, label_selector, field_selector)]

    # -- watches ------------------------------------------------------------------------------------

    def watch(self, kind: str, label_selector: str, field_selector: str, rv: str | None, timeout_s: float,
              send: Callable[[Obj], None]) -> None:
        """Send events of `kind` after version `rv` until the timeout, a stop or an expiry."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            epoch = self._watch_epoch
            if not rv or rv == "0":
                start = self.events[-1].rv if self.events else 0
                initial = [{"type": "ADDED", "object": copy.deepcopy(o)} for o in self.list_of(kind, label_selector,
                                                                                                field_selector)]
            else:
                start, initial = int(rv), []
                if start < self.compacted_rv:
                    initial = [{"type": "ERROR", "object": status_obj(
                        410, "Expired", f"too old resource version: {start} ({self.compacted_rv + 1})")}]
                    start = -1
        for ev in initial:
            send(ev)
        if start < 0:
            return
        while True:
            with self._lock:
                pending = [e for e in self.events if e.rv > start and e.kind == kind]
                while not pending:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._watch_epoch != epoch or self._closed:
                        return
                    self._changed.wait(min(left, 0.5))
                    pending = [e for e in self.events if e.rv > start and e.kind == kind]
                if self._watch_epoch != epoch:
                    return
            for e in pending:
                start = e.rv
                if _selected(e.obj, label_selector, field_selector):
                    send({"type": e.type, "object": e.obj})


def _is_ready(pod: Obj) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def _allocated_cpu_m(pod: Obj) -> int:
    return sum(cpu_m_of((s.get("allocatedResources") or {}).get("cpu"))
               for s in pod["status"].get("containerStatuses", []))


def _selected(obj: Obj, label_selector: str, field_selector: str) -> bool:
    if label_selector and not match_labels(label_selector, obj["metadata"].get("labels") or {}):
        return False
    for term in filter(None, field_selector.split(",")):
        k, _, v = term.partition("=")
        if k == "metadata.name" and obj["metadata"]["name"] != v.lstrip("="):
            return False
        if k == "metadata.namespace" and obj["metadata"]["namespace"] != v.lstrip("="):
            return False
    return True


def _ensure_same_identity(old: Obj, new: Obj, kind: str) -> None:
    name = old["metadata"]["name"]
    if new.get("metadata", {}).get("name") != name:
        raise invalid(kind, name, "metadata.name", "FieldValueInvalid",
                      f'Invalid value: "{new.get("metadata", {}).get("name")}": field is immutable')
    if not isinstance(new.get("spec"), dict):
        raise ApiError(status_obj(400, "BadRequest", "the patch removed the spec"))


def _strip_images(spec: Obj) -> Obj:
    s = copy.deepcopy(spec)
    for c in s.get("containers", []) + s.get("initContainers", []):
        c.pop("image", None)
    return s


def _strip_resources(spec: Obj) -> Obj:
    s = copy.deepcopy(spec)
    for c in s.get("containers", []) + s.get("initContainers", []):
        c.pop("resources", None)
    return s


def _spec_diff(old: Obj, new: Obj) -> str:
    """A short stand-in for the real server's go-cmp diff of core.PodSpec (only the changed containers)."""
    lines = ["  core.PodSpec{"]
    for o, n in zip(old.get("containers", []), new.get("containers", [])):
        if o != n:
            lines.append(f'- \t{json.dumps(o.get("resources", {}), sort_keys=True)}')
            lines.append(f'+ \t{json.dumps(n.get("resources", {}), sort_keys=True)}')
    lines.append("  }")
    return "\n".join(lines)


def _age(ts: str) -> str:
    secs = max(0, int(time.time() - datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()))
    return f"{secs}s" if secs < 120 else f"{secs // 60}m"


def pod_table(pods: list[Obj], rv: str) -> Obj:
    """The meta.k8s.io/v1 Table of pods kubectl prints (NAME, READY, STATUS, RESTARTS, AGE)."""
    cols = [("Name", "string", "name"), ("Ready", "string", ""), ("Status", "string", ""),
            ("Restarts", "string", ""), ("Age", "string", "")]
    rows = []
    for p in pods:
        cs = p["status"].get("containerStatuses") or []
        ready = f"{sum(1 for c in cs if c.get('ready'))}/{len(p['spec']['containers'])}"
        phase = "Terminating" if p["metadata"].get("deletionTimestamp") else p["status"].get("phase", "Pending")
        meta = {k: v for k, v in p["metadata"].items()}
        rows.append({"cells": [p["metadata"]["name"], ready, phase, str(sum(c.get("restartCount", 0) for c in cs)),
                               _age(p["metadata"]["creationTimestamp"])],
                     "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta}})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv},
            "columnDefinitions": [{"name": n, "type": t, "format": f, "description": n, "priority": 0}
                                  for n, t, f in cols],
            "rows": rows}


# -- HTTP -----------------------------------------------------------------------------------------

POD_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def _discovery(host: str) -> dict[str, Obj]:
    api_v1 = {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod", "verbs": POD_VERBS,
         "shortNames": ["po"], "categories": ["all"]},
        {"name": "pods/resize", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get", "patch", "update"]},
        {"name": "pods/status", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get", "patch", "update"]},
    ]}
    apps_v1 = {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "apps/v1", "resources": [
        {"name": "deployments", "singularName": "deployment", "namespaced": True, "kind": "Deployment",
         "verbs": POD_VERBS, "shortNames": ["deploy"], "categories": ["all"]},
        {"name": "deployments/scale", "singularName": "", "namespaced": True, "group": "autoscaling",
         "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]},
        {"name": "deployments/status", "singularName": "", "namespaced": True, "kind": "Deployment",
         "verbs": ["get", "patch", "update"]},
    ]}
    apps = {"name": "apps", "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
            "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"}}
    return {
        "/version": {"major": "1", "minor": "33", "gitVersion": "v1.33.0-sponge-fake", "gitCommit": "0" * 40,
                     "gitTreeState": "clean", "buildDate": "2025-04-23T00:00:00Z", "goVersion": "go1.24.2",
                     "compiler": "gc", "platform": "linux/amd64"},
        "/api": {"kind": "APIVersions", "versions": ["v1"],
                 "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]},
        "/api/v1": api_v1,
        "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [apps]},
        "/apis/apps": {"kind": "APIGroup", "apiVersion": "v1", **apps},
        "/apis/apps/v1": apps_v1,
    }


_ROUTES = [
    (re.compile(r"^/api/v1/namespaces/([^/]+)/pods/?$"), "pods", None),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)$"), "pod", None),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/resize$"), "pod", "resize"),
    (re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/?$"), "deployments", None),
    (re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)$"), "deployment", None),
    (re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/scale$"), "deployment", "scale"),
]


def _make_handler(cluster: FakeCluster) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive and chunked watch streams, as the client expects

        def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read cluster.requests
            pass

        def setup(self) -> None:
            super().setup()
            with cluster._lock:
                if cluster._closed:
                    self.connection.shutdown(socket.SHUT_RDWR)
                cluster._conns.add(self.connection)

        def finish(self) -> None:
            with cluster._lock:
                cluster._conns.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, code: int, obj: Obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: ApiError) -> None:
            self._send(e.status["code"], e.status)

        def do_GET(self) -> None:
            self._handle("GET")

        def do_PATCH(self) -> None:
            self._handle("PATCH")

        def do_PUT(self) -> None:
            self._handle("PUT")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_DELETE(self) -> None:
            self._handle("DELETE")

        def _handle(self, method: str) -> None:
            url = urlsplit(self.path)
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            body = self._body() if method in ("PATCH", "PUT", "POST") else b""
            ctype = self.headers.get("Content-Type", "")
            with cluster._lock:
                cluster.requests.append((method, url.path, ctype))
            try:
                docs = _discovery(f"{self.server.server_address[0]}:{self.server.server_address[1]}")
                if method == "GET" and url.path.rstrip("/") in docs:
                    return self._send(200, docs[url.path.rstrip("/")])
                for rx, what, sub in _ROUTES:
                    m = rx.match(url.path)
                    if m:
                        return self._route(method, what, sub, m.groups(), q, ctype, body)
                raise ApiError(status_obj(404, "NotFound", "the server could not find the requested resource",
                                          {"causes": [{"reason": "UnexpectedServerResponse", "message": "404 page not found"}]}))
            except ApiError as e:
                return self._error(e)

        def _route(self, method: str, what: str, sub: str | None, groups: tuple[str, ...], q: dict[str, str],
                   ctype: str, body: bytes) -> None:
            ns = groups[0]
            if ns != cluster.namespace:
                name = groups[1] if len(groups) > 1 else ""
                raise not_found("pods" if what.startswith("pod") else "deployments", name or ns)
            allowed = {("pods", None): {"GET"}, ("pod", None): {"GET", "PATCH"}, ("pod", "resize"): {"GET", "PATCH"},
                       ("deployments", None): {"GET"}, ("deployment", None): {"GET"},
                       ("deployment", "scale"): {"GET", "PATCH"}}[(what, sub)]
            if method not in allowed:
                raise ApiError(status_obj(405, "MethodNotAllowed",
                                          f"the fake apiserver does not allow {method} here (only {sorted(allowed)})"))
            if what in ("pods", "deployments"):
                kind = what
                if q.get("watch") in ("true", "1"):
                    return self._watch(kind, q)
                with cluster._lock:
                    items = copy.deepcopy(cluster.list_of(kind, q.get("labelSelector", ""), q.get("fieldSelector", "")))
                    rv = str(cluster.current_rv())
                if kind == "pods" and self._wants_table():
                    return self._send(200, pod_table(items, rv))
                list_kind, api = ("PodList", "v1") if kind == "pods" else ("DeploymentList", "apps/v1")
                return self._send(200, {"kind": list_kind, "apiVersion": api, "metadata": {"resourceVersion": rv},
                                        "items": items})
            name = groups[1]
            with cluster._lock:
                if what == "pod":
                    if method == "GET":
                        obj = cluster.get_pod(name)
                    elif sub == "resize":
                        obj = cluster.resize_pod(name, ctype, body)
                    else:
                        obj = cluster.patch_pod(name, ctype, body)
                elif sub == "scale":
                    obj = cluster.scale_of(name) if method == "GET" else cluster.patch_scale(name, ctype, body)
                else:
                    obj = cluster.get_deployment(name)
                obj = copy.deepcopy(obj)
            if what == "pod" and method == "GET" and self._wants_table():
                return self._send(200, pod_table([obj], obj["metadata"]["resourceVersion"]))
            self._send(200, obj)

        def _wants_table(self) -> bool:
            """kubectl's human output asks for the server-side Table (`as=Table;g=meta.k8s.io`)."""
            return "as=Table" in self.headers.get("Accept", "")

        def _watch(self, kind: str, q: dict[str, str]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def send(ev: Obj) -> None:
                data = json.dumps(ev).encode() + b"\n"
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            try:
                cluster.watch(kind, q.get("labelSelector", ""), q.get("fieldSelector", ""), q.get("resourceVersion"),
                              float(q.get("timeoutSeconds") or 1800), send)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

    return Handler
