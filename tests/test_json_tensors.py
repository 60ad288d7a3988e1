"""JSON tensor `data` lists decoded into typed buffers (issue 13, item 2): the simdjson path
(`sponge/protocol/json_tensor.py`, used for a JSON part >= 16 KiB) and the orjson path (small bodies and
whatever the simdjson path declines) give the same arrays and refuse the same input, with messages that
name the field. `path` runs each test through both by moving the size threshold."""

from __future__ import annotations

import httpx
import numpy as np
import orjson
import pytest

from serverproc import ServerProcess
from sponge.protocol import json_tensor
from sponge.protocol.v2 import DTYPES, Limits, ProtocolError, decode_request, parse_infer_request
from sponge.runtime.base import TensorSpec

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
WHERE = "'inputs[0] ('x').data'"


@pytest.fixture(params=["simdjson", "orjson"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Route every body to one path; count the tensors the simdjson path decoded itself."""
    monkeypatch.setattr(json_tensor, "MIN_BYTES", 0 if request.param == "simdjson" else 1 << 62)
    fast = {"tensors": 0, "name": request.param}
    real = json_tensor.tensor

    def counting(*args, **kw):
        out = real(*args, **kw)
        fast["tensors"] += 1
        return out

    monkeypatch.setattr(json_tensor, "tensor", counting)
    return fast


def body(data, shape, datatype="FP32", **extra) -> bytes:
    """A request; `data` given as bytes is put in as raw JSON text (numbers orjson cannot write)."""
    if isinstance(data, bytes):
        return body("RAW", shape, datatype, **extra).replace(b'"RAW"', data)
    doc = {"id": "r1", "inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data,
                                   "parameters": {"note": "[not, a list]"}}],
           "parameters": {"slo_ms": 250, "data": [[1], 2]}}
    doc.update(extra)
    return orjson.dumps(doc)


def values(datatype: str, n: int) -> np.ndarray:
    """n values spanning the datatype's range, ends included."""
    dt = DTYPES[datatype]
    if dt.kind == "b":
        return np.arange(n) % 3 == 0
    if dt.kind == "f":
        v = np.linspace(-1000, 1000, n).astype(dt)
        v[0], v[-1] = np.finfo(dt).min, np.finfo(dt).max
        return v
    info = np.iinfo(dt)
    v = (np.arange(n, dtype=np.int64) * 7919 % 251).astype(dt)
    v[0], v[-1] = info.min, info.max
    return v


@pytest.mark.parametrize("datatype", NUMERIC)
@pytest.mark.parametrize("nested", [False, True])
def test_every_numeric_datatype_round_trips_flat_and_nested(datatype, nested, path):
    want = values(datatype, 24).reshape(2, 3, 4)
    data = want.tolist() if nested else want.reshape(-1).tolist()
    req = parse_infer_request(body(data, [2, 3, 4], datatype), None)
    got = req.inputs["x"]
    assert got.dtype == DTYPES[datatype] and got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, want)  # C order, nested or not
    assert req.id == "r1" and req.parameters == {"slo_ms": 250, "data": [[1], 2]}  # untouched
    # BOOL (true/false) is not a number for simdjson's buffer: the orjson path takes it
    assert path["tensors"] == (1 if path["name"] == "simdjson" and datatype != "BOOL" else 0)


def test_nesting_of_other_dimensions_with_the_same_count_is_accepted_as_before(path):
    """np.asarray accepted any even nesting whose size matches the shape (e.g. an image sent without
    its batch dimension); so does the new path."""
    x = np.arange(24, dtype=np.float32)
    for nested in (x.reshape(4, 6), x.reshape(24, 1), x.reshape(2, 2, 2, 3)):
        got = parse_infer_request(body(nested.tolist(), [2, 3, 4]), None).inputs["x"]
        np.testing.assert_array_equal(got, x.reshape(2, 3, 4))


def test_numbers_of_the_other_kind_are_read_as_numpy_always_did(path):
    """Floats for an integer type are truncated, ints and bools for a float type converted: not a
    change of this issue (the simdjson path hands these to the orjson path)."""
    assert parse_infer_request(body([1.9, -2.5], [2], "INT32"), None).inputs["x"].tolist() == [1, -2]
    assert parse_infer_request(body([True, 2, 0.5], [3], "FP32"), None).inputs["x"].tolist() == [1.0, 2.0, 0.5]
    assert parse_infer_request(body([0, 2, 0.5], [3], "BOOL"), None).inputs["x"].tolist() == [False, True, True]


def refused(raw: bytes) -> str:
    with pytest.raises(ProtocolError) as err:
        parse_infer_request(raw, None)
    assert err.value.status == 400
    return err.value.message


@pytest.mark.parametrize("data, shape, datatype, words", [
    ([1, 2, 3], [2, 2], "FP32", "has 3 elements but shape [2, 2] needs 4"),
    ([[1, 2], [3, 4], [5, 6]], [2, 2], "FP32", "has 6 elements but shape [2, 2] needs 4"),
    ([1, 2, 3, 4, 5], [4], "UINT8", "has 5 elements but shape [4] needs 4"),
    ([1, "a", 3, 4], [4], "FP32", "element 1 is a string, not a number"),
    ([1, 2, "3", 4], [4], "INT32", "element 2 is a string, not a number"),
    ([[1, 2], [3, None]], [2, 2], "FP32", "element 3 is null, not a number"),
    ([1, {"v": 2}], [2], "FP64", "element 1 is an object, not a number"),
    ([True, "x"], [2], "BOOL", "element 1 is a string, not a number"),
    ([0, 255, 256], [3], "UINT8", "element 2 (256) is out of range for UINT8 [0, 255]"),
    ([[0, 1], [-1, 2]], [2, 2], "UINT8", "element 2 (-1) is out of range for UINT8 [0, 255]"),
    ([127, 128], [2], "INT8", "element 1 (128) is out of range for INT8 [-128, 127]"),
    ([70000, 1], [2], "UINT16", "element 0 (70000) is out of range for UINT16"),
    ([2**31], [1], "INT32", "element 0 (2147483648) is out of range for INT32"),
    ([1e10], [1], "INT32", "out of range for INT32"),
    ([2**63], [1], "INT64", "element 0 (9223372036854775808) is out of range for INT64"),
    ([-1], [1], "UINT64", "element 0 (-1) is out of range for UINT64"),
    (b"[18446744073709551616]", [1], "UINT64", "is out of range for UINT64"),  # orjson reads it as a float
    ([1.0, 1e39], [2], "FP32", "element 1 (1e+39) is out of range for FP32"),
    ([65504, 70000.5], [2], "FP16", "element 1 (70000.5) is out of range for FP16"),
    ([[1, 2, 3, 4], 5, 6, 7, 8], [2, 4], "FP32", "cannot be read as FP32"),
    ([[1, 2, 3], [4]], [2, 2], "FP32", "cannot be read as FP32"),  # uneven, count right
    ([[1, 2], [3, 4, 5, 6], []], [2, 3], "FP32", "cannot be read as FP32"),
    ([1, [2], 3], [3], "INT64", "cannot be read as INT64"),  # one slot per element, still uneven
    ([[1], [], [2, 3]], [3], "FP32", "cannot be read as FP32"),
    ([[[1, 2]], [[3], [4]]], [2, 2], "FP32", "cannot be read as FP32"),
    ([[1], []], [2, 1], "FP32", "cannot be read as FP32"),  # '[]' and '[1]' look alike without numbers
    ("1,2,3,4", [4], "FP32", "element 0 is a string, not a number"),
    ({"a": 1}, [1], "FP32", "element 0 is an object, not a number"),
])
def test_malformed_data_is_a_400_naming_the_field(data, shape, datatype, words, path):
    message = refused(body(data, shape, datatype))
    assert message.startswith(WHERE) and words in message, message


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"nan", b"1e400", b"01", b"1.", b"+1"])
def test_non_json_number_tokens_are_refused_as_invalid_json(token, path):
    raw = body([1.5, 0.0, 2.5], [3]).replace(b"0.0", token)
    assert "request body is not valid JSON" in refused(raw)


