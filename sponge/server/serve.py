"""Assemble a server from a ServerConfig: replicas, serving core, ASGI app; run it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI

from sponge.config import ConfigError, ServerConfig, resolve_admin_token
from sponge.control import Controller, DecisionLogEntry
from sponge.perf.latency_model import LatencyModel
from sponge.policy.baselines import StaticPolicy
from sponge.policy.learning import LearningPolicy
from sponge.policy.registry import make_policy
from sponge.policy.types import Decision, Policy
from sponge.runtime.remote import RemoteReplica
from sponge.runtime.replica import Replica
from sponge.scaling.base import CpuActuator
from sponge.scaling.guaranteed import open_actuator
from sponge.scaling.self_limit import threads_for
from sponge.scheduling.batcher import ExpiryPolicy
from sponge.server.admin import install_admin
from sponge.server.app import create_app
from sponge.server.core import ServingCore
from sponge.server.grpc_service import GrpcBindError, GrpcService
from sponge.server.live import LiveApplier, LiveView
from sponge.server.memory import IdleTrimmer, freeze_startup_objects
from sponge.server.metrics import Metrics
from sponge.server.per_batch import PerBatchSizer
from sponge.server.pool import ReplicaPool
from sponge.server.prober import IdleProber
from sponge.server.scaler import NullActuator, ReplicaScaler

log = logging.getLogger("sponge.serve")
DEFAULT_MODEL_NAME = "efficientnet-lite0"


def resolve_model(cfg: ServerConfig) -> tuple[Path, str]:
    """The model file to serve and the name to serve it under."""
    if cfg.model is None:
        from sponge.models.efficientnet_lite0 import default_model_path

        return default_model_path(), cfg.model_name or DEFAULT_MODEL_NAME
    path = Path(cfg.model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--model: no such file: {path}")
    check_onnx_file(path)
    return path, cfg.model_name or path.stem


def resolve_remote_model(cfg: ServerConfig) -> tuple[Path | None, str]:
    """Remote and kubernetes backends: the workers hold the model; the front door only names it (--model-name,
    else --model's file name, else the default's) and reads its offline profile if the file is here too."""
    path = Path(cfg.model).expanduser() if cfg.model else None
    name = cfg.model_name or (path.stem if path is not None else DEFAULT_MODEL_NAME)
    return (path if path is not None and path.is_file() else None), name


def check_onnx_file(path: Path) -> None:
    """Refuse a file that is not an ONNX model (ConfigError, one line) before anything is spawned or
    created: replicas, cgroups. Parsing only; a model ONNX Runtime cannot run still fails at start."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, or whatever else a random file provokes
        raise ConfigError(f"--model: {path} is not an ONNX model ({type(exc).__name__}: {exc})") from None
    if model.ir_version <= 0 or not model.graph.output:
        raise ConfigError(f"--model: {path} is not an ONNX model (no IR version or no graph outputs)")


class StartupError(RuntimeError):
    """The server cannot start (e.g. its port is taken); the message says why in one line."""


GRPC_PORT_HINT = " (--grpc-port N for another port, --grpc-port 0 to turn gRPC off)"


