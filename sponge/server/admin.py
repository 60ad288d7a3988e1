"""Operator API (/admin): replica state, and later CPU changes. Bearer-token protected; disabled
when no token is configured, so inference clients can never resize the server."""

from __future__ import annotations

import hmac

import orjson
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from sponge.control import Controller
from sponge.protocol import openapi_docs as docs
from sponge.server.core import ServingCore
from sponge.server.scaler import ReplicaScaler


async def _json_field(request: Request, field: str) -> int:
    """Read an integer field from a JSON body; ValueError names the field."""
    try:
        doc = await request.json()
    except ValueError:
        raise ValueError("body must be JSON") from None
    value = doc.get(field) if isinstance(doc, dict) else None
    if isinstance(value, float) and value.is_integer():  # JSON has one number type: 8.0 is the integer 8
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"'{field}' must be an integer")
    return value


def _bad(message: str, status: int = 400) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, media_type="application/json")


_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_REPLICAS = {"type": "object", "required": ["replicas", "batch", "queue_length"], "properties": {
    "replicas": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "pid": {"type": ["integer", "null"]}, "ready": {"type": "boolean"},
        "threads": {"type": "integer"}, "cpu_m": {"type": "integer"}, "restarts": {"type": "integer"},
        "state": {"type": "string", "enum": ["starting", "ready", "draining"]}}}},
    "batch": {"type": "integer"}, "queue_length": {"type": "integer"}}}
_RESIZED = {"type": "object", "required": ["replica", "cpu_m", "threads", "apply_ms"], "properties": {
    "replica": {"type": "string"}, "cpu_m": {"type": "integer"}, "threads": {"type": "integer"},
    "apply_ms": {"type": "number"}}}
_BATCH = {"type": "object", "required": ["batch"], "properties": {"batch": {"type": "integer"}}}


def install_admin(app: FastAPI, core: ServingCore, token: str | None, scaler: ReplicaScaler | None = None,
                  controller: Controller | None = None, max_batch: int | None = None) -> None:
    """`max_batch`: the largest batch `PUT /admin/batch` accepts (the server's --max-batch); None: the
    batch size the core started with."""
    batch_cap = max_batch if max_batch is not None else core.batcher.batch_size
    cpu_bounds = (scaler.min_cpu_m, scaler.max_cpu_m) if scaler is not None else (1, None)
    secured = {"security": docs.ADMIN_SECURITY}

    def denied(request: Request) -> Response | None:
        if token is None:
            return Response('{"error":"admin API disabled: start the server with --admin-token, '
                            '--admin-token-file or SPONGE_ADMIN_TOKEN"}',
                            status_code=403, media_type="application/json")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return Response('{"error":"missing or wrong bearer token in header Authorization"}',
                            status_code=401, media_type="application/json", headers={"WWW-Authenticate": "Bearer"})
        return None

    @app.get("/admin/replicas", tags=["admin"], summary="Replica processes and their allocations",
             responses=docs.admin_responses(_REPLICAS), openapi_extra=secured)
    async def replicas(request: Request) -> Any:
        if (resp := denied(request)) is not None:
            return resp
        return {"replicas": [
            {"name": r.name, "pid": r.pid, "ready": r.ready, "threads": r.threads,
             "cpu_m": core.cpu_m[r.name], "restarts": r.restarts,
             "state": core.state.get(r.name, "ready")} for r in core.replicas],
            "batch": core.batcher.batch_size, "queue_length": len(core.queue)}

    @app.put("/admin/replicas/{name}/cpu", tags=["admin"], summary="Resize a replica in place: {\"cpu_m\": N}",
             responses=docs.admin_responses(_RESIZED, e400="'cpu_m' missing, not an integer or out of bounds",
                                            e404="no replica of that name", e409="no actuator configured"),
             openapi_extra={**secured, **docs.admin_body("cpu_m", *cpu_bounds, "CPU in millicores")})
    async def resize(name: str, request: Request) -> Any:
        if (resp := denied(request)) is not None:
            return resp
        if scaler is None:
            return _bad("no actuator configured", 409)
        try:
            cpu_m = await _json_field(request, "cpu_m")
            result = scaler.resize(name, cpu_m)
        except KeyError as exc:
            return _bad(str(exc.args[0]), 404)
        except ValueError as exc:
            return _bad(str(exc))
        return {"replica": result.replica, "cpu_m": result.cpu_m, "threads": result.threads,
                "apply_ms": round(result.apply_ms, 3)}

    @app.put("/admin/batch", tags=["admin"], summary="Set the batch size: {\"batch\": B}, 1 <= B <= max_batch",
             responses=docs.admin_responses(_BATCH, e400="'batch' missing, not an integer or out of bounds"),
             openapi_extra={**secured, **docs.admin_body("batch", 1, batch_cap, "images per batch")})
    async def set_batch(request: Request) -> Any:
        if (resp := denied(request)) is not None:
            return resp
        try:
            b = await _json_field(request, "batch")
            if not 1 <= b <= batch_cap:
                raise ValueError(f"'batch' must be in [1, {batch_cap}] (max_batch), got {b}")
            core.set_batch(b)
        except ValueError as exc:
            return _bad(str(exc).replace("batch size", "'batch'"))
        return {"batch": core.batcher.batch_size}

    @app.get("/admin/decisions", tags=["admin"], summary="The controller's decision log (newest last)",
             responses=docs.admin_responses(_ANY_OBJECT), openapi_extra=secured)
    async def decisions(request: Request, since_ms: float = float("-inf")) -> Any:
        if (resp := denied(request)) is not None:
            return resp
        if controller is None:
            return {"policy": None, "decisions": []}
        return {"policy": controller.policy.name, "interval_ms": controller.interval_ms, "now_ms": core.clock(),
                "decisions": [e.as_dict() for e in controller.decisions if e.t_ms > since_ms]}

    @app.get("/admin/model", tags=["admin"], summary="The online latency model: mode, quality, measured cells",
             responses=docs.admin_responses(_ANY_OBJECT), openapi_extra=secured)
    async def latency_model(request: Request) -> Any:
        if (resp := denied(request)) is not None:
            return resp
        policy = controller.policy if controller is not None else None
        learner = getattr(policy, "learner", None)
        if learner is None:
            return {"policy": getattr(policy, "name", None), "learning": False}
        q = learner.quality()
        model = learner.model()
        return {"policy": policy.name, "learning": True, "mode": policy.mode,  # type: ignore[union-attr]
                "quality": {k: v for k, v in q.__dict__.items()}, "safety": learner.safety(),
                "model": model.to_dict() if model is not None else None,
                "cells": [{"batch": b, "cpu_m": c, "samples": n, "p95_ms": round(v, 3),
                           "predicted_ms": round(float(model.latency_ms(b, c)), 3) if model is not None else None}
                          for (b, c), (n, v) in sorted(learner.cell_stats().items())]}

    app.state.admin_denied = denied
