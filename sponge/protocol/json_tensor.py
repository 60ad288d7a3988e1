"""JSON tensor `data` lists decoded straight into typed buffers (issue 13, item 2).

Why: orjson + `np.asarray(list)` builds one Python object per element, then numpy walks them again:
~3.5 ms for one 224x224x3 UINT8 image sent as a flat JSON list, ~23 ms nested, ~10 ms as FP32
(`bench/json_decode.py`, more on a busy host). pysimdjson (`simdjson` on PyPI: bindings to the simdjson
C++ parser) parses the document into its own tape, and `Array.as_buffer(of_type=...)` copies a numeric
list, flattened, into a packed int64/uint64/double buffer without a Python object per element: ~2 ms
for the UINT8 image flat, ~3-4 ms nested or FP32, with every check below. It was the fastest of the
options measured (orjson or msgspec + numpy, `np.fromstring`/`np.loadtxt` on the list's text,
pyarrow's JSON reader); it needs no hand-written number parser, and its type checks refuse strings,
bools, objects and integers out of the 64-bit range inside the list.

What it does not check, done here cheaply instead:
* whether the list is flat or evenly nested (`as_buffer` flattens `[[1,2],3,[4]]` as happily as
  `[[1,2],[3,4]]`): the list's text span is located by a small scan of the JSON structure
  (`data_spans`), and a nested list's skeleton (its brackets and commas, via bytes.translate) is
  compared with that of an evenly nested list of the dimensions it starts with (`_even_slots`);
* whether a value fits the declared datatype (UINT8, FP16, ...): a min/max or isfinite pass.

Anything this path does not handle (BOOL and BYTES tensors, a number of the other kind for the
datatype such as 1.5 for INT32 or `true` for FP32, a list nested unevenly, duplicate keys, a document
simdjson refuses, a JSON part under `MIN_BYTES`) goes to the orjson path (`v2._json_tensor`), which
applies the same count and range checks (`cast`): the two accept the same input with the same result.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any, Callable

import numpy as np
import simdjson

OPEN, COMMA = ord("["), ord(",")
MIN_BYTES = 16 * 1024  # below: orjson's objects are cheaper than simdjson's fixed ~20 us (parser, scan)


class Fallback(Exception):
    """This path cannot decide: use the orjson path (same result and message as before)."""


def load(text: bytes) -> dict[str, Any] | None:
    """The request document as Python objects, except each `inputs[i].data` list, left as a
    simdjson Array (not yet read into Python objects). None: let orjson parse it (invalid JSON, a top
    level that is not an object, duplicate keys where lookups would pick the first, not the last)."""
    top = _parse(text)
    if top is None:
        return None
    if not isinstance(top, simdjson.Object):
        return None
    keys = list(top.keys())
    if len(keys) != len(set(keys)):
        return None
    doc = {k: _py(top[k]) if k != "inputs" else top[k] for k in keys}
    raw_inputs = doc.get("inputs")
    if isinstance(raw_inputs, simdjson.Array):
        inputs: list[Any] = []
        for item in raw_inputs:
            if isinstance(item, simdjson.Object):
                ikeys = list(item.keys())
                if len(ikeys) != len(set(ikeys)):
                    return None
                item = {k: _data(item[k]) if k == "data" else _py(item[k]) for k in ikeys}
            inputs.append(_py(item))
        doc["inputs"] = inputs
    elif "inputs" in doc:
        doc["inputs"] = _py(raw_inputs)
    return doc


_local = threading.local()
KEEP_PARSER_BYTES = 4 << 20  # a parser keeps the buffers of its largest document: bound what stays


def _parse(text: bytes) -> Any:
    """simdjson's DOM of `text`, or None where it refuses it. One parser per thread, reused: a fresh one
    per request costs ~2 ms more on a 0.5 MB body (its buffers are allocated and faulted in anew).
    A parser refuses a new document while proxies of its last one live (e.g. in a traceback): then a
    fresh one; RuntimeError is also simdjson's error for a too-large integer, so at most one retry."""
    keep = len(text) <= KEEP_PARSER_BYTES
    parser = getattr(_local, "parser", None) if keep else None
    for _ in range(2):
        if parser is None:
            parser = simdjson.Parser()
            if keep:
                _local.parser = parser
        try:
            return parser.parse(text)
        except (ValueError, UnicodeDecodeError):
            return None
        except RuntimeError:
            parser = None
    return None


def _data(value: Any) -> Any:
    """A `data` list stays a simdjson Array (read later into a typed buffer); anything else is converted."""
    return value if isinstance(value, simdjson.Array) else _py(value)


def _py(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


# --- locating each input's `data` list in the text (the document is valid JSON: simdjson parsed it) ---
_WS = re.compile(rb"[ \t\r\n]*")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_SCALAR = re.compile(rb"[^ \t\r\n,\]}]+")
_CONTAINER_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)


def _ws(text: bytes, pos: int) -> int:
    return _WS.match(text, pos).end()  # type: ignore[union-attr]  # matches the empty string too


