"""Fuzzing the front door in-process (issue 9): ≥ 10,000 malformed requests from a seeded generator,
good requests interleaved, against the real ASGI app and serving core with fake replicas (no model).

Asserted: no crash, every malformed request answered 4xx with a V2 `{"error": ...}` body (never 5xx),
every good request answered 200 with the right output (no collateral damage), and the Python heap's
peak memory (resident set growth) bounded. Also: the two bombs of the issue answered at once without allocating, and a
large body decoded off the event loop (liveness answers meanwhile)."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import struct
import threading
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import numpy as np
import orjson
import pytest

import sponge.protocol.v2 as v2
import sponge.server.app as app_module
import sponge.server.decode as decode_module
from sponge.runtime.base import TensorSpec
from sponge.runtime.replica import BatchResult
from sponge.scheduling.batcher import ExpiryPolicy
from sponge.server.app import create_app
from sponge.server.core import ServingCore
from sponge.server.decode import BodyDecoder
from sponge.server.metrics import Metrics

SEED = 20261202
N_MALFORMED = 10_200  # the issue asks for >= 10,000
GOOD_EVERY = 6  # one good request after every 6 malformed ones
CONCURRENCY = 48  # requests in flight at once: good ones share the loop, queue and batches with bad ones
PEAK_BOUND_MB = 100.0  # peak RSS growth over the whole run (one bomb of the issue took 2.3 GB)
MAX_BODY = 1 << 20
MAX_BATCH = 8
B_MAX_ELEMENTS = 4096  # model B: an explicit per-input cap (its input has no fixed size)
LARGE = 256 * 1024  # "large" bodies in the fuzz: model A decodes them in its child process


# ---- fakes: two models, no processes -------------------------------------------------------------
class FakeReplica:
    """A replica without a process: model A doubles FP32 `x` [-1, 4]; model B answers the byte length
    of each element of its BYTES input `s` [-1]."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = f"fake-{kind}"
        if kind == "A":
            self.inputs = [TensorSpec("x", "FP32", (-1, 4))]
            self.outputs = [TensorSpec("y", "FP32", (-1, 4))]
        else:
            self.inputs = [TensorSpec("s", "BYTES", (-1,))]
            self.outputs = [TensorSpec("n", "INT64", (-1,))]
        self.labels = None
        self.threads = 1
        self.pid = None
        self.ready = True
        self.busy = False

    async def infer(self, inputs: dict[str, np.ndarray]) -> BatchResult:
        if self.kind == "A":
            return BatchResult({"y": inputs["x"] * 2}, 0.1, 1)
        return BatchResult({"n": np.array([len(b) for b in inputs["s"]], np.int64)}, 0.1, 1)

    def kill(self) -> None:
        pass

    async def restart(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def make(kind: str, max_request_batch: int = MAX_BATCH, **app_kw: Any) -> tuple[ServingCore, Any]:
    replicas: list[Any] = [FakeReplica(kind)]
    core = ServingCore("m", replicas, 8, 4096, ExpiryPolicy.REJECT, 0.0, Metrics(), 1000)
    app = create_app(core, max_body_bytes=MAX_BODY, default_slo_ms=60_000.0, max_clock_skew_ms=200.0,
                     max_request_batch=max_request_batch, **app_kw)
    return core, app


def wire_headers(headers: dict[str, str]) -> dict[str, str | bytes]:
    """Header values as sent: non-ASCII ones as raw bytes (latin-1 where possible, as a server reads them)."""
    out: dict[str, str | bytes] = {}
    for k, v in headers.items():
        if v.isascii():
            out[k] = v
        else:
            try:
                out[k] = v.encode("latin-1")
            except UnicodeEncodeError:
                out[k] = v.encode("utf-8")
    return out


# ---- requests ------------------------------------------------------------------------------------
@dataclass
class Case:
    model: str  # "A" or "B"
    body: bytes
    headers: dict[str, str]
    kind: str  # "good", "bad" (malformed by construction), "mutant" (random bytes flipped: either)
    what: str  # generator name, for the counts
    expect: np.ndarray | None = None  # the right output of a good request
    path: str = "/v2/models/m/infer"


def good_a(rng: random.Random, pad: int = 0) -> Case:
    rows = rng.randint(1, MAX_BATCH)
    x = np.array([rng.randint(-1000, 1000) / 8 for _ in range(rows * 4)], np.float32).reshape(rows, 4)
    params: dict[str, Any] = {"slo_ms": rng.choice([5000, 60000])}
    if rng.random() < 0.3:
        params["network_ms"] = rng.randint(0, 100)
    binary_in, binary_out = rng.random() < 0.5, rng.random() < 0.5
    inp: dict[str, Any] = {"name": "x", "shape": [rows, 4], "datatype": "FP32"}
    doc: dict[str, Any] = {"id": f"g{rng.randint(0, 10**6)}", "inputs": [inp], "parameters": params}
    if rng.random() < 0.5:
        doc["outputs"] = [{"name": "y", "parameters": {"binary_data": binary_out}}]
    else:
        params["binary_data_output"] = binary_out
    if binary_in:
        inp["parameters"] = {"binary_data_size": x.nbytes}
        header = orjson.dumps(doc) + b" " * pad
        return Case("A", header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}, "good",
                    "good_a_binary", 2 * x)
    inp["data"] = x.reshape(-1).tolist() if rng.random() < 0.5 else x.tolist()
    return Case("A", orjson.dumps(doc) + b" " * pad, {}, "good", "good_a_json", 2 * x)


