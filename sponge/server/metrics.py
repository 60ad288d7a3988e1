"""Prometheus metrics (DESIGN §6): names start with `sponge_`, units in the name."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
REFUSAL_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0)


class FrontDoorCpu:
    """CPU time the front door has used: this server process — every thread of it (event loop, HTTP
    parsing, decoding threads, queue, batcher, controller, prober) — children excluded, so the replicas,
    which are billed by their own allocation, are not counted twice; plus the JSON decoder's child process
    (server/decode.py), which does front-door work. Cumulative seconds since the process started."""

    def __init__(self, process_cpu_s: Callable[[], float] = time.process_time) -> None:
        self.process_cpu_s = process_cpu_s
        self.decoder: Any = None  # a BodyDecoder, set by create_app: its child's CPU counts too

    def decoder_s(self) -> float:
        return float(self.decoder.child_cpu_s()) if self.decoder is not None else 0.0

    def seconds(self) -> float:
        return self.process_cpu_s() + self.decoder_s()


class _FrontDoorCollector:
    """Computed at each scrape (a counter whose value is read, not incremented)."""

    def __init__(self, cpu: FrontDoorCpu) -> None:
        self.cpu = cpu

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("sponge_front_door_cpu_seconds", "")
        yield CounterMetricFamily("sponge_front_door_decoder_cpu_seconds", "")

    def collect(self) -> Iterator[CounterMetricFamily]:
        decoder = self.cpu.decoder_s()
        yield CounterMetricFamily(
            "sponge_front_door_cpu_seconds", "CPU time used by the front door: the server process (all its "
            "threads, children excluded) plus the JSON decoder's child process; the replicas are not in it",
            value=self.cpu.process_cpu_s() + decoder)
        yield CounterMetricFamily("sponge_front_door_decoder_cpu_seconds", "Of which the JSON decoder's child "
                                  "process (large JSON bodies)", value=decoder)


class Metrics:
    """All metrics of one server instance, in their own registry (tests run several servers)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.front_door = FrontDoorCpu()  # its decoder is set by create_app
        r.register(_FrontDoorCollector(self.front_door))
        self.requests = Counter("sponge_requests", "Inference requests by outcome "
                                "(ok, late, expired, rejected, invalid, error, cancelled)", ["model", "outcome"],
                                registry=r)
        self.requests_by_protocol = Counter("sponge_requests_by_protocol", "Inference requests by front door "
                                            "(http, grpc) and outcome (as sponge_requests, which counts both)",
                                            ["model", "protocol", "outcome"], registry=r)
        self.server_latency = Histogram("sponge_request_server_latency_seconds",
                                        "Time from arrival to response, in the server", ["model"],
                                        buckets=LATENCY_BUCKETS_S, registry=r)
        self.budget = Histogram("sponge_request_budget_seconds", "Server-side budget (slo - network) of requests",
                                ["model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_time = Histogram("sponge_request_queue_seconds", "Time a request waited in the EDF queue",
                                    ["model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.refusals = Counter("sponge_admission_refusals", "Requests refused on arrival, by reason: overloaded "
                                "(503: would finish late behind the work ahead), displaces (503: would push admitted "
                                "requests past their deadlines), queue_full (503), hopeless (504: its budget is "
                                "shorter than one inference)", ["model", "reason"], registry=r)
        self.refusal_latency = Histogram("sponge_admission_refusal_latency_seconds", "Time from arrival to a "
                                         "refusal on arrival (503/504), in the server", ["model"],
                                         buckets=REFUSAL_BUCKETS_S, registry=r)
        self.queue_expired = Counter("sponge_queue_expired", "Admitted requests answered 504 from the queue once "
                                     "their deadline could no longer be met (deadline timer or dispatch)", ["model"],
                                     registry=r)
        self.queue_length = Gauge("sponge_queue_length", "Requests waiting in the EDF queue", ["model"], registry=r)
        self.batch_size = Histogram("sponge_batch_size", "Images (first-axis rows) per executed batch, as the "
                                    "latency model counts them", ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("sponge_batch_requests", "Requests per executed batch", ["model"],
                                        buckets=BATCH_BUCKETS, registry=r)
        self.batch_latency = Histogram("sponge_batch_inference_seconds", "Runtime time per batch", ["model"],
                                       buckets=LATENCY_BUCKETS_S, registry=r)
        self.configured_batch = Gauge("sponge_batch_size_target", "Batch size in force", ["model"], registry=r)
        self.cpu = Gauge("sponge_replica_cpu_millicores", "CPU allocated per replica", ["replica"], registry=r)
        self.threads = Gauge("sponge_replica_threads", "Runtime threads per replica", ["replica"], registry=r)
        self.replica_states = Gauge("sponge_replicas", "Replicas by state: starting (cold start, no work yet), "
                                    "ready (serving), draining (finishing its batch before it stops)", ["state"],
                                    registry=r)
        self.cold_start = Histogram("sponge_replica_cold_start_seconds", "Time from ordering a replica to its first "
                                    "work: process start, model load and warm-up", buckets=(0.25, 0.5, 1, 2, 3, 5, 10,
                                                                                            20, 60), registry=r)
        self.replica_start_failures = Counter("sponge_replica_start_failures", "New replicas that failed to start "
                                              "(dropped; the controller asks again if it still wants them)", registry=r)
        self.replica_restarts = Counter("sponge_replica_restarts", "Replica processes restarted after dying",
                                        ["replica"], registry=r)
        self.redispatched = Counter("sponge_requests_redispatched", "Requests of a batch whose remote worker was "
                                    "lost with it in flight, queued again (once) for another replica",
                                    ["model"], registry=r)
        self.dispatch_errors = Counter("sponge_dispatch_errors", "Unexpected errors in a dispatch loop (the "
                                       "batch's requests are answered 500; the loop goes on)", ["model"], registry=r)
        self.stalls = Counter("sponge_batch_stalls", "Served batches far slower than the estimate, set aside "
                              "as stalls (not fed to the latency estimate or the learner)", ["model"], registry=r)
        self.straddled = Counter("sponge_batches_straddled", "Served batches during which the replica was "
                                 "resized: they measured two allocations, so they are not samples of l(b, c)",
                                 ["model"], registry=r)
        # Per-batch CPU between two controller decisions (sponge.server.per_batch)
        self.batch_resizes = Counter("sponge_batch_resizes", "In-place resizes made by per-batch CPU sizing "
                                     "(at an arrival, a batch's start or end), by direction", ["direction"],
                                     registry=r)
        self.batch_sizing = Histogram("sponge_batch_sizing_seconds", "Time of one per-batch CPU sizing on the "
                                      "event loop (the policy's answer, and the resize when there is one)",
                                      ["resized"], buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01,
                                                            0.05), registry=r)
        self.per_batch_active = Gauge("sponge_per_batch_active", "1 while the policy sizes CPU per batch "
                                      "between decisions (sponge on the learned model), else 0", registry=r)
        self.decisions = Counter("sponge_decisions", "Controller decisions by policy and feasibility",
                                 ["policy", "feasible"], registry=r)
        self.resize_duration = Histogram("sponge_resize_duration_seconds", "Time to apply a CPU change",
                                         buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0), registry=r)
        self.arrival_rate = Gauge("sponge_arrival_rate_rps", "Arrival rate over the last interval", registry=r)
        # The online latency model (serve first, learn while serving): which mode decides, how good it is.
        self.controller_mode = Gauge("sponge_controller_mode", "1 for the mode deciding now: 'safe' (fixed safe "
                                     "allocation, nothing measured yet), 'explore' (planning on a conservative "
                                     "provisional model while the latency model is learned) or 'model'", ["mode"], registry=r)
        self.model_ready = Gauge("sponge_latency_model_ready", "1 when the online latency model meets its "
                                 "readiness criterion", registry=r)
        self.model_error = Gauge("sponge_latency_model_heldout_error_ratio", "Held-out p95 relative error of "
                                 "the online latency model", registry=r)
        self.model_cells = Gauge("sponge_latency_model_cells", "Measured (batch, cpu) cells in the online "
                                 "latency model", registry=r)
        self.model_safety = Gauge("sponge_latency_model_safety_ratio", "Deadline scale factor the policy uses "
                                  "(smaller = larger margin; follows the model's measured error)", registry=r)
        self.probes = Gauge("sponge_idle_probes", "Background profiling batches run in idle gaps, by outcome",
                            ["outcome"], registry=r)
