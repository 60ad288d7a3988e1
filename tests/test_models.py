"""The default model is real (classifies real photos), safe to load, and cached sensibly."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

skimage_data = pytest.importorskip("skimage.data")

import sponge.models.efficientnet_lite0 as enet  # noqa: E402
from sponge.models import default_model_path, labels_of, preprocess, trivial_model_path  # noqa: E402
from sponge.models.onnx_cache import read_metadata  # noqa: E402
from sponge.models.torch_checkpoint import (  # noqa: E402
    LEGACY_MAGIC,
    CheckpointError,
    UnsafeCheckpointError,
    load_state_dict,
)
from sponge.models.trivial import trivial_weights  # noqa: E402

CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat"}


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return default_model_path(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def session(model_path: Path) -> ort.InferenceSession:
    return _session(model_path)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """chelsea (a cat) and coffee (an espresso cup), preprocessed to [2, 224, 224, 3] uint8."""
    return np.stack([preprocess(skimage_data.chelsea()), preprocess(skimage_data.coffee())])


# --- the model contract and its accuracy ------------------------------------------------------


def test_io_contract_and_labels(model_path: Path, session: ort.InferenceSession) -> None:
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("image", "tensor(uint8)", [224, 224, 3])
    assert isinstance(inp.shape[0], str)  # dynamic batch
    outs = {o.name: o for o in session.get_outputs()}
    assert set(outs) == {"logits", "probabilities"}
    for o in outs.values():
        assert o.type == "tensor(float)" and o.shape[1] == 1000 and isinstance(o.shape[0], str)
    labels = labels_of(model_path)
    assert labels is not None and len(labels) == 1000 and len(set(labels)) == 1000
    assert (labels[0], labels[281], labels[967]) == ("tench", "tabby", "espresso")
    meta = read_metadata(model_path)
    assert meta["builder_version"] == enet.BUILDER_VERSION and len(meta["source_sha256"]) == 64


def test_classifies_real_photos(model_path: Path, session: ort.InferenceSession, photos: np.ndarray) -> None:
    labels = labels_of(model_path)
    assert labels is not None
    logits, probs = session.run(None, {"image": photos})
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    cat, coffee = (labels[int(i)] for i in probs.argmax(axis=1))
    assert cat in CAT_CLASSES
    cat_mass = sum(probs[0, labels.index(name)] for name in CAT_CLASSES)
    assert cat_mass > 0.8, f"cat classes only get {cat_mass:.2f}"
    assert coffee == "espresso" and probs[1].max() > 0.8
    assert np.array_equal(logits.argmax(axis=1), probs.argmax(axis=1))


def test_batch_of_two_equals_two_singles(session: ort.InferenceSession, photos: np.ndarray) -> None:
    batch = session.run(["logits"], {"image": photos})[0]
    singles = np.concatenate([session.run(["logits"], {"image": photos[i : i + 1]})[0] for i in range(2)])
    np.testing.assert_allclose(batch, singles, rtol=1e-4, atol=1e-4)


def test_preprocess_shapes_and_errors() -> None:
    for shape in [(300, 451, 3), (500, 200, 3), (224, 224, 3), (10, 10, 4), (64, 80)]:
        out = preprocess(np.zeros(shape, np.uint8))
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        preprocess(np.zeros((32, 32, 5), np.uint8))


# --- caching --------------------------------------------------------------------------------


def test_cache_is_reused_and_rebuilt_on_builder_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = []
    real_build = enet.build_model

    def counting_build(*args: Any, **kwargs: Any) -> onnx.ModelProto:
        builds.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(enet, "build_model", counting_build)
    first = enet.default_model_path(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert enet.default_model_path(tmp_path) == first and len(builds) == 1
    assert first.stat().st_mtime_ns == mtime

    monkeypatch.setattr(enet, "BUILDER_VERSION", "test-next")
    assert enet.default_model_path(tmp_path) == first and len(builds) == 2
    assert read_metadata(first)["builder_version"] == "test-next"
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp files left behind


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPONGE_CACHE_DIR", str(tmp_path / "envcache"))
    assert trivial_model_path().parent == tmp_path / "envcache"


def test_corrupt_cache_file_is_rebuilt(tmp_path: Path) -> None:
    (tmp_path / "trivial.onnx").write_bytes(b"truncated garbage")
    path = trivial_model_path(tmp_path)
    assert read_metadata(path)["model"] == "trivial"


def test_trivial_model(tmp_path: Path) -> None:
    path = trivial_model_path(tmp_path)
    sess = _session(path)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1]) == ("x", "tensor(float)", 16)
    assert (out.name, out.type, out.shape[1]) == ("y", "tensor(float)", 16)
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    w, b = trivial_weights()
    np.testing.assert_allclose(sess.run(["y"], {"x": x})[0], x @ w + b, rtol=1e-5, atol=1e-5)
    assert labels_of(path) is None


# --- the restricted checkpoint reader -------------------------------------------------------


def test_reads_packaged_legacy_checkpoint() -> None:
    sd = load_state_dict(enet.weights_path())
    assert len(sd) == 296
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3) and sd["_conv_stem.weight"].dtype == np.float32
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert sd["_bn0.num_batches_tracked"].dtype == np.int64 and sd["_bn0.num_batches_tracked"].shape == ()


class _Global:
    """A reference to ``module.name`` that pickles as GLOBAL without importing the module."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self) -> None:  # pickle insists that reduce functions be callable
        raise NotImplementedError


