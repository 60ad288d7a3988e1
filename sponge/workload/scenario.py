"""One description of a workload scenario — rate trace, network trace, image size, SLO, seed — with
the CLI options to set it, shared by the live load generator and the simulator, so that a live run
and a simulated run of "the same scenario" really replay the same requests."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import numpy as np

from sponge.workload.network import NetworkModel, RttModel, read_ghent_log
from sponge.workload.requests import PlannedRequest, generate_requests
from sponge.workload.traces import RateTrace, named_window, scale_to_peak, twitter_2021


@dataclass(frozen=True)
class Scenario:
    trace: str = "twitter:bursty"  # twitter:<window name> | twitter:<start>-<end> | constant:<rps>
    damping: float | None = None  # Twitter damping factor (None: the window's own, 5)
    peak_rps: float | None = None  # scale the trace so its peak is this (what the machine can serve)
    duration_s: int | None = None  # truncate the trace to its first N seconds
    network: str = "ghent"  # ghent | none
    uplink_scale: float = 1.0  # Ghent is a downlink log; < 1 makes uploads slower
    rtt: str = "none"  # none | 5gophers | 5gophers:<carrier>-<server> | <constant ms>
    image_kib: float = 200.0  # size of the uploaded image, for the network delay
    slo_ms: float = 1000.0
    seed: int = 0

    def rate_trace(self) -> RateTrace:
        kind, _, arg = self.trace.partition(":")
        if kind == "constant":
            seconds = self.duration_s or 60
            tr = RateTrace(np.full(seconds, float(arg)), f"constant {arg} req/s")
        elif kind == "twitter" and "-" in arg and arg.replace("-", "").isdigit():
            start, end = (int(x) for x in arg.split("-"))
            tr = twitter_2021(start, end, self.damping or 1.0)
        elif kind == "twitter":
            tr = named_window(arg or "bursty", self.damping)
        else:
            raise ValueError(f"--trace must be twitter:<window>, twitter:<start>-<end> or constant:<rps>, "
                             f"got {self.trace!r}")
        if self.duration_s is not None:
            tr = RateTrace(tr.rps[: self.duration_s], f"{tr.description}, first {self.duration_s} s")
        if self.peak_rps is not None:
            tr = scale_to_peak(tr, self.peak_rps)
        return tr

    def network_model(self) -> NetworkModel | None:
        if self.network == "none":
            return None
        if self.network != "ghent":
            raise ValueError(f"--network must be ghent or none, got {self.network!r}")
        if self.rtt == "none":
            rtt = RttModel()
        elif self.rtt.startswith("5gophers"):
            _, _, who = self.rtt.partition(":")
            carrier, _, server = who.partition("-")
            rtt = RttModel.from_5gophers(carrier or None, server or None)
        else:
            rtt = RttModel.constant(float(self.rtt))
        return NetworkModel(read_ghent_log(), rule="simple", rtt=rtt, uplink_scale=self.uplink_scale)

    def plan(self) -> list[PlannedRequest]:
        return generate_requests(self.rate_trace(), self.network_model(), self.slo_ms,
                                 int(self.image_kib * 1024), seed=self.seed)

    def describe(self) -> dict[str, object]:
        return asdict(self)


def add_scenario_args(p: argparse.ArgumentParser) -> None:
    d = Scenario()
    g = p.add_argument_group("scenario (same options for `sponge load` and `sponge simulate`)")
    g.add_argument("--trace", default=d.trace, help="twitter:<bursty|steady_low|steady_high|fluctuating>, "
                   "twitter:<start>-<end> (seconds), or constant:<rps>")
    g.add_argument("--damping", type=float, default=None, help="Twitter damping factor (default: window's)")
    g.add_argument("--peak-rps", type=float, default=None, help="scale the trace to this peak rate")
    g.add_argument("--duration-s", type=int, default=None, help="use only the first N seconds")
    g.add_argument("--network", default=d.network, choices=["ghent", "none"])
    g.add_argument("--uplink-scale", type=float, default=d.uplink_scale)
    g.add_argument("--rtt", default=d.rtt, help="none, 5gophers[:<carrier>-<server>], or constant ms")
    g.add_argument("--image-kib", type=float, default=d.image_kib)
    g.add_argument("--slo-ms", type=float, default=d.slo_ms)
    g.add_argument("--seed", type=int, default=d.seed)


def scenario_from_args(a: argparse.Namespace) -> Scenario:
    return Scenario(a.trace, a.damping, a.peak_rps, a.duration_s, a.network, a.uplink_scale, a.rtt, a.image_kib,
                    a.slo_ms, a.seed)
