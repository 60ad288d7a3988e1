"""Read PyTorch checkpoints (state dicts) into NumPy arrays without importing torch.

Why: the default model's weights ship as a ``.pth`` file, and torch is far too heavy a
dependency just to read them. ``pickle`` is unsafe on untrusted input, so the unpickler
below resolves only the handful of globals needed to rebuild tensors and refuses the rest.

Two on-disk layouts are supported:

* the legacy format (torch < 1.6, ``_use_new_zipfile_serialization=False``): a magic-number
  pickle, a protocol-version pickle, a sys-info pickle, the main pickle (tensors refer to
  storages by persistent id), a pickled list of storage keys, then each storage raw as
  ``int64 numel`` followed by its little-endian bytes;
* the zip format (torch >= 1.6): ``<root>/data.pkl`` plus one raw file per storage at
  ``<root>/data/<key>``.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

__all__ = ["CheckpointError", "UnsafeCheckpointError", "load_state_dict"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch storage class name -> little-endian NumPy dtype of its elements.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    # NumPy has no bfloat16: the raw 16-bit words are widened to float32 on rebuild.
    "BFloat16Storage": np.dtype("<u2"),
}


class CheckpointError(ValueError):
    """The file is not a checkpoint this reader understands."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The checkpoint's pickle references a global outside the allow-list."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.<X>Storage``: only its element dtype matters here."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclass
class _StorageRef:
    """A storage named in the main pickle, materialised later from the raw section."""

    key: str
    storage_type: _StorageType
    numel: int
    data: np.ndarray | None = None  # flat array of ``numel`` elements once loaded
    view_of: "_StorageRef | None" = None  # legacy storage views: (base, offset, size)
    view_offset: int = 0

    def array(self) -> np.ndarray:
        if self.view_of is not None:
            base = self.view_of.array()
            return base[self.view_offset : self.view_offset + self.numel]
        if self.data is None:
            raise CheckpointError(f"storage {self.key!r} was referenced but never loaded")
        return self.data


@dataclass
class _PendingTensor:
    """A tensor whose storage bytes are read after the main pickle (legacy format)."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self) -> np.ndarray:
        flat = self.storage.array()
        dtype = self.storage.storage_type.dtype
        if not self.size:
            out = flat[self.offset : self.offset + 1].reshape(())
        else:
            needed = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
            if any(n == 0 for n in self.size):
                out = np.zeros(self.size, dtype=dtype)
            elif needed > flat.size or self.offset < 0 or min(self.stride) < 0:
                raise CheckpointError(
                    f"tensor of size {self.size} stride {self.stride} offset {self.offset} "
                    f"overruns its storage {self.storage.key!r} of {flat.size} elements"
                )
            else:
                view = np.lib.stride_tricks.as_strided(
                    flat[self.offset :],
                    shape=self.size,
                    strides=tuple(s * dtype.itemsize for s in self.stride),
                    writeable=False,
                )
                out = view
        out = np.array(out, copy=True, order="C")  # own the memory, C-contiguous
        if self.storage.storage_type.name == "BFloat16Storage":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


def _rebuild_tensor_v2(
    storage: _StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _PendingTensor:
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(f"tensor rebuilt from a non-storage object: {type(storage).__name__}")
    return _PendingTensor(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_tensor(
    storage: _StorageRef, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> _PendingTensor:
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: bool = False, backward_hooks: Any = None) -> Any:
    return data  # an nn.Parameter is just its tensor for inference


def _rebuild_parameter_with_state(
    data: Any, requires_grad: bool = False, backward_hooks: Any = None, state: Any = None
) -> Any:
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and torch storage ids."""

    def __init__(self, file: BinaryIO, persistent_load: Callable[[Any], Any] | None = None):
        super().__init__(file)
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global {module}.{name} from checkpoint: only tensor-rebuilding "
                f"globals are allowed ({', '.join(sorted(f'{m}.{n}' for m, n in _ALLOWED))})"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise UnsafeCheckpointError(f"unexpected persistent id in a plain pickle: {pid!r}")
        return self._persistent(pid)