def test_declared_shape_and_caps_are_checked_before_the_data(path):
    limits = Limits([TensorSpec("x", "UINT8", (-1, 4))], max_batch=2, max_elements=8)
    with pytest.raises(ProtocolError, match=r"'inputs\[0\].datatype'"):
        parse_infer_request(body([1, 2, 3, 4], [1, 4], "FP32"), None, limits)
    with pytest.raises(ProtocolError, match=r"'inputs\[0\].shape'.* expects \[-1, 4\]"):
        parse_infer_request(body([1, 2, 3, 4], [4], "UINT8"), None, limits)
    with pytest.raises(ProtocolError, match=r"request batch 3 exceeds") as err:
        parse_infer_request(body([0] * 12, [3, 4], "UINT8"), None, limits)
    assert err.value.status == 413
    assert parse_infer_request(body([[0, 1, 2, 3]], [1, 4], "UINT8"), None, limits).inputs["x"].shape == (1, 4)


def test_several_inputs_and_keys_in_any_order_with_strings_that_look_like_json(path):
    """The JSON scan that locates each `data` list skips strings whole (brackets, quotes, escapes in
    them) and keys it does not know; a BYTES input keeps its own path."""
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    doc = (b'{"outputs": [{"name": "y]"}], "inputs": [ {"data" : ["]\\"[", "\\u005d"], "name": "s", '
           b'"shape": [2], "datatype": "BYTES"}, {"parameters": {"data": [[1], 2], "s": "}{]["}, "shape": [3, 4],'
           b' "datatype": "INT16", "name": "a", "data": \n ' + orjson.dumps(a.tolist()) + b' \n},'
           b' {"name": "b", "datatype": "FP64", "shape": [2], "data": [1e-3, -0.0]} ], "id": "\\"data\\": [1]"}')
    req = parse_infer_request(doc, None)
    assert req.inputs["s"].tolist() == [b']"[', b"]"] and req.id == '"data": [1]'
    np.testing.assert_array_equal(req.inputs["a"], a)
    assert req.inputs["a"].dtype == np.int16 and req.inputs["b"].tolist() == [1e-3, -0.0]
    assert [o.name for o in req.outputs] == ["y]"]
    assert path["tensors"] == (2 if path["name"] == "simdjson" else 0)


