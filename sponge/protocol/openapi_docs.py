"""OpenAPI description of the V2 infer operation (the handler reads the raw body itself, to support
the binary tensor extension, so the schema is declared here rather than inferred)."""

from __future__ import annotations

from typing import Any

from sponge.server.slo import DECIMAL_PATTERN

_TENSOR: dict[str, Any] = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                                                "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]},
        "parameters": {"type": "object", "properties": {
            "binary_data_size": {"type": "integer", "minimum": 0,
                                 "description": "bytes of this tensor in the binary section"}}},
        "data": {"description": "tensor elements, flat or nested, row-major", "type": "array", "items": {}},
    },
}

_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "properties": {
            "slo_ms": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600000,
                       "description": "end-to-end objective of this request (default: server's)"},
            "network_ms": {"type": "number", "minimum": 0, "maximum": 3600000,
                           "description": "time spent/expected in the network outside the server"},
            "sent_at": {"type": "number", "description": "client send time, Unix epoch seconds"},
            "binary_data_output": {"type": "boolean"},
        }},
        "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"},
            "parameters": {"type": "object", "properties": {
                "binary_data": {"type": "boolean"},
                "classification": {"type": "integer", "minimum": 0,
                                   "description": "return top-k 'score:index:label' strings"}}}}}},
    },
}

_RESPONSE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "model_name": {"type": "string"},
        "id": {"type": "string"},
        "parameters": {"type": "object", "description": "server-side timing and the request's budget",
                       "properties": {k: {"type": "number"} for k in (
                           "slo_ms", "network_ms", "budget_ms", "server_ms", "queue_ms", "infer_ms",
                           "batch_size", "cpu_m")} | {"deadline_met": {"type": "boolean"}}},
        "outputs": {"type": "array", "items": _TENSOR},
    },
}

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}

INFER_OPERATION: dict[str, Any] = {
    "parameters": [
        # Header values are text: numbers are described by their pattern (the server refuses others, 400).
        {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
         "schema": {"type": "string", "pattern": "^[0-9]+$"},
         "description": "binary tensor extension: length of the JSON header in bytes"},
        {"name": "x-sponge-slo-ms", "in": "header", "required": False,
         "schema": {"type": "string", "pattern": DECIMAL_PATTERN},
         "description": "like parameters.slo_ms (the parameter wins); ms, in (0, 3600000]"},
        {"name": "x-sponge-network-ms", "in": "header", "required": False,
         "schema": {"type": "string", "pattern": DECIMAL_PATTERN},
         "description": "like parameters.network_ms; ms, in [0, 3600000]"},
        {"name": "x-sponge-sent-at", "in": "header", "required": False,
         "schema": {"type": "string", "pattern": DECIMAL_PATTERN},
         "description": "like parameters.sent_at; Unix epoch seconds"},
    ],
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": _REQUEST},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": "JSON header followed by binary tensors"},
    }},
    "responses": {
        "200": {"description": "inference result", "content": {
            "application/json": {"schema": _RESPONSE},
            "application/octet-stream": {"schema": {
                "type": "string", "format": "binary", "description": "binary tensor extension: JSON header (its "
                "length in the Inference-Header-Content-Length header), then the tensors"}}}},
        "400": {"description": "malformed request (the message names the field)",
                "content": {"application/json": {"schema": _ERROR}}},
        "404": {"description": "unknown model", "content": {"application/json": {"schema": _ERROR}}},
        "413": {"description": "body, or a tensor's declared size, over the server's limit",
                "content": {"application/json": {"schema": _ERROR}}},
        "500": {"description": "inference failed", "content": {"application/json": {"schema": _ERROR}}},
        "503": {"description": "server busy (queue full, or the request would not finish in time; or no worker ready yet); see Retry-After",
                "headers": {"Retry-After": {"description": "seconds", "schema": {"type": "string"}}},
                "content": {"application/json": {"schema": _ERROR}}},
        "504": {"description": "the request's deadline cannot be met",
                "content": {"application/json": {"schema": _ERROR}}},
    },
}


