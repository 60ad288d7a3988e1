"""Per-request SLO on the wire (DESIGN §3): parameters `slo_ms`, `network_ms`, `sent_at`
(or headers `x-sponge-slo-ms`, `x-sponge-network-ms`, `x-sponge-sent-at`) -> budget and deadline."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from sponge.protocol.v2 import ProtocolError

MAX_SLO_MS = 3_600_000.0  # one hour: anything longer is a unit mistake, not an objective
HEADER_OF = {"slo_ms": "x-sponge-slo-ms", "network_ms": "x-sponge-network-ms", "sent_at": "x-sponge-sent-at"}
# A header's number: plain decimal (what the OpenAPI document's pattern says), not Python's float() syntax
# ("1_000", "inf", "nan" are refused).
DECIMAL_PATTERN = r"^[+-]?([0-9]+([.][0-9]*)?|[.][0-9]+)([eE][+-]?[0-9]+)?$"
_DECIMAL = re.compile(DECIMAL_PATTERN)


@dataclass(frozen=True)
class Budget:
    slo_ms: float
    network_ms: float
    budget_ms: float  # slo_ms - network_ms: the server's share (may be <= 0: already late)
    deadline_ms: float  # arrival + budget on the server's monotonic clock


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool):
        raise ProtocolError(f"'{field}' must be a number, got a boolean")
    if isinstance(value, str):  # only a header carries its number as text
        if not field.startswith("header ") or not _DECIMAL.match(value.strip()):
            raise ProtocolError(f"'{field}' must be a number, got {value!r}")
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"'{field}' must be a finite number, got {value!r}")
    return float(value)


def _lookup(params: Mapping[str, Any], headers: Mapping[str, str], key: str) -> tuple[Any, str] | None:
    h = HEADER_OF[key]
    if key in params:
        if h in headers:  # the parameter wins, but a malformed header is still an error
            _number(headers[h], f"header {h}")
        return params[key], f"parameters.{key}"
    if h in headers:
        return headers[h], f"header {h}"
    return None


def request_budget(
    params: Mapping[str, Any],
    headers: Mapping[str, str],
    arrival_ms: float,
    wall_now_s: float,
    default_slo_ms: float,
    max_clock_skew_ms: float,
) -> Budget:
    """Compute a request's budget; parameters win over headers. Raises ProtocolError naming the field."""
    slo_ms = default_slo_ms
    found = _lookup(params, headers, "slo_ms")
    if found is not None:
        slo_ms = _number(*found)
        if not 0 < slo_ms <= MAX_SLO_MS:
            raise ProtocolError(f"'{found[1]}' must be in (0, {MAX_SLO_MS:.0f}] ms, got {slo_ms}")
    network_ms = 0.0
    net = _lookup(params, headers, "network_ms")
    sent = _lookup(params, headers, "sent_at")
    if net is not None:
        network_ms = _number(*net)
        if not 0 <= network_ms <= MAX_SLO_MS:
            raise ProtocolError(f"'{net[1]}' must be in [0, {MAX_SLO_MS:.0f}] ms, got {network_ms}")
    elif sent is not None:
        sent_at = _number(*sent)
        delay_ms = (wall_now_s - sent_at) * 1000.0
        if delay_ms < -max_clock_skew_ms:
            raise ProtocolError(
                f"'{sent[1]}' is {-delay_ms:.0f} ms in the future (allowed clock skew {max_clock_skew_ms:.0f} ms)"
            )
        if delay_ms > slo_ms + max_clock_skew_ms:  # already hopeless, or the client's clock is off
            raise ProtocolError(
                f"'{sent[1]}' is {delay_ms:.0f} ms in the past, more than slo_ms + allowed clock skew "
                f"({slo_ms:.0f} + {max_clock_skew_ms:.0f} ms): the client's clock looks skewed"
            )
        network_ms = max(0.0, delay_ms)
    budget = slo_ms - network_ms
    return Budget(slo_ms, network_ms, budget, arrival_ms + budget)
