"""Latency the server adds over a direct in-process runtime call, and saturated throughput vs the
runtime's own best batched throughput (issue 2). Real server process, real HTTP and gRPC on loopback.

Front doors: HTTP with binary tensors (the load client: `sponge.workload.httpclient`, a minimal keep-alive
HTTP/1.1 client on asyncio streams, one connection per concurrent client) and gRPC with raw contents
(issue 13; the load client: grpc.aio stubs from `sponge.protocol.grpc_v2` on one channel — one HTTP/2
connection multiplexing the concurrent calls — sending a request serialized once, not tritonclient, whose
per-request Python work would dominate). Both clients run in this process, on the same 2 cores as the
server on a small machine: each row states the client's own CPU (process CPU seconds / wall seconds, in
cores, and as a share of the machine's cores), which the server did not get.

Also the front door's own CPU per request (`front_door_cpu`: the server process's CPU, its replicas
excluded, over a closed loop / the requests served), binary and JSON at concurrency 16, and JSON at 64.

Usage: python bench/overhead.py [--quick] [--only trivial]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import orjson

from sponge.protocol import grpc_v2 as pb
from sponge.runtime.onnx_runtime import OnnxRuntime
from sponge.server.process import ServerProcess
from sponge.workload.httpclient import Conn, closed_loop

GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def direct_latency(rt: OnnxRuntime, inputs: dict[str, np.ndarray], n: int) -> list[float]:
    for _ in range(10):
        rt.infer(inputs)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        rt.infer(inputs)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def best_batched_throughput(rt: OnnxRuntime, make, batches=(1, 2, 4, 8, 16, 32), seconds=1.5) -> tuple[float, int]:
    best, best_b = 0.0, 1
    for b in batches:
        x = make(b)
        rt.infer(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            rt.infer(x)
            n += b
        rps = n / (time.perf_counter() - t0)
        if rps > best:
            best, best_b = rps, b
    return best, best_b


def binary_body(name: str, arr: np.ndarray, dtype: str) -> tuple[bytes, dict[str, str]]:
    h = orjson.dumps({"inputs": [{"name": name, "shape": list(arr.shape), "datatype": dtype,
                                  "parameters": {"binary_data_size": arr.nbytes}}],
                      "parameters": {"slo_ms": 60000}})
    return h + arr.tobytes(), {"Inference-Header-Content-Length": str(len(h))}


def json_body(name: str, arr: np.ndarray, dtype: str) -> tuple[bytes, dict[str, str]]:
    return orjson.dumps({"inputs": [{"name": name, "shape": list(arr.shape), "datatype": dtype,
                                     "data": arr.ravel().tolist()}], "parameters": {"slo_ms": 60000}}), {}


def scrape_front_door_cpu_s(url: str) -> float:
    """The server's `sponge_front_door_cpu_seconds_total` (its own process + JSON decoder child)."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^sponge_front_door_cpu_seconds_total (\S+)$", text, re.M).group(1))


def front_door_cpu(srv: ServerProcess, path: str, body: bytes, headers: dict[str, str], conc: int,
                   seconds: float) -> dict:
    """A closed loop at `conc`: the front door's CPU ms per request (server process CPU delta / requests
    answered, errors included), throughput and client-side p50/p99 latency."""
    cpu0 = scrape_front_door_cpu_s(srv.url)
    lat, errors = asyncio.run(closed_loop("127.0.0.1", srv.port, path, body, headers, conc, seconds,
                                          max_requests=200_000))
    cpu1 = scrape_front_door_cpu_s(srv.url)  # the scrape's own CPU (~1 ms) is in it: negligible
    n = len(lat) + errors
    return {"cpu_ms": 1000.0 * (cpu1 - cpu0) / n if n else float("nan"), "rps": len(lat) / seconds,
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "errors": errors}


