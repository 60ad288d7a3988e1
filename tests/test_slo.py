"""Per-request budgets from parameters or headers (DESIGN §3)."""

import pytest

from sponge.protocol.v2 import ProtocolError
from sponge.server.slo import request_budget


def budget(params=None, headers=None, now_wall=1000.0):
    return request_budget(params or {}, headers or {}, arrival_ms=5000.0, wall_now_s=now_wall,
                          default_slo_ms=1000.0, max_clock_skew_ms=200.0)


def test_default_slo_and_deadline():
    b = budget()
    assert (b.slo_ms, b.network_ms, b.budget_ms, b.deadline_ms) == (1000, 0, 1000, 6000)


def test_slo_minus_network():
    b = budget({"slo_ms": 1000, "network_ms": 600})
    assert b.budget_ms == 400 and b.deadline_ms == 5400


def test_headers_when_no_parameters_and_parameters_win():
    assert budget(headers={"x-sponge-slo-ms": "300", "x-sponge-network-ms": "50"}).budget_ms == 250
    assert budget({"slo_ms": 500}, {"x-sponge-slo-ms": "300"}).slo_ms == 500


def test_sent_at_gives_upload_delay_and_bounds_skew():
    assert budget({"sent_at": 999.75}, now_wall=1000.0).network_ms == pytest.approx(250)
    assert budget({"sent_at": 1000.1}, now_wall=1000.0).network_ms == 0  # small skew: clamp
    with pytest.raises(ProtocolError, match="in the future"):
        budget({"sent_at": 1001.0}, now_wall=1000.0)
    with pytest.raises(ProtocolError, match="in the past"):
        budget({"sent_at": 1.0}, now_wall=100000.0)


def test_overspent_budget_is_negative_not_an_error():
    assert budget({"slo_ms": 100, "network_ms": 150}).budget_ms == -50


@pytest.mark.parametrize("params, field", [
    ({"slo_ms": -5}, "parameters.slo_ms"),
    ({"slo_ms": 0}, "parameters.slo_ms"),
    ({"slo_ms": 1e12}, "parameters.slo_ms"),
    ({"slo_ms": "fast"}, "parameters.slo_ms"),
    ({"slo_ms": True}, "parameters.slo_ms"),
    ({"network_ms": -1}, "parameters.network_ms"),
    ({"network_ms": float("nan")}, "parameters.network_ms"),
])
def test_bad_values_name_the_field(params, field):
    with pytest.raises(ProtocolError, match=field):
        budget(params)


def test_bad_header_names_the_header():
    with pytest.raises(ProtocolError, match="x-sponge-network-ms"):
        budget(headers={"x-sponge-network-ms": "-3"})
