"""The one configuration object: validated, laptop-friendly defaults, loadable from a TOML/JSON
file, with environment variables (SPONGE_<FIELD>) and then CLI flags on top."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sponge.scheduling.batcher import DEFAULT_MAX_WAIT_MS


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(8001, ge=0, le=65535, description="port of the V2 gRPC service "
                           "(inference.GRPCInferenceService; 8001 as Triton's); 0 turns gRPC off")
    model: str | None = Field(None, description="path to an .onnx model; default: the packaged EfficientNet-Lite0")
    model_name: str | None = Field(None, description="name the model is served under (default: from the file)")
    default_slo_ms: float = Field(1000.0, gt=0, le=3_600_000)
    max_clock_skew_ms: float = Field(
        2000.0, ge=0, description="sent_at may be this far in the future, or this far beyond the request's "
        "slo_ms in the past, before it is refused as a skewed client clock"
    )
    expiry_policy: Literal["reject", "serve_late"] = "reject"
    queue_capacity: int = Field(1024, ge=1, le=1_000_000)
    admission: bool = Field(True, description="admit by deadline (expiry policy reject): refuse on arrival, 503 + "
                            "Retry-After, a request that would finish late behind the queued work, 504 one whose "
                            "budget is shorter than one inference at the largest allocation")
    admission_headroom: float = Field(
        1.5, ge=1.0, le=10.0, description="admission plays the queued work forward at this multiple of the "
        "expected batch latency: the margin admitted requests keep against latency noise (under overload the "
        "replicas stay busy whatever it is; a larger one keeps the queue shorter; 1.2 let 1-4 % of the admitted "
        "answer late at 3x overload on a shared 2-core host, 1.5 none, at the same on-time rate)")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest HTTP request body (413 beyond); "
                                "also the largest gRPC message received or sent")
    max_request_batch: int = Field(64, ge=1, description="largest batch one request may carry")
    max_request_elements: int | None = Field(
        None, ge=1, description="most elements one input tensor of a request may declare (413 beyond); "
        "default: max_request_batch x the model's per-item size, and for dimensions the model leaves free "
        "(-1) whatever max_body_bytes can carry")
    batch: int = Field(8, ge=1, le=1024, description="batch size (the controller may change it)")
    max_batch: int = Field(32, ge=1, le=1024, description="largest batch the controller may choose")
    max_batch_wait_ms: float = Field(
        DEFAULT_MAX_WAIT_MS, ge=0, description="longest wait for a fuller batch (slack permitting); 0 = greedy: a free replica takes what is queued"
    )
    replicas: int = Field(1, ge=1, le=64, description="replicas at start (local: each a worker process in its own cgroup; kubernetes: worker pods)")
    max_replicas: int | None = Field(None, ge=1, le=64, description="most replicas the controller may run: above "
                                     "--replicas, it adds replicas while serving (each pays a real cold start) and "
                                     "removes them (drained); the default policy is then joint (default: --replicas, "
                                     "a fixed count)")
    replica_timeout_floor_ms: float = Field(
        2000.0, gt=0, description="watchdog: a replica that has not answered a batch within max(this floor "
        "(scaled up below one core), replica_timeout_factor x the batch's expected latency) is killed and "
        "restarted; its batch fails (500)")
    replica_timeout_factor: float = Field(10.0, ge=1, description="watchdog: multiple of a batch's expected "
                                          "latency after which its replica counts as hung")
    cpu_m: int | None = Field(None, ge=1, description="CPU per replica in millicores (default: all cores)")
    min_cpu_m: int = Field(100, ge=1, description="smallest CPU per replica the controller may set")
    max_cpu_m: int | None = Field(None, ge=1, description="largest CPU per replica (default: all cores)")
    actuator: Literal["auto", "cgroup-v2", "cgroup-v1", "affinity", "none"] = "auto"
    cfs_period_us: int = Field(
        10_000, ge=1_000, le=1_000_000,
        description="CFS period of replica quotas; 10 ms spreads a fractional CPU evenly in time (the kernel's "
        "100 ms lets a small batch stall for the rest of a period: p99 at 250 m was 86 ms vs 50 ms here)")
    guaranteed: bool = Field(True, description="put replica cgroups under a high-CPU-weight parent, so a replica "
                             "gets its quota even when the front door or neighbours compete (like a Guaranteed pod)")
    policy: Literal["sponge", "paper", "static", "joint", "themis", "hpa"] = Field(
        "sponge", description="sponge: vertical (one replica; CPU per batch); joint: replicas + CPU per replica, "
        "the default with --max-replicas > 1; themis: the published vertical-then-horizontal rule; hpa: horizontal "
        "only (Kubernetes HPA-like, --max-cpu-m per replica); paper: the published Sponge rule; static: fixed")
    per_batch: bool = Field(True, description="between two controller decisions, size the replica's CPU per "
                            "batch to the work present (at every arrival, batch start and end: the least CPU "
                            "meeting the queued deadlines, never below the decision, the minimum when idle); "
                            "sponge on its learned model, one replica; off for policy static")
    profile: str | None = Field(None, description="latency profile JSON (default: <model>.profile.json)")
    auto_profile: bool = Field(True, description="learn the latency model online also from background "
                               "profiling batches run in idle gaps (served batches are always used)")
    profile_min_r2: float = Field(0.95, gt=0, le=1, description="sponge profile: refuse a profile whose four-term "
                                  "fit R² is lower (sponge serve uses any profile's cells to seed its online model)")
    profile_max_error: float = Field(
        0.35, gt=0, description="sponge profile: refuse a profile whose p95 relative error is higher (the four-term "
        "model fits EfficientNet-Lite0 here to ~15-30 %: thread-count steps and CFS noise; bench/profile.py)")
    interval_ms: float = Field(1000.0, gt=0)
    admin_token: str | None = Field(None, description="bearer token for /admin endpoints (unset: admin disabled); "
                                    "visible in `ps` as a flag: prefer SPONGE_ADMIN_TOKEN or admin_token_file")
    admin_token_file: str | None = Field(None, description="file holding the bearer token for /admin endpoints "
                                         "(read once at start, surrounding whitespace stripped)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    backend: Literal["local", "remote", "kubernetes"] = Field(
        "local", description="where the replicas run: local (worker processes here, each in its own cgroup), "
        "remote (the `sponge worker`s listed in --workers; their CPU is whatever their hosts give), kubernetes "
        "(the worker pods of --namespace matching --selector, discovered while serving, resized in place, "
        "their Deployment --worker-deployment scaled up to --max-replicas)")
    workers: str | None = Field(None, description="remote backend: the workers, host:port,host:port "
                                "(a port left out is --worker-port)")
    namespace: str | None = Field(None, description="kubernetes backend: the namespace of the worker pods")
    selector: str | None = Field(None, description="kubernetes backend: label selector of the worker pods "
                                 "(e.g. app=sponge-worker)")
    kube_context: str | None = Field(None, description="kubernetes backend: kubeconfig context to use "
                                     "(default: the pod's service account in a cluster, else the current context)")
    worker_deployment: str = Field("sponge-worker", description="kubernetes backend: the Deployment of the "
                                   "workers, scaled through its scale subresource")
    worker_container: str = Field("worker", description="kubernetes backend: the worker pods' container "
                                  "resized in place")
    worker_port: int = Field(9000, ge=1, le=65535, description="remote and kubernetes backends: the workers' port")

    @model_validator(mode="after")
    def _replica_range(self) -> "ServerConfig":
        """--max-replicas N > 1 makes joint the default policy (horizontal + vertical); below --replicas is
        an error naming both fields."""
        if self.max_replicas is not None:
            if self.max_replicas < self.replicas:
                raise ValueError(f"max_replicas ({self.max_replicas}) is below replicas ({self.replicas})")
            if self.max_replicas > 1 and "policy" not in self.model_fields_set:
                self.policy = "joint"
        return self

    @model_validator(mode="after")
    def _backend_fields(self) -> "ServerConfig":
        """Each backend's required fields, and no field of another backend (the message names the field)."""
        if self.backend == "remote":
            if not self.workers or not self.workers.strip(",; "):
                raise ValueError("workers: the remote backend needs --workers host:port[,host:port...]")
            n = len(self.worker_addresses())  # each address well formed
            if "replicas" in self.model_fields_set and self.replicas != n:
                raise ValueError(f"replicas: the remote backend runs one replica per --workers address ({n}), "
                                 f"not {self.replicas}")
            if "policy" not in self.model_fields_set:  # their CPU is their hosts': nothing to move
                self.policy = "static"
            if self.max_replicas is not None and self.max_replicas != self.replicas:
                raise ValueError("max_replicas: the remote backend serves the fixed list of --workers (use "
                                 "--backend kubernetes to add and remove workers)")
        elif self.workers is not None:
            raise ValueError(f"workers: only the remote backend takes --workers (backend is {self.backend})")
        if self.backend == "kubernetes":
            for name in ("namespace", "selector"):
                if not getattr(self, name):
                    raise ValueError(f"{name}: the kubernetes backend needs --{name}"
                                     + (" (e.g. app=sponge-worker)" if name == "selector" else ""))
        else:
            for name in ("namespace", "selector", "kube_context"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: only the kubernetes backend takes --{name.replace('_', '-')} "
                                     f"(backend is {self.backend})")
        return self

    def worker_addresses(self) -> list[tuple[str, int]]:
        """--workers as (host, port) pairs (ValueError naming the field if one is malformed)."""
        from sponge.runtime.remote import parse_addresses

        try:
            return parse_addresses(self.workers or "", self.worker_port)
        except ValueError as exc:
            raise ValueError(f"workers: {exc}") from None

    @property
    def replica_limit(self) -> int:
        """The most replicas this server runs (a fixed --replicas unless --max-replicas is above it)."""
        return self.max_replicas if self.max_replicas is not None else self.replicas

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> "ServerConfig":
        """File, then SPONGE_* environment variables, then explicit overrides (CLI flags)."""
        data: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            text = p.read_text()
            data.update(tomllib.loads(text) if p.suffix == ".toml" else json.loads(text))
        for name in cls.model_fields:
            env = os.environ.get(f"SPONGE_{name.upper()}")
            if env is not None:
                data[name] = env
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(str(exc)) from None


class ConfigError(ValueError):
    """Invalid configuration; the message names the field."""


def resolve_admin_token(cfg: ServerConfig) -> str | None:
    """The admin bearer token: `admin_token` (flag, SPONGE_ADMIN_TOKEN or config file) or the contents of
    `admin_token_file`, stripped; not both. ConfigError names the field."""
    if cfg.admin_token_file is None:
        return cfg.admin_token
    if cfg.admin_token is not None:
        raise ConfigError("admin_token and admin_token_file are both set: choose one")
    try:
        token = Path(cfg.admin_token_file).expanduser().read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"admin_token_file: cannot read {cfg.admin_token_file}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise ConfigError(f"admin_token_file: {cfg.admin_token_file} is empty")
    return token
