"""One description of a workload scenario — rate trace, arrivals, network, image size, SLO, clients, seed —
and the one set of CLI options that sets it, shared by `sponge load`, `sponge simulate` and `sponge
experiment`, so that a live run and a simulated run of "the same scenario" replay the same requests.

The defaults are the simulator's (and the experiment's) long-standing ones — Sponge's transfer rule,
8 clients at random offsets into the network trace, Poisson arrivals — so `sponge load` with no options
now replays what `sponge simulate` with no options simulates.

Users bring their own traces (`sponge.workload.userfiles`): `--trace counts:PATH[@START-END]` (requests
per second), `--trace times:PATH[:COLUMN][@START-END]` (exact arrival times), `--network mahimahi:PATH`,
`--network bandwidth:PATH[:COLUMN[,KEY=VALUE...]]`. What their readers find in a file (gaps, unsorted or
duplicate times) is in `Scenario.notes()`; `warn_notes` prints it as warnings.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

from sponge.workload.arrivals import ArrivalMode
from sponge.workload.network import LinkTrace, NetworkModel, RttModel, TxRule, read_ghent_log
from sponge.workload.requests import PlannedRequest, generate_requests
from sponge.workload.traces import RateTrace, named_window, scale_to_peak, twitter_2021
from sponge.workload.userfiles import counts_trace, link_trace, times_trace

Offsets = Literal["random", "zero"]
CONSTANT_DEFAULT_S = 600  # length of a constant:<rps> trace without --duration-s
TRACE_KINDS = "twitter:<window>, twitter:<start>-<end>, constant:<rps>, counts:PATH[@START-END] or " \
              "times:PATH[:COLUMN][@START-END]"
NETWORK_KINDS = ("ghent", "none", "ghent:PATH", "mahimahi:PATH", "bandwidth:PATH[:COLUMN[,KEY=VALUE...]]")


@dataclass(frozen=True)
class Scenario:
    """Everything that decides the request plan; `plan()` is a pure function of these fields."""

    trace: str = "twitter:bursty"  # twitter:<window> | twitter:<start>-<end> | constant:<rps> | counts:.. | times:..
    damping: float | None = None  # Twitter/counts damping factor (None: a named window's own, 5; else 1)
    duration_s: int | None = None  # truncate the trace to its first N seconds (constant: its length)
    scale: float | None = None  # multiply the rates
    peak_rps: float | None = None  # then scale the trace so its peak is this (what the machine can serve)
    arrivals: ArrivalMode = "poisson"  # within each second: Poisson, or the count evenly spaced (not for times:)
    network: str = "ghent"  # ghent | none (budget = SLO) | ghent:PATH | mahimahi:PATH | bandwidth:PATH[...]
    tx_rule: TxRule = "sponge"  # transfer-time rule over the bandwidth log (sponge = barazmoon's arithmetic)
    uplink_scale: float = 1.0  # Ghent is a downlink log; < 1 makes uploads slower
    rtt: str = "none"  # none | 5gophers | 5gophers:<carrier>[-<East|West>] | <constant ms>
    clients: int = 8  # each request goes to one client; each client sees the network at its own offset
    client_offsets: Offsets = "random"  # random: decorrelated clients; zero: Sponge's trace time = run time
    image_kib: float = 200.0  # size of the uploaded image, for the network delay
    slo_ms: float = 1000.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (("arrivals", get_args(ArrivalMode)), ("tx_rule", get_args(TxRule)),
                              ("client_offsets", get_args(Offsets))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        kind, colon, arg = self.network.partition(":")
        if not (self.network in ("ghent", "none") or (kind in ("ghent", "mahimahi", "bandwidth") and arg)):
            raise ValueError(f"--network must be one of {', '.join(NETWORK_KINDS)}, got {self.network!r}")
        if self.trace.startswith("times:") and self.damping is not None:
            raise ValueError("--damping divides per-second counts; for times: traces use --scale")
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if self.image_kib <= 0 or self.slo_ms <= 0:
            raise ValueError("image_kib and slo_ms must be > 0")

    def rate_trace(self) -> RateTrace:
        """The per-second rates: the named or sliced trace, truncated, then scaled, then fitted to a peak."""
        kind, _, arg = self.trace.partition(":")
        if kind == "constant":
            tr = RateTrace.constant(float(arg), self.duration_s or CONSTANT_DEFAULT_S)
        elif kind == "counts":
            tr = counts_trace(arg, self.damping)
        elif kind == "times":
            tr = times_trace(arg)
        elif kind == "twitter" and "-" in arg and arg.replace("-", "").isdigit():
            start, end = (int(x) for x in arg.split("-"))
            tr = twitter_2021(start, end, self.damping or 1.0)
        elif kind == "twitter":
            tr = named_window(arg or "bursty", self.damping)
        else:
            raise ValueError(f"--trace must be {TRACE_KINDS}, got {self.trace!r}")
        if self.duration_s is not None and kind != "constant":
            tr = tr.window(0, self.duration_s)
        if tr.times_ms is not None:
            return self._scale_times(tr)
        if self.scale is not None:
            tr = RateTrace(tr.rps * self.scale, f"{tr.description}, x{self.scale:.3g}")
        if self.peak_rps is not None:
            tr = scale_to_peak(tr, self.peak_rps)
        return tr

    def _scale_times(self, tr: RateTrace) -> RateTrace:
        """Arrival times scaled once by the factor the rates would get (a peak fit overrides --scale, as
        it does for rates): seeded thinning below 1, replication within each second above (`scale_times`)."""
        if self.peak_rps is not None:
            if self.peak_rps < 0:
                raise ValueError(f"peak_rps must be >= 0, got {self.peak_rps}")
            return scale_to_peak(tr, self.peak_rps, self.seed)
        return tr if self.scale is None else tr.scaled(self.scale, self.seed)

    def link(self) -> LinkTrace | None:
        """The network trace itself (None for --network none)."""
        if self.network == "none":
            return None
        return read_ghent_log() if self.network == "ghent" else link_trace(self.network)

    def notes(self) -> tuple[str, ...]:
        """What the trace and network readers found in the files (gaps, sorting, duplicates) and did."""
        link = self.link()
        return self.rate_trace().notes + (link.notes if link is not None else ())

    def network_model(self) -> NetworkModel | None:
        """The network trace with the scenario's rule, uplink scale and RTT; None without a network."""
        link = self.link()
        if link is None:
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
        return NetworkModel(link, rule=self.tx_rule, rtt=rtt, uplink_scale=self.uplink_scale)

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
        link = "Ghent 4G" if self.network == "ghent" else self.network
        rule = "packet deliveries" if self.network.startswith("mahimahi:") else f"{self.tx_rule} rule"
        net = "no network" if self.network == "none" else (
            f"{link} ({rule}, uplink x{self.uplink_scale:g}, rtt {self.rtt}), {self.clients} "
            f"client{'s' if self.clients > 1 else ''} at {self.client_offsets} offsets")
        arrivals = "the file's arrival times" if self.trace.startswith("times:") else f"{self.arrivals} arrivals"
        return f"{arrivals}, SLO {self.slo_ms:g} ms, {self.image_kib:g} KiB images, {net}, seed {self.seed}"


