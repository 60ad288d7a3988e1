"""In-place CPU scaling of worker pods through the Kubernetes API (1.33+: the `pods/resize` subresource).

The cluster counterpart of `cgroup.py`. In a cluster a replica is a pod: its CPU is its container's
CFS quota, which only the kubelet may write, and the way to ask the kubelet is to PATCH the pod's
`resize` subresource. Three edges, each a small class over the official `kubernetes` client:

* `KubernetesActuator` — the `CpuActuator` of one pod's container. `apply(cpu_m)` patches requests and
  limits to the same value (so a Guaranteed pod stays Guaranteed: the API refuses a resize that changes
  the QoS class); `current()` reads back what the kubelet has really put in force
  (`status.containerStatuses[].resources`), never the wish in `spec` — a resize the node cannot take
  (`PodResizePending`/`Infeasible`), one it postpones (`Deferred`) or one still being applied
  (`PodResizeInProgress`) leaves the old allocation in force, and the controller must plan with that.
  Those outcomes are logged and counted (`K8sMetrics`, for `/metrics`).
* `DeploymentScaler` — horizontal: `deployments/{name}/scale`, and the ready count from the Deployment.
* `PodWatcher` — discovers the worker pods by label selector with a list + watch, calls back on
  added / ready / unready / deleted, and relists when the watch expires (410 Gone) or breaks.

`from_config(namespace, selector, context=None)` builds all three on one API client (in-cluster service
account, or a kubeconfig context) for the front door's `--backend kubernetes` (`server/k8s_pool.py`).

Every call here is a blocking HTTP round trip (a few ms in a cluster): callers on an event loop run
them in an executor. Pods and objects are handled as the API's JSON dicts (camelCase), one shape for
list, get and watch.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

try:
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config
    from kubernetes import watch as k8s_watch
    from kubernetes.client.exceptions import ApiException
    from kubernetes.utils import parse_quantity
except ImportError as e:  # an optional extra: the local (cgroup) server needs none of it
    raise ImportError("sponge.scaling.kubernetes needs the Kubernetes client: pip install 'sponge[kubernetes]'") from e
from prometheus_client import CollectorRegistry, Counter, Gauge

from sponge.scaling.base import ActuatorError

log = logging.getLogger(__name__)

Obj = dict[str, Any]
STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
# Patch types are named, not left to the client's guess from the body (it picks JSON Patch for a list).

# What `sponge_k8s_resizes_total` counts (see K8sMetrics).
OUTCOMES = ("requested", "rejected", "error", "applied", "in_progress", "deferred", "infeasible")


def cpu_m_of(q: str | int | float | None) -> int | None:
    """A CPU quantity ('500m', '1', '1.5') in millicores, rounded up; None stays None."""
    return None if q is None else math.ceil(parse_quantity(str(q)) * 1000)


def cpu_quantity(cpu_m: int) -> str:
    """Millicores as the API writes them back: '2' for 2000 m, '250m' otherwise."""
    return str(cpu_m // 1000) if cpu_m % 1000 == 0 else f"{cpu_m}m"


def api_message(e: ApiException) -> str:
    """The Status message the API server sent (e.g. `Pod "w" is invalid: spec: ...`), else the reason."""
    import json

    try:
        return json.loads(e.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{e.status} {e.reason}"


# -- reading a pod's resize status (pure) --------------------------------------------------------


@dataclass(frozen=True)
class ResizeStatus:
    """What one container's pod says about its CPU: the wish, what is allocated, what is in force.

    `state`: applied (in force = wish, no condition), in_progress (`PodResizeInProgress`), deferred or
    infeasible (`PodResizePending` with that reason), pending (the kubelet has not looked yet).
    """

    desired_m: int | None  # spec.containers[].resources.limits.cpu (requests = limits)
    allocated_m: int | None  # status.containerStatuses[].allocatedResources.cpu: what the kubelet admitted
    actual_m: int | None  # status.containerStatuses[].resources.limits.cpu: the quota in force
    state: str
    message: str = ""

    @property
    def in_force_m(self) -> int | None:
        """The allocation to plan with: the quota in force, else the admitted one, else the spec."""
        for v in (self.actual_m, self.allocated_m, self.desired_m):
            if v is not None:
                return v
        return None


def resize_status(pod: Obj, container: str) -> ResizeStatus:
    """Read `container`'s CPU and the pod's resize conditions from a pod object (a dict, API JSON)."""
    spec_c = next((c for c in pod.get("spec", {}).get("containers", []) if c.get("name") == container), None)
    if spec_c is None:
        raise ActuatorError(f"kubernetes: pod {pod.get('metadata', {}).get('name')!r} has no container {container!r}")
    res = spec_c.get("resources") or {}
    desired = cpu_m_of((res.get("limits") or {}).get("cpu") or (res.get("requests") or {}).get("cpu"))
    status = pod.get("status") or {}
    st = next((s for s in status.get("containerStatuses") or [] if s.get("name") == container), {})
    allocated = cpu_m_of((st.get("allocatedResources") or {}).get("cpu"))
    actual_res = st.get("resources") or {}
    actual = cpu_m_of((actual_res.get("limits") or {}).get("cpu") or (actual_res.get("requests") or {}).get("cpu"))
    # A condition that judged an earlier spec (its observedGeneration below the pod's generation, where the
    # cluster reports it) says nothing of the resize asked since: the kubelet has not looked at it yet.
    gen = (pod.get("metadata") or {}).get("generation")
    conds = {c.get("type"): c for c in status.get("conditions") or []
             if gen is None or c.get("observedGeneration") is None or int(c["observedGeneration"]) >= int(gen)}
    pending = conds.get("PodResizePending")
    if pending is not None and pending.get("status", "True") == "True":
        reason = (pending.get("reason") or "").lower()
        state = "infeasible" if reason == "infeasible" else "deferred"
        return ResizeStatus(desired, allocated, actual, state, pending.get("message") or "")
    prog = conds.get("PodResizeInProgress")
    if prog is not None and prog.get("status", "True") == "True":
        return ResizeStatus(desired, allocated, actual, "in_progress", prog.get("message") or "")
    if desired is not None and actual is not None and desired != actual:
        return ResizeStatus(desired, allocated, actual, "pending")
    return ResizeStatus(desired, allocated, actual, "applied")


# -- metrics ---------------------------------------------------------------------------------------


class K8sMetrics:
    """Counters a caller can put in its `/metrics` (pass its registry). Names follow DESIGN §6."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.resizes = Counter(
            "sponge_k8s_resizes", "In-place pod resizes by outcome: requested (the API accepted the patch), "
            "rejected (the API refused it, e.g. a QoS change), error (no answer), then what the kubelet made of "
            "an accepted one: in_progress, deferred, infeasible, applied. A resize counts once in each state "
            "it was seen in (a deferred one that lands later also counts applied)", ["outcome"], registry=r)
        for outcome in OUTCOMES:  # every outcome shows in /metrics from the start, at 0
            self.resizes.labels(outcome)
        self.cpu = Gauge("sponge_k8s_pod_cpu_millicores", "CPU of a worker pod's container by source: desired "
                         "(spec), allocated (admitted by the kubelet), actual (in force)", ["pod", "source"],
                         registry=r)
        self.relists = Counter("sponge_k8s_pod_relists", "Full lists of the worker pods (at start, and after a "
                               "watch expired or broke)", registry=r)
        self.scale_requests = Counter("sponge_k8s_scale_requests", "Replica count changes sent to the "
                                      "deployment's scale subresource, by outcome (ok, error)", ["outcome"],
                                      registry=r)


