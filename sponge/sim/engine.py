"""Trace-driven discrete-event simulator of one Sponge deployment (DESIGN §2: `sim/`).

What is real and what is modelled:
  * real: the EDF queue (`sponge.scheduling.edf.EDFQueue`), the batcher with its expiry policy
    (`sponge.scheduling.batcher.Batcher`), the policy objects (`sponge.policy`, called through the same
    `Observation`/`Decision` types as the live controller) and the request plan
    (`sponge.workload.generate_requests`, the load generator's own function);
  * modelled: a batch of b images on c millicores takes `LatencyModel.latency_ms(b, c)` ms, times an optional
    seeded lognormal factor of mean 1; an in-place resize takes effect `resize_delay_ms` after the
    decision and re-times the running batch (the work left runs at the new speed); a new replica serves
    only after `cold_start_ms`; a removed replica finishes its running batch first.

Semantics, mirrored from `sponge.server.core.ServingCore`:
  * admission: with expiry `reject`, a request of n images whose deadline is earlier than now + l(n, c) is
    answered at once with a deadline error (outcome `expired`); a full queue refuses it (`rejected`);
  * a free replica asks the batcher for its next action (expired entries are answered at once; a
    dispatch takes up to b images from the head, never splitting a request; a wait is bounded by the
    head's slack and `max_wait_ms`);
  * every request arrives at its send time (the load generator reports the network delay, it does not
    incur it) and its deadline is send + budget; it is `ok` iff server time <= budget.

Time ties: an arrival at the same instant as an event is processed first; events at the same instant run
in the order they were scheduled. Everything is deterministic under `SimConfig.seed` (which only drives
the service-time noise; the request plan has its own seed).

Cost: core-seconds = integral over [0, end] of the CPU allocated to every replica that exists (starting,
serving or draining), exactly (not sampled). The front door's own CPU (HTTP parsing, decoding, queue,
controller: the live server process, not its replicas) is modelled apart as `front_door_cpu_ms` of CPU per
arriving request (refused ones too: they were parsed), reported as `front_door_core_seconds` and in the
timeline's `front_door_cpu_m`, never inside `core_seconds` (`core_seconds_with_front_door` has both).
The timeline's `total_cpu_m` is each interval's mean allocation, rounded (the live decision log bills the
same quantity); its `cpu_m`, `replicas`, `batch` and `feasible` are those in force at the interval's end,
before the controller's decision at that instant.

The policy's Observation is built by `sponge.observe.ObservationBuilder`, the live controller's own
builder, fed what the simulated server measured (budgets stamped with their arrival times, cumulative
usage and allocation, the batches served with their simulated latencies).
"""

from __future__ import annotations

import heapq
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sponge.observe import BUDGET_WINDOW_MS, MAX_BUDGETS, RATE_HISTORY, ObservationBuilder
from sponge.perf.latency_model import LatencyModel
from sponge.perf.samples import BatchSample
from sponge.policy.batch_cpu import DEFAULT_MAX_QUEUED
from sponge.policy.types import Decision, Observation, Policy, QueueView, RunningBatch
from sponge.report.results import RequestRecord, TimelineRecord, write_run
from sponge.scheduling.batcher import DEFAULT_MAX_WAIT_MS, Batcher, Dispatch, ExpiryPolicy
from sponge.scheduling.edf import EDFQueue, QueueFull
from sponge.sim.inputs import RequestSet

# outcome codes (0 = not ended yet)
PENDING, OK, LATE, EXPIRED, REJECTED, ERROR = range(6)
OUTCOME_NAMES = ("pending", "ok", "late", "expired", "rejected", "error")

# event kinds
_COMPLETE, _TICK, _RESIZE, _READY, _WAKE = range(5)

RESIZE_DELAY_MS = 15.0  # SimConfig.resize_delay_ms default (see there)
NODE_CPU_M = 16_000  # SimConfig: a node's CPU when only `nodes` is given (the paper's 16-core node)
# SimConfig.front_door_cpu_ms default: the server process's CPU per request, bench/overhead.py's
# `front_door_cpu_ms` for the default model's binary requests at concurrency 16 (what `sponge load` sends):
# 0.70-0.83 ms on the 2-core host (2026-12-02). A request served alone costs more (concurrency 1: ~1.1 ms),
# JSON images ~3.3-4 ms; and the live front door also spends ~2 m idle (static; ~20 m with sponge's idle
# prober), which this per-request model leaves out.
FRONT_DOOR_CPU_MS = 0.8
DECISION_MS = 2.0  # SimConfig.decision_ms default: a per-batch CPU call (bench/decision_time.py: p50 50-80 us, 0.8-1.6 ms when even the top allocation falls short)


