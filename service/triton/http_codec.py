"""KServe v2 REST bodies <-> the neutral Triton messages (service/triton/types.py).

JSON tensors and Triton's binary tensor data extension: a body whose first
`Inference-Header-Content-Length` bytes are the JSON header and whose rest holds the inputs'
raw bytes (`binary_data_size` per input, in input order); outputs come back the same way when
asked (`binary_data` on an output, `binary_data_output` on the request). Only HTTP's framing
lives here: what a tensor must look like for a model is the core's business.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from service.engine.text.inputs import quoted
from service.triton.tensors import DTYPES, from_raw, from_values, to_raw
from service.triton.types import (
    InferInput,
    InferRequest,
    InferResponse,
    ParamValue,
    RequestedOutput,
    TritonError,
    invalid,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
# The JSON part of a request: large tensors belong in the binary part. Bounds what json.loads
# turns into Python objects (about 30 bytes of memory per number).
MAX_JSON_BYTES = 8 << 20

BYTES = "BYTES"
# Which JSON values a datatype takes: numpy kinds of np.asarray(values).
JSON_KINDS = {"b": "b", "u": "bui", "i": "bui", "f": "buif"}


def parse_json(body: bytes, what: str) -> Any:
    """A JSON document of at most MAX_JSON_BYTES; a short InvalidInput for anything else."""
    if len(body) > MAX_JSON_BYTES:
        raise invalid(
            f"{what}: the JSON is {len(body)} bytes, more than {MAX_JSON_BYTES}; send large "
            "tensors as binary data (binary_data_size)"
        )
    try:
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise invalid(f"{what} is not UTF-8 JSON: byte {exc.start} is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise invalid(f"{what} is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except RecursionError:
        raise invalid(f"{what} is nested too deeply") from None


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary rest) of an infer body; no header length: all of it is JSON."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        size = int(header_length)
    except ValueError:
        raise invalid(f"{HEADER_LENGTH} {quoted(header_length)} is not an integer") from None
    if not 0 <= size <= len(body):
        raise invalid(f"{HEADER_LENGTH} {size} is not within the body's {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:size]), view[size:]


def parse_infer_request(
    model: str, version: str, body: bytes, header_length: str | None
) -> tuple[InferRequest, OutputChoice]:
    """An infer body -> the neutral request and how each output is to be sent back."""
    header, binary = split_body(body, header_length)
    doc = parse_json(header, "the inference request")
    if not isinstance(doc, dict):
        raise invalid("the inference request must be a JSON object")
    params = parameters(doc.get("parameters"), "parameters")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid("the inference request needs 'inputs': a non-empty list of tensors")
    decoded, used = [], 0
    for i, item in enumerate(inputs):
        tensor, used = parse_input(item, i, binary, used)
        decoded.append(tensor)
    if used != len(binary):
        raise invalid(
            f"the body holds {len(binary)} bytes of binary tensor data but the inputs' "
            f"binary_data_size add up to {used}"
        )
    outputs = parse_outputs(doc.get("outputs"))
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise invalid(f"'id' must be a string, got {quoted(json.dumps(request_id))}")
    request = InferRequest(
        model=model, version=version, id=request_id, inputs=tuple(decoded),
        outputs=tuple(o for o, _ in outputs), parameters=params,
    )  # fmt: skip
    default = params.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise invalid("parameter 'binary_data_output' must be true or false")
    return request, OutputChoice(default, {o.name: b for o, b in outputs if b is not None})


def parameters(raw: object, field: str) -> dict[str, ParamValue]:
    """A parameters object: names -> bool, number or string."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise invalid(f"'{field}' must be a JSON object")
    for name, value in raw.items():
        if not isinstance(value, bool | int | float | str):
            raise invalid(f"{field}.{quoted(name)} must be a bool, a number or a string")
    return dict(raw)


