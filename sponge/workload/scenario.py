"""One description of a workload scenario — rate trace, arrivals, network, image size, SLO, clients, seed —
and the one set of CLI options that sets it, shared by `sponge load`, `sponge simulate` and `sponge
experiment`, so that a live run and a simulated run of "the same scenario" replay the same requests.

The defaults are the simulator's (and the experiment's) long-standing ones — Sponge's transfer rule,
8 clients at random offsets into the network trace, Poisson arrivals — so `sponge load` with no options
now replays what `sponge simulate` with no options simulates.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

from sponge.workload.arrivals import ArrivalMode
from sponge.workload.network import NetworkModel, RttModel, TxRule, read_ghent_log
from sponge.workload.requests import PlannedRequest, generate_requests
from sponge.workload.traces import RateTrace, named_window, scale_to_peak, twitter_2021

Offsets = Literal["random", "zero"]
CONSTANT_DEFAULT_S = 600  # length of a constant:<rps> trace without --duration-s


@dataclass(frozen=True)
class Scenario:
    """Everything that decides the request plan; `plan()` is a pure function of these fields."""

    trace: str = "twitter:bursty"  # twitter:<window name> | twitter:<start>-<end> | constant:<rps>
    damping: float | None = None  # Twitter damping factor (None: a named window's own, 5; a slice: 1)
    duration_s: int | None = None  # truncate the trace to its first N seconds (constant: its length)
    scale: float | None = None  # multiply the rates
    peak_rps: float | None = None  # then scale the trace so its peak is this (what the machine can serve)
    arrivals: ArrivalMode = "poisson"  # within each second: Poisson, or the count evenly spaced
    network: Literal["ghent", "none"] = "ghent"  # none: budget = SLO
    tx_rule: TxRule = "sponge"  # transfer-time rule over the bandwidth log (sponge = barazmoon's arithmetic)
    uplink_scale: float = 1.0  # Ghent is a downlink log; < 1 makes uploads slower
    rtt: str = "none"  # none | 5gophers | 5gophers:<carrier>[-<East|West>] | <constant ms>
    clients: int = 8  # each request goes to one client; each client sees the network at its own offset
    client_offsets: Offsets = "random"  # random: decorrelated clients; zero: Sponge's trace time = run time
    image_kib: float = 200.0  # size of the uploaded image, for the network delay
    slo_ms: float = 1000.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (("arrivals", get_args(ArrivalMode)), ("network", ("ghent", "none")),
                              ("tx_rule", get_args(TxRule)), ("client_offsets", get_args(Offsets))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if self.image_kib <= 0 or self.slo_ms <= 0:
            raise ValueError("image_kib and slo_ms must be > 0")

    def rate_trace(self) -> RateTrace:
        """The per-second rates: the named or sliced trace, truncated, then scaled, then fitted to a peak."""
        kind, _, arg = self.trace.partition(":")
        if kind == "constant":
            tr = RateTrace.constant(float(arg), self.duration_s or CONSTANT_DEFAULT_S)
        elif kind == "twitter" and "-" in arg and arg.replace("-", "").isdigit():
            start, end = (int(x) for x in arg.split("-"))
            tr = twitter_2021(start, end, self.damping or 1.0)
        elif kind == "twitter":
            tr = named_window(arg or "bursty", self.damping)
        else:
            raise ValueError(f"--trace must be twitter:<window>, twitter:<start>-<end> or constant:<rps>, "
                             f"got {self.trace!r}")
        if self.duration_s is not None and kind != "constant":
            tr = tr.window(0, self.duration_s)
        if self.scale is not None:
            tr = RateTrace(tr.rps * self.scale, f"{tr.description}, x{self.scale:.3g}")
        if self.peak_rps is not None:
            tr = scale_to_peak(tr, self.peak_rps)
        return tr

    def network_model(self) -> NetworkModel | None:
        """Ghent 4G bus log with the scenario's rule, uplink scale and RTT; None without a network."""
        if self.network == "none":
            return None
        if self.rtt == "none":
            rtt = RttModel()
        elif self.rtt.startswith("5gophers"):
            _, _, who = self.rtt.partition(":")
            # The server site is the last part ("East"/"West"); carriers may contain hyphens (T-Mobile).
            head, _, tail = who.rpartition("-")
            carrier, server = (head, tail) if tail.lower() in ("east", "west") else (who, "")
            rtt = RttModel.from_5gophers(carrier or None, server or None)
        else:
            rtt = RttModel.constant(float(self.rtt))
        return NetworkModel(read_ghent_log(), rule=self.tx_rule, rtt=rtt, uplink_scale=self.uplink_scale)

    @property
    def image_bytes(self) -> int:
        return int(round(self.image_kib * 1024))

    def plan(self) -> list[PlannedRequest]:
        """Every request of the run (send time, SLO, network delay, budget, size), deterministic in the seed."""
        return self.plan_over(self.rate_trace())

    def plan_over(self, trace: RateTrace) -> list[PlannedRequest]:
        """This scenario's arrivals, network, sizes and clients over a rate trace of the caller's."""
        return generate_requests(trace, self.network_model(), self.slo_ms, self.image_bytes, self.seed,
                                 arrivals=self.arrivals, clients=self.clients,
                                 random_offsets=self.client_offsets == "random")

    def describe(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        """One line for logs and report headers (the trace itself is described by `rate_trace()`)."""
        net = "no network" if self.network == "none" else (
            f"Ghent 4G ({self.tx_rule} rule, uplink x{self.uplink_scale:g}, rtt {self.rtt}), {self.clients} "
            f"client{'s' if self.clients > 1 else ''} at {self.client_offsets} offsets")
        return (f"{self.arrivals} arrivals, SLO {self.slo_ms:g} ms, {self.image_kib:g} KiB images, {net}, "
                f"seed {self.seed}")


def add_scenario_args(p: argparse.ArgumentParser, omit: Collection[str] = ()) -> None:
    """The workload options of every command that replays a scenario; `omit` names Scenario fields a
    command sets itself (the experiment picks its own traces and scale)."""
    d = Scenario()
    g = p.add_argument_group("scenario (the same options for sponge load, simulate and experiment)")

    def add(field: str, *flags: str, **kw: object) -> None:
        if field not in omit:
            g.add_argument(*flags, dest=field, **kw)  # type: ignore[arg-type]

    add("trace", "--trace", default=d.trace, help="twitter:<bursty|steady_low|steady_high|fluctuating>, "
        "twitter:<start>-<end> (seconds of the 2021-08 trace), or constant:<rps> (default: %(default)s)")
    # cheap aliases kept from `sponge simulate`: --window W = --trace twitter:W, --constant-rps R = constant:R
    add("trace", "--window", type=lambda w: f"twitter:{w}", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    add("trace", "--constant-rps", type=lambda r: f"constant:{float(r):g}", default=argparse.SUPPRESS,
        help=argparse.SUPPRESS)
    add("damping", "--damping", type=float, default=d.damping,
        help="Twitter damping factor (default: a named window's own, 5; 1 for a start-end slice)")
    add("duration_s", "--duration-s", type=int, default=d.duration_s,
        help=f"use only the first N seconds (constant: its length, default {CONSTANT_DEFAULT_S})")
    add("scale", "--scale", type=float, default=d.scale, help="multiply the rates")
    add("peak_rps", "--peak-rps", type=float, default=d.peak_rps, help="then scale the trace to this peak rate")
    add("arrivals", "--arrivals", choices=get_args(ArrivalMode), default=d.arrivals,
        help="within each second: Poisson (open loop) or evenly spaced (paced load tester) (default: %(default)s)")
    add("network", "--network", choices=["ghent", "none"], default=d.network,
        help="network trace that shrinks each budget, or none (budget = SLO) (default: %(default)s)")
    add("tx_rule", "--tx-rule", choices=get_args(TxRule), default=d.tx_rule,
        help="transfer time over the bandwidth log: sponge (barazmoon's integer arithmetic), simple "
             "(bits / bandwidth), exact (walk the samples) (default: %(default)s)")
    add("uplink_scale", "--uplink-scale", type=float, default=d.uplink_scale,
        help="multiply the (downlink) bandwidth for uploads (default: %(default)s)")
    add("rtt", "--rtt", default=d.rtt, help="base RTT: none, 5gophers[:<carrier>-<server>] (sampled; e.g. "
        "5gophers:T-Mobile-East or 5gophers:Verizon), or constant ms (default: %(default)s)")
    add("rtt", "--rtt-ms", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # alias kept from `simulate`
    add("clients", "--clients", type=int, default=d.clients,
        help="clients, each at its own offset into the network trace (default: %(default)s)")
    add("client_offsets", "--client-offsets", choices=get_args(Offsets), default=d.client_offsets,
        help="random offsets, or zero (Sponge's setup: trace time = run time) (default: %(default)s)")
    add("image_kib", "--image-kib", type=float, default=d.image_kib, help="upload size (default: %(default)s)")
    add("slo_ms", "--slo-ms", type=float, default=d.slo_ms, help="end-to-end SLO (default: %(default)s)")
    add("seed", "--seed", type=int, default=d.seed,
        help="seed of the request plan (and of the simulator's service-time noise) (default: %(default)s)")


def scenario_from_args(a: argparse.Namespace) -> Scenario:
    """The Scenario of parsed `add_scenario_args` options (fields the command omitted keep defaults)."""
    return Scenario(**{f.name: getattr(a, f.name) for f in fields(Scenario) if hasattr(a, f.name)})