# ---- every other route: each status it can answer, with its body (schemathesis checks them all) --------
def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json(_ERROR)}


_BOOL = {"type": "boolean"}
LIVE_RESPONSES: dict[int | str, Any] = {
    200: {"description": "the server is live (V2: `{\"live\": true}`)",
          "content": _json({"type": "object", "required": ["live"], "properties": {"live": _BOOL}})},
}
_READY = {"type": "object", "required": ["ready"], "properties": {"ready": _BOOL}}
READY_RESPONSES: dict[int | str, Any] = {
    200: {"description": "a replica can serve (`{\"ready\": true}`)", "content": _json(_READY)},
    503: {"description": "no replica can serve yet (`{\"ready\": false}`)", "content": _json(_READY)},
}
_MODEL_READY = {"type": "object", "required": ["name", "ready"],
                "properties": {"name": {"type": "string"}, "ready": _BOOL}}
MODEL_READY_RESPONSES: dict[int | str, Any] = {
    200: {"description": "the model can serve (`{\"name\": …, \"ready\": true}`)", "content": _json(_MODEL_READY)},
    503: {"description": "no replica of the model can serve yet (`\"ready\": false`)",
          "content": _json(_MODEL_READY)},
    404: error_response("unknown model"),
}
SERVER_METADATA_RESPONSES: dict[int | str, Any] = {
    200: {"description": "server metadata (V2)", "content": _json({
        "type": "object", "required": ["name", "version", "extensions"],
        "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                       "extensions": {"type": "array", "items": {"type": "string"}}}})},
}
_METADATA_TENSOR = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string"}, "datatype": {"type": "string"},
    "shape": {"type": "array", "items": {"type": "integer"}, "description": "-1: variable"}}}
MODEL_METADATA_RESPONSES: dict[int | str, Any] = {
    200: {"description": "model metadata (V2)", "content": _json({
        "type": "object", "required": ["name", "platform", "inputs", "outputs"],
        "properties": {"name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
                       "platform": {"type": "string"},
                       "inputs": {"type": "array", "items": _METADATA_TENSOR},
                       "outputs": {"type": "array", "items": _METADATA_TENSOR}}})},
    404: error_response("unknown model"),
    503: {**error_response("no replica (worker) has been ready yet: the model's tensors are unknown"),
          "headers": {"Retry-After": {"description": "seconds", "schema": {"type": "string"}}}},
}


def metrics_responses(content_type: str) -> dict[int | str, Any]:
    return {200: {"description": "Prometheus text exposition format",
                  "content": {content_type: {"schema": {"type": "string"}}}}}


# The operator API: bearer token; 403 when the server runs without one, 401 for a missing/wrong token.
ADMIN_SECURITY: list[dict[str, list[str]]] = [{"adminToken": []}]
SECURITY_SCHEMES: dict[str, Any] = {
    "adminToken": {"type": "http", "scheme": "bearer",
                   "description": "--admin-token / --admin-token-file / SPONGE_ADMIN_TOKEN"}}
_ADMIN_DENIED: dict[int | str, Any] = {
    401: {**error_response("missing or wrong bearer token"),
          "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}},
    403: error_response("admin API disabled (the server has no admin token)"),
}


def admin_responses(ok: dict[str, Any], **errors: str) -> dict[int | str, Any]:
    """200 with `ok` as its JSON schema, the auth failures, and `errors` (e.g. `e400="..."`)."""
    return {200: {"description": "OK", "content": _json(ok)}, **_ADMIN_DENIED,
            **{int(k[1:]): error_response(v) for k, v in errors.items()}}


def admin_body(field: str, minimum: int, maximum: int | None, description: str) -> dict[str, Any]:
    """The JSON body `{field: N}` of an admin PUT (the handler reads it itself)."""
    prop: dict[str, Any] = {"type": "integer", "minimum": minimum, "description": description}
    if maximum is not None:
        prop["maximum"] = maximum
    return {"requestBody": {"required": True, "content": _json(
        {"type": "object", "required": [field], "properties": {field: prop}})}}