def check_port_free(host: str, port: int, what: str = "", hint: str = "") -> None:
    """Bind host:port for a moment as uvicorn (and gRPC, SO_REUSEPORT off) will (SO_REUSEADDR), before
    any replica is spawned. `what` prefixes the message ("gRPC "), `hint` ends it."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"{what}port {port} on {host} is in use{hint}") from None
            raise StartupError(f"cannot listen on {host}:{port}{' for ' + what.strip() if what else ''}: "
                               f"{exc.strerror or exc}{hint}") from None


def machine_cpu_m() -> int:
    return 1000 * len(os.sched_getaffinity(0))


def make_actuators(cfg: ServerConfig, names: list[str], cpu_m: int) -> tuple[dict[str, CpuActuator], str]:
    """One actuator per replica, chosen automatically (or as configured); returns them and why."""
    if cfg.actuator == "none":
        return {n: NullActuator(cpu_m) for n in names}, "none: allocations are not enforced (--actuator none)"
    chosen: dict[str, CpuActuator] = {}
    reason = ""
    for i, n in enumerate(names):  # open_actuator also removes stale cgroups of dead earlier runs
        sel = open_actuator(n, prefer=cfg.actuator, guaranteed=cfg.guaranteed, period_us=cfg.cfs_period_us,
                            index=i, replicas=len(names))  # index: affinity spreads replicas over CPUs
        chosen[n], reason = sel.actuator, sel.reason
    return chosen, reason


def load_offline_profile(cfg: ServerConfig, model_path: Path) -> tuple[Any, str]:
    """The offline profile (`sponge profile`) to seed the online model with, or None and why not.

    Never fatal: a missing, stale (model changed, other CFS period) or corrupt profile only means the
    model is learned from scratch while serving. A profile whose four-term fit is poor is still used:
    its cells are measurements, and Sponge's own model may fit them well (the learner judges).
    """
    from sponge.perf.profile_store import ProfileError, load_profile, profile_path_for

    path = Path(cfg.profile) if cfg.profile else profile_path_for(model_path)
    if not path.exists():
        return None, f"no offline profile at {path}"
    try:
        profile = load_profile(path, model_path, min_r2=-math.inf, max_p95_rel_err=math.inf)
        measured_period = profile.machine.get("profiled_with", {}).get("cfs_period_us")
        if measured_period is not None and cfg.actuator != "none" and measured_period != cfg.cfs_period_us:
            raise ValueError(f"it was measured with a CFS period of {measured_period} us, the server uses "
                             f"{cfg.cfs_period_us} us")
    except (ProfileError, ValueError, OSError) as exc:
        return None, f"offline profile {path} not used: {exc}"
    return profile, f"offline profile {path} ({len(profile.grid)} cells)"


# The sponge rule's stated burst risk per interval when nothing absorbs bursts between decisions (no per-batch
# CPU: --no-per-batch, several replicas, or exploring) — the rule's value before per-batch sizing existed.
ARRIVAL_EPS_WITHOUT_PER_BATCH = 0.005


def sizes_per_batch(cfg: ServerConfig) -> bool:
    """Whether the server sizes CPU per batch between decisions: sponge, one replica, --per-batch, a local
    replica (a pod's resize takes the kubelet a while: per batch is for cgroup quota writes)."""
    return cfg.per_batch and cfg.policy == "sponge" and cfg.replica_limit == 1 and cfg.backend == "local"


def sponge_params(cfg: ServerConfig, max_cpu_m: int, per_batch: bool) -> dict[str, Any]:
    """The sponge rule's parameters on this server (with or without per-batch CPU between decisions)."""
    extra: dict[str, Any] = {} if per_batch else {"arrival_eps": ARRIVAL_EPS_WITHOUT_PER_BATCH}
    return {"min_cpu_m": cfg.min_cpu_m, "max_cpu_m": max_cpu_m, "max_batch": cfg.max_batch, "per_batch": per_batch,
            **extra}


def joint_params(cfg: ServerConfig, max_cpu_m: int) -> dict[str, Any]:
    """joint's and themis's parameters on this server: CPU per replica within [min, max], up to
    --max-replicas replicas, batch up to --max-batch (as `sponge simulate` runs them)."""
    return {"min_cpu_m": cfg.min_cpu_m, "max_cpu_m": max_cpu_m, "max_batch": cfg.max_batch,
            "min_replicas": 1, "max_replicas": cfg.replica_limit}


def hpa_params(cfg: ServerConfig, max_cpu_m: int) -> dict[str, Any]:
    """Horizontal only: replicas of a fixed --max-cpu-m each at batch --batch, 1 to --max-replicas."""
    return {"cpu_m": max_cpu_m, "batch": cfg.batch, "max_replicas": cfg.replica_limit}


def make_learning_policy(cfg: ServerConfig, profile: Any, cpu_m: int, max_cpu_m: int) -> LearningPolicy:
    """The configured model-driven policy behind a LearningPolicy: safe allocation until the online model
    (seeded with the offline profile's cells, if any) is good enough. With per-batch CPU (sponge, one
    replica) the policy forwards the inner rule's `batch_cpu_m` on the learned model; the explorer plans
    without it (exploring serves batches at the allocations it picks)."""
    from sponge.perf.online import OnlineLatencyLearner

    learner = OnlineLatencyLearner()
    if profile is not None:
        learner.seed(profile.points())
    per_batch = sizes_per_batch(cfg)

    def inner(model: Any, safety: float) -> Policy:
        if cfg.policy == "paper":  # the published rule keeps its own constant margin (0.9)
            return make_policy("paper", model, max_cores=max(1, max_cpu_m // 1000), max_batch=cfg.max_batch)
        if cfg.policy in ("joint", "themis"):
            return make_policy(cfg.policy, model, safety=safety, **joint_params(cfg, max_cpu_m))
        return make_policy("sponge", model, safety=safety, **sponge_params(cfg, max_cpu_m, per_batch))

    def explorer(model: Any, safety: float) -> Policy:
        if cfg.policy in ("paper", "joint", "themis"):  # the joint rules plan their replica count meanwhile
            return inner(model, safety)
        return make_policy("sponge", model, safety=safety, **sponge_params(cfg, max_cpu_m, False))

    return LearningPolicy(cfg.policy, learner, inner, Decision(cpu_m, cfg.batch, cfg.replicas), per_batch=per_batch,
                          reach_cpu_m=max_cpu_m if per_batch else None, make_explorer=explorer)


def make_policy_for(cfg: ServerConfig, model: LatencyModel | None, cpu_m: int, max_cpu_m: int) -> Policy:
    """A policy on a fixed latency model (bench/live.py's simulated twins); static without a model."""
    if cfg.policy == "hpa":
        return make_policy("hpa", model, **hpa_params(cfg, max_cpu_m))
    if cfg.policy == "static" or model is None:
        return StaticPolicy(cpu_m=cpu_m, batch=cfg.batch, replicas=cfg.replicas)
    if cfg.policy in ("joint", "themis"):
        return make_policy(cfg.policy, model, **joint_params(cfg, max_cpu_m))
    if cfg.policy == "paper":
        return make_policy("paper", model, max_cores=max(1, max_cpu_m // 1000), max_batch=cfg.max_batch)
    return make_policy("sponge", model, **sponge_params(cfg, max_cpu_m, sizes_per_batch(cfg)))


class DecisionReporter:
    """After each controller decision: metrics, and a log line when the deciding mode changes."""

    def __init__(self, metrics: Metrics, policy: Policy, prober: IdleProber | None) -> None:
        self.metrics, self.policy, self.prober = metrics, policy, prober
        self._mode: str | None = None

    def __call__(self, entry: DecisionLogEntry) -> None:
        m = self.metrics
        m.decisions.labels(entry.policy, str(entry.feasible).lower()).inc()
        m.arrival_rate.set(entry.arrival_rate_rps)
        if isinstance(self.policy, LearningPolicy):
            self._learning(self.policy)
        if self.prober is not None:
            for outcome in ("run", "disturbed", "failed"):
                m.probes.labels(outcome).set(getattr(self.prober.stats, outcome))

    def _learning(self, policy: LearningPolicy) -> None:
        m, st = self.metrics, policy.status()
        q = policy.learner.quality()
        for mode in ("safe", "explore", "model"):
            m.controller_mode.labels(mode).set(1 if st.mode == mode else 0)
        m.model_ready.set(1 if st.ready else 0)
        m.model_error.set(float(q.heldout_p95) if q.heldout_p95 is not None else float("nan"))
        m.model_cells.set(int(q.cells))
        m.model_safety.set(st.safety if st.safety is not None else float("nan"))
        if st.mode != self._mode:
            if st.mode == "model":
                log.warning("controller runs %s on the learned latency model (%s; safety %.2f)", policy.name,
                            st.switch_reason, st.safety or float("nan"))
            elif st.mode == "explore":
                log.warning("latency model not ready yet (%s): planning on its conservative provisional model",
                            st.reason)
            elif self._mode is not None:
                log.warning("latency model no longer good enough (%s): back to the safe allocation", st.reason)
            self._mode = st.mode


def follow_learned_model(core: ServingCore, policy: Policy) -> None:
    """Admission (and, while CPU is sized per batch, expiry and the sizer's view of the batch in flight)
    estimates service times on the learned latency model — at the largest allocation, and at the one in
    force — while the controller decides on that model (LearningPolicy in model mode); otherwise (None) on
    the core's online estimate. Called after each controller decision (the learner changes only then)."""
    model = policy.learner.model() if isinstance(policy, LearningPolicy) and policy.mode == "model" else None
    if model is None:
        core.reachable_latency = None
        core.latency_at = None
        return
    cpu_m = core.max_cpu_m
    core.reachable_latency = functools.lru_cache(maxsize=256)(lambda images: float(model.latency_ms(images, cpu_m)))
    # per-batch sizing's view of the batch in flight: l(images, c) at the allocation in force
    core.latency_at = functools.lru_cache(maxsize=4096)(lambda images, c: float(model.latency_ms(images, c)))


def make_per_batch(cfg: ServerConfig, core: ServingCore, scaler: ReplicaScaler, policy: Policy,
                   max_cpu_m: int) -> PerBatchSizer | None:
    """Per-batch CPU between decisions (sponge.server.per_batch) when the policy can size per batch (sponge
    with --per-batch, one replica); installed in the core, which calls it at every arrival, batch start
    and end. None otherwise (said in the log when it was asked for but cannot run)."""
    sizer = getattr(policy, "batch_cpu_m", None)
    if sizer is None:
        if cfg.per_batch and cfg.policy == "sponge" and cfg.replica_limit > 1:
            log.warning("per-batch CPU sizes one replica; with up to %d replicas the CPU follows the controller's "
                        "decisions only", cfg.replica_limit)
        return None
    per_batch = PerBatchSizer(core, sizer, scaler.resize, cfg.min_cpu_m, max_cpu_m, cfg.max_batch)
    core.batch_sizer = per_batch
    log.info("per-batch CPU between decisions: on (runs once the controller is on the learned model)")
    return per_batch


PROBE_BATCHES = (1, 2, 4, 8)


def make_prober(cfg: ServerConfig, core: ServingCore, scaler: ReplicaScaler, policy: LearningPolicy,
                max_cpu_m: int) -> IdleProber:
    """Background profiling in idle gaps for the policy's online learner (cells it still wants)."""
    from sponge.perf.profiler import default_cpu_grid

    learner = policy.learner
    levels = [c for c in default_cpu_grid(max_cpu_m) if c >= cfg.min_cpu_m]

    def expected(batch: int, cpu_m: int) -> float | None:
        """A probe's likely duration: the model's, else the costliest single image measured so far (in
        core-ms, CPU-bound work scales ~1/c) times the batch; None before anything was measured."""
        model = learner.model()
        if model is not None:
            return float(model.latency_ms(batch, cpu_m))
        per_image = [p95 * c / 1000.0 / b for (b, c), (_, p95) in learner.cell_stats().items()]
        return max(per_image) * batch * 1000.0 / cpu_m if per_image else None

    return IdleProber(core, scaler, learner.wanted_cells, core.record_batch, cpu_levels=levels,
                      batch_sizes=[b for b in PROBE_BATCHES if b <= cfg.max_batch], expected=expected)


def make_pool(cfg: ServerConfig, core: ServingCore, scaler: ReplicaScaler, model_path: str,
              max_threads: int) -> ReplicaPool | None:
    """Replicas added and removed while serving (--max-replicas above --replicas), each a worker process in
    its own cgroup from the same actuator choice as the first ones; None for a fixed count."""
    if cfg.replica_limit <= cfg.replicas:
        return None

    def make_actuator(name: str, cpu_m: int) -> CpuActuator:
        index = int(name[1:]) if name[1:].isdigit() else 0
        if cfg.actuator == "none":
            return NullActuator(cpu_m)
        return open_actuator(name, prefer=cfg.actuator, guaranteed=cfg.guaranteed, period_us=cfg.cfs_period_us,
                             index=index, replicas=cfg.replica_limit).actuator

    def make_replica(name: str, cpu_m: int) -> Replica:
        return Replica(name, model_path, threads_for(cpu_m), max_threads)

    log.info("horizontal scaling: %d to %d replicas (each new one pays a real cold start)", cfg.replicas,
             cfg.replica_limit)
    return ReplicaPool(core, scaler, make_replica, make_actuator, cfg.replica_limit)


def make_remote_replicas(cfg: ServerConfig) -> list[RemoteReplica]:
    """--backend remote: one RemoteReplica per --workers address, named by it."""
    return [RemoteReplica(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}", h, p) for h, p in cfg.worker_addresses()]


def follow_worker_limits(core: ServingCore, scaler: ReplicaScaler, replicas: list[Any]) -> None:
    """--backend remote: a worker reports the CPU limit it runs under (its container's quota; None when it has
    none); when it does, that is the replica's allocation in the core's bookkeeping and bill (its host gives
    it, nothing here moves it). Checked at every (re)connect."""
    def on_start(replica: Any, attach: Any = scaler._attach) -> None:
        limit = (getattr(replica, "worker_status", None) or {}).get("limit_m")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            act = scaler.actuators.get(replica.name)
            if act is not None:
                act.apply(limit)  # NullActuator: bookkeeping
            scaler.observed(replica.name, limit)
        attach(replica)

    for r in replicas:
        r.on_start = on_start


def make_k8s_pool(cfg: ServerConfig, core: ServingCore, scaler: ReplicaScaler, metrics: Metrics,
                  cpu_m: int) -> Any:
    """--backend kubernetes: the worker pods, discovered, resized and scaled through the API server."""
    from sponge.scaling.base import ActuatorError
    from sponge.server.k8s_pool import KubernetesPool

    try:
        from sponge.scaling.kubernetes import from_config
    except ImportError as exc:
        raise ConfigError(f"backend: {exc}") from None
    try:
        backend = from_config(cfg.namespace or "", cfg.selector or "", cfg.kube_context, registry=metrics.registry)
    except (ActuatorError, ValueError) as exc:
        raise ConfigError(f"backend: {exc}") from None
    log.warning("kubernetes backend: worker pods %r in namespace %s (port %d), deployment %s scaled to 1..%d, "
                "resized in place (%d..%d m)", cfg.selector, cfg.namespace, cfg.worker_port, cfg.worker_deployment,
                cfg.replica_limit, scaler.min_cpu_m, scaler.max_cpu_m)
    return KubernetesPool(core, scaler, backend, deployment=cfg.worker_deployment, container=cfg.worker_container,
                          port=cfg.worker_port, max_replicas=cfg.replica_limit, cpu_m=cpu_m)


def build_app(cfg: ServerConfig) -> FastAPI:
    t0 = time.monotonic()
    admin_token = resolve_admin_token(cfg)
    local = cfg.backend == "local"
    model_file: Path | None
    if local:
        model_file, model_name = resolve_model(cfg)  # validated before any actuator (cgroup) exists
    else:
        model_file, model_name = resolve_remote_model(cfg)
    model_path = model_file if model_file is not None else Path(model_name)  # for logs
    t_model = time.monotonic()
    if local:
        log.info("model %s ready in %.1f s", model_path, t_model - t0)
    max_threads = len(os.sched_getaffinity(0))
    if local:
        max_cpu_m = min(cfg.max_cpu_m or machine_cpu_m(), machine_cpu_m())
    else:  # the workers' hosts are not this one: --max-cpu-m, else this host's cores as a stand-in
        max_cpu_m = cfg.max_cpu_m or machine_cpu_m()
    cpu_m = min(cfg.cpu_m or max_cpu_m, max_cpu_m)
    if cpu_m < cfg.min_cpu_m:
        raise ConfigError(f"cpu_m ({cpu_m}) is below min_cpu_m ({cfg.min_cpu_m})")
    threads = threads_for(cpu_m)
    metrics = Metrics()
    replicas: list[Any]
    if local:
        replicas = [Replica(f"r{i}", str(model_path), threads, max_threads) for i in range(cfg.replicas)]
    elif cfg.backend == "remote":
        replicas = make_remote_replicas(cfg)
    else:  # kubernetes: discovered while serving
        replicas = []
    initial_replicas = len(replicas) if cfg.backend == "remote" else cfg.replicas
    core = ServingCore(model_name, replicas, cfg.batch, cfg.queue_capacity, ExpiryPolicy(cfg.expiry_policy),
                       cfg.max_batch_wait_ms, metrics, cpu_m, replica_timeout_floor_ms=cfg.replica_timeout_floor_ms,
                       replica_timeout_factor=cfg.replica_timeout_factor, admission=cfg.admission,
                       # the largest allocation the controller can reach: static never moves
                       max_cpu_m=cpu_m if cfg.policy == "static" else max_cpu_m,
                       admission_headroom=cfg.admission_headroom)
    actuators: dict[str, CpuActuator]
    if local:
        actuators, why = make_actuators(cfg, [r.name for r in replicas], cpu_m)
        kind = next(iter(actuators.values())).kind
    elif cfg.backend == "remote":
        actuators = {r.name: NullActuator(cpu_m) for r in replicas}
        kind, why = "none", "remote workers: their CPU is whatever their hosts give them (bookkeeping only)"
    else:
        actuators = {}
        kind, why = "kubernetes", "worker pods resized in place through pods/resize (the kubelet applies it)"
    scaler = ReplicaScaler(core, actuators, cfg.min_cpu_m, max_cpu_m)
    if cfg.backend == "remote":
        follow_worker_limits(core, scaler, replicas)
    log.warning("CPU actuator: %s — %s", kind, why)
    pool: Any = None
    k8s_pool: Any = None
    if local:
        pool = make_pool(cfg, core, scaler, str(model_path), max_threads)
    elif cfg.backend == "kubernetes":
        pool = k8s_pool = make_k8s_pool(cfg, core, scaler, metrics, cpu_m)
    policy: Policy
    prober: IdleProber | None = None
    if cfg.policy == "static":
        policy = StaticPolicy(cpu_m=cpu_m, batch=cfg.batch, replicas=initial_replicas)
    elif cfg.policy == "hpa":  # usage-based: no latency model to learn
        policy = make_policy("hpa", None, **hpa_params(cfg, max_cpu_m))
    else:
        if model_file is not None:
            profile, why = load_offline_profile(cfg, model_file)
        else:
            profile, why = None, "no model file here (the workers hold it)"
        policy = make_learning_policy(cfg, profile, cpu_m, max_cpu_m)
        status = policy.status()
        if status.ready:
            log.info("latency model: %s, good enough to start with (%s)", why, status.reason)
        else:
            log.warning("latency model: %s; serving at the safe allocation %d m, batch %d, and learning the "
                        "model online (%s)", why, cpu_m, cfg.batch, status.reason)
        if cfg.auto_profile and local:  # a probe resizes and restores at once: cgroup quotas, not pods
            prober = make_prober(cfg, core, scaler, policy, max_cpu_m)
    reporter = DecisionReporter(metrics, policy, prober)
    trimmer = IdleTrimmer()
    per_batch = make_per_batch(cfg, core, scaler, policy, max_cpu_m)

    def on_decision(entry: DecisionLogEntry) -> None:
        reporter(entry)
        follow_learned_model(core, policy)
        if per_batch is not None:  # the policy's state changed: size now (or hand the CPU back to the decision)
            per_batch.decided(controller.current)
            entry.explanation += per_batch.take_window()
        trimmer(core.arrivals, len(core.queue))  # after a burst, give its freed memory back to the OS

    controller = Controller(policy, LiveView(core, scaler, pool), LiveApplier(core, scaler, cfg.max_batch, per_batch, pool),
                            Decision(cpu_m, cfg.batch, initial_replicas), cfg.interval_ms, clock=core.clock,
                            on_decision=on_decision)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if local:
            await asyncio.gather(*(r.start() for r in replicas))
        elif replicas:  # remote: serve with the workers that answer; the others reconnect in the background
            results = await asyncio.gather(*(r.start() for r in replicas), return_exceptions=True)
            for r, res in zip(replicas, results):
                if isinstance(res, BaseException):
                    log.warning("worker %s not reachable at start (%s): serving without it, reconnecting in the "
                                "background", r.name, res)
        for r in replicas:
            metrics.cpu.labels(r.name).set(core.cpu_m.get(r.name, cpu_m))
            if r.threads is not None:
                metrics.threads.labels(r.name).set(r.threads)
        core.start()
        log.info("froze %d startup objects out of the garbage collector's scans", freeze_startup_objects())
        if k8s_pool is not None:
            await k8s_pool.start()
            have = k8s_pool.ordered()
            if have >= 1 and have != controller.current.replicas:  # the controller starts from the truth
                log.warning("worker deployment %s has %d replica(s); the controller starts from that (it may "
                            "order 1..%d)", cfg.worker_deployment, have, cfg.replica_limit)
                controller.current = dataclasses.replace(controller.current, replicas=have)
        control_task = asyncio.create_task(controller.run(), name="controller")
        probe_task = asyncio.create_task(prober.run(), name="idle-prober") if prober is not None else None
        where = {"local": f"{len(replicas)} replica(s)", "remote": f"{len(replicas)} remote worker(s)",
                 "kubernetes": f"the worker pods {cfg.selector!r} of namespace {cfg.namespace}"}[cfg.backend]
        log.info("serving %s (%s) on %s, %d m each, batch %d; up %.1f s after the model file was",
                 model_name, model_path, where, cpu_m, cfg.batch, time.monotonic() - t_model)

        async def stop_all() -> None:
            control_task.cancel()
            if probe_task is not None:
                probe_task.cancel()
            await asyncio.gather(control_task, *([probe_task] if probe_task else []), return_exceptions=True)
            if k8s_pool is not None:  # no more pods join while the core stops
                k8s_pool._closed = True
            await core.close()
            if k8s_pool is not None:
                await k8s_pool.close()
            scaler.close()

        stopping: list[asyncio.Future[None]] = []

        async def stop_serving() -> None:
            """Idempotent and bounded (ServingCore.close): run at SIGTERM (run()'s server), again at the end."""
            if not stopping:
                stopping.append(asyncio.ensure_future(stop_all()))
            await asyncio.shield(stopping[0])

        app.state.stop_serving = stop_serving
        try:
            yield
        finally:
            await stop_serving()

    app = create_app(core, max_body_bytes=cfg.max_body_bytes, default_slo_ms=cfg.default_slo_ms,
                     max_clock_skew_ms=cfg.max_clock_skew_ms, max_request_batch=cfg.max_request_batch,
                     max_request_elements=cfg.max_request_elements, lifespan=lifespan)
    install_admin(app, core, admin_token, scaler, controller, max_batch=cfg.max_batch)
    app.state.scaler = scaler
    app.state.pool = pool
    app.state.controller = controller
    # the gRPC front door on the same core, limits and decoder threads; `run` starts it (--grpc-port)
    app.state.grpc = GrpcService(core, max_message_bytes=cfg.max_body_bytes, default_slo_ms=cfg.default_slo_ms,
                                 max_clock_skew_ms=cfg.max_clock_skew_ms, max_request_batch=cfg.max_request_batch,
                                 max_request_elements=cfg.max_request_elements, decoder=app.state.decoder)
    return app


def grpc_port_to_use(cfg: ServerConfig) -> ServerConfig:
    """A gRPC port asked for (flag, env, file) must be free: StartupError naming it otherwise. The default
    8001 taken by something else (another Triton, a second Sponge) only turns gRPC off, with a warning:
    the HTTP server, which the user did ask for, still starts."""
    if not cfg.grpc_port:
        return cfg
    if cfg.grpc_port == cfg.port:
        raise StartupError(f"--grpc-port {cfg.grpc_port} is also the HTTP --port{GRPC_PORT_HINT}")
    try:
        check_port_free(cfg.host, cfg.grpc_port, "gRPC ", GRPC_PORT_HINT)
    except StartupError as exc:
        if "grpc_port" in cfg.model_fields_set:
            raise
        log.warning("%s: serving HTTP only", exc)
        return cfg.model_copy(update={"grpc_port": 0})
    return cfg


def run(cfg: ServerConfig) -> None:
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    check_port_free(cfg.host, cfg.port)  # before anything is spawned: a taken port is one line, not a crash
    cfg = grpc_port_to_use(cfg)
    app = build_app(cfg)
    grpc_service: GrpcService = app.state.grpc
    failed: list[str] = []

    class Server(uvicorn.Server):
        """The gRPC server starts once uvicorn has started (the lifespan ran: replicas up, core serving; the
        HTTP port bound) on the same event loop, and stops with it.
        At SIGTERM the serving core stops at once (bounded), concurrently with uvicorn's wait for open
        connections: their requests are answered ("server is shutting down") rather than waited for. uvicorn
        runs the lifespan's end only after every connection has closed, so a request held in the queue
        would otherwise hold the exit forever. The gRPC server stops once the core has (`stop_grpc`)."""

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if cfg.grpc_port and self.started:
                try:
                    await grpc_service.start(cfg.host, cfg.grpc_port)
                except GrpcBindError as exc:  # taken since check_port_free: stop as uvicorn does
                    failed.append(f"gRPC port {cfg.grpc_port} on {cfg.host} is in use or cannot be bound "
                                  f"({exc}){GRPC_PORT_HINT}")
                    log.error("%s", failed[-1])
                    self.should_exit = True

        async def shutdown(self, sockets: Any = None) -> None:
            t0 = time.monotonic()
            stop = getattr(app.state, "stop_serving", None)
            stopping = asyncio.ensure_future(stop()) if stop is not None else None

            async def stop_grpc() -> None:
                """After the core: meanwhile every RPC, queued or arriving, is answered UNAVAILABLE "shutting
                down" by it (stopping gRPC first would cancel those still being received: CANCELLED, which
                says less). Then refuse new RPCs; the rest (uploads in progress) until SHUTDOWN_GRACE_S."""
                try:
                    if stopping is not None:
                        await asyncio.shield(stopping)
                finally:
                    await grpc_service.stop(max(0.2, SHUTDOWN_GRACE_S - (time.monotonic() - t0)))

            grpc_stopping = asyncio.ensure_future(stop_grpc())
            try:
                await super().shutdown(sockets)
            finally:
                if stopping is not None:
                    await stopping
                await grpc_stopping

    # Keep idle client connections for 75 s (like common proxies), not uvicorn's 5 s: clients that
    # send every few seconds would otherwise race the server closing their connection. A connection still
    # open SHUTDOWN_GRACE_S after SIGTERM (e.g. a slow upload) is dropped: the exit is bounded.
    Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False,
                          timeout_keep_alive=75, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)).run()
    if failed:
        raise StartupError(failed[0])


SHUTDOWN_GRACE_S = 3.0