async def serial_latency(port: int, path: str, body: bytes, headers: dict[str, str], n: int
                         ) -> tuple[list[float], list[float], list[float]]:
    """Per request: client-observed ms, in-server overhead (server_ms - infer_ms) and everything the
    serving path adds around the replica's own runtime call (client ms - infer_ms)."""
    c = await Conn.open("127.0.0.1", port)
    client_ms, in_server_ms, around_ms = [], [], []
    for i in range(n + 10):
        t0 = time.perf_counter()
        status, data = await c.post(path, body, headers)
        dt = (time.perf_counter() - t0) * 1000
        assert status == 200, data[:200]
        if i >= 10:  # after warm-up
            client_ms.append(dt)
            p = orjson.loads(data)["parameters"]
            in_server_ms.append(p["server_ms"] - p["infer_ms"])
            around_ms.append(dt - p["infer_ms"])
    c.close()
    return client_ms, in_server_ms, around_ms


def grpc_body(name: str, arr: np.ndarray, dtype: str, model: str) -> bytes:
    req = pb.ModelInferRequest(model_name=model, raw_input_contents=[arr.tobytes()])
    req.inputs.add(name=name, datatype=dtype, shape=arr.shape)
    req.parameters["slo_ms"].double_param = 60000.0
    return req.SerializeToString()


async def grpc_serial_latency(target: str, body: bytes, n: int) -> tuple[list[float], list[float], list[float]]:
    """As serial_latency, over gRPC (the response parsed for its parameters after the clock stops)."""
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as ch:
        call = ch.unary_unary(pb.path("ModelInfer"))  # bytes in, bytes out
        client_ms, in_server_ms, around_ms = [], [], []
        for i in range(n + 10):
            t0 = time.perf_counter()
            data = await call(body)
            dt = (time.perf_counter() - t0) * 1000
            if i >= 10:
                client_ms.append(dt)
                p = pb.ModelInferResponse.FromString(data).parameters
                in_server_ms.append(p["server_ms"].double_param - p["infer_ms"].double_param)
                around_ms.append(dt - p["infer_ms"].double_param)
    return client_ms, in_server_ms, around_ms


async def grpc_closed_loop(target: str, body: bytes, concurrency: int, duration_s: float,
                           max_requests: int) -> tuple[list[float], int]:
    """`concurrency` calls in flight on one channel, each sent again as soon as it is answered."""
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration_s
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as ch:
        call = ch.unary_unary(pb.path("ModelInfer"))

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at and len(lat) < max_requests:
                t0 = time.perf_counter()
                try:
                    await call(body)
                    lat.append((time.perf_counter() - t0) * 1000)
                except grpc.aio.AioRpcError:
                    errors += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return lat, errors