# -- the actuator ----------------------------------------------------------------------------------


class KubernetesActuator:
    """CPU of one container of one pod, resized in place through `pods/{name}/resize`.

    Implements `sponge.scaling.base.CpuActuator`. Requests are set equal to limits so the QoS class
    never changes (a Guaranteed worker stays Guaranteed: its CPU weight follows its request, as the
    local `sponge-guaranteed` parent gives). The pod must already have cpu requests = limits.
    """

    kind = "kubernetes"
    granularity_m = 1

    def __init__(self, core: k8s_client.CoreV1Api, namespace: str, pod: str, container: str = "worker", *,
                 metrics: K8sMetrics | None = None, request_timeout_s: float = 10.0) -> None:
        self.core = core
        self.namespace = namespace
        self.pod = pod
        self.container = container
        self.metrics = metrics if metrics is not None else K8sMetrics()
        self.timeout = request_timeout_s
        self._lock = threading.Lock()
        self._wanted: int | None = None  # the last resize the API accepted
        self._seen: set[str] = set()  # states already counted for it
        self.last: ResizeStatus = self._check_shape(self._read())

    def _check_shape(self, pod: Obj) -> ResizeStatus:
        """Refuse a container whose cpu request differs from its limit: making them equal would change
        the QoS class, which the API refuses (and a request below the limit is not an allocation)."""
        c = next((c for c in pod["spec"]["containers"] if c["name"] == self.container), None)
        if c is None:
            raise ActuatorError(f"kubernetes: pod {self.pod!r} has no container {self.container!r}")
        res = c.get("resources") or {}
        req, lim = cpu_m_of((res.get("requests") or {}).get("cpu")), cpu_m_of((res.get("limits") or {}).get("cpu"))
        if lim is None or req != lim:
            raise ActuatorError(
                f"kubernetes: container {self.container!r} of pod {self.pod!r} must have cpu requests = limits "
                f"(has requests={req} m, limits={lim} m); see deploy/kubernetes/worker.yaml")
        return self._observe(pod)

    def _read(self) -> Obj:
        try:
            pod = self.core.read_namespaced_pod(self.pod, self.namespace, _request_timeout=self.timeout)
        except ApiException as e:
            raise ActuatorError(f"kubernetes: cannot read pod {self.namespace}/{self.pod}: {api_message(e)}") from e
        except Exception as e:  # urllib3 / socket errors: the API server is unreachable
            raise ActuatorError(f"kubernetes: cannot read pod {self.namespace}/{self.pod}: {e}") from e
        return self.core.api_client.sanitize_for_serialization(pod)

    def attach(self, pid: int) -> None:
        """Nothing to do: the pod is the unit, its processes are the kubelet's to place."""

    def apply(self, cpu_m: int) -> None:
        """Ask for `cpu_m` (requests = limits). Returns once the API accepted it; the kubelet applies it
        later (or defers, or finds it infeasible) — `current()` says what is in force.

        Raises ActuatorError when the API refuses (the Status message is kept) or cannot be reached."""
        if not isinstance(cpu_m, int) or isinstance(cpu_m, bool) or cpu_m <= 0:
            raise ValueError(f"cpu_m must be a positive integer of millicores, got {cpu_m!r}")
        q = cpu_quantity(cpu_m)
        body = {"spec": {"containers": [{"name": self.container,
                                         "resources": {"requests": {"cpu": q}, "limits": {"cpu": q}}}]}}
        try:
            pod = self.core.patch_namespaced_pod_resize(self.pod, self.namespace, body, _content_type=STRATEGIC,
                                                        _request_timeout=self.timeout)
        except ApiException as e:
            outcome = "rejected" if e.status and 400 <= e.status < 500 else "error"
            self.metrics.resizes.labels(outcome).inc()
            msg = api_message(e)
            log.warning("kubernetes: resize of %s/%s to %d m %s: %s", self.namespace, self.pod, cpu_m, outcome, msg)
            raise ActuatorError(f"kubernetes: resize of pod {self.namespace}/{self.pod} to {q} refused: {msg}") from e
        except Exception as e:
            self.metrics.resizes.labels("error").inc()
            raise ActuatorError(f"kubernetes: resize of pod {self.namespace}/{self.pod} failed: {e}") from e
        self.metrics.resizes.labels("requested").inc()
        with self._lock:
            self._wanted, self._seen = cpu_m, set()
        self._observe(self.core.api_client.sanitize_for_serialization(pod))

    def current(self) -> int:
        """The CPU in force (the container's quota the kubelet applied), read back from the pod's status.

        While a resize is pending, in progress, deferred or infeasible this is still the old allocation."""
        st = self.refresh()
        v = st.in_force_m
        if v is None:
            raise ActuatorError(f"kubernetes: pod {self.namespace}/{self.pod} reports no cpu for {self.container!r}")
        return v

    def refresh(self) -> ResizeStatus:
        """Read the pod once; count and log what the kubelet made of the last resize."""
        return self._observe(self._read())

    def wait(self, timeout_s: float = 10.0, poll_s: float = 0.05) -> ResizeStatus:
        """Poll until the last resize is applied or found infeasible, or `timeout_s` passes (for tests,
        tools, and callers that can afford to block; the controller does not wait)."""
        end = time.monotonic() + timeout_s
        while True:
            st = self.refresh()
            if st.state in ("applied", "infeasible") or time.monotonic() >= end:
                return st
            time.sleep(poll_s)

    def _observe(self, pod: Obj) -> ResizeStatus:
        st = resize_status(pod, self.container)
        m = self.metrics
        for source, v in (("desired", st.desired_m), ("allocated", st.allocated_m), ("actual", st.actual_m)):
            if v is not None:
                m.cpu.labels(self.pod, source).set(v)
        with self._lock:
            self.last = st
            mine = self._wanted is not None and st.desired_m == self._wanted
            new = mine and st.state != "pending" and st.state not in self._seen
            if new:
                self._seen.add(st.state)
        if new:
            m.resizes.labels(st.state).inc()
            if st.state in ("infeasible", "deferred"):
                log.warning("kubernetes: resize of %s/%s to %d m is %s (%s); %s m stays in force", self.namespace,
                            self.pod, st.desired_m, st.state, st.message, st.in_force_m)
            else:
                log.info("kubernetes: resize of %s/%s to %d m %s", self.namespace, self.pod, st.desired_m, st.state)
        return st

    def close(self) -> None:
        """Nothing to release: the pod keeps its last size (the API client belongs to the caller)."""

    def __repr__(self) -> str:
        return f"KubernetesActuator({self.namespace}/{self.pod}:{self.container})"


