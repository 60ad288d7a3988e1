"""Workloads: request-rate traces, arrival times, network delay, and the per-request plan.

`generate_requests` is the one entry point the live load generator and the simulator share.
"""

from sponge.workload.arrivals import arrival_times_ms
from sponge.workload.network import (
    BandwidthTrace,
    MahimahiTrace,
    NetworkModel,
    RttModel,
    budget_ms,
    read_5gophers_rtt,
    read_5gophers_throughput,
    read_ghent_log,
    read_mahimahi,
    sponge_network_model,
)
from sponge.workload.requests import PlannedRequest, generate_requests
from sponge.workload.traces import (
    NAMED_WINDOWS,
    RateTrace,
    find_gaps,
    named_window,
    scale_to_mean,
    scale_to_peak,
    twitter_2018,
    twitter_2021,
    twitter_2021_counts,
)

__all__ = [
    "arrival_times_ms",
    "BandwidthTrace",
    "MahimahiTrace",
    "NetworkModel",
    "RttModel",
    "budget_ms",
    "read_5gophers_rtt",
    "read_5gophers_throughput",
    "read_ghent_log",
    "read_mahimahi",
    "sponge_network_model",
    "PlannedRequest",
    "generate_requests",
    "NAMED_WINDOWS",
    "RateTrace",
    "find_gaps",
    "named_window",
    "scale_to_mean",
    "scale_to_peak",
    "twitter_2018",
    "twitter_2021",
    "twitter_2021_counts",
]