def warn_notes(scenario: Scenario, prog: str) -> tuple[str, ...]:
    """Print each finding of the scenario's files as one `<prog>: warning: ...` line on stderr; return them."""
    notes = scenario.notes()
    for note in notes:
        print(f"{prog}: warning: {note}", file=sys.stderr)
    return notes


def add_scenario_args(p: argparse.ArgumentParser, omit: Collection[str] = ()) -> None:
    """The workload options of every command that replays a scenario; `omit` names Scenario fields a
    command sets itself (the experiment picks its own traces and scale)."""
    d = Scenario()
    g = p.add_argument_group("scenario (the same options for sponge load, simulate and experiment)")

    def add(field: str, *flags: str, **kw: object) -> None:
        if field not in omit:
            g.add_argument(*flags, dest=field, **kw)  # type: ignore[arg-type]

    add("trace", "--trace", default=d.trace, help="twitter:<bursty|steady_low|steady_high|fluctuating>, "
        "twitter:<start>-<end> (seconds of the 2021-08 trace), constant:<rps>, or a file of your own: "
        "counts:PATH[@START-END] (requests per second: numbers a line or on one line, a JSON list, or either "
        "in a tar.bz2; seconds START-END of it) or times:PATH[:COLUMN][@START-END] (exact arrival times: "
        "seconds or ISO-8601 in a CSV column, 0-based index or header name) (default: %(default)s)")
    # cheap aliases kept from `sponge simulate`: --window W = --trace twitter:W, --constant-rps R = constant:R
    add("trace", "--window", type=lambda w: f"twitter:{w}", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    add("trace", "--constant-rps", type=lambda r: f"constant:{float(r):g}", default=argparse.SUPPRESS,
        help=argparse.SUPPRESS)
    add("damping", "--damping", type=float, default=d.damping,
        help="divide each second's count and truncate (Twitter, counts:) (default: a named window's own, 5; "
             "else 1)")
    add("duration_s", "--duration-s", type=int, default=d.duration_s,
        help=f"use only the first N seconds (constant: its length, default {CONSTANT_DEFAULT_S})")
    add("scale", "--scale", type=float, default=d.scale, help="multiply the rates (times: seeded thinning "
        "below 1, copies within the same second above)")
    add("peak_rps", "--peak-rps", type=float, default=d.peak_rps, help="then scale the trace to this peak rate "
        "(times: by the factor that takes the busiest second there)")
    add("arrivals", "--arrivals", choices=get_args(ArrivalMode), default=d.arrivals,
        help="within each second: Poisson (open loop) or evenly spaced (paced load tester) (default: %(default)s)")
    add("network", "--network", default=d.network,
        help="network trace that shrinks each budget: ghent (bundled 4G log), none (budget = SLO), or a file: "
             "mahimahi:PATH (packet-delivery ms timestamps, e.g. a .up file), bandwidth:PATH (time s, Mbit/s) or "
             "bandwidth:PATH:COLUMN[,KEY=VALUE...] (a headed CSV column of Mbit/s, one row a second, rows "
             "filtered), ghent:PATH (default: %(default)s)")
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
