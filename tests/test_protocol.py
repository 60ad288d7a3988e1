"""V2 codecs: JSON tensors, the binary tensor extension, and errors that name the field."""

import struct
import time

import numpy as np
import orjson
import pytest

from sponge.protocol.v2 import (
    Limits,
    ProtocolError,
    check_inputs,
    classify,
    encode_infer_response,
    parse_infer_request,
)
from sponge.runtime.base import TensorSpec

SPECS = [TensorSpec("x", "FP32", (-1, 4))]


def body(doc) -> bytes:
    return orjson.dumps(doc)


def test_json_tensor_flat_and_nested():
    for data in ([1, 2, 3, 4, 5, 6, 7, 8], [[1, 2, 3, 4], [5, 6, 7, 8]]):
        req = parse_infer_request(body({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                                                      "data": data}]}), None)
        np.testing.assert_array_equal(req.inputs["x"], np.arange(1, 9, dtype=np.float32).reshape(2, 4))
        assert check_inputs(req.inputs, SPECS, max_batch=8) == 2


def binary_request(arr: np.ndarray, extra_in=None, outputs=None):
    header = {"inputs": [{"name": "x", "shape": list(arr.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": arr.nbytes}}]}
    if outputs:
        header["outputs"] = outputs
    h = orjson.dumps(header)
    return h + arr.tobytes() + (extra_in or b""), len(h)


def test_binary_tensor_extension_round_trip():
    arr = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    raw, hl = binary_request(arr, outputs=[{"name": "y", "parameters": {"binary_data": True}}])
    req = parse_infer_request(raw, hl)
    np.testing.assert_array_equal(req.inputs["x"], arr)
    assert req.outputs[0].binary
    out, headers = encode_infer_response("m", None, "id1", [("y", arr * 2, True)], {"k": 1})
    n = int(headers["inference-header-content-length"])
    doc = orjson.loads(out[:n])
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == arr.nbytes
    np.testing.assert_array_equal(np.frombuffer(out[n:], np.float32).reshape(3, 4), arr * 2)
    assert doc["id"] == "id1"


def test_bytes_tensor_binary_and_json():
    blob = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", b"xyz"))
    h = orjson.dumps({"inputs": [{"name": "s", "shape": [3], "datatype": "BYTES",
                                  "parameters": {"binary_data_size": len(blob)}}]})
    req = parse_infer_request(h + blob, len(h))
    assert list(req.inputs["s"]) == [b"ab", b"", b"xyz"]
    out, _ = encode_infer_response("m", None, None, [("s", req.inputs["s"], False)], {})
    assert orjson.loads(out)["outputs"][0]["data"] == ["ab", "", "xyz"]


@pytest.mark.parametrize(
    "raw, header_len, field",
    [
        (b"{not json", None, "not valid JSON"),
        (body({"inputs": []}), None, "'inputs'"),
        (body({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}), None, "inputs[0].name"),
        (body({"inputs": [{"name": "x", "shape": [1], "datatype": "FLOAT", "data": [1]}]}), None, ".datatype"),
        (body({"inputs": [{"name": "x", "shape": "1", "datatype": "FP32", "data": [1]}]}), None, ".shape"),
        (body({"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}), None, "negative"),
        (body({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}), None, ".data"),
        (body({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}), None, ".data"),
        (body({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}), None, ".data' is missing"),
        (body({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
               "parameters": []}), None, "'parameters'"),
        (body({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
               "outputs": [{"name": "y", "parameters": {"classification": -1}}]}), None, "classification"),
    ],
)
def test_malformed_requests_name_the_field(raw, header_len, field):
    with pytest.raises(ProtocolError) as err:
        parse_infer_request(raw, header_len)
    assert err.value.status == 400
    assert field in err.value.message


def test_binary_size_mismatch_is_refused():
    arr = np.zeros((2, 4), np.float32)
    h = orjson.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                                  "parameters": {"binary_data_size": 16}}]})
    with pytest.raises(ProtocolError, match="binary_data_size' is 16 bytes but shape"):
        parse_infer_request(h + arr.tobytes()[:16], len(h))
    raw, hl = binary_request(arr, extra_in=b"junk")
    with pytest.raises(ProtocolError, match="not claimed"):
        parse_infer_request(raw, hl)
    raw, hl = binary_request(arr)
    with pytest.raises(ProtocolError, match="only 8 bytes"):
        parse_infer_request(raw[:-24], hl)
    with pytest.raises(ProtocolError, match="Inference-Header-Content-Length"):
        parse_infer_request(raw, len(raw) + 5)
    with pytest.raises(ProtocolError, match="no 'Inference-Header-Content-Length'"):
        parse_infer_request(raw[:hl], None)


def test_check_inputs_against_model():
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ProtocolError, match="input 'z' is not an input"):
        check_inputs({"x": x, "z": x}, SPECS, 8)
    with pytest.raises(ProtocolError, match="input 'x' is missing"):
        check_inputs({}, SPECS, 8)
    with pytest.raises(ProtocolError, match="datatype FP64 but the model expects FP32"):
        check_inputs({"x": x.astype(np.float64)}, SPECS, 8)
    with pytest.raises(ProtocolError, match=r"shape \[2, 5\]"):
        check_inputs({"x": np.zeros((2, 5), np.float32)}, SPECS, 8)
    with pytest.raises(ProtocolError, match="exceeds the server's maximum of 1"):
        check_inputs({"x": x}, SPECS, 1)
    with pytest.raises(ProtocolError, match="batch dimension"):
        check_inputs({"x": np.zeros((0, 4), np.float32)}, SPECS, 8)


def test_classification_extension_top_k_with_labels():
    scores = np.array([[0.1, 0.7, 0.2]], np.float32)
    out = classify(scores, 2, ["cat", "dog", "cup"])
    assert out.shape == (1, 2)
    assert out[0, 0].decode().endswith(":1:dog") and out[0, 1].decode().endswith(":2:cup")


# ---- declared sizes are checked before anything is allocated (issue 9) ----------------------------
LIMITS = Limits(SPECS, max_batch=8)


def _declared(shape, datatype="FP32", name="x", **extra):
    return body({"inputs": [{"name": name, "shape": shape, "datatype": datatype, **extra}]})


@pytest.mark.parametrize("raw, status, words", [
    (_declared([1, 4], "BYTES", data=["a"]), 400, "'inputs[0].datatype': input 'x' has datatype BYTES"),
    (_declared([1, 4], name="z", data=[1] * 4), 400, "'inputs[0].name': input 'z' is not an input"),
    (_declared([1, 2**40], data=[1]), 400, "'inputs[0].shape': input 'x' has shape [1, 1099511627776]"),
    (_declared([2**40, 4], data=[1]), 413, "'inputs[0].shape': request batch 1099511627776 exceeds"),
    (_declared([1] * 33, data=[1]), 400, "33 dimensions"),
])
def test_declared_tensor_is_checked_against_the_model_before_its_data(raw, status, words):
    with pytest.raises(ProtocolError) as err:
        parse_infer_request(raw, None, LIMITS)
    assert err.value.status == status and words in err.value.message


def test_element_cap_applies_to_free_dimensions():
    free = Limits([TensorSpec("v", "FP32", (-1, -1))], max_batch=8, max_elements=100)
    assert parse_infer_request(_declared([2, 50], name="v", data=[0] * 100), None, free).inputs["v"].shape == (2, 50)
    with pytest.raises(ProtocolError, match=r"'inputs\[0\].shape' \[2, 51\] declares 102 elements.*of 100") as err:
        parse_infer_request(_declared([2, 51], name="v", data=[0] * 102), None, free)
    assert err.value.status == 413


def test_binary_bytes_count_is_bounded_by_the_bytes_present():
    """The issue's 113-byte bomb: 300 million elements declared, 8 bytes sent. Refused before the
    object array (8 bytes per declared element) is built."""
    h = orjson.dumps({"inputs": [{"name": "s", "shape": [300_000_000], "datatype": "BYTES",
                                  "parameters": {"binary_data_size": 8}}]})
    t0 = time.perf_counter()
    with pytest.raises(ProtocolError, match=r"declares 300000000 BYTES elements but .* can hold at most 2"):
        parse_infer_request(h + b"\0" * 8, len(h))
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(ProtocolError, match="binary_data_size' must be a non-negative integer"):
        h2 = h.replace(b"8}", b"true}")  # a boolean is not a size (True == 1 to isinstance(_, int))
        parse_infer_request(h2 + b"\0", len(h2))
