"""Decoding a JSON tensor `data` list into the typed array the replica reads (issue 13, item 2):
the options side by side, in one run, on the same bodies.

Each option decodes a whole V2 request body (one input) into a numpy array of the input's datatype:
* `orjson+asarray`: the core of the path before issue 13 (orjson.loads, then np.asarray on the list);
* `orjson+fromiter`: the same parse, np.fromiter instead (flat lists only);
* `msgspec+asarray`: msgspec's JSON decoder instead of orjson (still a Python object per element);
* `simdjson.as_buffer`: pysimdjson's DOM, `Array.as_buffer` straight into an int64/double buffer, cast
  (no validation: the floor of what the library costs);
* `span+fromstring` / `span+loadtxt`: the list's text span located by sponge's JSON scan, brackets
  removed, numbers parsed by numpy's text readers;
* `pyarrow.json`: Arrow's JSON reader (typed list columns; optional, if installed);
* `sponge orjson path`: `parse_infer_request` with the simdjson path switched off: the path for
  small bodies and the fallback (orjson, np.asarray, then the same count/range checks);
* `sponge (shipped)`: `parse_infer_request` as it is now (simdjson for a JSON part >= 16 KiB, with
  the nesting, count and range checks; orjson below).

Medians of `--reps` decodes per option and body, the options interleaved over `--rounds` rounds.
With `--loop`, also the event loop's view (issue 9's table, redone for this decoder): for JSON bodies
of 1-64 MiB decoded inline, on a thread and in the helper process (`BodyDecoder`), the request's
decode time and the longest stall of a 0.5 ms ticker on the loop meanwhile (medians of 3).

Usage: python bench/json_decode.py [--reps 30] [--rounds 3] [--loop]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import time
from typing import Any, Callable

import numpy as np
import orjson

from sponge.protocol import json_tensor
from sponge.protocol.v2 import Limits, parse_infer_request
from sponge.runtime.base import TensorSpec
from sponge.server.decode import BodyDecoder

Decoder = Callable[[bytes, np.dtype], np.ndarray]


def old_path(body: bytes, dtype: np.dtype) -> np.ndarray:
    return np.asarray(orjson.loads(body)["inputs"][0]["data"], dtype=dtype)


def orjson_fromiter(body: bytes, dtype: np.dtype) -> np.ndarray:
    data = orjson.loads(body)["inputs"][0]["data"]
    if data and isinstance(data[0], list):
        raise NotImplementedError("flat lists only")
    return np.fromiter(data, dtype=dtype, count=len(data))


def msgspec_asarray(body: bytes, dtype: np.dtype) -> np.ndarray:
    import msgspec

    return np.asarray(msgspec.json.decode(body)["inputs"][0]["data"], dtype=dtype)


def simdjson_buffer(body: bytes, dtype: np.dtype) -> np.ndarray:
    doc = json_tensor._parse(body)  # the shipped per-thread parser (a fresh one costs ~2 ms more)
    data = doc["inputs"][0]["data"]
    of_type, raw = ("d", np.float64) if dtype.kind == "f" else ("i", np.int64)
    out = np.frombuffer(data.as_buffer(of_type=of_type), raw).astype(dtype)
    del data, doc  # the parser is reused: release its proxies
    return out


def _span_text(body: bytes) -> bytes:
    start, end, _ = json_tensor.data_spans(body)[0]
    return body[start:end].translate(None, b"[]")


def span_fromstring(body: bytes, dtype: np.dtype) -> np.ndarray:
    return np.fromstring(_span_text(body), dtype=dtype, sep=",")


def span_loadtxt(body: bytes, dtype: np.dtype) -> np.ndarray:
    return np.loadtxt(io.BytesIO(_span_text(body)), dtype=dtype, delimiter=",", ndmin=1)


def pyarrow_json(body: bytes, dtype: np.dtype) -> np.ndarray:
    import pyarrow.json as pj

    table = pj.read_json(io.BytesIO(body))
    data = table.column("inputs").combine_chunks().flatten().field("data")
    while hasattr(data, "flatten"):  # list<list<...>>: down to the values
        data = data.flatten()
    return data.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def sponge_orjson_path(body: bytes, dtype: np.dtype) -> np.ndarray:
    saved, json_tensor.MIN_BYTES = json_tensor.MIN_BYTES, 1 << 62
    try:
        return next(iter(parse_infer_request(body, None).inputs.values())).reshape(-1)
    finally:
        json_tensor.MIN_BYTES = saved


def shipped(body: bytes, dtype: np.dtype) -> np.ndarray:
    return next(iter(parse_infer_request(body, None).inputs.values())).reshape(-1)


OPTIONS: dict[str, Decoder] = {
    "orjson+asarray": old_path,
    "orjson+fromiter": orjson_fromiter,
    "msgspec+asarray": msgspec_asarray,
    "simdjson.as_buffer": simdjson_buffer,
    "span+fromstring": span_fromstring,
    "span+loadtxt": span_loadtxt,
    "pyarrow.json": pyarrow_json,
    "sponge orjson path": sponge_orjson_path,
    "sponge (shipped)": shipped,
}


def bodies() -> dict[str, tuple[bytes, np.ndarray]]:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1, 224, 224, 3)).astype(np.uint8)
    f32 = ((img / 255.0 - 0.5) / 0.25).astype(np.float32)  # a normalised image: full-precision floats
    tiny = np.array([[0.5, -1.25, 3.0, 7.75]], np.float32)
    out = {}
    for name, arr in (("UINT8 150,528", img), ("FP32 150,528", f32), ("FP32 4 (tiny)", tiny)):
        for form in ("flat", "nested"):
            data = arr.reshape(-1).tolist() if form == "flat" else arr.tolist()
            doc = {"id": "b", "inputs": [{"name": "x", "shape": list(arr.shape),
                                          "datatype": "UINT8" if arr.dtype == np.uint8 else "FP32", "data": data}],
                   "parameters": {"slo_ms": 1000}}
            out[f"{name} {form}"] = (orjson.dumps(doc), arr.reshape(-1))
    return out


async def _stall(decoder: BodyDecoder, body: bytes, limits: Limits) -> tuple[float, float]:
    """(decode ms, longest gap ms between ticks of a 0.5 ms ticker) while the body is decoded."""
    gaps: list[float] = []
    done = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.0005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.005)
    gaps.clear()
    t0 = time.perf_counter()
    await decoder.decode(body, None, limits, [])
    took = time.perf_counter() - t0
    done = True
    await task
    return took * 1e3, max(gaps, default=0.0) * 1e3


async def loop_table(sizes_mib: tuple[int, ...] = (1, 4, 16, 64)) -> dict[str, Any]:
    limits = Limits([TensorSpec("x", "FP32", (-1, 4))], 1 << 30, 1 << 40)
    routes = {"inline": BodyDecoder(1 << 62, 1 << 62), "thread": BodyDecoder(0, 1 << 62), "process": BodyDecoder(0, 0)}
    rng = np.random.default_rng(1)
    out: dict[str, Any] = {}
    print(f"\n{'JSON body':<14}" + "".join(f"{r + ' decode/stall ms':>28}" for r in routes))
    for mib in sizes_mib:
        n = mib * (1 << 20) // 20 // 4 * 4  # ~20 bytes per FP32 number in JSON
        data = rng.standard_normal(n).astype(np.float32)
        body = orjson.dumps({"inputs": [{"name": "x", "shape": [n // 4, 4], "datatype": "FP32",
                                         "data": data.tolist()}]})
        row = {}
        for route, dec in routes.items():
            await dec.decode(body, None, limits, [])  # warm: the helper process starts on first use
            runs = [await _stall(dec, body, limits) for _ in range(3)]
            row[route] = [round(statistics.median(r[0] for r in runs), 1), round(statistics.median(r[1] for r in runs), 1)]
        out[f"{len(body) / (1 << 20):.0f} MiB"] = row
        print(f"{len(body) / (1 << 20):>6.0f} MiB FP32" + "".join(f"{row[r][0]:>19.1f} / {row[r][1]:>6.1f}" for r in routes))
    for dec in routes.values():
        await dec.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=30, help="decodes per option, body and round (tiny: x20)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loop", action="store_true", help="also the event-loop stall table (inline/thread/process)")
    args = ap.parse_args()
    cases = bodies()
    times: dict[str, dict[str, list[float]]] = {c: {o: [] for o in OPTIONS} for c in cases}
    usable: dict[str, dict[str, str]] = {c: {} for c in cases}
    for case, (body, want) in cases.items():  # correctness first: an option that decodes wrong is out
        for opt, fn in OPTIONS.items():
            try:
                got = fn(body, want.dtype)
                if not np.array_equal(got.reshape(-1), want):
                    usable[case][opt] = "wrong values"
            except ImportError:
                usable[case][opt] = "not installed"
            except Exception as exc:  # noqa: BLE001 - report whatever the option cannot do
                usable[case][opt] = f"fails: {type(exc).__name__}"
    for _ in range(args.rounds):
        for case, (body, want) in cases.items():
            reps = args.reps * (20 if "tiny" in case else 1)
            for opt, fn in OPTIONS.items():
                if opt in usable[case]:
                    continue
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn(body, want.dtype)
                    times[case][opt].append((time.perf_counter() - t0) * 1e6)
    result: dict[str, Any] = {"body_bytes": {c: len(b) for c, (b, _) in cases.items()}, "median_us": {}}
    names = list(OPTIONS)
    print(f"{'body':<22}{'bytes':>9}" + "".join(f"{n:>20}" for n in names))
    for case, (body, _) in cases.items():
        row = {}
        cells = []
        for opt in names:
            if opt in usable[case]:
                cells.append(f"{usable[case][opt][:18]:>20}")
                row[opt] = None
            else:
                med = statistics.median(times[case][opt])
                row[opt] = round(med, 1)
                cells.append(f"{med:>17.1f} us")
        result["median_us"][case] = row
        print(f"{case:<22}{len(body):>9}" + "".join(cells))
    result["speedup_vs_orjson_asarray"] = {  # the path before issue 13, without its few us of validation
        case: round(row["orjson+asarray"] / row["sponge (shipped)"], 2) for case, row in result["median_us"].items()
    }
    result["reps"], result["rounds"] = args.reps, args.rounds
    if args.loop:
        result["loop_decode_stall_ms"] = asyncio.run(loop_table())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
