"""Tensors of the Open Inference Protocol <-> numpy, with errors naming the tensor.

Raw bytes (gRPC raw_input_contents, the binary tensor data extension) are little-endian, row
major; a BYTES tensor's raw form is each element as a 4-byte little-endian length and its
bytes. Typed values (gRPC `contents`, HTTP JSON `data`) are a flat list in row-major order.

Bounded by what a request declares, before any copy: a shape's rank and element count, the
raw byte size its datatype and shape call for, and the BYTES elements of one request
(`max_bytes_elements`, --max-bytes-elements), so that refusing a hostile tensor costs O(1).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.engine.text.inputs import quoted
from service.triton.types import invalid

# Datatype name -> numpy dtype (BYTES is an object array of bytes).
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}  # fmt: skip
MAX_ELEMENTS = 1 << 28  # a shape asking for more elements than this is refused before any copy
MAX_RANK = 16  # dimensions of one tensor (numpy's own limit is 64)
MAX_BYTES_ELEMENTS = 65_536  # BYTES elements of one request (--max-bytes-elements)
LENGTH_PREFIX = 4  # bytes before each element of a BYTES tensor's raw form
VALUES_SLICE = 1 << 16  # typed values converted per numpy call (bounded time holding the GIL)


def check_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape as a tuple: at most MAX_RANK dimensions, each >= 0, and every dimension and
    the element count at most MAX_ELEMENTS (a 0 elsewhere does not excuse a huge one)."""
    if len(shape) > MAX_RANK:
        raise invalid(f"input {quoted(name)}: shape has {len(shape)} dimensions, at most "
                      f"{MAX_RANK}")  # fmt: skip
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise invalid(f"input {quoted(name)}: shape {_shown(dims)} has a negative dimension")
    count = 1
    for d in dims:
        count *= d
        if d > MAX_ELEMENTS or count > MAX_ELEMENTS:
            raise invalid(f"input {quoted(name)}: shape {_shown(dims)} is too large (more than "
                          f"{MAX_ELEMENTS} elements)")  # fmt: skip
    return dims


def _shown(dims: tuple[int, ...]) -> str:
    """A shape for an error message: at most 8 dimensions, none of thousands of digits."""
    parts = [str(d) if d.bit_length() <= 64 else "(huge)" for d in dims[:8]]
    return "[" + ", ".join(parts) + (", ...]" if len(dims) > 8 else "]")


def check_bytes_elements(name: str, count: int, before: int, limit: int) -> int:
    """The BYTES elements of a request so far plus `count` (this input's), refused beyond
    `limit` before any element is read."""
    total = before + count
    if total > limit:
        raise invalid(
            f"input {quoted(name)}: {count} BYTES elements, the request would hold {total}; "
            f"at most {limit} per request (--max-bytes-elements)"
        )
    return total


def check_raw_size(name: str, datatype: str, dims: tuple[int, ...], size: int) -> None:
    """The raw byte size a tensor declares fits its datatype and shape (BYTES: at least a
    length prefix per element), checked before the bytes are read or copied."""
    count = element_count(dims)
    if datatype == "BYTES":
        if size < LENGTH_PREFIX * count:
            raise invalid(
                f"input {quoted(name)}: {size} bytes of raw data cannot hold {count} BYTES "
                f"elements (each needs a {LENGTH_PREFIX}-byte length)"
            )
        return
    expected = count * _dtype(name, datatype).itemsize
    if size != expected:
        raise invalid(
            f"input {quoted(name)}: {size} bytes of raw data, expected {expected} for shape "
            f"{_shown(dims)} {datatype}"
        )


def element_count(shape: Sequence[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def _dtype(name: str, datatype: str) -> np.dtype[Any]:
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise invalid(f"input {quoted(name)}: datatype {quoted(datatype)} is not a KServe v2 type")
    return dtype


def from_raw(
    name: str, datatype: str, shape: Sequence[int], raw: bytes,
    max_bytes_elements: int = MAX_BYTES_ELEMENTS,
) -> np.ndarray:  # fmt: skip
    """Raw bytes -> an array of `shape`; INVALID_ARGUMENT naming the tensor if the byte size
    does not match the shape and datatype, or a BYTES tensor has more than
    `max_bytes_elements` elements (both judged before any element is read)."""
    dims = check_shape(name, shape)
    _dtype(name, datatype)
    check_raw_size(name, datatype, dims, len(raw))
    if datatype == "BYTES":
        count = check_bytes_elements(name, element_count(dims), 0, max_bytes_elements)
        return deserialize_bytes(name, raw, count).reshape(dims)
    return np.frombuffer(raw, dtype=DTYPES[datatype]).reshape(dims)


def from_values(
    name: str, datatype: str, shape: Sequence[int], values: Sequence[Any],
    max_bytes_elements: int = MAX_BYTES_ELEMENTS,
) -> np.ndarray:  # fmt: skip
    """A flat list of typed values (bytes or str for BYTES) -> an array of `shape`, converted
    in slices of VALUES_SLICE."""
    dims = check_shape(name, shape)
    dtype = _dtype(name, datatype)
    count = element_count(dims)
    if datatype == "BYTES":
        check_bytes_elements(name, count, 0, max_bytes_elements)
    if len(values) != count:
        raise invalid(
            f"input {quoted(name)}: {len(values)} values, expected {count} for shape {_shown(dims)}"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = [_utf8(name, v) for v in values]
        return out.reshape(dims)
    array = np.empty(count, dtype=dtype)
    try:
        for start in range(0, count, VALUES_SLICE):
            array[start : start + VALUES_SLICE] = np.asarray(
                values[start : start + VALUES_SLICE], dtype=dtype
            )
    except (TypeError, ValueError, OverflowError) as exc:
        raise invalid(f"input {quoted(name)}: values are not {datatype}: {exc}") from exc
    return array.reshape(dims)


def _utf8(name: str, value: Any) -> bytes:
    if not isinstance(value, str):
        return bytes(value)
    try:
        return value.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800" in JSON)
        raise invalid(
            f"input {quoted(name)}: a string is not valid Unicode "
            f"({exc.reason} at character {exc.start})"
        ) from None


def deserialize_bytes(name: str, raw: bytes, count: int) -> np.ndarray:
    """A BYTES tensor's raw form -> an object array of `count` bytes items."""
    items: list[bytes] = []
    offset, size = 0, len(raw)
    while offset < size:
        if offset + 4 > size:
            raise invalid(f"input {quoted(name)}: BYTES element {len(items)} has a cut length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > size:
            raise invalid(
                f"input {quoted(name)}: BYTES element {len(items)} claims {length} bytes, "
                f"{size - offset} remain"
            )
        items.append(raw[offset : offset + length])
        offset += length
        if len(items) > count:  # more than the shape says: stop here, O(count) at most
            break
    if len(items) != count:
        raise invalid(f"input {quoted(name)}: {len(items)} BYTES elements, expected {count}")
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def serialize_bytes(array: np.ndarray) -> bytes:
    """An object array of bytes (or str) -> the BYTES raw form, row major."""
    parts = []
    for item in array.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def to_raw(array: np.ndarray, datatype: str) -> bytes:
    """An output array -> its raw bytes (little-endian, row major)."""
    if datatype == "BYTES":
        return serialize_bytes(array)
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()