# -- horizontal scaling ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaCount:
    desired: int  # spec.replicas
    ready: int  # status.readyReplicas


class DeploymentScaler:
    """Replica count of the worker Deployment through its `scale` subresource.

    The ready count is read from the Deployment itself (`get deployments`): the Scale object reports
    only how many pods exist, and a pod still starting (cold start) serves nothing."""

    def __init__(self, apps: k8s_client.AppsV1Api, namespace: str, name: str, *,
                 metrics: K8sMetrics | None = None, request_timeout_s: float = 10.0) -> None:
        self.apps = apps
        self.namespace = namespace
        self.name = name
        self.metrics = metrics if metrics is not None else K8sMetrics()
        self.timeout = request_timeout_s

    def set_replicas(self, n: int) -> int:
        """Ask for `n` pods; returns the replica count the API stored."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"replicas must be a non-negative integer, got {n!r}")
        try:
            scale = self.apps.patch_namespaced_deployment_scale(self.name, self.namespace, {"spec": {"replicas": n}},
                                                                _content_type=MERGE, _request_timeout=self.timeout)
        except Exception as e:
            self.metrics.scale_requests.labels("error").inc()
            msg = api_message(e) if isinstance(e, ApiException) else str(e)
            raise ActuatorError(f"kubernetes: cannot scale deployment {self.namespace}/{self.name} to {n}: {msg}") from e
        self.metrics.scale_requests.labels("ok").inc()
        log.info("kubernetes: deployment %s/%s scaled to %d", self.namespace, self.name, n)
        return int(scale.spec.replicas)

    def replicas(self) -> ReplicaCount:
        """Desired and ready replicas, as the deployment controller counts them."""
        try:
            dep = self.apps.read_namespaced_deployment(self.name, self.namespace, _request_timeout=self.timeout)
        except Exception as e:
            msg = api_message(e) if isinstance(e, ApiException) else str(e)
            raise ActuatorError(f"kubernetes: cannot read deployment {self.namespace}/{self.name}: {msg}") from e
        return ReplicaCount(int(dep.spec.replicas or 0), int((dep.status and dep.status.ready_replicas) or 0))


# -- discovery of the worker pods ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPod:
    """What the front door needs to know of a worker pod."""

    name: str
    ip: str | None
    ready: bool
    terminating: bool
    labels: dict[str, str] = field(default_factory=dict)
    resource_version: str = ""

    @classmethod
    def of(cls, pod: Obj) -> "WorkerPod":
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        terminating = bool(meta.get("deletionTimestamp"))
        ready = not terminating and any(c.get("type") == "Ready" and c.get("status") == "True"
                                        for c in status.get("conditions") or [])
        return cls(meta["name"], status.get("podIP"), ready, terminating, dict(meta.get("labels") or {}),
                   str(meta.get("resourceVersion") or ""))


Callback = Callable[[WorkerPod], None]


class PodWatcher:
    """Keeps the set of worker pods (by label selector) current with a list, then a watch from its version.

    Callbacks run on the watcher's thread, in event order: `on_added` when a pod is first seen,
    `on_ready` when it becomes Ready, `on_unready` when it stops being Ready (e.g. terminating), and
    `on_deleted` when it is gone; `on_object(type, pod)` first sees every pod object listed or watched
    (e.g. to read a resize's progress from it without another request). A watch ends on its timeout (a new one starts from the last version),
    expires (410 Gone: the version was compacted) or breaks: then the pods are listed again and the
    differences delivered as callbacks, so nothing is missed. A callback that raises is logged, not fatal.
    """

    def __init__(self, core: k8s_client.CoreV1Api, namespace: str, selector: str, *,
                 on_added: Callback | None = None, on_ready: Callback | None = None,
                 on_unready: Callback | None = None, on_deleted: Callback | None = None,
                 on_object: Callable[[str, Obj], None] | None = None, metrics: K8sMetrics | None = None, watch_timeout_s: int = 300, backoff_s: float = 1.0,
                 request_timeout_s: float = 10.0) -> None:
        self.core = core
        self.namespace = namespace
        self.selector = selector
        self.callbacks = {"added": on_added, "ready": on_ready, "unready": on_unready, "deleted": on_deleted}
        self.on_object = on_object  # (event type, the pod as API JSON) for every pod listed or watched, first
        self.metrics = metrics if metrics is not None else K8sMetrics()
        self.watch_timeout_s = watch_timeout_s
        self.backoff_s = backoff_s
        self.timeout = request_timeout_s
        self._pods: dict[str, WorkerPod] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._watch: k8s_watch.Watch | None = None
        self._thread: threading.Thread | None = None

    def pods(self) -> dict[str, WorkerPod]:
        """A snapshot of the pods known now."""
        with self._lock:
            return dict(self._pods)

    def ready_pods(self) -> list[WorkerPod]:
        return [p for p in self.pods().values() if p.ready]

    def start(self) -> "PodWatcher":
        self._thread = threading.Thread(target=self.run, name=f"pod-watcher-{self.selector}", daemon=True)
        self._thread.start()
        return self

    def wait_synced(self, timeout_s: float = 10.0) -> bool:
        """True once the first list has been delivered."""
        return self._synced.wait(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def run(self) -> None:
        """List, then watch from the list's version; relist after an expiry or a failure. Until stop()."""
        while not self._stop.is_set():
            try:
                rv = self._relist()
                while not self._stop.is_set():
                    rv = self._watch_from(rv)
            except ApiException as e:
                if e.status == 410:
                    log.info("kubernetes: watch of pods %r expired (410 Gone); relisting", self.selector)
                    continue
                log.warning("kubernetes: watching pods %r failed: %s; relisting in %.1f s", self.selector,
                            api_message(e), self.backoff_s)
                self._stop.wait(self.backoff_s)
            except Exception as e:  # connection refused/reset, timeouts: the API server is away
                if self._stop.is_set():
                    return
                log.warning("kubernetes: watching pods %r broke: %s; relisting in %.1f s", self.selector, e,
                            self.backoff_s)
                self._stop.wait(self.backoff_s)

    def _relist(self) -> str:
        self.metrics.relists.inc()
        lst = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector,
                                            _request_timeout=self.timeout)
        raw = self.core.api_client.sanitize_for_serialization(lst)
        now = {p.name: p for p in map(WorkerPod.of, raw.get("items") or [])}
        with self._lock:
            gone = [p for n, p in self._pods.items() if n not in now]
        for p in gone:
            self._update("DELETED", p)
        for obj in raw.get("items") or []:
            self._object("MODIFIED", obj)
        for p in now.values():
            self._update("MODIFIED", p)
        self._synced.set()
        return str((raw.get("metadata") or {}).get("resourceVersion") or "")

    def _watch_from(self, rv: str) -> str:
        """One watch request; returns the last version seen (to resume from). 410 raises ApiException."""
        w = self._watch = k8s_watch.Watch()
        try:
            for ev in w.stream(self.core.list_namespaced_pod, self.namespace, label_selector=self.selector,
                               resource_version=rv, timeout_seconds=self.watch_timeout_s,
                               allow_watch_bookmarks=True, _request_timeout=(self.timeout, self.watch_timeout_s + 30)):
                obj = ev["raw_object"]
                rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    self._object(ev["type"], obj)
                    self._update(ev["type"], WorkerPod.of(obj))
                if self._stop.is_set():
                    break
        finally:
            self._watch = None
        return rv

    def _update(self, etype: str, pod: WorkerPod) -> None:
        with self._lock:
            old = self._pods.get(pod.name)
            if etype == "DELETED":
                self._pods.pop(pod.name, None)
            else:
                self._pods[pod.name] = pod
        if etype == "DELETED":
            if old is not None:
                if old.ready:
                    self._call("unready", pod)
                self._call("deleted", pod)
            return
        if old is None:
            self._call("added", pod)
        if pod.ready and not (old is not None and old.ready):
            self._call("ready", pod)
        elif not pod.ready and old is not None and old.ready:
            self._call("unready", pod)

    def _object(self, etype: str, obj: Obj) -> None:
        if self.on_object is None:
            return
        try:
            self.on_object(etype, obj)
        except Exception:
            log.exception("kubernetes: pod watcher callback on_object failed")

    def _call(self, which: str, pod: WorkerPod) -> None:
        cb = self.callbacks[which]
        if cb is None:
            return
        try:
            cb(pod)
        except Exception:
            log.exception("kubernetes: pod watcher callback on_%s(%s) failed", which, pod.name)


