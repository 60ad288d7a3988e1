"""Schemathesis, every check, against the served `/openapi.json`: in process (ASGI), a fake replica behind
a real ServingCore, the admin API installed with a token and a bookkeeping actuator. Derandomized and
bounded (a handful of fuzzed examples per operation plus the coverage phase's boundary cases), so it
finishes in seconds even on a busy machine.

All of schemathesis' checks run, with two configured expectations (everything else as it ships):
* for `POST /v2/models/{model_name}/infer` a schema-valid body may still be a 400: what makes a V2 request
  servable (data length = product of the shape, this model's tensor names and datatypes, sent_at near
  now) is not expressible in JSON Schema;
* 503 (busy, not ready) and 504 (deadline cannot be met) are documented answers of inference and the
  readiness routes, not server errors; a 500 anywhere still fails.
Path parameters are pinned to the served model and replica, otherwise every case would be a 404."""

from __future__ import annotations

import contextlib
import os
from typing import Any, AsyncIterator

import pytest

schemathesis = pytest.importorskip("schemathesis")

from schemathesis.config import SchemathesisConfig  # noqa: E402

from sponge.server.admin import install_admin  # noqa: E402
from sponge.server.app import create_app  # noqa: E402
from sponge.server.scaler import NullActuator, ReplicaScaler  # noqa: E402
from test_front_door_fixes import FakeReplica, make_core  # noqa: E402

TOKEN = "schemathesis-token"


class ResizableReplica(FakeReplica):
    busy = False

    def set_threads(self, threads: int) -> None:
        self.threads = threads


def build_app() -> Any:
    core = make_core(ResizableReplica())

    started = False

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        # Schemathesis ends an ASGI app's lifespan after each test and starts it again for the next; the
        # core runs on its one event loop from the first start on (a closed core cannot start again).
        nonlocal started
        if not started:
            core.start()
            started = True
        yield

    app = create_app(core, max_body_bytes=1 << 20, default_slo_ms=1000.0, max_clock_skew_ms=200.0,
                     max_request_batch=8, lifespan=lifespan)
    scaler = ReplicaScaler(core, {"r0": NullActuator(1000)}, 100, 2000)
    install_admin(app, core, TOKEN, scaler, controller=None, max_batch=16)
    # A request this model serves, as the operation's example: the examples phase sends it, so the 200
    # answer is checked too (fuzzed bodies almost never fit a model's tensors).
    body = app.openapi()["paths"]["/v2/models/{model_name}/infer"]["post"]["requestBody"]["content"]
    body["application/json"] = {**body["application/json"], "example": {
        "id": "example", "parameters": {"slo_ms": 5000},
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
        "outputs": [{"name": "y"}]}}
    return app


# Derandomized by default; a longer, seeded exploration:
#   SPONGE_SCHEMATHESIS_SEED=7 SPONGE_SCHEMATHESIS_EXAMPLES=200 pytest tests/test_openapi_schemathesis.py
SEED = os.environ.get("SPONGE_SCHEMATHESIS_SEED")
EXAMPLES = int(os.environ.get("SPONGE_SCHEMATHESIS_EXAMPLES", "8"))
# 503 (busy / not ready) and 504 (the request's deadline cannot be met) are documented answers by design,
# not server errors; a 500 still fails `not_a_server_error`.
BY_DESIGN_5XX = {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503", "504"]}}
CONFIG = SchemathesisConfig.from_dict({
    "seed": int(SEED or "20261202"),
    "generation": {"max-examples": EXAMPLES, "deterministic": SEED is None},
    "headers": {"Authorization": f"Bearer {TOKEN}"},
    "parameters": {"path.model_name": "m", "path.name": "r0"},  # the served model and replica (else: all 404)
    "operations": [
        {"include-path": "/v2/models/{model_name}/infer",
         "checks": {**BY_DESIGN_5XX,
                    "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "503", "504"]}}},
        {"include-path-regex": "/ready$", "checks": BY_DESIGN_5XX},
    ],
})

schema = schemathesis.openapi.from_asgi("/openapi.json", build_app(), config=CONFIG)


@schema.parametrize()
def test_openapi_conformance_all_checks(case: Any) -> None:
    case.call_and_validate()