def _skip(text: bytes, pos: int) -> int:
    """End of the value starting at `pos` (strings skipped whole, so brackets inside them do not count)."""
    c = text[pos]
    if c == 0x22:
        return _STRING.match(text, pos).end()  # type: ignore[union-attr]
    if c in (0x5B, 0x7B):
        depth = 0
        for m in _CONTAINER_TOKEN.finditer(text, pos):
            t = m.group()[0]
            if t in (0x5B, 0x7B):
                depth += 1
            elif t in (0x5D, 0x7D):
                depth -= 1
                if depth == 0:
                    return m.end()
        raise Fallback("unterminated container")
    return _SCALAR.match(text, pos).end()  # type: ignore[union-attr]


def _members(text: bytes, pos: int, special: dict[str, Callable[[bytes, int], int]]) -> int:
    """Cross the object at `pos`, returning its end; a value whose key is in `special` is crossed by
    that function (which may record where it was), any other by the generic scan."""
    pos = _ws(text, pos + 1)
    if text[pos] == 0x7D:
        return pos + 1
    while True:
        key_end = _STRING.match(text, pos).end()  # type: ignore[union-attr]
        raw_key = text[pos + 1:key_end - 1]
        key = raw_key.decode() if b"\\" not in raw_key else simdjson.Parser().parse(text[pos:key_end])
        start = _ws(text, _ws(text, key_end) + 1)  # past the ':'
        pos = _ws(text, special[key](text, start) if key in special else _skip(text, start))
        if text[pos] == 0x7D:
            return pos + 1
        pos = _ws(text, pos + 1)  # past the ','


# every byte but '[', ']' and ',': what bytes.translate deletes to leave a list's skeleton
_NOT_SKELETON = bytes(c for c in range(256) if c not in b"[],")
FLAT, UNEVEN = 0, -1  # `slots` of a span: a flat list; anything else this path cannot vouch for


def _even_slots(skeleton: bytes) -> int:
    """Number slots of an evenly nested list, from its skeleton (brackets and commas only), or UNEVEN.
    The dimensions are read off the first path (`[[[,,]` ...) and the skeleton of a list of exactly
    those dimensions is built and compared whole, so a misread can only refuse, never accept. A
    '[]' reads as one slot (empty or one number): the caller compares the slots with the numbers."""
    depth = len(skeleton) - len(skeleton.lstrip(b"["))
    if depth == 0 or depth > 64:
        return UNEVEN
    lengths = [skeleton.find(b"]") - (depth - 1) + 1]  # skeleton length of the first innermost list
    dims = [lengths[0] - 1]
    for level in range(depth - 1, 0, -1):  # the first ']' * n closes the first list n - 1 levels up
        closes = b"]" * (depth - level + 1)
        length = skeleton.find(closes) + len(closes) - (level - 1)
        n, rest = divmod(length - 1, lengths[-1] + 1)  # '[' + n children joined by ',' + ']'
        if rest or n < 1:
            return UNEVEN
        lengths.append(length)
        dims.append(n)
    if dims[0] < 1:
        return UNEVEN
    expected = b"[" + b"," * (dims[0] - 1) + b"]"
    for n in dims[1:]:
        expected = b"[" + b",".join([expected] * n) + b"]"
    return math.prod(dims) if expected == skeleton else UNEVEN


def _list_end(text: bytes, start: int) -> tuple[int, int]:
    """(end, slots) of the `data` list at `start`. A list of numbers holds no '"' or '}': a flat one
    ends at the first ']'; a nested one at the last ']' before the next '"' or '}' (what follows a
    value in an object), which the skeleton comparison confirms. Anything else (a BYTES input's
    strings, uneven nesting, ...): the generic scan, and UNEVEN."""
    close = text.find(b"]", start)  # find, not count: memchr, ~40x faster than count on 0.5 MB
    if close != -1 and text.find(b"[", start + 1, close) == -1:
        if text.find(b'"', start, close) == -1 and text.find(b"{", start, close) == -1:
            return close + 1, FLAT
        return _skip(text, start), UNEVEN
    stops = [i for i in (text.find(b'"', start), text.find(b"}", start)) if i != -1]
    end = text.rfind(b"]", start, min(stops, default=len(text))) + 1
    if end > start:
        slots = _even_slots(text[start:end].translate(None, _NOT_SKELETON))
        if slots != UNEVEN:
            return end, slots
    return _skip(text, start), UNEVEN