def good_b(rng: random.Random) -> Case:
    n = rng.randint(1, MAX_BATCH)
    strs = ["".join(rng.choice("abcé€") for _ in range(rng.randint(0, 12))) for _ in range(n)]
    lengths = np.array([len(s.encode()) for s in strs], np.int64)
    inp: dict[str, Any] = {"name": "s", "shape": [n], "datatype": "BYTES"}
    doc = {"inputs": [inp], "parameters": {"binary_data_output": rng.random() < 0.5}}
    if rng.random() < 0.5:
        blob = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in strs)
        inp["parameters"] = {"binary_data_size": len(blob)}
        header = orjson.dumps(doc)
        return Case("B", header + blob, {"Inference-Header-Content-Length": str(len(header))}, "good",
                    "good_b_binary", lengths)
    inp["data"] = strs
    return Case("B", orjson.dumps(doc), {}, "good", "good_b_json", lengths)


def _a_doc(rng: random.Random, rows: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    inp: dict[str, Any] = {"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": [1.5] * (4 * rows)}
    return {"inputs": [inp]}, inp


def _j(doc: Any) -> bytes:
    return orjson.dumps(doc)


HUGE = [2**31, 2**40, 2**62, 2**63 - 1, 2**64 - 1, 300_000_000]
BAD_HL = ["-5", "ten", "", "1e3", "\u00b2", "0x10", "9" * 30, "+5", "1.5", "\u0663", "12 34"]


def bad_json_text(rng: random.Random) -> Case:
    good = good_a(rng).body if rng.random() < 0.5 else _j(_a_doc(rng)[0])
    choice = rng.randrange(6)
    if choice == 0:  # truncated: no proper prefix of a JSON object is valid JSON
        body = good[: rng.randrange(0, len(good))]
    elif choice == 1:  # invalid UTF-8 inside a string
        body = good.replace(b'"x"', rng.choice([b'"x\xff"', b'"\xc3\x28"', b'"\xed\xa0\x80"']), 1)
    elif choice == 2:
        body = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        body = b"{" + body  # random bytes after '{': never a valid object with inputs
    elif choice == 3:
        body = rng.choice([b"", b"   ", b"{", b"}", b"{,}", b'{"inputs":', b"\x00", b"{'inputs': []}", b"NaN"])
    elif choice == 4:  # deeply nested
        d = rng.randint(100, 3000)
        body = b'{"inputs":' + b"[" * d + b"]" * d + b"}"
    else:
        body = good + rng.choice([b"}", b",", b"x", b"{}"])
    return Case("A", body, {}, "bad", "invalid_json")


def bad_structure(rng: random.Random) -> Case:
    doc, inp = _a_doc(rng)
    choice = rng.randrange(9)
    if choice == 0:
        return Case("A", _j(rng.choice([[], "s", 1, None, True, [doc], 1.5])), {}, "bad", "top_level_not_object")
    if choice == 1:
        if rng.random() < 0.3:
            del doc["inputs"]
        else:
            doc["inputs"] = rng.choice([None, {}, "x", [], [1], [None], [[inp]], {"x": inp}, 0])
    elif choice == 2:
        doc["id"] = rng.choice([1, [], {}, True, 1.5])
    elif choice == 3:
        doc["parameters"] = rng.choice([[], "p", 1, None, True])
    elif choice == 4:
        if rng.random() < 0.3:
            del inp["name"]
        else:
            inp["name"] = rng.choice(["", 1, None, [], {}, True])
    elif choice == 5:
        inp["name"] = rng.choice(["z", "X", "x ", "y", "s", "\u0000"])  # not an input of model A
    elif choice == 6:
        doc["inputs"] = [inp, dict(inp)]  # given twice
    elif choice == 7:
        inp["parameters"] = rng.choice([[], "p", 1, True])
    else:
        doc["outputs"] = rng.choice([
            {}, "y", 1, [{"name": "nope"}], [{"name": 1}], [{}], [None], [{"name": ""}],
            [{"name": "y", "parameters": {"classification": rng.choice([-1, "3", True, 1.5, [], None])}}],
            [{"name": "y", "parameters": []}],
        ])
    return Case("A", _j(doc), {}, "bad", ("structure", "inputs", "id", "parameters_type", "name", "unknown_input",
                                           "duplicate_input", "input_parameters", "outputs")[choice])


def bad_datatype(rng: random.Random) -> Case:
    doc, inp = _a_doc(rng)
    if rng.random() < 0.3:
        del inp["datatype"]
    else:  # not a V2 type, or a V2 type the model does not take
        inp["datatype"] = rng.choice(["FLOAT", "fp32", "FP8", "", 1, None, [], "BYTES", "INT32", "FP64", "UINT8",
                                      "BOOL", "FP16", "INT64"])
    return Case("A", _j(doc), {}, "bad", "datatype")


def bad_shape(rng: random.Random) -> Case:
    rows = rng.randint(1, 3)
    doc, inp = _a_doc(rng, rows)
    choice = rng.randrange(7)
    if choice == 0:
        if rng.random() < 0.2:
            del inp["shape"]
        else:
            inp["shape"] = rng.choice(["1,4", [1.0, 4], [True, 4], [[1], 4], {"0": 1}, None, 4, [1, "4"], [1, 4.5]])
    elif choice == 1:
        inp["shape"] = rng.choice([[-1, 4], [rows, -4], [-(2**40), 4], [0, -1]])
    elif choice == 2:  # huge: declared far beyond anything sent
        inp["shape"] = rng.choice([[rng.choice(HUGE), 4], [1, rng.choice(HUGE)], [rng.choice(HUGE)],
                                   [rng.choice(HUGE)] * rng.randint(2, 4)])
    elif choice == 3:
        inp["shape"] = [1] * rng.randint(33, 200) if rng.random() < 0.5 else rng.choice([[4 * rows], [rows, 1, 4], []])
    elif choice == 4:  # batch the server does not take: 0, or more than max_request_batch (data matching)
        b = rng.choice([0, MAX_BATCH + 1, MAX_BATCH + rng.randint(2, 40)])
        inp["shape"], inp["data"] = [b, 4], [0.5] * (4 * b)
    elif choice == 5:
        inp["shape"] = [rows, rng.choice([3, 5, 16, 0])]
    else:  # shape and data disagree
        inp["data"] = [1.0] * (4 * rows + rng.choice([-3, -1, 1, 4]))
    return Case("A", _j(doc), {}, "bad", ("shape_type", "shape_negative", "shape_huge", "shape_ndim", "shape_batch",
                                           "shape_vs_model", "shape_vs_data")[choice])


def bad_data(rng: random.Random) -> Case:
    doc, inp = _a_doc(rng, 2)
    choice = rng.randrange(4)
    if choice == 0:
        del inp["data"]
    elif choice == 1:
        inp["data"] = rng.choice([{"a": 1}, "abc", "", 1.5, True])
    elif choice == 2:
        data: list[Any] = [1.0] * 8
        data[rng.randrange(8)] = rng.choice(["a", {}, [1, 2], "1.5x"])
        inp["data"] = data
    else:  # ragged nesting
        inp["data"] = [[1, 2, 3, 4], [1, 2, 3]] if rng.random() < 0.5 else [[1, 2, 3, 4], 5, 6, 7, 8]
    return Case("A", _j(doc), {}, "bad", "data")


def bad_binary(rng: random.Random) -> Case:
    rows = rng.randint(1, 4)
    x = np.ones((rows, 4), np.float32)
    doc, inp = _a_doc(rng, rows)
    del inp["data"]
    inp["parameters"] = {"binary_data_size": x.nbytes}
    header = _j(doc)
    tail = x.tobytes()
    hl = str(len(header))
    choice = rng.randrange(7)
    if choice == 0:
        hl = rng.choice(BAD_HL)
    elif choice == 1:  # beyond the body, or inside the JSON header
        hl = str(rng.choice([len(header) + len(tail) + rng.randint(1, 10**6), rng.randint(0, len(header) - 1)]))
    elif choice == 2:
        inp["parameters"]["binary_data_size"] = rng.choice([-1, True, 16.0, "16", None, [], x.nbytes + 1,
                                                            x.nbytes - 4, 2**62])
        if inp["parameters"]["binary_data_size"] is None:
            inp["parameters"] = {}  # HL given but neither binary_data_size nor data
        header = _j(doc)
        hl = str(len(header))
    elif choice == 3:  # truncated binary part, or bytes no input claims
        tail = tail[: rng.randrange(len(tail))] if rng.random() < 0.5 else tail + b"\0" * rng.randint(1, 32)
    elif choice == 4:  # binary_data_size without the header
        return Case("A", header + tail, {}, "bad", "binary_without_header")
    elif choice == 5:  # a JSON request with the header but no binary part
        doc2, _ = _a_doc(rng)
        header, tail = _j(doc2), b"\0" * rng.randint(1, 64)
        hl = str(len(header))
    else:  # the 113-byte BYTES bomb of the issue, sent to a model that takes FP32
        bomb = {"inputs": [{"name": "x", "shape": [rng.choice(HUGE)], "datatype": "BYTES",
                            "parameters": {"binary_data_size": 8}}]}
        header, tail = _j(bomb), b"\0" * 8
        hl = str(len(header))
        return Case("A", header + tail, {"Inference-Header-Content-Length": hl}, "bad", "bytes_bomb_a")
    return Case("A", header + tail, {"Inference-Header-Content-Length": hl}, "bad",
                ("hl_not_a_number", "hl_out_of_range", "binary_data_size", "binary_body_length", "", "hl_no_binary")
                [choice])


def bad_parameters(rng: random.Random) -> Case:
    doc, _ = _a_doc(rng)
    key, values = rng.choice([
        ("slo_ms", [-1, 0, 1e12, "abc", True, [], {}, "nan", "inf", None, "-5"]),
        ("network_ms", [-5, 1e12, "x", True, [], "nan", None]),
        ("sent_at", [time.time() + 3600, time.time() - 10**6, "yesterday", True, [], None, "inf", 1e308]),
    ])
    if rng.random() < 0.8:
        doc["parameters"] = {key: rng.choice(values)}
        return Case("A", _j(doc), {}, "bad", f"param_{key}")
    header = {"slo_ms": "x-sponge-slo-ms", "network_ms": "x-sponge-network-ms", "sent_at": "x-sponge-sent-at"}[key]
    value = rng.choice(["abc", "-1", "nan", "", "1e999"]) if key != "sent_at" else rng.choice(["soon", "1e999", "0"])
    return Case("A", _j(doc), {header: value}, "bad", f"header_{key}")


def bad_model_b(rng: random.Random) -> Case:
    """Model B takes BYTES of any length: here the element count is bounded only by the bytes present
    and the explicit cap, the path the issue's bomb went through."""
    n = rng.choice(HUGE + [B_MAX_ELEMENTS + 1, 64, 8, 5])  # 8, 5: within the batch, beyond the bytes
    inp: dict[str, Any] = {"name": "s", "shape": [n], "datatype": "BYTES"}
    if rng.random() < 0.6:
        size = rng.choice([0, 8, 12, 16])
        inp["parameters"] = {"binary_data_size": size}
        header = _j({"inputs": [inp]})
        return Case("B", header + b"\x01\0\0\0" * (size // 4), {"Inference-Header-Content-Length": str(len(header))},
                    "bad", "bytes_bomb_b_binary")
    inp["data"] = ["a"] * rng.randint(0, 3)
    return Case("B", _j({"inputs": [inp]}), {}, "bad", "bytes_bomb_b_json")


def bad_bytes_elements(rng: random.Random) -> Case:
    """Model B: length prefixes that lie, elements that are not strings."""
    inp: dict[str, Any] = {"name": "s", "shape": [2], "datatype": "BYTES"}
    if rng.random() < 0.5:
        blob = rng.choice([struct.pack("<I", 2**32 - 1) + b"ab" + struct.pack("<I", 0),
                           struct.pack("<I", 3) + b"ab",
                           struct.pack("<I", 0) * 3,
                           struct.pack("<I", 1) + b"a" + b"\0\0"])
        inp["parameters"] = {"binary_data_size": len(blob)}
        header = _j({"inputs": [inp]})
        return Case("B", header + blob, {"Inference-Header-Content-Length": str(len(header))}, "bad", "bytes_prefix")
    inp["data"] = rng.choice([[1, 2], ["a", None], [{}, "b"], ["a", True], ["a", 1.5]])
    return Case("B", _j({"inputs": [inp]}), {}, "bad", "bytes_elements")


def bad_route_or_size(rng: random.Random) -> Case:
    if rng.random() < 0.8:
        return Case("A", _j(_a_doc(rng)[0]), {}, "bad", "unknown_model",
                    path=rng.choice(["/v2/models/other/infer", "/v2/models/M/infer", "/v2/models/m%00/infer"]))
    return Case("A", b'{"inputs": [' + b" " * MAX_BODY + b"]}", {}, "bad", "body_too_large")


def bad_large(rng: random.Random) -> Case:
    """Malformed bodies decoded off the event loop (model A: in its decoder process)."""
    pad = LARGE + rng.randint(0, 4096)
    doc, inp = _a_doc(rng, 2)
    inp["data"] = [1.0] * 7
    return Case("A", _j(doc) + b" " * pad + rng.choice([b"", b"}"]), {}, "bad", "large_malformed")


def mutant(rng: random.Random) -> Case:
    """A good request with a few random bytes changed: may still be valid; must never be a 5xx."""
    c = good_a(rng) if rng.random() < 0.7 else good_b(rng)
    body = bytearray(c.body)
    for _ in range(rng.randint(1, 4)):
        body[rng.randrange(len(body))] = rng.randrange(256)
    return Case(c.model, bytes(body), c.headers, "mutant", "mutant")


GENERATORS: list[tuple[Callable[[random.Random], Case], int]] = [
    (bad_json_text, 12), (bad_structure, 18), (bad_datatype, 6), (bad_shape, 18), (bad_data, 8),
    (bad_binary, 16), (bad_parameters, 10), (bad_model_b, 6), (bad_bytes_elements, 4), (bad_route_or_size, 2),
    (bad_large, 1),
]


def generate(rng: random.Random) -> Iterator[Case]:
    """N_MALFORMED malformed requests, a good one after every GOOD_EVERY, a mutant every 10 (lazily:
    the bodies are not all held at once)."""
    gens, weights = zip(*GENERATORS)
    for n_bad in range(1, N_MALFORMED + 1):
        yield rng.choices(gens, weights)[0](rng)
        if n_bad % GOOD_EVERY == 0:
            r = rng.random()
            yield (good_a(rng) if r < 0.6 else good_b(rng) if r < 0.95 else
                   good_a(rng, pad=LARGE))  # a large good one: decoded in model A's decoder process
        if n_bad % 10 == 0:
            yield mutant(rng)


class PeakRSS:
    """The process's resident memory sampled every few ms on a thread: its peak above the start.
    (tracemalloc is exact but slows this many requests five-fold.)"""

    def __init__(self, every_s: float = 0.005) -> None:
        self.every_s = every_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> "PeakRSS":
        self.baseline = self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


def output_of(r: httpx.Response) -> np.ndarray:
    """The first output of a 200 answer, JSON or binary."""
    hl = r.headers.get("inference-header-content-length")
    doc = orjson.loads(r.content[: int(hl)] if hl else r.content)
    out = doc["outputs"][0]
    dtype = {"FP32": np.float32, "INT64": np.int64}[out["datatype"]]
    if hl:
        return np.frombuffer(r.content[int(hl):], dtype).reshape(out["shape"])
    return np.array(out["data"], dtype).reshape(out["shape"])


def is_v2_error(r: httpx.Response) -> bool:
    try:
        doc = orjson.loads(r.content)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("error"), str) and bool(doc["error"])


@pytest.mark.timeout(240)
def test_fuzz_front_door_thousands_of_malformed_requests_with_good_ones_alongside():
    counts: Counter[str] = Counter()
    by_what: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    decoders: list[BodyDecoder] = []

    async def run() -> float:
        # every decoding route taken: inline, thread (B: bodies >= 192 bytes), process (A: JSON >= 128 KiB)
        core_a, app_a = make("A", decoder=BodyDecoder(thread_bytes=16 * 1024, process_json_bytes=128 * 1024))
        core_b, app_b = make("B", max_request_elements=B_MAX_ELEMENTS, decoder=BodyDecoder(thread_bytes=192))
        decoders.extend([app_a.state.decoder, app_b.state.decoder])
        core_a.start()
        core_b.start()
        clients = {
            "A": httpx.AsyncClient(transport=httpx.ASGITransport(app=app_a), base_url="http://a", timeout=60),
            "B": httpx.AsyncClient(transport=httpx.ASGITransport(app=app_b), base_url="http://b", timeout=60),
        }

        async def one(c: Case) -> None:
            by_what[c.what] += 1
            try:
                r = await clients[c.model].post(c.path, content=c.body, headers=wire_headers(c.headers))
            except Exception as exc:  # the app raised through the transport: a crash
                counts["crash"] += 1
                failures.append(f"{c.what}: crash {type(exc).__name__}: {exc} body={c.body[:200]!r}")
                return
            statuses[r.status_code] += 1
            counts[c.kind] += 1
            if c.kind == "good":
                if r.status_code != 200:
                    failures.append(f"{c.what}: good request got {r.status_code} {r.text[:300]}")
                elif not np.array_equal(output_of(r), c.expect):
                    failures.append(f"{c.what}: good request got a wrong output")
            elif c.kind == "mutant" and r.status_code == 200:
                counts["mutant_ok"] += 1
            elif not (400 <= r.status_code < 500 and is_v2_error(r)):
                failures.append(f"{c.what}: {r.status_code} {r.text[:300]} for body={c.body[:200]!r} "
                                f"headers={c.headers}")

        t0 = time.perf_counter()
        cases = generate(random.Random(SEED))
        try:
            while chunk := list(itertools.islice(cases, CONCURRENCY)):
                await asyncio.gather(*(one(c) for c in chunk))
            # the server still serves after all that
            assert (await clients["A"].get("/v2/health/live")).status_code == 200
        finally:
            for c in clients.values():
                await c.aclose()
            await core_a.close()
            await core_b.close()
            for d in decoders:
                d.close()
        return time.perf_counter() - t0

    with PeakRSS() as mem:
        elapsed = asyncio.run(run())
    print(f"\nfuzz: {counts['bad']} malformed, {counts['good']} good, {counts['mutant']} mutants "
          f"({counts['mutant_ok']} still valid) in {elapsed:.1f} s; statuses {dict(sorted(statuses.items()))}; "
          f"crashes {counts['crash']}; peak RSS growth {mem.growth_mb:.1f} MB; decoded "
          f"A {decoders[0].counts} B {decoders[1].counts}\n"
          f"generators: {dict(sorted(by_what.items()))}")
    assert not failures, f"{len(failures)} failures, first ones:\n" + "\n".join(failures[:15])
    assert counts["crash"] == 0
    assert counts["bad"] >= N_MALFORMED
    assert counts["good"] >= N_MALFORMED // GOOD_EVERY
    assert not any(s >= 500 for s in statuses)
    assert mem.growth_mb < PEAK_BOUND_MB
    assert decoders[0].counts["process"] > 0 and decoders[1].counts["thread"] > 0  # every route was fuzzed
    assert decoders[0].counts["inline"] > 0 and decoders[1].counts["inline"] > 0


# ---- the two bombs of the issue ------------------------------------------------------------------
BOMBS = [(300_000_000, "300 million"), (2**40, "2**40")]


@pytest.mark.parametrize("declared, label", BOMBS)
@pytest.mark.parametrize("model", ["A", "B"])
def test_bytes_bombs_of_the_issue_are_refused_at_once_without_allocating(declared, label, model):
    """113 bytes declaring `BYTES [300000000]` made the server allocate 2.4 GB for 8.8 s, and
    `[2**40]` answered 500 MemoryError. Now: 400/413 in milliseconds, a heap that does not grow, both
    where the model takes FP32 (refused on datatype) and where it takes BYTES (refused as more elements
    than the bytes sent can hold, or than the cap)."""
    async def run() -> list[tuple[httpx.Response, float]]:
        # model B with no batch bound or element cap in the way: the bytes sent are what refuses it
        core, app = make(model) if model == "A" else make(model, max_request_batch=2**62)
        core.start()
        name = "x" if model == "A" else "s"
        out = []
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                header = _j({"inputs": [{"name": name, "shape": [declared], "datatype": "BYTES",
                                         "parameters": {"binary_data_size": 8}}]})
                json_bomb = _j({"inputs": [{"name": name, "shape": [declared], "datatype": "BYTES", "data": ["a"]}]})
                for body, headers in ((header + b"\0" * 8, {"Inference-Header-Content-Length": str(len(header))}),
                                      (json_bomb, {})):
                    t0 = time.perf_counter()
                    r = await c.post("/v2/models/m/infer", content=body, headers=headers)
                    out.append((r, time.perf_counter() - t0))
        finally:
            await core.close()
        return out

    tracemalloc.start()
    try:
        results = asyncio.run(run())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for r, seconds in results:
        assert r.status_code in (400, 413), r.text
        err = r.json()["error"]
        if model == "A":
            assert r.status_code == 400 and "'inputs[0].datatype'" in err and "expects FP32" in err, err
        else:
            assert r.status_code == 400 and ("can hold at most 2" in err or "has 1 elements" in err), err
        assert seconds < 1.0
    assert peak < 10 * 2**20, f"{label}: peak {peak / 2**20:.1f} MB"


def test_element_cap_is_413_naming_the_field():
    async def run() -> httpx.Response:
        core, app = make("B", max_request_elements=4)
        core.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await c.post("/v2/models/m/infer", json={"inputs": [
                    {"name": "s", "shape": [5], "datatype": "BYTES", "data": ["a"] * 5}]})
        finally:
            await core.close()
    r = asyncio.run(run())
    assert r.status_code == 413
    assert "inputs[0].shape" in r.json()["error"] and "limit of 4" in r.json()["error"]


# ---- large bodies are decoded off the event loop ---------------------------------------------------
def test_large_binary_body_is_decoded_on_a_thread_so_liveness_answers_meanwhile(monkeypatch):
    """The decode of a body past the thread threshold is held until liveness has answered: that can
    only happen if the decode is not on the event loop (inline, it would hold the loop for the wait)."""
    release, decoding, decoded = threading.Event(), threading.Event(), threading.Event()
    real = v2.parse_infer_request

    def slow_parse(*args: Any, **kw: Any) -> Any:
        decoding.set()
        release.wait(5.0)
        decoded.set()
        return real(*args, **kw)

    monkeypatch.setattr(v2, "parse_infer_request", slow_parse)

    async def run() -> tuple[int, int, bool, dict[str, int]]:
        core, app = make("A")
        core.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                x = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
                header = _j({"inputs": [{"name": "x", "shape": [8, 4], "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}]})
                body = header + b" " * decode_module.THREAD_BYTES + x.tobytes()  # past the threshold
                hl = {"Inference-Header-Content-Length": str(len(header) + decode_module.THREAD_BYTES)}
                infer = asyncio.create_task(c.post("/v2/models/m/infer", content=body, headers=hl))
                while not decoding.is_set():
                    await asyncio.sleep(0.005)
                live = await c.get("/v2/health/live")
                answered_while_decoding = not decoded.is_set()
                release.set()
                r = await infer
                assert np.array_equal(output_of(r), 2 * x)
                return live.status_code, r.status_code, answered_while_decoding, app.state.decoder.counts
        finally:
            release.set()
            await core.close()
            app.state.decoder.close()
    assert asyncio.run(run()) == (200, 200, True, {"inline": 0, "thread": 1, "process": 0})


def gated_decode(body: bytes, hl: int | None, limits: v2.Limits, outputs: Any) -> Any:
    """Runs in the decoder's child process (imported there by name): says it started, with its pid,
    then waits for the test's go-ahead before decoding."""
    gate = Path(os.environ["SPONGE_TEST_DECODE_GATE"])
    (gate / "started").write_text(str(os.getpid()))
    deadline = time.monotonic() + 20
    while not (gate / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return v2.decode_request(body, hl, limits, outputs)


@pytest.mark.timeout(120)
def test_large_json_body_is_decoded_in_a_child_process(monkeypatch, tmp_path):
    """JSON parsing holds the GIL for the whole body (a thread would stall the loop as long as inline
    decoding does): a JSON body past the process threshold is decoded in the decoder's child process,
    errors keep their status across the process boundary, and liveness answers meanwhile."""
    monkeypatch.setenv("SPONGE_TEST_DECODE_GATE", str(tmp_path))
    monkeypatch.setattr(decode_module, "decode_request", gated_decode)

    async def run() -> None:
        core, app = make("A", decoder=BodyDecoder(thread_bytes=1024, process_json_bytes=64 * 1024))
        core.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                         timeout=60) as c:
                x = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
                doc = _j({"inputs": [{"name": "x", "shape": [8, 4], "datatype": "FP32", "data": x.tolist()}]})
                infer = asyncio.create_task(c.post("/v2/models/m/infer", content=doc + b" " * 65536))
                while not (tmp_path / "started").exists():  # the child starts in ~0.5 s (more when busy)
                    assert not infer.done(), infer.result().text
                    await asyncio.sleep(0.01)
                assert int((tmp_path / "started").read_text()) != os.getpid()
                live = await c.get("/v2/health/live")
                assert live.status_code == 200 and not (tmp_path / "go").exists()
                (tmp_path / "go").touch()
                r = await infer
                assert r.status_code == 200 and np.array_equal(output_of(r), 2 * x), r.text
                # a client error raised in the child keeps its status and message
                bad = _j({"inputs": [{"name": "x", "shape": [2**40, 4], "datatype": "FP32", "data": [1]}]})
                r = await c.post("/v2/models/m/infer", content=bad + b" " * 65536)
                assert r.status_code == 413 and "'inputs[0].shape'" in r.json()["error"], r.text
                assert app.state.decoder.counts == {"inline": 0, "thread": 0, "process": 2}
        finally:
            await core.close()
            await app.state.decoder.aclose()  # what the app's lifespan does at shutdown
        child = int((tmp_path / "started").read_text())
        deadline = time.monotonic() + 10
        while running(child):  # close() stops the child
            assert time.monotonic() < deadline, f"decoder process {child} still running after close()"
            await asyncio.sleep(0.02)
    asyncio.run(run())


def test_the_app_lifespan_stops_the_decoder():
    async def run() -> None:
        _, app = make("A")
        async with app.router.lifespan_context(app):
            assert not app.state.decoder.closed
        assert app.state.decoder.closed
    asyncio.run(run())


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting to be reaped is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_a_decoder_process_that_dies_fails_its_request_with_500_and_is_replaced(monkeypatch, tmp_path):
    monkeypatch.setenv("SPONGE_TEST_DECODE_GATE", str(tmp_path))
    monkeypatch.setattr(decode_module, "decode_request", gated_decode)

    async def run() -> None:
        core, app = make("A", decoder=BodyDecoder(thread_bytes=1024, process_json_bytes=4096))
        core.start()
        body = _j({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
        body += b" " * 4096
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                         timeout=60) as c:
                infer = asyncio.create_task(c.post("/v2/models/m/infer", content=body))
                while not (tmp_path / "started").exists():
                    await asyncio.sleep(0.01)
                os.kill(int((tmp_path / "started").read_text()), signal.SIGKILL)  # our own child
                r = await infer
                assert r.status_code == 500 and "decoder process died" in r.json()["error"], r.text
                (tmp_path / "go").touch()
                r = await c.post("/v2/models/m/infer", content=body)  # a new child decodes it
                assert r.status_code == 200, r.text
                assert output_of(r).tolist() == [[2, 4, 6, 8]]
        finally:
            await core.close()
            app.state.decoder.close()
    asyncio.run(run())


# ---- numbers in headers --------------------------------------------------------------------------
def test_header_numbers_that_isdigit_accepts_but_int_refuses_are_client_errors():
    """`'²'.isdigit()` is True but `int('²')` raises, and int() refuses 5,000 digits: both were 500s."""
    from sponge.protocol.v2 import ProtocolError
    from sponge.server.app import header_length, read_body
    from starlette.requests import Request

    for v in ["\u00b2", "9" * 5000, "-1", "1 2", "\u0663", "0x1"]:
        with pytest.raises(ProtocolError, match="Inference-Header-Content-Length"):
            header_length(v)
    assert header_length(" 12 ") == 12 and header_length(None) is None

    async def body_with(content_length: bytes) -> bytes:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"{}", "more_body": False}
        scope = {"type": "http", "method": "POST", "headers": [(b"content-length", content_length)]}
        return await read_body(Request(scope, receive), 1024)
    assert asyncio.run(body_with(b"\xb2")) == b"{}"  # a bogus length is ignored: the stream is still capped
    with pytest.raises(app_module.BodyTooLarge):
        asyncio.run(body_with(b"9" * 5000))
