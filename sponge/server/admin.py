"""Operator API (/admin): replica state, and later CPU changes. Bearer-token protected; disabled
when no token is configured, so inference clients can never resize the server."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from sponge.server.core import ServingCore


def install_admin(app: FastAPI, core: ServingCore, token: str | None) -> None:
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

    app.state.admin_denied = denied