def data_spans(text: bytes) -> dict[int, tuple[int, int, int]]:
    """{input index: (start, end, slots)} of each input's `data` list in `text` (slots: FLAT, the
    number slots of an evenly nested list, or UNEVEN). A scan of the JSON structure (the document
    is valid: simdjson parsed it) that skips strings whole and crosses numeric lists with
    bytes.find/translate: ~40 us for one image, flat or nested. Keys given twice: the last one, as
    orjson reads them (`load` refuses duplicates anyway)."""
    spans: dict[int, tuple[int, int, int]] = {}
    current: list[tuple[int, int, int]] = []

    def data(text: bytes, start: int) -> int:
        if text[start] != OPEN:
            current.append((start, _skip(text, start), UNEVEN))
        else:
            current.append((start, *_list_end(text, start)))
        return current[-1][1]

    def inputs(text: bytes, start: int) -> int:
        spans.clear()
        if text[start] != OPEN:
            return _skip(text, start)
        pos, i = _ws(text, start + 1), 0
        while text[pos] != 0x5D:
            current.clear()
            pos = _members(text, pos, {"data": data}) if text[pos] == 0x7B else _skip(text, pos)
            if current:
                spans[i] = current[-1]
            i += 1
            pos = _ws(text, pos)
            if text[pos] == COMMA:
                pos = _ws(text, pos + 1)
        return pos + 1

    _members(text, _ws(text, 0), {"inputs": inputs})
    return spans


_OF_TYPE = {"i": ("i", np.dtype(np.int64)), "u": ("i", np.dtype(np.int64)), "f": ("d", np.dtype(np.float64))}


def tensor(data: simdjson.Array, span: tuple[int, int, int] | None, dtype: np.dtype,
           datatype: str, shape: tuple[int, ...], count: int, where: str) -> np.ndarray:
    """The tensor of a numeric `data` list, decoded by simdjson into a packed buffer (no Python object
    per element), checked for nesting, element count and range. Raises ValueError (a client error,
    message names the field) or Fallback."""
    if dtype.kind not in "iuf" or count == 0 or span is None:
        raise Fallback(datatype)
    of_type, raw_dtype = _OF_TYPE[dtype.kind]
    if dtype == np.uint64:
        of_type, raw_dtype = "u", np.dtype(np.uint64)
    try:
        raw = np.frombuffer(data.as_buffer(of_type=of_type), raw_dtype)
    except (TypeError, ValueError):  # not all numbers of that kind (1.5 for INT*, true, "a", {}, ...)
        raise Fallback(datatype) from None
    if span[2] == UNEVEN or (span[2] != FLAT and span[2] != raw.size):
        raise Fallback("uneven nesting")  # the orjson path names what is wrong
    if raw.size != count:
        raise ValueError(f"'{where}.data' has {raw.size} elements but shape {list(shape)} needs {count}")
    return cast(raw, dtype, datatype, where).reshape(shape)


def cast(raw: np.ndarray, dtype: np.dtype, datatype: str, where: str) -> np.ndarray:
    """`raw` (bool, int64, uint64 or float64: what JSON numbers read as) in the tensor's datatype,
    refusing a value the datatype cannot hold (256 for UINT8, 1e39 for FP32) rather than wrapping it or
    making it infinite. BOOL: nonzero is true; an integer type takes a float truncated (as numpy
    always did here)."""
    if raw.dtype == dtype:
        return raw  # e.g. FP64, INT64: the buffer the parser filled, no copy
    if dtype.kind == "b":
        return raw.astype(dtype)
    if dtype.kind == "f":
        with np.errstate(over="ignore"):
            arr = raw.astype(dtype)
        if not np.isfinite(arr).all():  # JSON has no NaN or Infinity: an overflow of the datatype
            bad = int(np.flatnonzero(~np.isfinite(arr.reshape(-1)))[0])
            raise ValueError(f"'{where}.data' element {bad} ({raw.reshape(-1)[bad]}) is out of range for "
                             f"{datatype} (largest finite {np.finfo(dtype).max})")
        return arr
    info = np.iinfo(dtype)
    if raw.dtype.kind == "f":  # truncated by the cast: refused where the integer part does not fit
        t = np.trunc(raw)
        outside = (t < float(info.min)) | (t >= float(info.max) + 1)  # exact bounds in float64
    elif raw.dtype.kind == "b":
        outside = np.zeros(raw.shape, bool)
    elif raw.size == 0 or (raw.min() >= info.min and raw.max() <= info.max):  # the usual case: 2 passes
        outside = None
    else:
        outside = (raw < info.min) | (raw > info.max)
    if outside is not None and outside.any():
        flat = raw.reshape(-1)
        bad = int(np.flatnonzero(outside.reshape(-1))[0])
        raise ValueError(f"'{where}.data' element {bad} ({flat[bad]}) is out of range for {datatype} "
                         f"[{info.min}, {info.max}]")
    return raw.astype(dtype)


def not_a_number(data: Any, datatype: str, where: str) -> str:
    """The message for a `data` list with something other than numbers (and bools) in it."""
    stack, i = [data], 0
    flat: list[Any] = []
    while stack:  # flatten in order (an error path: a Python loop is fine)
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(reversed(x))
        else:
            flat.append(x)
    for i, x in enumerate(flat):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            if not isinstance(x, bool):
                kind = {str: "a string", dict: "an object", type(None): "null"}.get(type(x), type(x).__name__)
                return f"'{where}.data' element {i} is {kind}, not a number (datatype {datatype})"
        elif isinstance(x, int) and not -(2**63) <= x < 2**64:
            return f"'{where}.data' element {i} ({x}) is out of range for {datatype}"
    return f"'{where}.data' cannot be read as {datatype}"
