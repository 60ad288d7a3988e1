"""The V2 gRPC front door (`inference.GRPCInferenceService`, issue 13 item 1), through stock tritonclient.grpc:
its own client, and its own `service_pb2` messages and stub for requests the client cannot make (typed
contents, malformed raw contents). Also: the committed descriptor matches inference.proto and Triton's
field numbers; the codec's checks in process; the status-code mapping of the core's refusals in process."""

from __future__ import annotations

import asyncio
import hashlib
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest

from sponge.protocol import grpc_v2 as pb
from sponge.protocol.grpc_v2 import codec
from sponge.protocol.v2 import Limits, ProtocolError
from sponge.runtime.base import TensorSpec

tg = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402  (stock Triton messages and stub)
from tritonclient.utils import InferenceServerException  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ---- the descriptor: current, and wire-compatible with Triton's --------------------------------------------
def test_committed_descriptor_matches_the_proto():
    from sponge.protocol.grpc_v2 import _descriptor, generate

    assert _descriptor.PROTO_SHA256 == hashlib.sha256(generate.PROTO.read_bytes()).hexdigest(), (
        "inference.proto changed: run python -m sponge.protocol.grpc_v2.generate")
    pytest.importorskip("grpc_tools")
    out = subprocess.run([sys.executable, "-m", "sponge.protocol.grpc_v2.generate", "--check"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_messages_coexist_with_tritonclient_and_match_its_field_numbers():
    """Both are imported in this process (our pool is our own), and every field we declare is Triton's:
    same number, type and cardinality; the service and its methods are the specification's."""
    theirs = service_pb2.DESCRIPTOR

    def fields(desc, prefix=""):
        out = {}
        for f in desc.fields:
            kind = f.message_type.full_name if f.message_type else None
            out[prefix + f.name] = (f.number, f.type, f.is_repeated, kind)
        for nested in desc.nested_types:
            out.update(fields(nested, f"{prefix}{nested.name}."))
        return out

    for name, mine in pb.FILE.message_types_by_name.items():
        assert name in theirs.message_types_by_name, name
        t = fields(theirs.message_types_by_name[name])
        for fname, spec in fields(mine).items():
            assert t.get(fname) == spec, (name, fname, spec, t.get(fname))
    service = theirs.services_by_name["GRPCInferenceService"]
    assert service.full_name == pb.SERVICE == "inference.GRPCInferenceService"
    for m in pb.FILE.services_by_name["GRPCInferenceService"].methods:
        t = service.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (t.input_type.full_name, t.output_type.full_name)


# ---- the codec, in process ---------------------------------------------------------------------------------
SPECS = [TensorSpec("x", "FP32", (-1, 4))]
OUTS = [TensorSpec("y", "FP32", (-1, 4))]


def request(*tensors, raw=None, **params) -> bytes:
    msg = pb.ModelInferRequest(model_name="m")
    for name, dt, shape in tensors:
        msg.inputs.add(name=name, datatype=dt, shape=shape)
    for blob in raw or []:
        msg.raw_input_contents.append(blob)
    codec.set_parameters(msg.parameters, params)
    return msg.SerializeToString()


def decode(body: bytes, specs=SPECS, max_batch: int = 8):
    return codec.decode_model_infer(body, Limits(specs, max_batch, None), OUTS, "m", ["1"])


def test_codec_raw_and_typed_contents():
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    req, items = decode(request(("x", "FP32", [2, 4]), raw=[x.tobytes()], slo_ms=50.0, network_ms=5))
    assert items == 2 and np.array_equal(req.inputs["x"], x) and req.parameters == {"slo_ms": 50.0, "network_ms": 5}
    msg = pb.ModelInferRequest(model_name="m", id="r1")
    msg.inputs.add(name="x", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(x.ravel().tolist())
    req, _ = decode(msg.SerializeToString())
    assert np.array_equal(req.inputs["x"], x) and req.id == "r1"


@pytest.mark.parametrize("specs, build, match", [
    # typed contents in the wrong field, of the wrong count, out of the datatype's range; FP16 has none
    (SPECS, lambda m: m.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.int_contents.extend([1] * 4),
     r"'inputs\[0\] \('x'\)\.contents\.int_contents' is set but datatype FP32 takes its elements in "
     r"'contents\.fp32_contents'"),
    (SPECS, lambda m: m.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1.0] * 3),
     r"'inputs\[0\] \('x'\)\.contents\.fp32_contents' has 3 elements but shape \[1, 4\] needs 4"),
    ([TensorSpec("x", "INT8", (-1, 2))],
     lambda m: m.inputs.add(name="x", datatype="INT8", shape=[1, 2]).contents.int_contents.extend([1, 300]),
     r"'inputs\[0\] \('x'\)\.contents\.int_contents' element 1 \(300\) is out of range for INT8"),
    ([TensorSpec("x", "FP16", (-1, 2))],
     lambda m: m.inputs.add(name="x", datatype="FP16", shape=[1, 2]).contents.fp32_contents.extend([1.0, 2.0]),
     r"'inputs\[0\] \('x'\)\.contents': datatype FP16 has no typed contents field"),
    # raw contents: one entry per input, or typed and raw at once
    (SPECS, lambda m: (m.inputs.add(name="x", datatype="FP32", shape=[1, 4]), m.raw_input_contents.extend([b"", b""])),
     r"'raw_input_contents' has 2 entries but the request has 1 inputs"),
    (SPECS, lambda m: (m.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1.0] * 4),
                       m.raw_input_contents.append(bytes(16))),
     r"'inputs\[0\] \('x'\)\.contents' is set but the request also has raw_input_contents"),
    # BYTES: more elements declared than the raw contents can hold (before anything is allocated)
    ([TensorSpec("s", "BYTES", (1, -1))],
     lambda m: (m.inputs.add(name="s", datatype="BYTES", shape=[1, 1000]), m.raw_input_contents.append(bytes(8))),
     r"'raw_input_contents\[0\]' is 8 bytes: it can hold at most 2 BYTES elements"),
    (SPECS, lambda m: m.inputs.add(name="x", datatype="FP32", shape=[1, -4]), r"'inputs\[0\] \('x'\)\.shape' has a "
     "negative dimension"),
])
def test_codec_refuses_naming_the_field(specs, build, match):
    msg = pb.ModelInferRequest(model_name="m")
    build(msg)
    with pytest.raises(ProtocolError, match=match) as exc:
        decode(msg.SerializeToString(), specs)
    assert exc.value.status == 400