class ConservationError(AssertionError):
    """A request ended twice (or never): a simulator bug, never a property of the workload."""


@dataclass(frozen=True)
class SimConfig:
    """Everything about the simulated deployment that is not the workload, the model or the policy."""

    interval_ms: float = 1000.0  # controller period
    # decision -> new CPU in force (in-place resize of a local cgroup: bench/resize.py measured in effect
    # p99 5 ms and the runtime's threads following p99 13 ms; --resize-delay-ms 1000 for a slower actuator)
    resize_delay_ms: float = RESIZE_DELAY_MS
    # per-batch CPU (a policy's batch_cpu_m, at every arrival, batch start and end, one replica): each
    # call costs decision_ms before its resize is even issued (bench/decision_time.py measures it)
    per_batch: bool = True
    decision_ms: float = DECISION_MS
    cold_start_ms: float = 7000.0  # new replica -> ready
    # CPU ms the front door spends per arriving request (FRONT_DOOR_CPU_MS): billed apart from the replicas
    front_door_cpu_ms: float = FRONT_DOOR_CPU_MS
    noise_sigma: float = 0.0  # lognormal sigma of the service-time factor (mean 1); 0 = exact model
    expiry: str = "reject"  # ExpiryPolicy value: reject | serve_late
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS  # batcher: longest wait for a fuller batch (as the live server's)
    queue_capacity: int = 100_000
    # Observation.budgets_ms (sponge.observe.ObservationBuilder, as live): budgets of the requests that
    # arrived in (now - budget_window_ms - interval, now], at most max_budgets, the newest
    budget_window_ms: float = BUDGET_WINDOW_MS
    max_budgets: int = MAX_BUDGETS
    history_len: int = RATE_HISTORY  # Observation.rate_history_rps: this many intervals, oldest first
    initial_cpu_m: int = 1000
    initial_batch: int = 1
    initial_replicas: int = 1
    max_replicas: int = 256  # a decision asking for more is clamped (protects the simulator, not a policy)
    resize_running: bool = True  # a resize re-times the running batch (cgroup quotas apply at once)
    max_drain_ms: float = 600_000.0  # after the trace: give up on requests still unanswered after this
    seed: int = 0  # service-time noise
    keep_explanations: bool = True  # store every decision's explanation (decisions.jsonl)
    # Nodes (None, None: no node model, today's behaviour). node_cpu_m caps CPU per replica (a replica never
    # exceeds its node) and replicas are packed on nodes; nodes=None means as many nodes as replicas need.
    # With `nodes` a new replica that fits on no node is refused (counted in meta["nodes"], the timeline's
    # refused_replicas and the decision's explanation). `nodes` without node_cpu_m: 16-core nodes.
    nodes: int | None = None
    node_cpu_m: int | None = None

    def __post_init__(self) -> None:
        if self.interval_ms <= 0 or self.resize_delay_ms < 0 or self.cold_start_ms < 0 or self.decision_ms < 0:
            raise ValueError("interval_ms must be > 0, delays >= 0")
        if not self.front_door_cpu_ms >= 0 or not math.isfinite(self.front_door_cpu_ms):
            raise ValueError("front_door_cpu_ms must be a finite number >= 0")
        if self.noise_sigma < 0 or self.max_wait_ms < 0 or self.budget_window_ms <= 0:
            raise ValueError("noise_sigma, max_wait_ms must be >= 0 and budget_window_ms > 0")
        if self.initial_cpu_m < 1 or self.initial_batch < 1 or self.initial_replicas < 1:
            raise ValueError("the initial configuration needs cpu_m, batch, replicas >= 1")
        ExpiryPolicy(self.expiry)  # validates
        if self.nodes is not None and self.nodes < 1:
            raise ValueError("nodes must be >= 1 (or None: unlimited)")
        if self.node_cpu_m is not None and self.node_cpu_m < 1:
            raise ValueError("node_cpu_m must be >= 1")

    @property
    def node_size_m(self) -> int | None:
        """CPU of one node, or None when nodes are not modelled."""
        if self.node_cpu_m is not None:
            return self.node_cpu_m
        return NODE_CPU_M if self.nodes is not None else None

    def initial(self) -> Decision:
        return Decision(self.initial_cpu_m, self.initial_batch, self.initial_replicas, True, "initial configuration")