def parse_input(
    item: object, index: int, binary: memoryview, offset: int
) -> tuple[InferInput, int]:
    """One request input -> (tensor, the binary offset after it)."""
    if not isinstance(item, dict):
        raise invalid(f"inputs[{index}] must be a JSON object")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise invalid(f"inputs[{index}] needs a 'name'")
    field = f"input {quoted(name)}"
    datatype = item.get("datatype")
    if not isinstance(datatype, str) or datatype not in DTYPES:
        shown = quoted(str(datatype))
        raise invalid(f"{field}: datatype {shown} is not a KServe v2 datatype")
    shape = parse_shape(item.get("shape"), field)
    params = parameters(item.get("parameters"), f"{field} parameters")
    if "shared_memory_region" in params:
        raise TritonError("UNIMPLEMENTED", f"{field}: shared memory is not supported by "
                          "lstm-serve: send the tensor in the body")  # fmt: skip
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in item:
            raise invalid(f"{field} has neither 'data' nor a binary_data_size parameter")
        data = json_tensor(name, item["data"], datatype, shape)
        return InferInput(name, datatype, shape, data), offset
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise invalid(f"{field}: binary_data_size must be a non-negative integer")
    if offset + size > len(binary):
        raise invalid(
            f"{field}: binary_data_size {size} goes past the end of the body's binary data "
            f"({len(binary) - offset} bytes left)"
        )
    data = from_raw(name, datatype, shape, bytes(binary[offset : offset + size]))
    return InferInput(name, datatype, shape, data), offset + size


def parse_shape(raw: object, field: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    ):
        raise invalid(f"{field}: 'shape' must be a list of non-negative integers")
    return tuple(raw)


def json_tensor(name: str, values: object, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """JSON 'data' (flat or nested, row-major) -> an array of `shape`; numbers only for
    numeric types (no strings, no fractions for integers), strings for BYTES."""
    flat = _flatten(values)
    if datatype == BYTES:
        if not all(isinstance(v, str) for v in flat):
            raise invalid(f"input {quoted(name)}: BYTES data must be strings")
        return from_values(name, datatype, shape, flat)
    kinds = JSON_KINDS[DTYPES[datatype].kind]
    if not all(_is_json_number(v, datatype) for v in flat) or (
        flat and np.asarray(flat).dtype.kind not in kinds
    ):
        raise invalid(f"input {quoted(name)}: 'data' holds values a {datatype} tensor cannot take")
    return from_values(name, datatype, shape, flat)


def _is_json_number(value: object, datatype: str) -> bool:
    """true / false for BOOL; numbers (not booleans) for the numeric types."""
    if datatype == "BOOL":
        return isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flatten(values: object) -> list[object]:
    """Nested lists -> their leaves in row-major order (a scalar is one value)."""
    out: list[object] = []
    stack = [values]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def parse_outputs(raw: object) -> list[tuple[RequestedOutput, bool | None]]:
    """The requested outputs and, for each, its binary_data parameter (None: not given)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise invalid("'outputs' must be a list")
    outputs = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise invalid(f"outputs[{i}] must be an object with a 'name'")
        params = parameters(item.get("parameters"), f"output {quoted(item['name'])} parameters")
        binary = params.pop("binary_data", None)
        if binary is not None and not isinstance(binary, bool):
            raise invalid(f"output {quoted(item['name'])}: binary_data must be true or false")
        outputs.append((RequestedOutput(item["name"], params), binary))
    return outputs


class OutputChoice:
    """Which outputs go back as binary data: per output, else the request's default."""

    def __init__(self, default: bool, per_output: Mapping[str, bool]) -> None:
        self.default = default
        self.per_output = dict(per_output)

    def binary(self, name: str) -> bool:
        return self.per_output.get(name, self.default)


def encode_infer_response(response: InferResponse, choice: OutputChoice) -> tuple[bytes, str, int]:
    """The reply body, its content type and the JSON header's length (-1: no binary part)."""
    outputs, blobs = [], []
    for out in response.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype,
                                 "shape": list(out.shape)}  # fmt: skip
        if choice.binary(out.name):
            blob = to_raw(out.data, out.datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = json_values(out.data, out.datatype)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model, "model_version": response.version}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = dict(response.parameters)
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, JSON_TYPE, -1
    return b"".join([header, *blobs]), BINARY_TYPE, len(header)


def json_values(data: np.ndarray, datatype: str) -> list[Any]:
    """An array as JSON 'data': flat, row-major (BYTES as UTF-8 strings)."""
    if datatype == BYTES:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                for v in data.reshape(-1)]  # fmt: skip
    return data.reshape(-1).tolist()