def test_codec_bytes_raw_contents_and_unknown_model_version():
    specs = [TensorSpec("s", "BYTES", (-1,))]
    blob = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", b"xyz"))
    req, items = decode(request(("s", "BYTES", [3]), raw=[blob]), specs)
    assert items == 3 and list(req.inputs["s"]) == [b"ab", b"", b"xyz"]
    for name, version, match in (("other", "", r"model 'other' is not served here \(available: 'm'\)"),
                                 ("m", "7", r"model 'm' has no version '7'")):
        msg = pb.ModelInferRequest(model_name=name, model_version=version)
        with pytest.raises(ProtocolError, match=match) as exc:
            decode(msg.SerializeToString())
        assert exc.value.status == 404
    with pytest.raises(ProtocolError, match="not a valid ModelInferRequest"):
        decode(b"\xff\xff\xff")


def test_codec_mangled_messages_are_protocol_errors_or_valid_never_a_crash():
    """Seeded mutations (bit flips, truncations, spliced bytes) of valid requests, raw and typed, on a model
    with a BYTES and an FP32 input: each decodes or is a ProtocolError (INVALID_ARGUMENT / NOT_FOUND),
    never another exception (which the server would answer INTERNAL)."""
    specs = [TensorSpec("x", "FP32", (-1, 4)), TensorSpec("s", "BYTES", (-1, 2))]
    raw = pb.ModelInferRequest(model_name="m", raw_input_contents=[
        np.ones((2, 4), np.float32).tobytes(), b"".join(struct.pack("<I", 1) + b"a" for _ in range(4))])
    raw.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    raw.inputs.add(name="s", datatype="BYTES", shape=[2, 2])
    codec.set_parameters(raw.parameters, {"slo_ms": 100.0})
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1.0] * 4)
    typed.inputs.add(name="s", datatype="BYTES", shape=[1, 2]).contents.bytes_contents.extend([b"a", b"bc"])
    rng = np.random.default_rng(13)
    outcomes = {"ok": 0, "refused": 0}
    for base in (raw.SerializeToString(), typed.SerializeToString()):
        decode(base, specs)  # both valid as they are
        for _ in range(1500):
            b = bytearray(base)
            for _ in range(int(rng.integers(1, 4))):
                kind, i = int(rng.integers(3)), int(rng.integers(len(b)))
                if kind == 0:
                    b[i] ^= 1 << int(rng.integers(8))
                elif kind == 1:
                    del b[i:i + int(rng.integers(1, 16))]
                else:
                    b[i:i] = rng.integers(0, 256, int(rng.integers(1, 8)), dtype=np.uint8).tobytes()
            try:
                decode(bytes(b), specs)
                outcomes["ok"] += 1
            except ProtocolError as exc:
                assert exc.status in (400, 404, 413), exc
                outcomes["refused"] += 1
    assert outcomes["refused"] > 1000 and outcomes["ok"] > 0, outcomes