# -- configuration ------------------------------------------------------------------------------------


def api_client(context: str | None = None, config_file: str | None = None) -> k8s_client.ApiClient:
    """An API client: the pod's service account when running in a cluster and no context is named,
    else the kubeconfig (`config_file`, `$KUBECONFIG` or ~/.kube/config) at `context` (None: current)."""
    if context is None and config_file is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = k8s_client.Configuration()
        k8s_config.load_incluster_config(client_configuration=cfg)
        return k8s_client.ApiClient(cfg)
    # $KUBECONFIG as it is now (the client reads it once, at import)
    config_file = config_file or os.environ.get("KUBECONFIG") or None
    try:
        return k8s_config.new_client_from_config(config_file=config_file, context=context)
    except k8s_config.ConfigException as e:
        raise ActuatorError(f"kubernetes: no usable kubeconfig (context {context or 'current'}): {e}") from e


@dataclass
class KubernetesBackend:
    """The worker pods of one namespace and selector, reachable through one API client."""

    namespace: str
    selector: str
    api: k8s_client.ApiClient
    metrics: K8sMetrics

    @property
    def core(self) -> k8s_client.CoreV1Api:
        return k8s_client.CoreV1Api(self.api)

    @property
    def apps(self) -> k8s_client.AppsV1Api:
        return k8s_client.AppsV1Api(self.api)

    def actuator(self, pod: str, container: str = "worker") -> KubernetesActuator:
        return KubernetesActuator(self.core, self.namespace, pod, container, metrics=self.metrics)

    def scaler(self, deployment: str) -> DeploymentScaler:
        return DeploymentScaler(self.apps, self.namespace, deployment, metrics=self.metrics)

    def watcher(self, **callbacks: Any) -> PodWatcher:
        return PodWatcher(self.core, self.namespace, self.selector, metrics=self.metrics, **callbacks)

    def close(self) -> None:
        self.api.close()


def from_config(namespace: str, selector: str, context: str | None = None, *, config_file: str | None = None,
                registry: CollectorRegistry | None = None) -> KubernetesBackend:
    """What `sponge serve --backend kubernetes --namespace NS --selector SEL [--context C]` needs.

    `registry`: the server's metrics registry, so `sponge_k8s_*` appear in its `/metrics`."""
    if not namespace:
        raise ValueError("namespace must be given")
    if not selector:
        raise ValueError("a label selector must be given (e.g. app=sponge-worker): all pods would be workers")
    return KubernetesBackend(namespace, selector, api_client(context, config_file), K8sMetrics(registry))