def test_duplicate_keys_mean_the_last_one_as_before(path):
    raw = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2], "data": [3, 4]}]}'
    assert parse_infer_request(raw, None).inputs["x"].tolist() == [3.0, 4.0]


def test_a_parser_is_reused_safely_across_requests_and_errors(monkeypatch):
    """One simdjson parser per thread: arrays from an earlier request stay valid, and a request that
    failed (its traceback may hold the parser's proxies) does not break the next one."""
    monkeypatch.setattr(json_tensor, "MIN_BYTES", 0)
    first = parse_infer_request(body(list(range(8)), [8], "INT64"), None).inputs["x"]
    with pytest.raises(ProtocolError) as err:
        parse_infer_request(body([1, 2, 300], [3], "UINT8"), None)
    kept = err.value  # noqa: F841 - the exception (and its frames) alive across the next parse
    second = parse_infer_request(body([5.5] * 4, [4], "FP32"), None).inputs["x"]
    assert first.tolist() == list(range(8)) and second.tolist() == [5.5] * 4


def test_one_image_through_the_simdjson_path_equals_the_binary_path():
    """A 224x224x3 UINT8 image as JSON (flat and nested: a 0.5 MB body, past the 16 KiB threshold)
    decodes to exactly the array the binary tensor extension gives."""
    img = np.random.default_rng(13).integers(0, 256, (1, 224, 224, 3)).astype(np.uint8)
    limits = Limits([TensorSpec("image", "UINT8", (-1, 224, 224, 3))], 8, None)
    h = orjson.dumps({"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8",
                                  "parameters": {"binary_data_size": img.nbytes}}]})
    binary, _ = decode_request(h + img.tobytes(), len(h), limits, [])
    for data in (img.reshape(-1).tolist(), img.tolist()):
        raw = orjson.dumps({"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8",
                                        "data": data}]})
        assert len(raw) >= json_tensor.MIN_BYTES
        spans = json_tensor.data_spans(raw)
        assert spans[0][2] == (json_tensor.FLAT if isinstance(data[0], int) else 150_528)
        req, items = decode_request(raw, None, limits, [])
        assert items == 1 and req.inputs["image"].dtype == np.uint8
        np.testing.assert_array_equal(req.inputs["image"], binary.inputs["image"])
        assert req.inputs["image"].flags.c_contiguous


