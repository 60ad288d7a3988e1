"""The serving core: admission into the EDF queue, one dispatch loop per replica, results routed
back to waiting requests. No HTTP here (the ASGI app in app.py is a thin layer on top)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from sponge.perf.samples import BatchSample
from sponge.runtime.replica import BatchParts, Replica, ReplicaDied, ReplicaError
from sponge.scheduling.admission import HOPELESS, AdmissionControl
from sponge.scheduling.batcher import Batcher, Dispatch, ExpiryPolicy
from sponge.scheduling.edf import EDFQueue, Entry, QueueFull
from sponge.scheduling.estimate import OnlineServiceEstimate
from sponge.server.metrics import Metrics
from sponge.server.slo import Budget

log = logging.getLogger("sponge.core")

MAX_BATCH_SAMPLES = 10_000  # served batches kept for the controller between two looks (bounded)

__all__ = ["ServingCore", "Pending", "Served", "DeadlineExpired", "ServerBusy", "InferenceFailed", "ShuttingDown",
           "QueueFull", "shape_key"]

STARTING, READY, DRAINING = "starting", "ready", "draining"
REPLICA_STATES = (STARTING, READY, DRAINING)
FINISH_FIRST_SLACK_MS = 0.5  # a busy replica must beat a free one by more than this to be waited for

STOP_KILL_AFTER_S = 3.0  # at shutdown, a replica not stopped this long after "stop" is SIGKILLed (its own
# stop() kills it after STOP_JOIN_S = 2 s already; this bounds the whole)


class DeadlineExpired(Exception):
    """The request cannot be answered within its budget (expiry policy `reject`)."""


class ServerBusy(Exception):
    """The queue is full; `retry_after_s` says when to try again."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InferenceFailed(Exception):
    """The replica failed on the batch or died with it in flight."""


class ShuttingDown(InferenceFailed):
    """The server is stopping: the request was queued or in flight and will not be served."""


def shape_key(inputs: dict[str, np.ndarray]) -> tuple:
    """Batch-compatibility class of a request: its inputs' dtypes and dims after the first. Requests
    share a batch only with equal keys (a model with a second variable dimension gets mixed widths)."""
    return tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))


@dataclass
class Served:
    outputs: dict[str, np.ndarray]
    batch_size: int  # images (first-axis rows) in the batch this request ran in, as l(b, c) counts
    queue_ms: float
    infer_ms: float
    cpu_m: int
    replica: str
    batch_requests: int = 1  # requests in that batch


@dataclass
class Pending:
    inputs: dict[str, np.ndarray]
    items: int  # first-axis size of this request's tensors
    budget: Budget
    arrival_ms: float
    future: asyncio.Future[Served] = field(repr=False)
    entry: Entry["Pending"] | None = field(default=None, repr=False)  # its place in the queue (for cancel)
    redispatched: int = 0  # times queued again after its remote worker was lost with it in flight


def _fail(pendings: list[Pending], exc: Exception) -> None:
    for p in pendings:
        if not p.future.done():
            p.future.set_exception(exc)


def monotonic_ms() -> float:
    return time.monotonic() * 1000.0


@dataclass
class RunningWork:
    """What a replica runs now (a served batch, or an idle probe's): for per-batch CPU sizing, which
    needs its images, its tightest deadline and how much of it is left. Progress is booked by the model:
    `done` is the fraction finished by `t_ms`, from when it runs at `cpu_m` (a resize re-books it)."""

    images: int
    deadline_ms: float  # absolute, its tightest member's (+inf: a probe, nothing to protect)
    cpu_m: int
    t_ms: float
    done: float = 0.0
    probe: bool = False

    def left(self, now_ms: float, latency_ms: float) -> float:
        """Fraction of the work still to do at now_ms, `latency_ms` being its whole latency at cpu_m."""
        if latency_ms <= 0.0:
            return 0.0
        return max(0.0, 1.0 - self.done - (now_ms - self.t_ms) / latency_ms)


