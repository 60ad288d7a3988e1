"""Operator API (/admin): replica state, and later CPU changes. Bearer-token protected; disabled
when no token is configured, so inference clients can never resize the server."""

from __future__ import annotations

import hmac

import orjson
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from sponge.control import Controller
from sponge.server.core import ServingCore
from sponge.server.scaler import ReplicaScaler


async def _json_field(request: Request, field: str) -> int:
    """Read an integer field from a JSON body; ValueError names the field."""
    try:
        doc = await request.json()
    except ValueError:
        raise ValueError("body must be JSON") from None
    value = doc.get(field) if isinstance(doc, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"'{field}' must be an integer")
    return value


def _bad(message: str, status: int = 400) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, media_type="application/json")


def install_admin(app: FastAPI, core: ServingCore, token: str | None, scaler: ReplicaScaler | None = None,
                  controller: Controller | None = None) -> None:
    def denied(request: Request) -> Response | None:
        if token is None:
            return Response('{"error":"admin API disabled: start the server with --admin-token"}',
                            status_code=403, media_type="application/json")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return Response('{"error":"missing or wrong bearer token in header Authorization"}',
                            status_code=401, media_type="application/json", headers={"WWW-Authenticate": "Bearer"})
        return None

    @app.get("/admin/replicas", tags=["admin"], summary="Replica processes and their allocations")
    async def replicas(request: Request) -> Any:
        if (resp := denied(request)) is not None:
            return resp
        return {"replicas": [
            {"name": r.name, "pid": r.pid, "ready": r.ready, "threads": r.threads,
             "cpu_m": core.cpu_m[r.name], "restarts": r.restarts} for r in core.replicas],
            "batch": core.batcher.batch_size, "queue_length": len(core.queue)}

    @app.put("/admin/replicas/{name}/cpu", tags=["admin"], summary="Resize a replica in place: {\"cpu_m\": N}")
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

    @app.put("/admin/batch", tags=["admin"], summary="Set the batch size: {\"batch\": B}")
    async def set_batch(request: Request) -> Any:
        if (resp := denied(request)) is not None:
            return resp
        try:
            b = await _json_field(request, "batch")
            core.set_batch(b)
        except ValueError as exc:
            return _bad(str(exc).replace("batch size", "'batch'"))
        return {"batch": core.batcher.batch_size}

    @app.get("/admin/decisions", tags=["admin"], summary="The controller's decision log (newest last)")
    async def decisions(request: Request, since_ms: float = float("-inf")) -> Any:
        if (resp := denied(request)) is not None:
            return resp
        if controller is None:
            return {"policy": None, "decisions": []}
        return {"policy": controller.policy.name, "interval_ms": controller.interval_ms, "now_ms": core.clock(),
                "decisions": [e.as_dict() for e in controller.decisions if e.t_ms > since_ms]}

    @app.get("/admin/model", tags=["admin"], summary="The online latency model: mode, quality, measured cells")
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