def test_even_slots_reads_dimensions_and_refuses_anything_uneven():
    def skeleton(data) -> bytes:
        return orjson.dumps(data).translate(None, json_tensor._NOT_SKELETON)

    assert json_tensor._even_slots(skeleton(np.zeros((2, 3, 4)).tolist())) == 24
    assert json_tensor._even_slots(skeleton([[1], [2], [3]])) == 3
    assert json_tensor._even_slots(skeleton([[[1, 2, 3]]])) == 3
    for uneven in ([[1, 2], [3]], [[1, 2], 3], [[[1]], [2]], [[1, [2]], [3, 4]], [[1, 2], [3, 4], [5]]):
        assert json_tensor._even_slots(skeleton(uneven)) == json_tensor.UNEVEN, uneven


# ---- end to end: a real server with the default model (UINT8 [N, 224, 224, 3]) ------------------
@pytest.fixture(scope="module")
def image_server():
    srv = ServerProcess("--batch", "1")
    yield srv
    srv.stop()


@pytest.mark.slow
def test_a_json_image_through_the_server_equals_the_binary_request(image_server):
    url = f"{image_server.url}/v2/models/efficientnet-lite0/infer"
    img = np.random.default_rng(5).integers(0, 256, (1, 224, 224, 3)).astype(np.uint8)
    h = orjson.dumps({"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8",
                                  "parameters": {"binary_data_size": img.nbytes}}],
                      "outputs": [{"name": "logits"}], "parameters": {"slo_ms": 60000}})
    r = httpx.post(url, content=h + img.tobytes(), headers={"Inference-Header-Content-Length": str(len(h))},
                   timeout=60)
    assert r.status_code == 200, r.text
    want = np.array(r.json()["outputs"][0]["data"], np.float32)
    for data in (img.reshape(-1).tolist(), img.tolist()):
        doc = {"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8", "data": data}],
               "outputs": [{"name": "logits"}], "parameters": {"slo_ms": 60000}}
        r = httpx.post(url, content=orjson.dumps(doc), timeout=60)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.array(r.json()["outputs"][0]["data"], np.float32), want)
    bad = img.reshape(-1).tolist()
    bad[1000] = 256
    r = httpx.post(url, content=orjson.dumps({"inputs": [{"name": "image", "shape": [1, 224, 224, 3],
                                                          "datatype": "UINT8", "data": bad}]}), timeout=60)
    assert r.status_code == 400
    assert r.json()["error"] == ("'inputs[0] ('image').data' element 1000 (256) is out of range for UINT8 [0, 255]")
    uneven = img.tolist()
    uneven[0][5].pop()
    uneven[0][6].append([1, 2, 3])
    r = httpx.post(url, json={"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8",
                                          "data": uneven}]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"].startswith("'inputs[0] ('image').data' cannot be read"), r.text

