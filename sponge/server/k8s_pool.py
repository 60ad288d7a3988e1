"""`sponge serve --backend kubernetes`: the front door serves through the worker pods it discovers.

The cluster counterpart of `pool.py`. Every replica is a `sponge worker` pod reached over TCP
(`RemoteReplica`); the front door starts no process of its own. Three things tie it to the cluster, all
built on `sponge.scaling.kubernetes` (whose calls block: none of them runs on the event loop):

* discovery — a `PodWatcher` (its own thread) follows the pods of `--namespace` matching `--selector`.
  A pod that becomes Ready joins the core (`ServingCore.add_replica`: connect, warm up, then work); one
  that turns unready, terminating (deletionTimestamp) or is deleted is drained (`remove_replica`: the
  batch in flight is answered as usual — a worker drains its batches at SIGTERM — or, if the worker
  vanished, fails with a clear 500; never answered twice). The last serving replica is kept until
  another is ready (if its worker is gone it fails its batches and keeps reconnecting meanwhile). The
  watcher hops to the event loop with `loop.call_soon_threadsafe`.
* horizontal — `KubernetesPool.scale_to(n, cpu_m)` (what `LiveApplier` calls, as for `ReplicaPool`)
  patches the worker Deployment's scale subresource on a background thread; pods ordered and not yet
  Ready count as starting (`starting()`, the controller's `replicas_starting`) and get no work.
* vertical — each pod's `PodActuator` wraps a `KubernetesActuator`: `apply` hands the `pods/resize`
  PATCH to the pod's own background thread (the latest wish wins) and returns at once; `current` is the
  allocation the kubelet has put in force as last read (after each PATCH, and from the watcher's
  events). When a read shows a new allocation in force, the core's `cpu_m`, the bill and the metrics
  follow it (`ReplicaScaler.observed`): the controller plans with what is allocated, not with the wish —
  an Infeasible or Deferred resize leaves the old allocation in force (counted in `/metrics`,
  `sponge_k8s_resizes_total{outcome}`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from sponge.runtime.remote import RemoteReplica, WorkerUnreachable
from sponge.scaling.base import ActuatorError
from sponge.server.core import DRAINING, STARTING, ServingCore
from sponge.server.pool import warm_up
from sponge.server.scaler import ReplicaScaler

log = logging.getLogger("sponge.k8s_pool")

SCALE_ATTEMPTS = 3


class ConnectingReplica(RemoteReplica):
    """A RemoteReplica whose first start retries with backoff until the worker answers (a pod reported
    Ready may not accept connections from here at once); cancelled if the replica is removed meanwhile.
    Later starts (reconnects, from `restart`) are single attempts as usual."""

    _connected_once = False

    async def start(self) -> None:
        if self._connected_once:
            return await super().start()
        delay, attempt = self.backoff_initial_s, 0
        while True:
            try:
                await super().start()
                self._connected_once = True
                return
            except WorkerUnreachable as exc:
                attempt += 1
                if attempt == 1 or attempt % 10 == 0:
                    log.warning("%s (attempt %d; retrying)", exc, attempt)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(self.backoff_max_s, delay * 2)


class PodActuator:
    """The `CpuActuator` of one worker pod, never blocking its caller (the event loop).

    `apply(cpu_m)` records the wish and wakes the pod's resize thread, which sends the PATCH (only the
    latest wish, only if it differs from the last one sent) and reads the pod back; `current()` is the
    allocation in force as last read — after each PATCH, and from every pod object the watcher sees
    (`observe`). `on_change(cpu_m)` is called (on whichever thread read it) when that value changes."""

    kind = "kubernetes"
    granularity_m = 1

    def __init__(self, inner: Any, on_change: Callable[[int], None] | None = None) -> None:
        self.inner = inner  # a KubernetesActuator (blocking calls)
        self.on_change = on_change
        st = inner.last
        self._in_force: int = int(st.in_force_m or 0)
        self._sent: int | None = st.desired_m  # the last wish the API stored (the spec's at start)
        self._wish: int | None = None  # the wish the resize thread has not taken yet
        self._asked: int | None = None  # the latest wish (taken or not)
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._rv: int | None = None  # the newest pod version seen
        self._observing = threading.Lock()
        self.patches = 0  # PATCHes sent

    @property
    def pod(self) -> str:
        return str(self.inner.pod)

    def attach(self, pid: int) -> None:
        """Nothing to do: the pod is the unit."""

    def apply(self, cpu_m: int) -> None:
        if not isinstance(cpu_m, int) or isinstance(cpu_m, bool) or cpu_m <= 0:
            raise ValueError(f"cpu_m must be a positive integer of millicores, got {cpu_m!r}")
        with self._cv:
            if self._closed:
                return
            self._wish = self._asked = cpu_m
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"resize-{self.pod}", daemon=True)
                self._thread.start()
            self._cv.notify()

    def current(self) -> int:
        return self._in_force

    def wish(self) -> int | None:
        """The allocation last asked for (not necessarily in force)."""
        with self._cv:
            return self._asked if self._asked is not None else self._sent

    def observe(self, pod: dict[str, Any]) -> None:
        """A pod object read (the watcher's events, or the read after a PATCH): what is in force now. A read
        older than one already seen (its resourceVersion lower: a GET racing the watch) is not taken."""
        rv = _rv((pod.get("metadata") or {}).get("resourceVersion"))
        with self._observing:  # the watcher's thread and the resize thread
            if rv is not None and self._rv is not None and rv < self._rv:
                return
            if rv is not None:
                self._rv = rv
            self._note(self.inner._observe(pod).in_force_m)

    def _note(self, in_force: int | None) -> None:
        if in_force is None or in_force == self._in_force:
            return
        self._in_force = in_force
        if self.on_change is not None:
            self.on_change(in_force)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._wish is None and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                want, self._wish = self._wish, None
            if want == self._sent:
                continue
            try:
                self.inner.apply(want)  # counted (requested / rejected / error) and logged by the actuator
                self._sent = want
                self.patches += 1
                self.observe(self.inner._read())  # read back at once (the kubelet may be quick)
            except ActuatorError as exc:
                log.warning("%s", exc)
            except Exception:
                log.exception("kubernetes: resize of pod %s to %d m failed", self.pod, want)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def __repr__(self) -> str:
        return f"PodActuator({self.pod}: {self._in_force} m in force)"


def _rv(v: Any) -> int | None:
    """A resourceVersion as a number to order reads by (etcd's revision); None if it is not one (then every
    read is taken)."""
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


class FixedPodActuator:
    """A worker pod that cannot be resized in place (its cpu request differs from its limit, or it has
    none): its CPU is bookkeeping at the value it was found with; resizes are refused (logged once)."""

    kind = "kubernetes-fixed"
    granularity_m = 1

    def __init__(self, pod: str, cpu_m: int, why: str) -> None:
        self.pod, self._cpu_m, self.why = pod, cpu_m, why
        self._warned = False

    def attach(self, pid: int) -> None:
        pass

    def apply(self, cpu_m: int) -> None:
        if cpu_m != self._cpu_m and not self._warned:
            self._warned = True
            log.warning("kubernetes: pod %s is not resized (%s); it keeps %d m", self.pod, self.why, self._cpu_m)

    def current(self) -> int:
        return self._cpu_m

    def observe(self, pod: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class KubernetesPool:
    """The worker pods as the core's replicas, and the Deployment's replica count as the controller's."""

    def __init__(self, core: ServingCore, scaler: ReplicaScaler, backend: Any, *, deployment: str,
                 container: str = "worker", port: int = 9000, max_replicas: int = 1, min_replicas: int = 1,
                 cpu_m: int | None = None, replica_kw: dict[str, Any] | None = None) -> None:
        if not 1 <= min_replicas <= max_replicas:
            raise ValueError(f"need 1 <= min_replicas ({min_replicas}) <= max_replicas ({max_replicas})")
        self.core, self.scaler, self.backend = core, scaler, backend
        self.deployment, self.container, self.port = deployment, container, port
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.target_cpu_m = cpu_m  # the controller's CPU per replica: a discovered pod is resized to it
        self.replica_kw = dict(replica_kw or {})
        self.deployments = backend.scaler(deployment)
        self.watcher: Any = None
        self._desired: int | None = None  # the replica count last stored in the Deployment
        self._acts: dict[str, Any] = {}  # pod -> its actuator (read by the watcher thread)
        self._gone: set[str] = set()  # pods gone whose replica was the last serving one: removed later
        self._readd: dict[str, Any] = {}  # pods Ready again while their old replica was still stopping
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="k8s-scale")
        self._closed = False
        self.added = 0
        self.removed = 0
        prev = core.on_replica_ready

        def ready(replica: Any) -> None:
            if prev is not None:
                prev(replica)
            self._retry_gone()

        core.on_replica_ready = ready
        prev_gone = core.on_replica_gone

        def gone(replica: Any) -> None:
            if prev_gone is not None:
                prev_gone(replica)
            pod = self._readd.pop(replica.name, None)
            if pod is not None and not self._closed:  # its pod is Ready again: a fresh replica for it
                self._executor.submit(self._on_ready, pod)

        core.on_replica_gone = gone

    # ---- life cycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Read the Deployment's replica count and start watching the pods (both off the event loop).
        Never fatal: an unreachable API server is logged and the watcher keeps retrying."""
        self._loop = asyncio.get_running_loop()
        try:
            rc = await self._loop.run_in_executor(self._executor, self.deployments.replicas)
            self._desired = rc.desired
            log.info("kubernetes: deployment %s/%s has %d replica(s), %d ready", self.backend.namespace,
                     self.deployment, rc.desired, rc.ready)
        except ActuatorError as exc:
            log.warning("%s (the replica count is learned from the pods seen)", exc)
        self.watcher = self.backend.watcher(on_ready=self._on_ready, on_unready=self._on_gone,
                                            on_deleted=self._on_gone, on_object=self._on_object)
        self.watcher.start()

    async def close(self) -> None:
        self._closed = True
        loop = asyncio.get_running_loop()
        if self.watcher is not None:
            await loop.run_in_executor(None, self.watcher.stop, 3.0)
        for act in list(self._acts.values()):
            act.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        await loop.run_in_executor(None, self.backend.close)

    # ---- what the controller sees and orders -----------------------------------------------------
    def ordered(self) -> int:
        """Replicas that count for the controller: the Deployment's count (else the live pods seen)."""
        if self._desired is not None:
            return self._desired
        pods = self.watcher.pods().values() if self.watcher is not None else ()
        return sum(1 for p in pods if not p.terminating)

    def starting(self) -> int:
        """Ordered and not serving yet: pods not Ready (or not created yet), and Ready ones still connecting."""
        pods = [p for p in (self.watcher.pods().values() if self.watcher is not None else ()) if not p.terminating]
        not_ready = sum(1 for p in pods if not p.ready)
        missing = max(0, (self._desired or 0) - len(pods))
        return not_ready + missing + self.core.states()[STARTING]

    def scale_to(self, n: int, cpu_m: int) -> int:
        """Order `n` worker pods (clamped to [min, max]) at `cpu_m` each; returns the count ordered. The
        PATCH runs on a background thread; pods come and go through the watcher."""
        self.target_cpu_m = cpu_m
        n = min(max(n, self.min_replicas), self.max_replicas)
        if n != self._desired and not self._closed:
            self._desired = n
            self._executor.submit(self._set_replicas, n)
        return n

    def _set_replicas(self, n: int) -> None:
        for attempt in range(1, SCALE_ATTEMPTS + 1):
            try:
                self.deployments.set_replicas(n)
                return
            except ActuatorError as exc:
                log.warning("%s (attempt %d of %d)", exc, attempt, SCALE_ATTEMPTS)
                if attempt < SCALE_ATTEMPTS and not self._closed:
                    time.sleep(0.5 * attempt)
        self._on_loop(self._scale_failed, n)

    def _scale_failed(self, n: int) -> None:
        if self._desired == n:  # the next order of n is sent again
            self._desired = None

    # ---- the watcher's events (its thread) -------------------------------------------------------
    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or self._closed:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _on_ready(self, pod: Any) -> None:
        if self._closed:
            return
        if not pod.ip:
            log.warning("kubernetes: pod %s is Ready without an IP: not used", pod.name)
            return
        act: Any
        try:  # one blocking read: here, on the watcher's thread
            inner = self.backend.actuator(pod.name, self.container)
            act = PodActuator(inner, on_change=lambda v, name=pod.name: self._on_loop(self.scaler.observed, name, v))
        except ActuatorError as exc:
            cpu = self.target_cpu_m or self.scaler.min_cpu_m
            log.warning("%s: serving it at a fixed %d m (bookkeeping)", exc, cpu)
            act = FixedPodActuator(pod.name, cpu, str(exc))
        self._on_loop(self._add, pod, act)

    def _on_gone(self, pod: Any) -> None:
        self._on_loop(self._remove, pod.name)

    def _on_object(self, etype: str, obj: dict[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name")
        act = self._acts.get(name)
        if act is not None and etype != "DELETED":
            act.observe(obj)

    # ---- on the event loop -----------------------------------------------------------------------
    def _replica(self, name: str) -> Any:
        return next((r for r in self.core.replicas if r.name == name), None)

    def _add(self, pod: Any, act: Any) -> None:
        core, name = self.core, pod.name
        if self._closed or core.closing:
            act.close()
            return
        self._gone.discard(name)
        existing = self._replica(name)
        if existing is not None:  # Ready again before its drain ended: take it back (it is warm)
            act.close()
            if core.undrain(name):
                own = self.scaler.actuators.get(name)
                if own is not None:  # its events are followed again
                    self._acts[name] = own
                log.info("worker pod %s ready again: drain cancelled", name)
            elif core.state.get(name) == DRAINING:  # too late to take back: a new replica once it is gone
                self._readd[name] = pod
            return
        cpu = act.current() or self.target_cpu_m or self.scaler.min_cpu_m
        replica = ConnectingReplica(name, pod.ip, self.port, **self.replica_kw)
        self._acts[name] = act
        self.scaler.add(replica, act, cpu)
        core.add_replica(replica, cpu, warm_up)
        self.added += 1
        log.info("worker pod %s (%s:%d) discovered at %d m: connecting", name, pod.ip, self.port, cpu)
        want = self.target_cpu_m
        if want is not None:
            want = min(max(want, self.scaler.min_cpu_m), self.scaler.max_cpu_m)
            if want != cpu:  # the Deployment's template differs from the controller's allocation
                self.scaler.resize(name, want)

    def _remove(self, name: str) -> None:
        replica = self._replica(name)
        if replica is None or self.core.state.get(name) == DRAINING:
            self._acts.pop(name, None)
            return
        try:
            self.core.remove_replica(name)
        except ValueError:  # the last serving replica: kept until another is ready
            self._gone.add(name)
            log.warning("worker pod %s is going, but it is the last serving replica: kept until another is "
                        "ready", name)
            return
        except KeyError:
            return
        self._acts.pop(name, None)  # its actuator is closed when the replica is forgotten
        self.removed += 1
        log.info("worker pod %s going: its replica drains", name)

    def _retry_gone(self) -> None:
        for name in list(self._gone):
            self._gone.discard(name)
            self._remove(name)