class _Storage:
    def __init__(self, key: str, data: np.ndarray, legacy: bool):
        self.key, self.data, self.legacy = key, np.ascontiguousarray(data).ravel(), legacy

    def pid(self) -> tuple[Any, ...]:
        kind = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage"}[self.data.dtype]
        pid = ("storage", _Global("torch", kind), self.key, "cpu", self.data.size)
        return pid + (None,) if self.legacy else pid


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.args = (storage, offset, size, stride)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Global("torch._utils", "_rebuild_tensor_v2"), (*self.args, False, collections.OrderedDict()))


class _TorchLikePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes the same opcodes torch.save does, for building test checkpoints without torch."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_global_ref(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[_Global] = _save_global_ref

    def persistent_id(self, obj: Any) -> Any:
        return obj.pid() if isinstance(obj, _Storage) else None


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _TorchLikePickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _example_state_dict(legacy: bool) -> tuple[collections.OrderedDict[str, Any], dict[str, np.ndarray], list[_Storage]]:
    base = np.arange(24, dtype=np.float32)
    shared = _Storage("0", base, legacy)
    counter = _Storage("1", np.array([7], np.int64), legacy)
    sd = collections.OrderedDict(
        w=_Tensor(shared, 0, (4, 6), (6, 1)),
        w_t=_Tensor(shared, 0, (6, 4), (1, 6)),  # a transposed (non-contiguous) view of the same storage
        tail=_Tensor(shared, 20, (4,), (1,)),
        steps=_Tensor(counter, 0, (), ()),
    )
    want = {"w": base.reshape(4, 6), "w_t": base.reshape(4, 6).T, "tail": base[20:], "steps": np.array(7)}
    return sd, want, [shared, counter]


def _legacy_bytes(main: bytes, storages: list[_Storage]) -> bytes:
    header = pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
    header += pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {}}, protocol=2)
    raw = b"".join(struct.pack("<q", s.data.size) + s.data.tobytes() for s in storages)
    return header + main + pickle.dumps([s.key for s in storages], protocol=2) + raw


def _zip_bytes(main: bytes, storages: list[_Storage]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", main)
        for s in storages:
            zf.writestr(f"archive/data/{s.key}", s.data.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_roundtrip_of_both_layouts(tmp_path: Path, layout: str) -> None:
    sd, want, storages = _example_state_dict(legacy=layout == "legacy")
    main = _dumps(sd)
    path = tmp_path / "ckpt.pth"
    path.write_bytes(_legacy_bytes(main, storages) if layout == "legacy" else _zip_bytes(main, storages))
    got = load_state_dict(path)
    assert list(got) == list(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
        assert got[k].dtype == want[k].dtype
        assert got[k].flags.c_contiguous


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("layout", ["legacy", "zip", "bare"])
def test_refuses_malicious_pickle(tmp_path: Path, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    evil = pickle.dumps({"weight": _Evil()}, protocol=2)
    data = {"legacy": _legacy_bytes(evil, []), "zip": _zip_bytes(evil, []), "bare": evil}[layout]
    path = tmp_path / "evil.pth"
    path.write_bytes(data)
    calls: list[Any] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load global (posix|os|nt)\.system"):
        load_state_dict(path)
    assert calls == []


def test_rejects_non_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(pickle.dumps(12345, protocol=2))
    with pytest.raises(CheckpointError, match="magic"):
        load_state_dict(path)
    path.write_bytes(b"definitely not a pickle")
    with pytest.raises(CheckpointError):
        load_state_dict(path)


def test_labels_of_rejects_malformed_metadata(tmp_path: Path) -> None:
    model = onnx.load(str(trivial_model_path(tmp_path)))
    onnx.helper.set_model_props(model, {"labels": json.dumps({"not": "a list"})})
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(ValueError, match="JSON list of strings"):
        labels_of(bad)
