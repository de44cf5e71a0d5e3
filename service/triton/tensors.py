"""Tensors of the Open Inference Protocol <-> numpy, with errors naming the tensor.

Raw bytes (gRPC raw_input_contents, the binary tensor data extension) are little-endian, row
major; a BYTES tensor's raw form is each element as a 4-byte little-endian length and its
bytes. Typed values (gRPC `contents`, HTTP JSON `data`) are a flat list in row-major order.
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


def check_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape as a tuple; every dimension >= 0 and the element count bounded."""
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise invalid(f"input {quoted(name)}: shape {list(dims)} has a negative dimension")
    count = 1
    for d in dims:
        count *= d
        if count > MAX_ELEMENTS:
            raise invalid(f"input {quoted(name)}: shape {list(dims)[:8]} is too large")
    return dims


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


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """Raw bytes -> an array of `shape`; INVALID_ARGUMENT naming the tensor if the byte size
    does not match the shape and datatype."""
    dims = check_shape(name, shape)
    dtype = _dtype(name, datatype)
    count = element_count(dims)
    if datatype == "BYTES":
        return deserialize_bytes(name, raw, count).reshape(dims)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise invalid(
            f"input {quoted(name)}: {len(raw)} bytes of raw data, expected {expected} for shape "
            f"{list(dims)} {datatype}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(dims)


def from_values(
    name: str, datatype: str, shape: Sequence[int], values: Sequence[Any]
) -> np.ndarray:
    """A flat list of typed values (bytes or str for BYTES) -> an array of `shape`."""
    dims = check_shape(name, shape)
    dtype = _dtype(name, datatype)
    count = element_count(dims)
    if len(values) != count:
        raise invalid(
            f"input {quoted(name)}: {len(values)} values, expected {count} for shape {list(dims)}"
        )
    if datatype == "BYTES":
        items = [v.encode() if isinstance(v, str) else bytes(v) for v in values]
        out = np.empty(count, dtype=object)
        out[:] = items
        return out.reshape(dims)
    try:
        array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise invalid(f"input {quoted(name)}: values are not {datatype}: {exc}") from exc
    return array.reshape(dims)


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
        if len(items) > count:
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
