"""OpenAPI description of the V2 infer operation (the handler reads the raw body itself, to support
the binary tensor extension, so the schema is declared here rather than inferred)."""

from __future__ import annotations

from typing import Any

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

_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}}

INFER_OPERATION: dict[str, Any] = {
    "parameters": [
        {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
         "schema": {"type": "integer"}, "description": "binary tensor extension: length of the JSON header"},
        {"name": "x-sponge-slo-ms", "in": "header", "required": False, "schema": {"type": "number"}},
        {"name": "x-sponge-network-ms", "in": "header", "required": False, "schema": {"type": "number"}},
        {"name": "x-sponge-sent-at", "in": "header", "required": False, "schema": {"type": "number"}},
    ],
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": _REQUEST},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": "JSON header followed by binary tensors"},
    }},
    "responses": {
        "200": {"description": "inference result", "content": {"application/json": {"schema": _RESPONSE}}},
        "400": {"description": "malformed request (the message names the field)",
                "content": {"application/json": {"schema": _ERROR}}},
        "404": {"description": "unknown model", "content": {"application/json": {"schema": _ERROR}}},
        "413": {"description": "body too large", "content": {"application/json": {"schema": _ERROR}}},
        "500": {"description": "inference failed", "content": {"application/json": {"schema": _ERROR}}},
        "503": {"description": "queue full; see Retry-After", "content": {"application/json": {"schema": _ERROR}}},
        "504": {"description": "the request's deadline cannot be met",
                "content": {"application/json": {"schema": _ERROR}}},
    },
}