class ServingCore:
    """Queue + batcher + replicas. `submit` admits a request; dispatch loops serve the queue."""

    def __init__(self, model_name: str, replicas: list[Replica], batch: int, queue_capacity: int,
                 expiry: ExpiryPolicy, max_wait_ms: float, metrics: Metrics, cpu_m: int,
                 clock: Callable[[], float] = monotonic_ms, replica_timeout_floor_ms: float = 2000.0,
                 replica_timeout_factor: float = 10.0, admission: bool = True,
                 max_cpu_m: int | None = None, admission_headroom: float = 1.5) -> None:
        self.model_name = model_name
        self.replica_timeout_floor_ms = replica_timeout_floor_ms
        self.replica_timeout_factor = replica_timeout_factor
        self.replicas = replicas
        self.metrics = metrics
        self.clock = clock
        self.queue: EDFQueue[Pending] = EDFQueue(queue_capacity)
        self.estimate = OnlineServiceEstimate(cpu_m=cpu_m)
        # "can it still make it" at the allocation in force, or, while CPU is sized per batch, at the one
        # the sizer can reach (`_expiry_ms`)
        self.batcher = Batcher(batch, self.estimate, expiry, max_wait_ms, expiry_estimate_ms=self._expiry_ms)
        self.cpu_m = {r.name: cpu_m for r in replicas}
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._dispatch: dict[str, asyncio.Task[None]] = {}  # each replica's dispatch loop
        self._overdue_at: dict[str, float] = {}  # replica -> when its batch in flight passes its watchdog
        self._closing = False
        self._close_task: asyncio.Future[None] | None = None
        # Admission by deadline (policy `reject` only: `serve_late` wants late answers rather than none).
        self.admission = AdmissionControl(admission_headroom) if admission else None
        self.max_cpu_m = max_cpu_m or cpu_m  # the largest allocation the controller can reach
        # l(images) in ms at max_cpu_m from the learned latency model, when the controller has a good one
        # (serve.py keeps it current); otherwise admission scales the online estimate.
        self.reachable_latency: Callable[[int], float] | None = None
        self.dispatch_overhead_ms = 0.0  # EWMA of a batch's wall time beyond the runtime's own (concat, IPC)
        self._busy_until: dict[str, float] = {}  # replica -> expected end of the batch it runs (ms)
        self._head_changed = asyncio.Event()  # re-arms the deadline timer
        self.arrivals = 0  # total admitted + refused, for the controller's rate observation
        self.recent_budgets: list[tuple[float, float]] = []  # (arrival, budget) ms since the controller looked
        self.recent_batches: list[BatchSample] = []  # batches served since the controller last looked
        # Per-batch CPU (sponge.server.per_batch.PerBatchSizer, installed by serve.py with one replica):
        # called with (now_ms, force) at every arrival, before a batch is formed, when it starts and ends,
        # and on the deadline timer's wakeups. `sizes_per_batch`: the policy sized the last call (the
        # allocation is the sizer's; expiry judges at the reachable allocation).
        self.batch_sizer: Callable[[float, bool], bool] | None = None
        self.sizes_per_batch = False
        # l(images, cpu_m) in ms from the learned latency model, when the controller runs on one (serve.py
        # keeps it current); else None and the online estimate (at the allocation in force) stands in
        self.latency_at: Callable[[int, int], float] | None = None
        self.running: dict[str, RunningWork] = {}  # replica -> the work it runs now
        self.probing: set[str] = set()  # replicas an idle probe holds (their dispatch loops wait)
        self.resizes: dict[str, int] = {r.name: 0 for r in replicas}  # resizes so far, per replica
        self.version = 0  # bumped whenever the queue or the running work changes (the sizer skips otherwise)
        self.arrival_times: deque[float] = deque()  # the last second's arrivals (kept while a sizer is set)
        # Replica lifecycle (add_replica / remove_replica): starting (cold start: no work), ready, draining
        # (finishes its batch in flight, takes no new one, then stops). `replicas` holds every live one.
        self.state: dict[str, str] = {r.name: READY for r in replicas}
        self._cold_starts: dict[str, asyncio.Task[None]] = {}
        self.cold_start_s: deque[float] = deque(maxlen=64)  # measured cold starts (process, model, warm-up)
        self.on_replica_gone: Callable[[Replica], None] | None = None  # removed/failed: release its actuator
        self.on_replica_ready: Callable[[Replica], None] | None = None
        self._spec: Replica | None = None  # a replica whose model metadata is known (kept once it is gone)
        self._restarting: dict[str, asyncio.Task[None]] = {}  # replica -> its reconnect/restart in progress
        metrics.configured_batch.labels(model_name).set(batch)
        self._count_states()

    # ---- admission -------------------------------------------------------------------------
    def submit(self, inputs: dict[str, np.ndarray], items: int, budget: Budget, arrival_ms: float) -> Pending:
        """Admit a request or raise DeadlineExpired / ServerBusy. The caller awaits `pending.future`."""
        self.arrivals += 1
        if self.batch_sizer is not None:
            self.arrival_times.append(self.clock())
        if self._closing:
            raise ServerBusy("server is shutting down", 1)
        if len(self.recent_budgets) < 100_000:  # bounded even if no controller drains it
            self.recent_budgets.append((arrival_ms, budget.budget_ms))
        now = self.clock()
        if self.batcher.expiry is ExpiryPolicy.REJECT:
            if self.admission is not None:
                self._admit(items, budget, now)
            elif budget.deadline_ms < now + self._expiry_ms(items):
                raise DeadlineExpired(
                    f"budget {budget.budget_ms:.1f} ms (slo {budget.slo_ms:.0f} - network {budget.network_ms:.0f}) "
                    f"cannot be met: an inference of {items} image(s) takes ~{self._expiry_ms(items):.1f} ms"
                )
        pending = Pending(inputs, items, budget, arrival_ms, asyncio.get_running_loop().create_future())
        try:
            pending.entry = self.queue.push(pending, budget.deadline_ms, arrival_ms, size=items,
                                            key=shape_key(inputs))
        except QueueFull as exc:
            self.metrics.refusals.labels(self.model_name, "queue_full").inc()
            per_image_ms = self.estimate(self.batcher.batch_size) / max(1, self.batcher.batch_size)
            drain_s = self.queue.images * per_image_ms / 1000.0 / max(1, len(self.replicas))
            raise ServerBusy(str(exc), max(1, math.ceil(drain_s))) from None
        if self.queue.peek() is pending.entry:
            self._head_changed.set()  # the deadline timer sleeps for the old head
        self.metrics.queue_length.labels(self.model_name).set(len(self.queue))
        self._wakeup.set()
        self.version += 1
        self.size_batch(now)  # an arrival: the CPU its deadline needs, at once (within one CFS period)
        return pending

    # ---- per-batch CPU ------------------------------------------------------------------------------
    def size_batch(self, now: float | None = None, force: bool = False) -> bool:
        """Ask the per-batch sizer (if any) for the CPU and batch cap the present work needs and apply
        them; True when the policy sized. Never raises: a failing sizer is logged and serving goes on."""
        sizer = self.batch_sizer
        if sizer is None or self._closing:
            return False
        try:
            return sizer(self.clock() if now is None else now, force)
        except Exception:
            log.exception("per-batch CPU sizing failed (the allocation stays as it is)")
            self.metrics.dispatch_errors.labels(self.model_name).inc()
            return False

    def _expiry_ms(self, images: int) -> float:
        """A request is hopeless if it misses even when served next alone: judged at the allocation in force,
        or, while CPU is sized per batch, at the largest the sizer reaches (it raises it for that request)."""
        return self.reachable_ms(images) if self.sizes_per_batch else self.estimate(images)

    def latency_ms(self, images: int, cpu_m: int) -> float:
        """l(images, cpu_m): the learned model's when the controller runs on one, else the online estimate
        (at the allocation in force, whatever cpu_m)."""
        if self.latency_at is not None:
            return float(self.latency_at(images, cpu_m))
        return self.estimate(images)

    def note_resize(self, name: str, cpu_m: int) -> None:
        """The replica's allocation changed (ReplicaScaler.resize): re-book the progress of its running work,
        and mark its batch as straddling a resize (no sample of l(b, c))."""
        self.resizes[name] = self.resizes.get(name, 0) + 1
        work = self.running.get(name)
        if work is not None and work.cpu_m != cpu_m:
            now = self.clock()
            work.done = 1.0 - work.left(now, self.latency_ms(work.images, work.cpu_m))
            work.t_ms, work.cpu_m = now, cpu_m

    def probe_started(self, name: str, images: int, cpu_m: int) -> None:
        """An idle probe holds the replica (IdleProber): its dispatch loop waits until `probe_ended`; the
        probe is the work in flight (nothing to protect) for admission and per-batch sizing."""
        now = self.clock()
        self.probing.add(name)
        self.running[name] = RunningWork(images, math.inf, cpu_m, now, probe=True)
        self._busy_until[name] = now + self.latency_ms(images, cpu_m)
        self._overdue_at[name] = now + self.watchdog_ms(images, cpu_m)  # a hung probe is a hung replica
        self.version += 1

    def probe_ended(self, name: str) -> None:
        """The probe is over (its allocation restored, or handed to the sizer): size for what is queued and
        let the dispatch loop serve it."""
        self.probing.discard(name)
        self._overdue_at.pop(name, None)
        work = self.running.get(name)
        if work is not None and work.probe:
            del self.running[name]
        now = self.clock()
        self._busy_until[name] = now
        self.version += 1
        self._wakeup.set()
        self.size_batch(now)

    def reachable_ms(self, images: int) -> float:
        """A batch's expected wall time at the allocation the controller can reach (`max_cpu_m`): the learned
        model's when there is one, else the online estimate scaled from the current allocation (a batch runs
        at most c_max/c faster: a lower bound); 0 while nothing was measured. Plus the dispatch overhead."""
        if self.reachable_latency is not None:
            base = float(self.reachable_latency(images))
        else:
            base = self.estimate(images)
            if base <= 0.0:
                return 0.0
            cur = max(self.cpu_m.values(), default=self.max_cpu_m)
            if cur < self.max_cpu_m:
                base *= cur / self.max_cpu_m
        return base + self.dispatch_overhead_ms

    def _free_at(self, now: float) -> list[float]:
        """When each replica that can serve frees (now when idle); every replica at now if none is ready."""
        free = [max(now, self._busy_until.get(r.name, now)) for r in self.serving()]
        return free or [now] * max(1, len(self.replicas))

    def _admit(self, items: int, budget: Budget, now: float) -> None:
        """Refuse at once (ServerBusy 503 / DeadlineExpired 504) a request that would not finish by its
        deadline behind the work already admitted (scheduling/admission.py has the rule)."""
        assert self.admission is not None
        v = self.admission.check(now, budget.deadline_ms, items, self.queue.deadlines_sizes(), self._free_at(now),
                                 self.batcher.batch_size, self.reachable_ms)
        if v.admit:
            return
        if v.status == HOPELESS:
            self.metrics.refusals.labels(self.model_name, "hopeless").inc()
            raise DeadlineExpired(f"budget {budget.budget_ms:.1f} ms (slo {budget.slo_ms:.0f} - network "
                                  f"{budget.network_ms:.0f}) cannot be met: {v.reason}")
        self.metrics.refusals.labels(self.model_name, "displaces" if v.displaced else "overloaded").inc()
        raise ServerBusy(v.reason, v.retry_after_s)

    def cancel(self, pending: Pending) -> bool:
        """Its client went away: drop a still-queued request (its future is cancelled). False when it is
        no longer queued (already in a batch, or answered)."""
        if pending.entry is None or not self.queue.remove(pending.entry):
            return False
        pending.future.cancel()
        self.version += 1
        self.metrics.queue_length.labels(self.model_name).set(len(self.queue))
        self._wakeup.set()  # the batcher may have been waiting on this request's slack
        return True

    def watchdog_ms(self, images: int, cpu_m: int | None = None) -> float:
        """How long a batch may run before its replica counts as hung: `replica_timeout_factor` times its
        expected latency, and at least the floor (meant for a whole core: scaled up below one)."""
        floor = self.replica_timeout_floor_ms * (max(1.0, 1000.0 / cpu_m) if cpu_m else 1.0)
        return max(floor, self.replica_timeout_factor * self.estimate(images))

    @property
    def closing(self) -> bool:
        """True once close() has begun: new requests are refused (ServerBusy "server is shutting down")."""
        return self._closing

    def can_serve(self) -> bool:
        """Readiness: some replica can take work — its process running, its dispatch loop alive, and no
        batch of its past the watchdog (hung: about to be killed). False once closing."""
        if self._closing:
            return False
        now = self.clock()
        for r in self.serving():
            task = self._dispatch.get(r.name)
            if r.ready and (task is None or not task.done()) and now <= self._overdue_at.get(r.name, math.inf):
                return True
        return False

    # ---- replicas come and go ------------------------------------------------------------------
    @property
    def spec_replica(self) -> Replica | None:
        """A replica whose model metadata is known (any: they serve one model), for validation; the last one
        known once every replica is gone (the model does not change); None while none was ever started
        (e.g. no worker discovered yet: the front door answers 503)."""
        if self._spec is None or self._spec not in self.replicas:
            self._spec = next((r for r in self.replicas if r.inputs), None) or self._spec
        return self._spec if self._spec is not None and self._spec.inputs else None

    def serving(self) -> list[Replica]:
        """Replicas that take new work: ready and not draining."""
        return [r for r in self.replicas if self.state.get(r.name) == READY and r.ready]

    def states(self) -> dict[str, int]:
        """How many replicas are starting, ready and draining."""
        counts = dict.fromkeys(REPLICA_STATES, 0)
        for r in self.replicas:
            counts[self.state.get(r.name, READY)] += 1
        return counts

    def _count_states(self) -> None:
        for st, n in self.states().items():
            self.metrics.replica_states.labels(st).set(n)

    def add_replica(self, replica: Replica, cpu_m: int, warm_up: Callable[[Replica], Any] | None = None) -> None:
        """Start a new replica while serving: it pays its cold start (process, model load, `warm_up`) and gets
        no work until it is ready; then it gets its own dispatch loop. A failed start is logged and the
        replica dropped (`on_replica_gone`): the controller asks again if it still wants it."""
        if self._closing:
            raise RuntimeError("server is shutting down")
        if any(r.name == replica.name for r in self.replicas):
            raise ValueError(f"a replica named {replica.name} exists")
        self.replicas.append(replica)
        self.state[replica.name] = STARTING
        self.cpu_m[replica.name] = cpu_m
        self.resizes.setdefault(replica.name, 0)
        self._count_states()
        task = asyncio.create_task(self._cold_start(replica, warm_up), name=f"cold-start-{replica.name}")
        self._cold_starts[replica.name] = task

    async def _cold_start(self, replica: Replica, warm_up: Callable[[Replica], Any] | None) -> None:
        t0 = time.monotonic()
        try:
            await replica.start()
            if warm_up is not None:
                await warm_up(replica)
        except asyncio.CancelledError:  # removed while starting (or shutdown): no orphan process
            await self._stop_replica(replica)
            self._forget(replica)
            raise
        except Exception:
            log.exception("replica %s failed to start: dropped", replica.name)
            self.metrics.replica_start_failures.inc()
            await self._stop_replica(replica)
            self._forget(replica)
            return
        finally:
            self._cold_starts.pop(replica.name, None)
        took = time.monotonic() - t0
        self.cold_start_s.append(took)
        self.metrics.cold_start.observe(took)
        if self.state.get(replica.name) != STARTING or self._closing:  # removed meanwhile: drain (nothing to)
            await self._stop_replica(replica)
            self._forget(replica)
            return
        self.state[replica.name] = READY
        self._count_states()
        log.info("replica %s ready after a cold start of %.2f s", replica.name, took)
        if self.on_replica_ready is not None:
            self.on_replica_ready(replica)
        self._start_dispatch(replica)
        self.version += 1
        self._wakeup.set()

    def remove_replica(self, name: str) -> None:
        """Take a replica out while serving: a starting one is cancelled (its process stopped); a ready one
        drains — it finishes the batch in flight (answered as usual), takes no new work, then stops. Nothing
        queued is lost: the queue is shared, the other replicas serve it. The last serving replica is kept."""
        replica = next((r for r in self.replicas if r.name == name), None)
        if replica is None:
            raise KeyError(f"no replica named '{name}'")
        st = self.state.get(name)
        if st == DRAINING:
            return
        if st == READY and len(self.serving()) <= 1 and replica in self.serving():
            raise ValueError("the last serving replica cannot be removed")
        self.state[name] = DRAINING
        self._count_states()
        cold = self._cold_starts.get(name)
        if cold is not None:
            cold.cancel()
            return
        restarting = self._restarting.get(name)
        if restarting is not None:  # e.g. reconnecting to a worker that is gone: no batch in flight, stop now
            restarting.cancel()
        self.version += 1
        self._wakeup.set()  # its dispatch loop sees the drain at once when idle

    def undrain(self, name: str) -> bool:
        """Take back a draining replica whose dispatch loop still runs (its batch in flight): it is warm, so
        scaling out again uses it before starting a new one. False when it is not draining or already done."""
        task = self._dispatch.get(name)
        if self.state.get(name) != DRAINING or task is None or task.done():
            return False
        self.state[name] = READY
        self._count_states()
        self.version += 1
        self._wakeup.set()
        return True

    async def _retire(self, replica: Replica) -> None:
        """After its dispatch loop ended on a drain: stop the process, forget the replica."""
        await self._stop_replica(replica)
        self._forget(replica)
        log.info("replica %s removed (drained)", replica.name)

    def _forget(self, replica: Replica) -> None:
        if replica in self.replicas:
            self.replicas.remove(replica)
        for d in (self.state, self.cpu_m, self._busy_until, self._overdue_at, self.running, self._dispatch):
            d.pop(replica.name, None)
        self.probing.discard(replica.name)
        self._count_states()
        self.version += 1
        if self.on_replica_gone is not None:
            try:
                self.on_replica_gone(replica)
            except Exception:
                log.exception("releasing replica %s failed", replica.name)

    def _finishes_first_elsewhere(self, replica: Replica, now: float) -> float | None:
        """The dispatcher sends a batch to the replica that finishes it first (by the latency model and each
        replica's allocation): when a busy replica with more CPU, freeing soon, would still finish the batch
        at the queue's head before this free one, this one leaves it (the queue holding no more than the
        batches those replicas will take). Returns when to look again (the other's expected free time), or
        None to serve now. Only a replica expected to free in the future counts: one past its expected end
        has an unknown end, and waiting on it could wait forever."""
        others = [r for r in self.serving() if r is not replica]
        if not others:
            return None
        images = min(self.queue.images, self.batcher.batch_size)
        if images <= 0:
            return None
        mine = now + self.latency_ms(images, self.cpu_m[replica.name])
        better = [(self._busy_until[r.name], r) for r in others
                  if self._busy_until.get(r.name, now) > now
                  and self._busy_until[r.name] + self.latency_ms(images, self.cpu_m[r.name]) + FINISH_FIRST_SLACK_MS
                  < mine]
        if not better or self.queue.images > len(better) * self.batcher.batch_size:
            return None
        return min(t for t, _ in better)

    # ---- dispatch ---------------------------------------------------------------------------
    def start(self) -> None:
        self._count_states()  # the first replicas started (lifespan): the gauges say so
        for r in self.replicas:
            self._start_dispatch(r)
        self._tasks.append(asyncio.create_task(self._deadline_timer(), name="deadline-timer"))

    def _start_dispatch(self, replica: Replica) -> None:
        replica.on_death = lambda _r: self._wakeup.set()
        task = asyncio.create_task(self._serve(replica), name=f"dispatch-{replica.name}")
        self._dispatch[replica.name] = task
        self._tasks = [t for t in self._tasks if not t.done()]  # bounded: replicas come and go
        self._tasks.append(task)

    async def close(self) -> None:
        """Stop serving, bounded in time: refuse new requests, answer the queue and the batches in flight
        ("server is shutting down"), stop every replica at once (SIGKILL within STOP_KILL_AFTER_S; one
        still running a batch nobody waits for is killed at once). Idempotent: later calls wait for the
        first."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        self._closing = True
        self._wakeup.set()
        cold = list(self._cold_starts.values())
        for t in [*self._tasks, *cold]:
            t.cancel()
        await asyncio.gather(*self._tasks, *cold, return_exceptions=True)
        while self.queue:
            e = self.queue.pop()
            if not e.payload.future.done():
                e.payload.future.set_exception(ShuttingDown("server is shutting down"))
        self.metrics.queue_length.labels(self.model_name).set(0)
        await asyncio.gather(*(self._stop_replica(r) for r in list(self.replicas)))

    async def _stop_replica(self, replica: Replica) -> None:
        try:
            if replica.busy:  # its batch was answered "shutting down": nobody waits for the result
                replica.kill()
            await asyncio.wait_for(replica.stop(), STOP_KILL_AFTER_S)
        except TimeoutError:
            log.warning("replica %s did not stop within %.0f s: killing it", replica.name, STOP_KILL_AFTER_S)
            replica.kill()
        except Exception:
            log.exception("stopping replica %s failed", replica.name)

    def set_batch(self, b: int) -> None:
        self.batcher.batch_size = b
        self.metrics.configured_batch.labels(self.model_name).set(b)
        self._wakeup.set()

    def _expire(self, entry: Entry[Pending], now: float) -> None:
        p = entry.payload
        if not p.future.done():
            self.metrics.queue_expired.labels(self.model_name).inc()
            p.future.set_exception(DeadlineExpired(
                f"deadline passed in the queue: waited {now - p.arrival_ms:.1f} ms of a "
                f"{p.budget.budget_ms:.1f} ms budget"))

    async def _serve(self, replica: Replica) -> None:
        """The replica's dispatch loop. Nothing but shutdown ends it: an unexpected error while forming or
        running a batch fails that batch's requests (in `_execute`) or is logged and counted here. A drain
        (remove_replica) ends it between two batches; the replica is then stopped and forgotten."""
        while not self._closing and self.state.get(replica.name) != DRAINING:
            try:
                await self._serve_once(replica)
            except Exception:
                log.exception("dispatch loop of replica %s: unexpected error (the loop goes on)", replica.name)
                self.metrics.dispatch_errors.labels(self.model_name).inc()
                await asyncio.sleep(0.01)  # never a hot loop if the error repeats
        if not self._closing and self.state.get(replica.name) == DRAINING:
            await self._retire(replica)

    async def _serve_once(self, replica: Replica) -> None:
        if not replica.ready:
            await self._restart(replica)
            return
        if replica.name in self.probing:  # an idle probe holds it: served right after (probe_ended wakes us)
            overdue = self._overdue_at.get(replica.name, math.inf)
            if self.clock() > overdue:  # the probe hangs, so does the replica: as for a batch, kill it (the
                # probe fails and ends; this loop then restarts the replica)
                log.error("replica %s (pid %s) did not finish an idle probe in time: killing it", replica.name,
                          replica.pid)
                self._overdue_at.pop(replica.name, None)
                replica.kill()
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), 0.05)
            except TimeoutError:
                pass
            return
        now = self.clock()
        if self.queue and len(self.replicas) > 1:
            until = self._finishes_first_elsewhere(replica, now)
            if until is not None:  # a faster replica, freeing soon, takes the head batch
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), max(0.0, (until - now) / 1000.0) + 0.001)
                except TimeoutError:
                    pass
                return
        if self.queue:
            self.size_batch(now)  # before the batch is formed: its cap and its CPU
        action = self.batcher.next_action(self.queue, now)
        if action.expired or isinstance(action.step, Dispatch):
            self.version += 1
        for e in action.expired:
            self._expire(e, now)
        if isinstance(action.step, Dispatch):
            self.metrics.queue_length.labels(self.model_name).set(len(self.queue))
            await self._execute(replica, action.step.entries)
            return
        self._wakeup.clear()
        timeout = None if action.step.until_ms is None else max(0.0, (action.step.until_ms - now) / 1000.0)
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            pass

    async def _deadline_timer(self) -> None:
        """Answers queued requests (504) as soon as their deadline can no longer be met even if served
        next — deadline minus one inference — while every replica is busy (a free one's dispatch loop does
        the same). Sleeps until the head's moment; woken early when a new request becomes the head."""
        while not self._closing:
            try:
                delay = self._expire_due()
            except Exception:  # never let the timer die: log, retry soon
                log.exception("deadline timer: unexpected error (it goes on)")
                delay = 0.1
            try:
                async with asyncio.timeout(delay):
                    await self._head_changed.wait()
            except TimeoutError:
                pass

    def _expire_due(self) -> float | None:
        """Expire the hopeless head(s); seconds until the next head's moment (None: queue empty)."""
        now = self.clock()
        expired = self.batcher.expire(self.queue, now)
        for e in expired:
            self._expire(e, now)
        if expired:
            self.version += 1
            self.metrics.queue_length.labels(self.model_name).set(len(self.queue))
            self._wakeup.set()  # a dispatch loop may be waiting on the expired head's slack
        self.size_batch(now)  # skipped by the sizer when nothing changed
        head = self.queue.peek()
        self._head_changed.clear()
        # at least 1 ms: at the exact moment the head is not yet expired (strict inequality)
        return None if head is None else max(0.001, (head.deadline_ms - self._expiry_ms(head.size) - now) / 1000.0)

    async def _restart(self, replica: Replica) -> None:
        """Restart (a local process) or reconnect (a remote worker, with backoff until it answers). A drain
        (remove_replica) cancels it: a replica being removed is not waited for."""
        self.metrics.replica_restarts.labels(replica.name).inc()
        task = asyncio.ensure_future(replica.restart())
        self._restarting[replica.name] = task
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:  # shutdown: the restart goes too (no orphan process)
            task.cancel()
            await asyncio.wait({task}, timeout=STOP_KILL_AFTER_S)
            raise
        finally:
            if self._restarting.get(replica.name) is task:
                del self._restarting[replica.name]
        if task.cancelled():  # drained meanwhile: the dispatch loop ends and retires the replica
            return
        if task.exception() is not None:  # keep trying: the queue must not be stranded
            exc = task.exception()
            log.error("replica %s failed to restart (%s: %s); retrying in 1 s", replica.name, type(exc).__name__, exc)
            await asyncio.sleep(1.0)

    async def _execute(self, replica: Replica, entries: list[Entry[Pending]]) -> None:
        pendings = [e.payload for e in entries]
        try:
            await self._run_batch(replica, pendings)
        except Exception as exc:  # a bug or a batch the runtime's plumbing cannot take: fail it, go on
            log.exception("batch of %d request(s) on replica %s failed in dispatch", len(pendings), replica.name)
            self.metrics.dispatch_errors.labels(self.model_name).inc()
            _fail(pendings, InferenceFailed(f"internal error in dispatch: {type(exc).__name__}: {exc}"))
        finally:
            if self.running.pop(replica.name, None) is not None:
                self.version += 1
        self.size_batch()  # the batch ended: the CPU the queue needs now (the idle minimum if none)

    async def _run_batch(self, replica: Replica, pendings: list[Pending]) -> None:
        start = self.clock()
        n_images = sum(p.items for p in pendings)
        self.running[replica.name] = RunningWork(n_images, min(p.budget.deadline_ms for p in pendings),
                                                 self.cpu_m[replica.name], start)
        self.version += 1
        self.size_batch(start)  # it starts: more CPU if the work queued behind it needs it (before it is sent)
        cpu_m = self.cpu_m[replica.name]  # the allocation the batch starts on (its BatchSample's c)
        resizes = self.resizes.get(replica.name, 0)
        # several requests: joined by the replica straight into its shared memory (one copy each)
        inputs = pendings[0].inputs if len(pendings) == 1 else BatchParts([p.inputs for p in pendings])
        timeout_ms = self.watchdog_ms(sum(p.items for p in pendings), self.cpu_m[replica.name])
        self._overdue_at[replica.name] = start + timeout_ms
        expected_ms = self.latency_ms(n_images, cpu_m) + self.dispatch_overhead_ms
        self._busy_until[replica.name] = start + expected_ms  # for admission: when this replica frees
        try:
            async with asyncio.timeout(timeout_ms / 1000.0):  # no extra task per batch (unlike wait_for)
                result = await replica.infer(inputs)
        except ReplicaDied as exc:
            if replica.pid is None:  # a remote worker lost (connection, host, pod): the batch may go elsewhere
                self._redispatch(pendings, exc)
            else:  # a local process died on it: the batch may be what killed it; not tried again
                _fail(pendings, InferenceFailed(str(exc)))
            return
        except ReplicaError as exc:
            _fail(pendings, InferenceFailed(str(exc)))
            return
        except TimeoutError:  # hung (stopped, deadlocked): kill it, the dispatch loop restarts it; the
            # stall is not observed, so it does not poison the latency estimate
            log.error("replica %s (pid %s) did not answer within %.0f ms: killing it", replica.name,
                      replica.pid, timeout_ms)
            replica.kill()
            _fail(pendings, InferenceFailed(f"replica {replica.name} timed out after {timeout_ms:.0f} ms"))
            return
        except asyncio.CancelledError:  # close() cancels the dispatch loops: answer the batch in flight
            _fail(pendings, ShuttingDown("server is shutting down") if self._closing
                  else InferenceFailed("dispatch cancelled"))
            raise
        finally:
            self._overdue_at.pop(replica.name, None)
        images = sum(p.items for p in pendings)
        end = self.clock()
        self._busy_until[replica.name] = end
        self.dispatch_overhead_ms += 0.2 * (max(0.0, end - start - result.infer_ms) - self.dispatch_overhead_ms)
        believed = self.estimate.observe(images, result.infer_ms)
        self.metrics.batch_size.labels(self.model_name).observe(images)
        self.metrics.batch_requests.labels(self.model_name).observe(len(pendings))
        self.metrics.batch_latency.labels(self.model_name).observe(result.infer_ms / 1000.0)
        if not believed:  # a stall (e.g. the replica was stopped for a while): neither estimate nor learner
            self.metrics.stalls.labels(self.model_name).inc()
            log.warning("replica %s: a batch of %d image(s) took %.0f ms, far beyond the estimate (%.1f ms): "
                        "treated as a stall, not learned", replica.name, images, result.infer_ms,
                        self.estimate(images))
        elif self.cpu_m[replica.name] == cpu_m and self.resizes.get(replica.name, 0) == resizes:
            self.record_batch(BatchSample(images, cpu_m, float(result.infer_ms), self.clock()))
        else:  # a batch that straddled a resize measured two allocations: no sample of l(b, c)
            self.metrics.straddled.labels(self.model_name).inc()
        offset = 0
        for p in pendings:
            part = {k: v[offset: offset + p.items] for k, v in result.outputs.items()}
            offset += p.items
            if not p.future.done():
                p.future.set_result(Served(part, images, start - p.arrival_ms, result.infer_ms,
                                           self.cpu_m[replica.name], replica.name, len(pendings)))

    def _redispatch(self, pendings: list[Pending], exc: Exception) -> None:
        """Queue again (once each, in EDF order as before) the requests of a batch whose remote worker was lost
        with it in flight: inference has no side effects, and the lost connection can deliver no late answer
        (RemoteReplica), so each is still answered exactly once. One already re-dispatched, whose deadline has
        passed, or that no longer fits the queue fails as before (500)."""
        now = self.clock()
        again = 0
        for p in pendings:
            if p.future.done():
                continue
            if p.redispatched >= 1 or p.budget.deadline_ms <= now or self._closing:
                p.future.set_exception(InferenceFailed(str(exc)))
                continue
            try:
                p.entry = self.queue.push(p, p.budget.deadline_ms, p.arrival_ms, size=p.items, key=shape_key(p.inputs))
            except QueueFull:
                p.future.set_exception(InferenceFailed(str(exc)))
                continue
            p.redispatched += 1
            again += 1
        if again:
            log.warning("%s: %d request(s) of its batch queued again for another replica", exc, again)
            self.metrics.redispatched.labels(self.model_name).inc(again)
            self.metrics.queue_length.labels(self.model_name).set(len(self.queue))
            self._head_changed.set()
            self.version += 1
            self._wakeup.set()

    def record_batch(self, sample: BatchSample) -> None:
        """Keep a served batch (or a probe's) for the controller's next observation (bounded: the oldest
        go first when nobody drains them)."""
        if len(self.recent_batches) >= MAX_BATCH_SAMPLES:
            del self.recent_batches[: len(self.recent_batches) - MAX_BATCH_SAMPLES + 1]
        self.recent_batches.append(sample)
