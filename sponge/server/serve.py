"""Assemble a server from a ServerConfig: replicas, serving core, ASGI app; run it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI

from sponge.config import ServerConfig
from sponge.runtime.replica import Replica
from sponge.scheduling.batcher import ExpiryPolicy
from sponge.server.admin import install_admin
from sponge.server.app import create_app
from sponge.server.core import ServingCore
from sponge.server.metrics import Metrics

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


def build_app(cfg: ServerConfig) -> FastAPI:
    model_path, model_name = resolve_model(cfg)
    max_threads = len(os.sched_getaffinity(0))
    cpu_m = cfg.cpu_m or machine_cpu_m()
    threads = max(1, min(max_threads, -(-cpu_m // 1000)))
    metrics = Metrics()
    replicas = [Replica(f"r{i}", str(model_path), threads, max_threads) for i in range(cfg.replicas)]
    core = ServingCore(model_name, replicas, cfg.batch, cfg.queue_capacity, ExpiryPolicy(cfg.expiry_policy),
                       cfg.max_batch_wait_ms, metrics, cpu_m)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.gather(*(r.start() for r in replicas))
        metrics.replicas.set(len(replicas))
        for r in replicas:
            metrics.cpu.labels(r.name).set(cpu_m)
            metrics.threads.labels(r.name).set(r.threads)
        core.start()
        log.info("serving %s (%s) on %d replica(s), %d m each, batch %d", model_name, model_path,
                 len(replicas), cpu_m, cfg.batch)
        try:
            yield
        finally:
            await core.close()

    app = create_app(core, max_body_bytes=cfg.max_body_bytes, default_slo_ms=cfg.default_slo_ms,
                     max_clock_skew_ms=cfg.max_clock_skew_ms, max_request_batch=cfg.max_request_batch,
                     lifespan=lifespan)
    install_admin(app, core, cfg.admin_token)
    return app


def run(cfg: ServerConfig) -> None:
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = build_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False)