class _Replica:
    """One model server: ready after its cold start, busy with at most one batch."""

    __slots__ = ("rid", "ready", "busy", "removing", "alive", "version", "batch", "size", "finish", "cpu_start",
                 "usage", "busy_since", "started", "expect", "resized", "node")

    def __init__(self, rid: int, ready: bool, node: int = -1) -> None:
        self.rid = rid
        self.node = node  # index into Simulator._node_count (-1: nodes not modelled)
        self.ready = ready
        self.busy = False
        self.removing = False
        self.alive = True
        self.version = 0
        self.batch: list[int] = []
        self.size = 0
        self.finish = 0.0
        self.cpu_start = 0
        self.usage = 0.0  # millicore-ms used, cumulative (accrued up to busy_since while busy)
        self.busy_since = 0.0
        self.started = 0.0  # when the running batch started
        self.expect = 0.0  # when the running batch finishes by the model (no noise): what a server can know
        self.resized = False  # the running batch straddled a resize (its latency measured two allocations)


@dataclass
class SimResult:
    """Per-request outcomes (columns), the per-interval timeline and the exact cost of one simulated run."""

    policy: str
    requests: RequestSet
    outcome: np.ndarray  # int8 codes, OUTCOME_NAMES
    server_ms: np.ndarray  # NaN if never answered
    batch: np.ndarray
    cpu_m: np.ndarray
    timeline: list[TimelineRecord]
    decisions: list[tuple[float, Decision]]
    core_seconds: float
    end_ms: float
    wall_s: float
    events: int
    config: SimConfig
    meta: dict[str, Any] = field(default_factory=dict)
    # l(1, max CPU) of the deployment's model (sponge.report.summary.saveable_floor_ms): budgets below it
    # are unsaveable (DESIGN §5). Set by whoever knows the deployment (sim.scenario.run_policies).
    saveable_floor_ms: float | None = None
    # the front door's modelled CPU (arrivals x SimConfig.front_door_cpu_ms), apart from core_seconds
    front_door_core_seconds: float = 0.0

    @property
    def core_seconds_with_front_door(self) -> float:
        return self.core_seconds + self.front_door_core_seconds

    @property
    def n(self) -> int:
        return len(self.requests)

    def counts(self) -> dict[str, int]:
        c = np.bincount(self.outcome, minlength=len(OUTCOME_NAMES))
        return {name: int(c[k]) for k, name in enumerate(OUTCOME_NAMES) if k != PENDING}

    @property
    def attainment(self) -> float:
        return float(np.mean(self.outcome == OK)) if self.n else math.nan

    @property
    def requests_per_wall_s(self) -> float:
        return self.n / self.wall_s if self.wall_s > 0 else math.inf

    def records(self) -> list[RequestRecord]:
        """One RequestRecord per request (the results format shared with live runs)."""
        r = self.requests
        srv = self.server_ms.tolist()
        net = r.network_ms.tolist()
        names = [OUTCOME_NAMES[k] for k in self.outcome.tolist()]
        return [
            RequestRecord(i, s, slo, nw, b, sv, nw + sv, o, bt, c)  # type: ignore[arg-type]
            for i, (s, slo, nw, b, sv, o, bt, c) in enumerate(
                zip(r.send_ms.tolist(), r.slo_ms.tolist(), net, r.budget_ms.tolist(), srv, names,
                    self.batch.tolist(), self.cpu_m.tolist())
            )
        ]

    def run_meta(self) -> dict[str, Any]:
        return {
            "kind": "simulation",
            "name": self.meta.get("name", self.policy),
            "policy": self.policy,
            "requests": self.n,
            "workload": self.requests.description,
            "duration_ms": self.requests.duration_ms,
            "end_ms": self.end_ms,
            "core_seconds": self.core_seconds,
            "front_door_core_seconds": self.front_door_core_seconds,
            "core_seconds_with_front_door": self.core_seconds_with_front_door,
            "counts": self.counts(),
            "saveable_floor_ms": self.saveable_floor_ms,
            "wall_s": self.wall_s,
            "events": self.events,
            "config": asdict(self.config),
            **{k: v for k, v in self.meta.items() if k != "name"},
        }

    def write(self, directory: str | Path) -> Path:
        """requests.csv + timeline.csv + run.json (sponge.report.results format) + decisions.jsonl."""
        d = write_run(directory, self.records(), self.timeline, self.run_meta())
        if self.decisions:
            with (d / "decisions.jsonl").open("w") as fh:
                for t, dec in self.decisions:
                    fh.write(json.dumps({"t_ms": t, **asdict(dec)}) + "\n")
        return d