# ---- the status-code mapping of the core's refusals, in process (stock tritonclient.grpc.aio) ---------------
def test_core_refusals_map_to_status_codes_with_a_retry_hint():
    import tritonclient.grpc.aio as tga
    from test_front_door_fixes import FakeReplica, make_core

    from sponge.runtime.replica import ReplicaDied
    from sponge.server.core import ServerBusy
    from sponge.server.grpc_service import GrpcService

    async def go() -> None:
        replica = FakeReplica(hang=True)
        core = make_core(replica)
        service = GrpcService(core, max_message_bytes=1 << 20, default_slo_ms=1000.0, max_clock_skew_ms=200.0,
                              max_request_batch=8)
        core.start()
        port = await service.start("127.0.0.1", 0)
        client = tga.InferenceServerClient(f"127.0.0.1:{port}")
        x = tg.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))

        async def status(**kw) -> tuple[str, str]:
            with pytest.raises(InferenceServerException) as exc:
                await client.infer("m", [x], **kw)
            return exc.value.status(), exc.value.message()

        try:
            # a client that gives up while its request is queued: taken out of the queue, counted cancelled
            hold = asyncio.ensure_future(client.infer("m", [x]))  # occupies the (hanging) replica
            while not replica.calls:
                await asyncio.sleep(0.01)
            code, _ = await status(client_timeout=0.3)
            assert code == "StatusCode.DEADLINE_EXCEEDED"  # the client's own deadline
            for _ in range(200):
                if len(core.queue) == 0:
                    break
                await asyncio.sleep(0.01)
            assert len(core.queue) == 0
            assert core.metrics.registry.get_sample_value(
                "sponge_requests_by_protocol_total", {"model": "m", "protocol": "grpc", "outcome": "cancelled"}) == 1
            replica.release.set()
            assert (await hold).as_numpy("y").tolist() == [[2.0] * 4]
            # admission refuses (overloaded / queue full): RESOURCE_EXHAUSTED, retry-after in the trailers
            submit = core.submit

            def busy(*a, **kw):
                raise ServerBusy("queue is full", 3)
            core.submit = busy  # type: ignore[method-assign]
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            body = request(("x", "FP32", [1, 4]), raw=[np.ones((1, 4), np.float32).tobytes()])
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await pb.Stub(channel).ModelInfer(pb.ModelInferRequest.FromString(body))
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server busy: queue is full (retry after 3 s)" in exc.value.details()
            trailers = tuple(exc.value.trailing_metadata())
            assert ("retry-after", "3") in trailers and ("grpc-retry-pushback-ms", "3000") in trailers
            core.submit = submit  # type: ignore[method-assign]

            async def dying(inputs):
                raise ReplicaDied("replica r0 died (exit -9)")
            replica.infer = dying  # type: ignore[method-assign]
            code, message = await status()
            assert code == "StatusCode.INTERNAL" and "inference failed: replica r0 died" in message
            # shutting down: what is queued or arrives is UNAVAILABLE, retry-after 1
            await core.close()
            code, message = await status()
            assert code == "StatusCode.UNAVAILABLE" and "shutting down" in message
            await channel.close()
        finally:
            await client.close()
            await service.stop(0.5)
            await core.close()

    asyncio.run(go())