def _check_storage_pid(pid: Any) -> tuple[_StorageType, str, int, Any]:
    """Validate ``('storage', type, key, location, numel[, view_metadata])``."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
        raise CheckpointError(f"unsupported persistent id in checkpoint: {pid!r}")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
        raise CheckpointError(f"persistent id names a non-storage type: {storage_type!r}")
    if not isinstance(numel, int) or numel < 0:
        raise CheckpointError(f"bad storage size in persistent id: {pid!r}")
    return storage_type, str(key), numel, pid[5] if len(pid) == 6 else None


def _load_restricted(data: BinaryIO) -> Any:
    return _RestrictedUnpickler(data).load()


def _collect_tensors(obj: Any) -> dict[str, np.ndarray]:
    """Flatten a (possibly nested ``{'state_dict': ...}``) checkpoint into name -> array."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if isinstance(value, _PendingTensor):
            out[str(name)] = value.materialise()
    return out


def _load_legacy(f: BinaryIO) -> dict[str, np.ndarray]:
    magic = _load_restricted(f)
    if magic != LEGACY_MAGIC:
        raise CheckpointError("not a PyTorch checkpoint (bad magic number)")
    protocol = _load_restricted(f)
    if protocol != LEGACY_PROTOCOL:
        raise CheckpointError(f"unsupported legacy checkpoint protocol {protocol!r}")
    sys_info = _load_restricted(f)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise CheckpointError("big-endian checkpoints are not supported")

    storages: dict[str, _StorageRef] = {}

    def persistent_load(pid: Any) -> _StorageRef:
        storage_type, key, numel, view = _check_storage_pid(pid)
        base = storages.setdefault(key, _StorageRef(key, storage_type, numel))
        if view is None:
            return base
        view_key, view_offset, view_size = view
        return storages.setdefault(
            str(view_key),
            _StorageRef(str(view_key), storage_type, int(view_size), view_of=base, view_offset=int(view_offset)),
        )

    result = _RestrictedUnpickler(f, persistent_load).load()
    keys = _load_restricted(f)
    if not isinstance(keys, list):
        raise CheckpointError("legacy checkpoint: storage key list is missing")
    for key in keys:
        ref = storages.get(str(key))
        if ref is None:
            raise CheckpointError(f"legacy checkpoint: raw storage {key!r} was never referenced")
        header = f.read(8)
        if len(header) != 8:
            raise CheckpointError(f"legacy checkpoint truncated before storage {key!r}")
        (numel,) = struct.unpack("<q", header)
        if numel != ref.numel:
            raise CheckpointError(f"storage {key!r}: header says {numel} elements, pickle says {ref.numel}")
        nbytes = numel * ref.storage_type.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise CheckpointError(f"legacy checkpoint truncated inside storage {key!r}")
        ref.data = np.frombuffer(raw, dtype=ref.storage_type.dtype)
    return _collect_tensors(result)


def _load_zip(zf: zipfile.ZipFile) -> dict[str, np.ndarray]:
    pkl_names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl_names) != 1:
        raise CheckpointError("zip checkpoint must contain exactly one <root>/data.pkl")
    root = pkl_names[0].rsplit("/", 1)[0]
    storages: dict[str, _StorageRef] = {}

    def persistent_load(pid: Any) -> _StorageRef:
        storage_type, key, numel, _ = _check_storage_pid(pid)
        ref = storages.get(key)
        if ref is None:
            try:
                raw = zf.read(f"{root}/data/{key}")
            except KeyError:
                raise CheckpointError(f"zip checkpoint lacks storage data/{key}") from None
            dtype = storage_type.dtype
            if len(raw) < numel * dtype.itemsize:
                raise CheckpointError(f"storage {key!r} is shorter than its {numel} elements")
            ref = _StorageRef(key, storage_type, numel, data=np.frombuffer(raw, dtype=dtype, count=numel))
            storages[key] = ref
        return ref

    with zf.open(pkl_names[0]) as f:
        result = _RestrictedUnpickler(f, persistent_load).load()  # type: ignore[arg-type]
    return _collect_tensors(result)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Load a PyTorch state dict as ``{name: np.ndarray}`` (tensors only, copies, C-contiguous).

    Raises :class:`UnsafeCheckpointError` if the pickle references anything but the
    tensor-rebuilding globals, and :class:`CheckpointError` for malformed files.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                return _load_zip(zf)
        with path.open("rb") as f:
            return _load_legacy(f)
    except (CheckpointError, OSError):
        raise
    except Exception as exc:  # malformed pickle: wrong arity, bad opcodes, truncation, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {exc!r}") from exc