class Simulator:
    """One run: a request plan served by replicas under one policy. Use `simulate()` for the one-liner."""

    def __init__(self, requests: RequestSet, model: LatencyModel, policy: Policy, config: SimConfig | None = None,
                 progress: Callable[[float], None] | None = None) -> None:
        self.req = requests
        self.model = model
        self.policy = policy
        self.cfg = config or SimConfig()
        self.progress = progress  # called with the fraction of the trace simulated, once per interval
        cfg = self.cfg
        n = len(requests)
        self.n = n
        self._send = requests.send_ms.tolist()
        self._budget = requests.budget_ms.tolist()
        self._deadline = (requests.send_ms + requests.budget_ms).tolist()
        self._images = requests.images.tolist()
        self._outcome = [PENDING] * n
        self._server = [math.nan] * n
        self._batch = [0] * n
        self._cpu = [0] * n
        self._ended = 0

        self.queue: EDFQueue[int] = EDFQueue(cfg.queue_capacity)
        init = cfg.initial()
        self._lat: list[float] = [0.0]
        self._node_m = cfg.node_size_m  # None: no node model
        self._node_count: list[int] = []  # replicas (alive) per node
        self.refused_replicas = 0  # replicas a decision asked for that fit on no node
        self.refused_decisions = 0  # decisions (and the initial configuration) with a refused scale-out
        self.clamped_cpu = 0  # CPU requests (decisions and per-batch) cut to what the replicas' nodes hold
        self._refused_tick = 0  # refused replicas since the last tick (the timeline's column)
        if self._node_m is not None and init.cpu_m > self._node_m:
            init = replace(init, cpu_m=self._node_m)
            self.clamped_cpu += 1
        self.cpu = init.cpu_m  # CPU per replica in force (all replicas share it)
        self._cpu_target = init.cpu_m
        sizer = getattr(policy, "batch_cpu_m", None)
        self._sizer = sizer if callable(sizer) and cfg.per_batch else None
        # with per-batch CPU a request is hopeless only at the allocation the sizer can reach
        reach = float(getattr(policy, "max_cpu_m", 0) or 0) if self._sizer is not None else 0.0
        if self._node_m is not None and reach > 0:
            reach = min(reach, float(self._node_m))  # the sizer cannot go past the node
        self._reach = [0.0] + [self._latency(b, reach) for b in range(1, 65)] if reach > 0 else None
        self.batcher = Batcher(init.batch, self._estimate, ExpiryPolicy(cfg.expiry), cfg.max_wait_ms,
                               expiry_estimate_ms=self._reachable if self._reach is not None else None)
        self._reject = self.batcher.expiry is ExpiryPolicy.REJECT
        self._retable(init.batch)
        self.current = init

        self._events: list[tuple[float, int, int, Any, Any]] = []
        self._seq = 0
        self._next_wake = math.inf
        self._cost = 0.0  # millicore-ms
        self._cost_t = 0.0
        self.live: list[_Replica] = []  # every replica that costs CPU (starting, serving, draining)
        self.idle: list[_Replica] = []  # ready, not busy, not draining
        self._rid = 0

        got = sum(self._add_replica(0.0, ready=True, cpu_m=init.cpu_m) for _ in range(init.replicas))
        if got < init.replicas:
            self.refused_replicas += init.replicas - got
            self.refused_decisions += 1
            self._refused_tick += init.replicas - got
            init = replace(init, replicas=max(got, 1), explanation=init.explanation + self._node_note(init.replicas, got, init.cpu_m))
            self.current = init
        self._rng = np.random.default_rng(cfg.seed)
        self._noise: list[float] = []
        self._noise_i = 0

        self._arr_tick = 0  # arrivals seen at the last tick
        self._served: list[BatchSample] = []  # batches completed since the last tick
        self.observer = ObservationBuilder(cfg.interval_ms, 0.0, 0, {}, 0.0, history_len=cfg.history_len,
                                           budget_window_ms=cfg.budget_window_ms, max_budgets=cfg.max_budgets,
                                           serves_late=cfg.expiry == ExpiryPolicy.SERVE_LATE.value)
        self._arrived = 0  # requests arrived so far (the per-batch sizer's last-second rate)
        self._rate_from = 0
        self.timeline: list[TimelineRecord] = []
        self.decisions: list[tuple[float, Decision]] = []
        self.events = 0
        bind = getattr(policy, "bind_simulator", None)
        if callable(bind):  # simulator-only reference policies (sponge.sim.clairvoyant) read the state
            bind(self)

    # ---- small helpers -------------------------------------------------------------------------------
    def _estimate(self, b: int) -> float:
        lat = self._lat
        return lat[b] if b < len(lat) else self._latency(b, self.cpu)

    def _reachable(self, b: int) -> float:
        """l(b) at the most the per-batch sizer can reach (its policy's max_cpu_m, at most the node)."""
        r = self._reach
        assert r is not None
        top = float(getattr(self.policy, "max_cpu_m"))
        return r[b] if b < len(r) else self._latency(b, top if self._node_m is None else min(top, self._node_m))

    def _latency(self, b: int, cpu_m: float) -> float:
        return max(float(self.model.latency_ms(b, cpu_m)), 1e-6)

    def _retable(self, max_b: int) -> None:
        """l(b, c) for b = 0..max_b at the CPU in force (the service times and the batcher's estimate)."""
        size = max(max_b, self.batcher.batch_size, 16)
        self._lat = [0.0] + [self._latency(b, self.cpu) for b in range(1, size + 1)]

    def _push(self, t: float, kind: int, a: Any = None, b: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, a, b))

    def _noise_factor(self) -> float:
        if self.cfg.noise_sigma == 0.0:
            return 1.0
        if self._noise_i >= len(self._noise):
            s = self.cfg.noise_sigma
            self._noise = self._rng.lognormal(-0.5 * s * s, s, 65536).tolist()
            self._noise_i = 0
        self._noise_i += 1
        return self._noise[self._noise_i - 1]

    def _end(self, i: int, outcome: int, server_ms: float, batch: int = 0, cpu_m: int = 0) -> None:
        if self._outcome[i] != PENDING:
            raise ConservationError(f"request {i} ended twice ({OUTCOME_NAMES[self._outcome[i]]}, then "
                                    f"{OUTCOME_NAMES[outcome]})")
        self._outcome[i] = outcome
        self._server[i] = server_ms
        self._batch[i] = batch
        self._cpu[i] = cpu_m
        self._ended += 1

    def _integrate(self, now: float) -> None:
        self._cost += self.cpu * len(self.live) * (now - self._cost_t)
        self._cost_t = now

    # ---- replicas --------------------------------------------------------------------------------------
    # ---- nodes -------------------------------------------------------------------------------------------
    def _place(self, cpu_m: int) -> int | None:
        """A node for one more replica of cpu_m (every replica of a node shares its CPU): the least loaded
        node with room (spreading leaves each replica the most room to grow in place), a new node while
        nodes are unlimited or some are unused; None when it fits nowhere (the scale-out is refused)."""
        assert self._node_m is not None
        fits = [(k, i) for i, k in enumerate(self._node_count) if (k + 1) * cpu_m <= self._node_m]
        limit = self.cfg.nodes
        can_open = (limit is None or len(self._node_count) < limit) and cpu_m <= self._node_m
        if can_open and (not fits or min(fits)[0] > 0):  # an unused node is the least loaded
            self._node_count.append(0)
            return len(self._node_count) - 1
        return min(fits)[1] if fits else None

    def _node_cap(self) -> int:
        """The most CPU per replica the nodes hold with the replicas where they are (all share one CPU)."""
        if self._node_m is None:
            return 1 << 62
        most = max(self._node_count, default=0)
        return self._node_m // most if most else self._node_m

    def _clamp(self, cpu_m: int) -> int:
        cap = self._node_cap()
        if cpu_m > cap:
            self.clamped_cpu += 1
            return cap
        return cpu_m

    def _node_note(self, asked: int, got: int, cpu_m: int) -> str:
        return (f" [nodes: scale-out refused: {got} of {asked} replicas fit at {cpu_m} m each on "
                f"{self.cfg.nodes} nodes of {self._node_m} m]")

    def _add_replica(self, now: float, ready: bool, cpu_m: int | None = None) -> bool:
        """Start a replica (on a node with room for cpu_m, if nodes are modelled); False if none has room."""
        node = -1
        if self._node_m is not None:
            got = self._place(self.cpu if cpu_m is None else cpu_m)
            if got is None:
                return False
            node = got
            self._node_count[node] += 1
        self._integrate(now)
        rep = _Replica(self._rid, ready, node)
        self._rid += 1
        self.live.append(rep)
        if ready:
            self.idle.append(rep)
        else:
            self._push(now + self.cfg.cold_start_ms, _READY, rep)
        return True

    def _drop(self, rep: _Replica, now: float) -> None:
        self._integrate(now)
        if rep.node >= 0:
            self._node_count[rep.node] -= 1
        rep.alive = False
        self.live.remove(rep)
        if rep in self.idle:
            self.idle.remove(rep)

    def _set_replicas(self, n: int, now: float, cpu_m: int | None = None) -> int:
        """Scale to n replicas (new ones placed for cpu_m per replica); returns how many were refused."""
        active = [r for r in self.live if not r.removing]
        refused = 0
        if n > len(active):
            for r in self.live:  # un-drain before starting new ones: they are warm
                if r.removing and n > len(active):
                    r.removing = False
                    active.append(r)
            for _ in range(n - len(active)):
                if not self._add_replica(now, ready=self.cfg.cold_start_ms == 0, cpu_m=cpu_m):
                    refused += 1
        elif n < len(active):
            k = len(active) - n
            victims = [r for r in reversed(active) if not r.ready][:k]  # cancel cold starts first
            victims += [r for r in reversed(active) if r.ready and not r.busy][: k - len(victims)]
            victims += [r for r in reversed(active) if r.busy][: k - len(victims)]
            for r in victims:
                if r.busy:
                    r.removing = True  # finishes its batch, then goes
                else:
                    self._drop(r, now)
        return refused

    # ---- the serving path --------------------------------------------------------------------------------
    def _dispatch(self, now: float) -> None:
        queue, idle, batcher = self.queue, self.idle, self.batcher
        while idle and queue:
            if self._sizer is not None and len(self.live) == 1:
                self._size(now)  # the cap for this very batch, from the queue as it is now
            act = batcher.next_action(queue, now)
            for e in act.expired:
                i = e.payload
                self._end(i, EXPIRED, now - self._send[i])
            step = act.step
            if type(step) is Dispatch:
                self._start(idle.pop(), step.entries, now)
                continue
            until = step.until_ms  # type: ignore[union-attr]
            if until is not None and (until < self._next_wake or self._next_wake < now):
                self._next_wake = until
                self._push(until, _WAKE, until)
            break

    def _start(self, rep: _Replica, entries: list, now: float) -> None:
        b = sum(e.size for e in entries)  # images
        rep.busy = True
        rep.batch = [e.payload for e in entries]
        rep.size = b
        rep.cpu_start = self.cpu
        rep.busy_since = now
        rep.started = now
        rep.version += 1
        rep.expect = now + self._estimate(b)
        rep.resized = False
        rep.finish = now + (rep.expect - now) * self._noise_factor()
        self._push(rep.finish, _COMPLETE, rep, rep.version)

    def _complete(self, rep: _Replica, version: int, now: float) -> None:
        if version != rep.version or not rep.busy:
            return  # re-timed by a resize: a newer completion event stands for it
        rep.usage += self.cpu * (now - rep.busy_since)
        send, budget, b, c = self._send, self._budget, rep.size, rep.cpu_start
        if not rep.resized:  # as the live core: a batch that straddled a resize is no sample of l(b, c)
            self._served.append(BatchSample(b, c, now - rep.started, now))
        for i in rep.batch:
            srv = now - send[i]
            self._end(i, OK if srv <= budget[i] else LATE, srv, b, c)
        rep.busy = False
        rep.batch = []
        if rep.removing:
            self._drop(rep, now)
        elif rep.alive:
            self.idle.append(rep)
        self._dispatch(now)
        if self._sizer is not None:
            self._size(now)

    def _arrive(self, i: int, now: float) -> None:
        self._arrived = i + 1
        dl = self._deadline[i]
        size = self._images[i]
        est = self.batcher.expiry_estimate_ms
        if self._reject and dl < now + (self._lat[1] if size == 1 and self._reach is None else est(size)):
            self._end(i, EXPIRED, 0.0)
            return
        try:
            self.queue.push(i, dl, now, size)
        except QueueFull:
            self._end(i, REJECTED, 0.0)
            return
        if self.idle:
            self._dispatch(now)
        if self._sizer is not None:
            self._size(now)

    def _size(self, now: float) -> None:
        """Per-batch CPU (Policy.batch_cpu_m): ask the policy for the allocation the present work needs and
        issue the resize; it takes effect decision_ms + resize_delay_ms later."""
        if len(self.live) != 1 or self._sizer is None:
            return
        rep = self.live[0]
        # until the new allocation takes effect, the replica runs at the allocation in force or, if a resize
        # issued earlier lands meanwhile, at that one: plan with the lower of the two
        slowest = int(min(self.cpu, self._cpu_target))
        running = None
        if rep.busy:
            dl = min(self._deadline[i] for i in rep.batch) - now
            left = max(rep.expect - now, 0.0) * self._latency(rep.size, slowest) / self._latency(rep.size, self.cpu)
            running = RunningBatch(rep.size, left, dl)
        rem, images = self.queue.head(now, DEFAULT_MAX_QUEUED)
        cfg = self.cfg
        send, j = self._send, self._rate_from
        while j < self._arrived and send[j] <= now - 1000.0:
            j += 1
        self._rate_from = j
        got = self._sizer(QueueView(rem, images, running, slowest, cfg.decision_ms + cfg.resize_delay_ms,
                                    float(self._arrived - j)))
        if got is None:
            return
        if got.batch != self.batcher.batch_size:
            self.batcher.batch_size = int(got.batch)
            if got.batch >= len(self._lat):
                self._retable(int(got.batch))
        cpu = int(got.cpu_m)
        if self._node_m is not None:
            cpu = self._clamp(cpu)
        if cpu == self._cpu_target:
            return
        self._cpu_target = cpu
        delay = cfg.decision_ms + cfg.resize_delay_ms
        if delay == 0:
            self._resize(int(cpu), now)
        else:
            self._push(now + delay, _RESIZE, int(cpu))

    # ---- control ---------------------------------------------------------------------------------------
    def _resize(self, cpu_m: int, now: float) -> None:
        if self._node_m is not None:
            cpu_m = min(cpu_m, self._node_cap())  # the nodes as they are when it lands
        if cpu_m == self.cpu:
            return
        self._integrate(now)
        old = self.cpu
        for rep in self.live:
            if rep.busy:
                rep.usage += old * (now - rep.busy_since)
                rep.busy_since = now
                if self.cfg.resize_running and rep.finish > now:
                    scale = self._latency(rep.size, cpu_m) / self._latency(rep.size, old)
                    rep.finish = now + (rep.finish - now) * scale
                    rep.expect = now + max(rep.expect - now, 0.0) * scale
                    rep.resized = True
                    rep.version += 1
                    self._push(rep.finish, _COMPLETE, rep, rep.version)
        self.cpu = cpu_m
        self._retable(self.batcher.batch_size)
        self._dispatch(now)

    def _observe(self, now: float, arrived: int) -> Observation:
        """What the live controller would see now (call after `_integrate(now)`)."""
        usage: dict[object, float | None] = {}
        for rep in self.live:
            if rep.busy:
                rep.usage += self.cpu * (now - rep.busy_since)
                rep.busy_since = now
            if rep.ready:
                usage[rep.rid] = rep.usage
        lo, self._arr_tick = self._arr_tick, arrived
        budgets = zip(self._send[lo:arrived], self._budget[lo:arrived])
        served, self._served = self._served, []
        return self.observer.observe(
            now, arrived, budgets, self.queue.remaining_ms(now), usage,
            self.current,  # the decision in force, as the live controller reports it
            replicas_starting=sum(1 for r in self.live if not r.removing and not r.ready),
            batches=served, allocated_mms=self._cost)

    def _apply(self, d: Decision, now: float) -> None:
        cpu = int(d.cpu_m)
        if cpu < 1 or d.batch < 1 or d.replicas < 1:
            raise ValueError(f"policy {self.policy.name!r} returned an invalid decision {d}")
        if self._node_m is not None:
            d = self._fit_nodes(d, now)
            cpu = int(d.cpu_m)
        if d.batch != self.batcher.batch_size:
            self.batcher.batch_size = int(d.batch)
            if d.batch >= len(self._lat):
                self._retable(int(d.batch))
        if cpu != self._cpu_target and self._sizer is None:  # with per-batch CPU, _size applies it
            self._cpu_target = cpu
            if self.cfg.resize_delay_ms == 0:
                self._resize(cpu, now)
            else:
                self._push(now + self.cfg.resize_delay_ms, _RESIZE, cpu)
        if self._node_m is None:
            self._set_replicas(min(int(d.replicas), self.cfg.max_replicas), now)
        self.current = d
        self._dispatch(now)
        if self._sizer is not None:
            self._size(now)

    def _fit_nodes(self, d: Decision, now: float) -> Decision:
        """Scale replicas first (a new one needs room for the decision's CPU on some node, else it is
        refused), then cut the CPU per replica to what the fullest node holds. Returns the decision as
        applied: what the policy sees as `current` next, with the refusal in its explanation."""
        want = min(int(d.replicas), self.cfg.max_replicas)
        cpu = min(int(d.cpu_m), int(self._node_m or d.cpu_m))
        refused = self._set_replicas(want, now, cpu)
        cpu = self._clamp(int(d.cpu_m))
        note = ""
        if refused:
            self.refused_replicas += refused
            self.refused_decisions += 1
            self._refused_tick += refused
            note = self._node_note(want, want - refused, cpu)
        if cpu != d.cpu_m and not refused:
            note = f" [nodes: CPU per replica cut to {cpu} m, what the fullest of the nodes of {self._node_m} m holds]"
        if not note:
            return d
        active = sum(1 for r in self.live if not r.removing)
        return replace(d, cpu_m=cpu, replicas=max(active, 1), explanation=d.explanation + note)

    def _tick(self, now: float, arrived: int) -> bool:
        """Close the interval ending now, ask the policy, apply. Returns False when the run is over."""
        cfg = self.cfg
        self._integrate(now)
        obs = self._observe(now, arrived)
        active = sum(1 for r in self.live if not r.removing)
        self.timeline.append(TimelineRecord(
            t_ms=now, arrival_rps=obs.arrival_rate_rps, cpu_m=int(self.cpu), replicas=active,
            total_cpu_m=int(round(self.observer.total_cpu_m)), batch=self.batcher.batch_size,
            queue_len=len(self.queue), feasible=bool(self.current.feasible), refused_replicas=self._refused_tick,
            # arrivals over the interval x CPU ms each = CPU ms per second = millicores
            front_door_cpu_m=obs.arrival_rate_rps * cfg.front_door_cpu_ms,
        ))
        self._refused_tick = 0
        if self.progress is not None:
            self.progress(min(now / self.req.duration_ms, 1.0) if self.req.duration_ms > 0 else 1.0)
        if now >= self.req.duration_ms and (self._ended == self.n or now >= self.req.duration_ms + cfg.max_drain_ms):
            return False
        d = self.policy.decide(obs)
        self._apply(d, now)
        if cfg.keep_explanations:  # as applied: with nodes, a refused scale-out or a CPU cut says so
            self.decisions.append((now, self.current))
        self._push(now + cfg.interval_ms, _TICK)
        return True

    # ---- the loop ----------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        send = self._send
        n = self.n
        events = self._events
        heappop = heapq.heappop
        self._push(self.cfg.interval_ms, _TICK)
        i = 0
        n_events = 0
        now = 0.0
        while True:
            t_ev = events[0][0]  # a tick is always pending until the end
            if i < n and send[i] <= t_ev:
                now = send[i]
                self._arrive(i, now)
                i += 1
                continue
            now, _, kind, a, b = heappop(events)
            n_events += 1
            if kind == _COMPLETE:
                self._complete(a, b, now)
            elif kind == _TICK:
                if not self._tick(now, i):
                    break
            elif kind == _RESIZE:
                self._resize(a, now)
            elif kind == _READY:
                if a.alive:
                    a.ready = True
                    if not a.removing:
                        self.idle.append(a)
                    self._dispatch(now)
            elif kind == _WAKE:
                if a == self._next_wake:
                    self._next_wake = math.inf
                    self._dispatch(now)
                    if self._sizer is not None:
                        self._size(now)
        self._integrate(now)
        # Whatever is still unanswered after the drain limit failed (counted, never silently dropped).
        for j in range(n):
            if self._outcome[j] == PENDING:
                self._end(j, ERROR, math.nan)
        if self._ended != n:
            raise ConservationError(f"{n - self._ended} of {n} requests never ended")
        return SimResult(
            policy=getattr(self.policy, "name", type(self.policy).__name__),
            requests=self.req,
            outcome=np.asarray(self._outcome, dtype=np.int8),
            server_ms=np.asarray(self._server, dtype=np.float64),
            batch=np.asarray(self._batch, dtype=np.int32),
            cpu_m=np.asarray(self._cpu, dtype=np.int32),
            timeline=self.timeline,
            decisions=self.decisions,
            core_seconds=self._cost / 1e6,
            front_door_core_seconds=self._arrived * self.cfg.front_door_cpu_ms / 1000.0,
            end_ms=now,
            wall_s=time.perf_counter() - wall0,
            events=n_events + n,
            config=self.cfg,
            meta={} if self._node_m is None else {"nodes": {
                "nodes": self.cfg.nodes, "node_cpu_m": self._node_m, "used": len(self._node_count),
                "refused_replicas": self.refused_replicas, "refused_decisions": self.refused_decisions,
                "clamped_cpu": self.clamped_cpu}},
        )


def simulate(
    requests: RequestSet,
    model: LatencyModel,
    policy: Policy,
    config: SimConfig | None = None,
    progress: Callable[[float], None] | None = None,
) -> SimResult:
    """Run `policy` on `requests` with service times from `model`. Pass a fresh policy per run (they keep
    state such as hysteresis)."""
    return Simulator(requests, model, policy, config, progress).run()
