"""Assemble a server from a ServerConfig: replicas, serving core, ASGI app; run it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI

from sponge.config import ConfigError, ServerConfig
from sponge.control import Controller
from sponge.perf.latency_model import LatencyModel
from sponge.policy.baselines import StaticPolicy
from sponge.policy.registry import make_policy
from sponge.policy.types import Decision, Policy
from sponge.runtime.replica import Replica
from sponge.scaling.base import CpuActuator
from sponge.scaling.guaranteed import open_actuator
from sponge.scaling.self_limit import threads_for
from sponge.scheduling.batcher import ExpiryPolicy
from sponge.server.admin import install_admin
from sponge.server.app import create_app
from sponge.server.core import ServingCore
from sponge.server.live import LiveApplier, LiveView
from sponge.server.metrics import Metrics
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
    return path, cfg.model_name or path.stem


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


def obtain_latency_model(cfg: ServerConfig, model_path: Path, max_cpu_m: int) -> LatencyModel:
    """The model's fitted profile: loaded if valid, else (with auto_profile) measured now and saved."""
    from sponge.perf.profile_store import ProfileError, load_profile, profile_path_for

    path = Path(cfg.profile) if cfg.profile else profile_path_for(model_path)
    limits = {"min_r2": cfg.profile_min_r2, "max_p95_rel_err": cfg.profile_max_error}
    try:
        profile = load_profile(path, model_path, **limits)
        measured_period = profile.machine.get("profiled_with", {}).get("cfs_period_us")
        if measured_period is not None and cfg.actuator != "none" and measured_period != cfg.cfs_period_us:
            raise ValueError(f"it was measured with a CFS period of {measured_period} us, the server uses "
                             f"{cfg.cfs_period_us} us")
        log.info("latency profile %s: l(b,c) = %.3g*b/c + %.3g*b + %.3g/c + %.3g ms", path, profile.model.g,
                 profile.model.d, profile.model.e, profile.model.h)
        return profile.model
    except FileNotFoundError:
        why = f"no profile at {path}"
    except (ProfileError, ValueError) as exc:
        why = f"profile {path} refused: {exc}"
    if not cfg.auto_profile or cfg.profile:
        raise ConfigError(f"{why}; run `sponge profile --model {model_path}` or use --policy static")
    from sponge.perf.profiler import quick_profile

    log.warning("%s — profiling the model now (once; saved for later starts)", why)
    profile = quick_profile(model_path, max_cpu_m=max_cpu_m, out=path, actuator=cfg.actuator, progress=True,
                            period_us=cfg.cfs_period_us, guaranteed=cfg.guaranteed, **limits)
    return profile.model


def make_policy_for(cfg: ServerConfig, model: LatencyModel | None, cpu_m: int, max_cpu_m: int) -> Policy:
    if cfg.policy == "static" or model is None:
        return StaticPolicy(cpu_m=cpu_m, batch=cfg.batch, replicas=cfg.replicas)
    if cfg.policy == "paper":
        return make_policy("paper", model, max_cores=max(1, max_cpu_m // 1000), max_batch=cfg.max_batch)
    return make_policy("sponge", model, min_cpu_m=cfg.min_cpu_m, max_cpu_m=max_cpu_m, max_batch=cfg.max_batch)


def build_app(cfg: ServerConfig) -> FastAPI:
    model_path, model_name = resolve_model(cfg)
    max_threads = len(os.sched_getaffinity(0))
    max_cpu_m = min(cfg.max_cpu_m or machine_cpu_m(), machine_cpu_m())
    cpu_m = min(cfg.cpu_m or max_cpu_m, max_cpu_m)
    if cpu_m < cfg.min_cpu_m:
        raise ConfigError(f"cpu_m ({cpu_m}) is below min_cpu_m ({cfg.min_cpu_m})")
    threads = threads_for(cpu_m)
    metrics = Metrics()
    replicas = [Replica(f"r{i}", str(model_path), threads, max_threads) for i in range(cfg.replicas)]
    core = ServingCore(model_name, replicas, cfg.batch, cfg.queue_capacity, ExpiryPolicy(cfg.expiry_policy),
                       cfg.max_batch_wait_ms, metrics, cpu_m, replica_timeout_floor_ms=cfg.replica_timeout_floor_ms,
                       replica_timeout_factor=cfg.replica_timeout_factor)
    actuators, why = make_actuators(cfg, [r.name for r in replicas], cpu_m)
    scaler = ReplicaScaler(core, actuators, cfg.min_cpu_m, max_cpu_m)
    kind = next(iter(actuators.values())).kind
    log.warning("CPU actuator: %s — %s", kind, why)
    latency_model = None if cfg.policy == "static" else obtain_latency_model(cfg, model_path, max_cpu_m)
    policy = make_policy_for(cfg, latency_model, cpu_m, max_cpu_m)
    controller = Controller(policy, LiveView(core, scaler), LiveApplier(core, scaler, cfg.max_batch),
                            Decision(cpu_m, cfg.batch, cfg.replicas), cfg.interval_ms, clock=core.clock,
                            on_decision=lambda e: (metrics.arrival_rate.set(e.arrival_rate_rps),
                                                   metrics.decisions.labels(e.policy, str(e.feasible).lower()).inc()))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.gather(*(r.start() for r in replicas))
        metrics.replicas.set(len(replicas))
        for r in replicas:
            metrics.cpu.labels(r.name).set(cpu_m)
            metrics.threads.labels(r.name).set(r.threads)
        core.start()
        control_task = asyncio.create_task(controller.run(), name="controller")
        log.info("serving %s (%s) on %d replica(s), %d m each, batch %d", model_name, model_path,
                 len(replicas), cpu_m, cfg.batch)
        try:
            yield
        finally:
            control_task.cancel()
            await asyncio.gather(control_task, return_exceptions=True)
            await core.close()
            scaler.close()

    app = create_app(core, max_body_bytes=cfg.max_body_bytes, default_slo_ms=cfg.default_slo_ms,
                     max_clock_skew_ms=cfg.max_clock_skew_ms, max_request_batch=cfg.max_request_batch,
                     lifespan=lifespan)
    install_admin(app, core, cfg.admin_token, scaler, controller)
    app.state.scaler = scaler
    return app


def run(cfg: ServerConfig) -> None:
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = build_app(cfg)
    # Keep idle client connections for 75 s (like common proxies), not uvicorn's 5 s: clients that
    # send every few seconds would otherwise race the server closing their connection.
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False,
                timeout_keep_alive=75)