def test_message_limit_and_large_messages_decoded_off_the_loop():
    """The receive limit is max_body_bytes (gRPC refuses beyond it: RESOURCE_EXHAUSTED); a message of
    256 KiB or more is parsed on the body decoder's threads, and its checks still answer."""
    from test_front_door_fixes import FakeReplica, make_core

    from sponge.server.grpc_service import GrpcBindError, GrpcService

    async def go() -> None:
        core = make_core(FakeReplica())
        service = GrpcService(core, max_message_bytes=1 << 20, default_slo_ms=1000.0, max_clock_skew_ms=200.0,
                              max_request_batch=8)
        core.start()
        port = await service.start("127.0.0.1", 0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_send_message_length", 8 << 20)])
        stub = pb.Stub(channel)
        try:
            for rows, code, details in ((70_000, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
                                        (20_000, grpc.StatusCode.INVALID_ARGUMENT,
                                         "request batch 20000 exceeds the server's maximum of 8")):
                x = np.ones((rows, 4), np.float32)
                msg = pb.ModelInferRequest.FromString(request(("x", "FP32", [rows, 4]), raw=[x.tobytes()]))
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await stub.ModelInfer(msg)
                assert exc.value.code() == code and details in exc.value.details(), exc.value.details()
            assert service.decoder.counts["thread"] == 1  # the 320 KB one; the 1.1 MB one never reached us
            one = np.ones((1, 4), np.float32)
            ok = pb.ModelInferRequest.FromString(request(("x", "FP32", [1, 4]), raw=[one.tobytes()]))
            resp = await stub.ModelInfer(ok)
            assert np.frombuffer(resp.raw_output_contents[0], np.float32).tolist() == [2.0] * 4
            assert service.decoder.counts["inline"] == 1
            # a second server on the same port: refused (SO_REUSEPORT off), not silently sharing it
            other = GrpcService(core, max_message_bytes=1 << 20, default_slo_ms=1000.0, max_clock_skew_ms=200.0,
                                max_request_batch=8)
            with pytest.raises(GrpcBindError):
                await other.start("127.0.0.1", port)
        finally:
            await channel.close()
            await service.stop(0.5)
            await core.close()
            service.decoder.close()

    asyncio.run(go())


# ---- end to end: a real `sponge serve` with --grpc-port, through tritonclient.grpc ----------------------
@pytest.fixture(scope="module")
def server():
    from serverproc import ServerProcess

    from sponge.models.trivial import trivial_model_path

    srv = ServerProcess("--model", str(trivial_model_path()), "--batch", "4", "--queue-capacity", "64",
                        "--max-request-batch", "8", grpc=True)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    c = tg.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def fp32_input(x: np.ndarray, name: str = "x") -> "tg.InferInput":
    i = tg.InferInput(name, list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def refusal(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as exc:
        call()
    return exc.value.status(), exc.value.message()


def stub_refusal(stub, req) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(req, timeout=30)
    return str(exc.value.code()), exc.value.details()


@pytest.mark.slow
def test_health_and_metadata(server, client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("trivial")
    assert client.is_model_ready("trivial", "1")
    meta = client.get_server_metadata()
    assert meta.name == "sponge" and "sponge_dynamic_slo" in meta.extensions
    m = client.get_model_metadata("trivial", as_json=True)
    assert m["versions"] == ["1"] and m["platform"] == "onnxruntime_onnx"
    assert m["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "16"]}]  # int64 as JSON strings
    assert m["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "16"]}]
    code, message = refusal(lambda: client.get_model_metadata("nope"))
    assert code == "StatusCode.NOT_FOUND" and "model 'nope' is not served here" in message
    code, message = refusal(lambda: client.is_model_ready("trivial", "2"))
    assert code == "StatusCode.NOT_FOUND" and "has no version '2'" in message


@pytest.mark.slow
def test_raw_contents_round_trip_equals_the_http_answer(server, client):
    import onnxruntime as ort

    from sponge.models.trivial import trivial_model_path

    x = np.random.default_rng(7).random((3, 16), dtype=np.float32)
    result = client.infer("trivial", [fp32_input(x)], request_id="r-7")
    y_grpc = result.as_numpy("y")
    header = orjson.dumps({"inputs": [{"name": "x", "shape": [3, 16], "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": True}})
    r = httpx.post(f"{server.url}/v2/models/trivial/infer", content=header + x.tobytes(),
                   headers={"Inference-Header-Content-Length": str(len(header))}, timeout=30)
    assert r.status_code == 200, r.text
    hl = int(r.headers["inference-header-content-length"])
    y_http = np.frombuffer(r.content[hl:], np.float32).reshape(3, 16)
    assert y_grpc.dtype == np.float32 and y_grpc.shape == (3, 16)
    assert np.array_equal(y_grpc, y_http)  # the same bytes from the same replica
    expected = ort.InferenceSession(str(trivial_model_path())).run(None, {"x": x})[0]
    np.testing.assert_allclose(y_grpc, expected, rtol=1e-5)
    response = result.get_response()
    assert response.id == "r-7" and response.model_name == "trivial"
    assert response.outputs[0].datatype == "FP32" and list(response.outputs[0].shape) == [3, 16]


@pytest.mark.slow
def test_typed_contents(server, stub):
    x = np.random.default_rng(8).random((2, 16), dtype=np.float32)
    req = service_pb2.ModelInferRequest(model_name="trivial")
    t = req.inputs.add(name="x", datatype="FP32", shape=[2, 16])
    t.contents.fp32_contents.extend(x.ravel().tolist())
    resp = stub.ModelInfer(req, timeout=30)
    typed = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 16)  # answered as raw contents
    raw_req = service_pb2.ModelInferRequest(model_name="trivial", raw_input_contents=[x.tobytes()])
    raw_req.inputs.add(name="x", datatype="FP32", shape=[2, 16])
    raw = np.frombuffer(stub.ModelInfer(raw_req, timeout=30).raw_output_contents[0], np.float32).reshape(2, 16)
    assert np.array_equal(typed, raw)


@pytest.mark.slow
def test_slo_parameters_decide_the_deadline(server, client):
    x = fp32_input(np.ones((1, 16), np.float32))
    # a generous budget is served, with the served parameters the HTTP answer has
    r = client.infer("trivial", [x], parameters={"slo_ms": 800.0, "network_ms": 300})
    p = r.get_response(as_json=True)["parameters"]
    assert p["slo_ms"]["double_param"] == 800 and p["network_ms"]["double_param"] == 300
    assert p["budget_ms"]["double_param"] == 500 and p["deadline_met"]["bool_param"] is True
    assert 0 < p["server_ms"]["double_param"] <= 500 and int(p["batch_size"]["int64_param"]) >= 1
    # sent_at: the network delay is now - sent_at
    r = client.infer("trivial", [x], parameters={"slo_ms": 5000.0, "sent_at": time.time() - 0.2})
    p = r.get_response(as_json=True)["parameters"]
    assert 150 <= p["network_ms"]["double_param"] <= 2000
    # a budget that cannot be met: DEADLINE_EXCEEDED, at once
    for params in ({"slo_ms": 0.01}, {"slo_ms": 100.0, "network_ms": 100.0}):
        code, message = refusal(lambda: client.infer("trivial", [x], parameters=params))
        assert code == "StatusCode.DEADLINE_EXCEEDED" and message.startswith("deadline exceeded:"), message
    # metadata of the HTTP headers' meaning, for clients that cannot set parameters
    code, _ = refusal(lambda: client.infer("trivial", [x], headers={"x-sponge-slo-ms": "0.01"}))
    assert code == "StatusCode.DEADLINE_EXCEEDED"


def _good(x: np.ndarray) -> "service_pb2.ModelInferRequest":
    req = service_pb2.ModelInferRequest(model_name="trivial", raw_input_contents=[x.tobytes()])
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    return req


ONE = np.ones((1, 16), np.float32)


def _raw_size_mismatch():
    req = _good(ONE)
    req.raw_input_contents[0] = ONE.tobytes()[:60]
    return req


def _no_inputs():
    return service_pb2.ModelInferRequest(model_name="trivial")


def _no_data():
    req = service_pb2.ModelInferRequest(model_name="trivial")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    return req


def _bad_param(value):
    def build():
        req = _good(ONE)
        if isinstance(value, bool):
            req.parameters["slo_ms"].bool_param = value
        else:
            req.parameters["slo_ms"].string_param = value
        return req
    return build


def _unknown_model():
    req = _good(ONE)
    req.model_name = "nope"
    return req


def _unknown_version():
    req = _good(ONE)
    req.model_version = "3"
    return req


def _two_inputs_one_raw():
    req = _good(ONE)
    req.inputs.add(name="z", datatype="FP32", shape=[1, 16])
    return req


def _renamed(name=None, datatype=None, shape=None, data=ONE):
    def build():
        req = _good(data)
        t = req.inputs[0]
        if name:
            t.name = name
        if datatype:
            t.datatype = datatype
        if shape:
            del t.shape[:]
            t.shape.extend(shape)
        return req
    return build


ERRORS = [
    ("unknown model", _unknown_model, "NOT_FOUND", r"model 'nope' is not served here \(available: 'trivial'\)"),
    ("unknown version", _unknown_version, "NOT_FOUND", r"model 'trivial' has no version '3'"),
    ("wrong input name", _renamed(name="z"), "INVALID_ARGUMENT",
     r"'inputs\[0\]\.name': input 'z' is not an input of this model \(expected \['x'\]\)"),
    ("wrong datatype", _renamed(datatype="FP64", data=np.ones((1, 16), np.float64)), "INVALID_ARGUMENT",
     r"'inputs\[0\]\.datatype': input 'x' has datatype FP64 but the model expects FP32"),
    ("unknown datatype", _renamed(datatype="FLOAT"), "INVALID_ARGUMENT",
     r"'inputs\[0\] \('x'\)\.datatype' must be one of"),
    ("wrong shape", _renamed(shape=[2, 8]), "INVALID_ARGUMENT",
     r"'inputs\[0\]\.shape': input 'x' has shape \[2, 8\] but the model expects \[-1, 16\]"),
    ("batch over the cap", _renamed(shape=[9, 16], data=np.ones((9, 16), np.float32)), "INVALID_ARGUMENT",
     r"'inputs\[0\]\.shape': request batch 9 exceeds the server's maximum of 8"),
    ("raw size mismatch", _raw_size_mismatch, "INVALID_ARGUMENT",
     r"'raw_input_contents\[0\]' is 60 bytes but input 'x' \(inputs\[0\]\) shape \[1, 16\] of FP32 needs 64"),
    ("raw contents for some inputs", _two_inputs_one_raw, "INVALID_ARGUMENT",
     r"'raw_input_contents' has 1 entries but the request has 2 inputs"),
    ("no inputs", _no_inputs, "INVALID_ARGUMENT", r"'inputs' must be a non-empty list"),
    ("no data", _no_data, "INVALID_ARGUMENT", r"'inputs\[0\] \('x'\)\.contents' is missing"),
    ("slo_ms a string", _bad_param("fast"), "INVALID_ARGUMENT", r"'parameters\.slo_ms' must be a number, got 'fast'"),
    ("slo_ms a boolean", _bad_param(True), "INVALID_ARGUMENT", r"'parameters\.slo_ms' must be a number, got a boolean"),
]


@pytest.mark.slow
@pytest.mark.parametrize("what, build, code, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_have_a_status_code_and_name_the_field(server, stub, what, build, code, message):
    got_code, got_message = stub_refusal(stub, build())
    assert got_code == f"StatusCode.{code}", (what, got_code, got_message)
    assert re.search(message, got_message), (what, got_message)


@pytest.mark.slow
def test_errors_through_the_client_and_serving_goes_on(server, client):
    """What tritonclient itself can send wrongly: a missing input (another one named), a wrong datatype,
    a negative slo_ms; afterwards the server still serves, and the metrics count it all by protocol."""
    code, message = refusal(lambda: client.infer("trivial", [fp32_input(ONE, "z")]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "'inputs[0].name': input 'z'" in message
    x64 = tg.InferInput("x", [1, 16], "FP64")
    x64.set_data_from_numpy(np.ones((1, 16), np.float64))
    code, message = refusal(lambda: client.infer("trivial", [x64]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "'inputs[0].datatype'" in message
    code, message = refusal(lambda: client.infer("trivial", [fp32_input(ONE)], parameters={"slo_ms": -5.0}))
    assert code == "StatusCode.INVALID_ARGUMENT" and "'parameters.slo_ms' must be in (0," in message
    y = client.infer("trivial", [fp32_input(ONE)]).as_numpy("y")
    assert y.shape == (1, 16) and np.isfinite(y).all()
    r = httpx.post(f"{server.url}/v2/models/trivial/infer", timeout=30, json={
        "inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]})
    assert r.status_code == 200, r.text
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert re.search(r'sponge_requests_by_protocol_total\{model="trivial",outcome="invalid",protocol="grpc"\} '
                     r'([3-9]|\d\d+)\.0', text)
    assert re.search(r'sponge_requests_by_protocol_total\{model="trivial",outcome="ok",protocol="grpc"\}', text)
    assert 'sponge_requests_total{model="trivial",outcome="invalid"}' in text  # the existing metric, as before
    # the HTTP request above, by its own front door
    assert re.search(r'sponge_requests_by_protocol_total\{model="trivial",outcome="ok",protocol="http"\} [1-9]', text)


@pytest.mark.slow
def test_sigterm_under_grpc_load_exits_within_5_s_and_every_call_is_answered(tmp_path):
    """60 calls of ~50-150 ms each (256 KiB messages: parsed on the decoder's threads) queued on one
    replica: SIGTERM. The process exits within 5 s; every call is answered, OK if served before, else
    UNAVAILABLE "shutting down" (the gRPC server stops alongside the serving core)."""
    from serverproc import ServerProcess
    from test_dispatch_faults import _sigterm_and_time, build_slow_model, wait_queued

    model = build_slow_model(tmp_path / "slow.onnx")
    srv = ServerProcess("--model", str(model), "--batch", "1", "--actuator", "none", grpc=True)
    try:
        x = np.ones((64, 1024), np.float32)
        req = pb.ModelInferRequest(model_name="slow", raw_input_contents=[x.tobytes()])
        req.inputs.add(name="x", datatype="FP32", shape=[64, 1024])
        req.parameters["slo_ms"].double_param = 60000.0
        body = req.SerializeToString()

        async def run():
            async with grpc.aio.insecure_channel(srv.grpc_url) as ch:
                call = ch.unary_unary(pb.path("ModelInfer"))

                async def one() -> tuple[str, str]:
                    try:
                        await call(body, timeout=30)
                        return "OK", ""
                    except grpc.aio.AioRpcError as exc:
                        return exc.code().name, exc.details() or ""

                tasks = [asyncio.create_task(one()) for _ in range(60)]
                await asyncio.to_thread(wait_queued, srv, 20)
                took = await asyncio.to_thread(_sigterm_and_time, srv)
                return took, await asyncio.gather(*tasks)

        took, rs = asyncio.run(run())
        assert took < 5.0, took
        codes = [c for c, _ in rs]
        # none hangs (that would be DEADLINE_EXCEEDED at 30 s); a call whose message was still being
        # received when the gRPC server stopped is CANCELLED by gRPC itself (the server stops after the core
        # for that reason: seen in 1 of ~30 runs, before in ~1 of 4)
        assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, [r for r in rs if r[0] not in ("OK", "UNAVAILABLE")]
        assert codes.count("UNAVAILABLE") >= len(rs) // 2, rs
        assert all("shutting down" in d for c, d in rs if c == "UNAVAILABLE"), rs
    finally:
        srv.stop()