def with_cpu(fn, *args):
    """fn(*args) with this process's CPU seconds (all its threads: asyncio, gRPC's) and wall seconds."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn(*args)
    return out, time.process_time() - c0, time.perf_counter() - w0


ONLY: str | None = None  # --only: the one model to run


def saturate(row: dict, prefix: str, door: str, own_rps: float, seconds: float, load) -> None:
    """Closed loops at concurrency 1, 16 and 64 through one front door (`load(conc)` -> (latencies, errors)):
    throughput, its share of the runtime's best and the load client's own CPU, into `row` under `prefix`."""
    for conc in (1, 16, 64):
        (lat, errors), cpu_s, wall_s = with_cpu(asyncio.run, load(conc))
        rps = len(lat) / seconds
        row[f"{prefix}rps_c{conc}"] = rps
        row[f"{prefix}rps_ratio_c{conc}"] = rps / own_rps
        row[f"{prefix}errors_c{conc}"] = errors
        row[f"{prefix}client_cores_c{conc}"] = cpu_s / wall_s
        print(f"{door} concurrency {conc:3d}: {rps:8.0f} req/s ({rps / own_rps:.0%} of runtime), "
              f"p50 {pct(lat, 50):.2f} ms, errors {errors}, client CPU {cpu_s / wall_s:.2f} cores", flush=True)


def run_model(label: str, model_path: Path, name: str, input_name: str, make, dtype: str, n_serial: int,
              seconds: float, cores: int) -> dict | None:
    if ONLY is not None and label != ONLY:
        return None
    print(f"\n== {label}: {model_path.name} ==", flush=True)
    rt = OnnxRuntime(model_path, threads=cores, max_threads=cores, prebuild=False)
    one = make(1)
    direct = direct_latency(rt, {input_name: one}, n_serial)
    own_rps, own_b = best_batched_throughput(rt, lambda b: {input_name: make(b)})
    del rt
    print(f"direct p50 {pct(direct, 50):.3f} ms; runtime best {own_rps:.0f} req/s at batch {own_b}", flush=True)
    srv = ServerProcess("--model", str(model_path), "--batch", "32", "--max-batch", "32",
                        "--queue-capacity", "4096", grpc=True)
    try:
        path = f"/v2/models/{name}/infer"
        body, headers = binary_body(input_name, one, dtype)
        client_ms, in_server, around = asyncio.run(serial_latency(srv.port, path, body, headers, n_serial))
        row = {"model": label, "direct_p50_ms": pct(direct, 50), "direct_p99_ms": pct(direct, 99),
               "server_p50_ms": pct(client_ms, 50), "server_p99_ms": pct(client_ms, 99),
               "added_p50_ms": pct(client_ms, 50) - pct(direct, 50),
               "added_p99_ms": pct(client_ms, 99) - pct(direct, 99),
               "in_server_overhead_p50_ms": pct(in_server, 50),
               # what the serving path adds around the replica's own runtime call (same process, same
               # placement): independent of where the in-process "direct" runtime happens to run
               "added_vs_replica_runtime_p50_ms": pct(around, 50),
               "added_vs_replica_runtime_p99_ms": pct(around, 99), "runtime_best_rps": own_rps,
               "runtime_best_batch": own_b}
        saturate(row, "", "HTTP binary", own_rps, seconds, lambda conc: closed_loop(
            "127.0.0.1", srv.port, path, body, headers, conc, seconds, max_requests=200_000))
        assert srv.grpc_url is not None
        gbody = grpc_body(input_name, one, dtype, name)
        client_ms, in_server, around = asyncio.run(grpc_serial_latency(srv.grpc_url, gbody, n_serial))
        row.update({"grpc_server_p50_ms": pct(client_ms, 50), "grpc_server_p99_ms": pct(client_ms, 99),
                    "grpc_in_server_overhead_p50_ms": pct(in_server, 50),
                    "grpc_added_vs_replica_runtime_p50_ms": pct(around, 50),
                    "grpc_added_vs_replica_runtime_p99_ms": pct(around, 99)})
        saturate(row, "grpc_", "gRPC raw   ", own_rps, seconds, lambda conc: grpc_closed_loop(
            srv.grpc_url, gbody, conc, seconds, max_requests=200_000))
        jbody, jheaders = json_body(input_name, one, dtype)
        for fmt, conc, (b, h) in (("binary", 1, (body, headers)), ("binary", 16, (body, headers)),
                                  ("json", 16, (jbody, jheaders)), ("json", 64, (jbody, jheaders))):
            fd = front_door_cpu(srv, path, b, h, conc, seconds)
            row.update({f"front_door_cpu_ms_{fmt}_c{conc}": fd["cpu_ms"], f"rps_{fmt}_c{conc}": fd["rps"],
                        f"p50_ms_{fmt}_c{conc}": fd["p50_ms"], f"p99_ms_{fmt}_c{conc}": fd["p99_ms"]})
            print(f"{fmt:6} concurrency {conc:3d}: front door {fd['cpu_ms']:.3f} CPU ms/request, "
                  f"{fd['rps']:.0f} req/s, p50 {fd['p50_ms']:.2f} ms, p99 {fd['p99_ms']:.2f} ms, "
                  f"errors {fd['errors']}", flush=True)
    finally:
        srv.stop()
    return row


def print_front_door(rows: list[dict]) -> None:
    """The front door's CPU per request (server process, replicas excluded) and latency, per format."""
    print("\nfront door          CPU ms/req binary c1  binary c16  json c16  json c64 | json c64 p50 / p99 (ms)")
    for r in rows:
        print(f"{r['model']:<19} {r['front_door_cpu_ms_binary_c1']:20.3f} {r['front_door_cpu_ms_binary_c16']:11.3f} "
              f"{r['front_door_cpu_ms_json_c16']:9.3f} "
              f"{r['front_door_cpu_ms_json_c64']:9.3f} | {r['p50_ms_json_c64']:8.2f} / {r['p99_ms_json_c64']:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter runs (smoke test)")
    ap.add_argument("--only", choices=["trivial", "efficientnet-lite0"], help="one model only")
    args = ap.parse_args()
    global ONLY
    ONLY = args.only
    n_serial, seconds = (100, 2.0) if args.quick else (500, 5.0)
    cores = len(os.sched_getaffinity(0))
    from sponge.models.efficientnet_lite0 import default_model_path
    from sponge.models.trivial import trivial_model_path

    gc.collect()
    gc.freeze()  # the client's full collections would walk all it imported (~20 ms stalls): measure the server

    rows = [
        run_model("trivial", trivial_model_path(), "trivial", "x",
                  lambda b: np.random.default_rng(0).random((b, 16), dtype=np.float32), "FP32", n_serial,
                  seconds, cores),
        run_model("efficientnet-lite0", default_model_path(), "efficientnet-lite0", "image",
                  lambda b: np.random.default_rng(0).integers(0, 255, (b, 224, 224, 3), dtype=np.uint8),
                  "UINT8", n_serial // 2, seconds, cores),
    ]
    rows = [r for r in rows if r is not None]
    print("\nmodel               front door   direct p50  server p50  added p50  added p99  added vs replica's "
          "runtime p50/p99  in-server p50 | c=1 / c=16 / c=64 throughput vs runtime best | client CPU c=1/16/64 "
          f"(cores; share of {cores})")
    for r in rows:
        for door, k in (("HTTP binary", ""), ("gRPC raw", "grpc_")):
            server_p50, server_p99 = r[f"{k}server_p50_ms"], r[f"{k}server_p99_ms"]
            cpu = [r[f"{k}client_cores_c{c}"] for c in (1, 16, 64)]
            print(f"{r['model']:<19} {door:<12} {r['direct_p50_ms']:8.3f}ms {server_p50:8.3f}ms "
                  f"{server_p50 - r['direct_p50_ms']:8.3f}ms {server_p99 - r['direct_p99_ms']:8.3f}ms "
                  f"{r[f'{k}added_vs_replica_runtime_p50_ms']:17.3f}/{r[f'{k}added_vs_replica_runtime_p99_ms']:.3f}ms "
                  f"{r[f'{k}in_server_overhead_p50_ms']:12.3f}ms   | "
                  f"{r[f'{k}rps_ratio_c1']:.0%} / {r[f'{k}rps_ratio_c16']:.0%} / {r[f'{k}rps_ratio_c64']:.0%} "
                  f"of {r['runtime_best_rps']:.0f} req/s (batch {r['runtime_best_batch']}) | "
                  + " / ".join(f"{c:.2f}" for c in cpu) + " (" + " / ".join(f"{c / cores:.0%}" for c in cpu) + ")")
    print("targets: added p50 <= 1 ms at concurrency 1; saturated throughput >= 90 % of the runtime's own. The load "
          "client runs on the same cores: its CPU is not the server's (HTTP: sponge.workload.httpclient; gRPC: "
          "grpc.aio stubs, one channel, request serialized once)")
    print_front_door(rows)
    print(json.dumps({"bench": "overhead", "cores": cores,
                      "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                               for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
