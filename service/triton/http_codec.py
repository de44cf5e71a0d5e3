"""KServe v2 REST bodies <-> the neutral Triton messages (service/triton/types.py).

JSON tensors and Triton's binary tensor data extension: a body whose first
`Inference-Header-Content-Length` bytes are the JSON header and whose rest holds the inputs'
raw bytes (`binary_data_size` per input, in input order); outputs come back the same way when
asked (`binary_data` on an output, `binary_data_output` on the request). Only HTTP's framing
lives here: what a tensor must look like for a model is the core's business.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.engine.text.inputs import quoted
from service.triton.tensors import (
    DTYPES,
    MAX_BYTES_ELEMENTS,
    VALUES_SLICE,
    check_bytes_elements,
    check_raw_size,
    check_shape,
    element_count,
    from_raw,
    from_values,
    to_raw,
)
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
# Arrays and objects in one JSON document (counted before parsing, brackets inside strings
# included): each costs json.loads ~0.4 us holding the GIL, 2.8 M of them in 8 MiB took 1.2 s.
MAX_JSON_CONTAINERS = 1 << 17
# From this size on, numbers go through Python functions: the thread parsing the JSON then lets
# the event loop's thread run between them (an 8 MiB array of floats held the GIL for 0.45 s
# in one json.loads call, 0.13 s at most this way; parsing takes twice as long, off the loop).
YIELDING_FROM_BYTES = 64 << 10


def _int(text: str) -> int:
    return int(text)


def _float(text: str) -> float:
    return float(text)


NUMBER_CALLBACKS: dict[str, Any] = {"parse_int": _int, "parse_float": _float}
# A backslash escape of a UTF-16 surrogate: only then can a string hold a lone one.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")

BYTES = "BYTES"
# Which JSON values a datatype takes: numpy kinds of np.asarray(values).
JSON_KINDS = {"b": "b", "u": "bui", "i": "bui", "f": "buif"}


def parse_json(body: bytes, what: str) -> Any:
    """A JSON document of at most MAX_JSON_BYTES and MAX_JSON_CONTAINERS arrays and objects,
    valid Unicode; a short InvalidInput for anything else. Costs up to ~0.3 s at the limit:
    callers run large ones off the event loop."""
    if len(body) > MAX_JSON_BYTES:
        raise invalid(
            f"{what}: the JSON is {len(body)} bytes, more than {MAX_JSON_BYTES}; send large "
            "tensors as binary data (binary_data_size)"
        )
    if body.count(b"[") + body.count(b"{") > MAX_JSON_CONTAINERS:
        raise invalid(f"{what}: more than {MAX_JSON_CONTAINERS} JSON arrays and objects; "
                      "send tensors flat")  # fmt: skip
    try:
        doc = json.loads(body, **(NUMBER_CALLBACKS if len(body) > YIELDING_FROM_BYTES else {}))
    except UnicodeDecodeError as exc:
        raise invalid(f"{what} is not UTF-8 JSON: byte {exc.start} is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise invalid(f"{what} is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except RecursionError:
        raise invalid(f"{what} is nested too deeply") from None
    except ValueError as exc:  # an integer of more digits than Python converts (4300)
        raise invalid(f"{what} is not valid JSON here: {str(exc)[:120]}") from None
    if SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(doc):
        raise invalid(f"{what} is not valid Unicode: a string holds a lone surrogate (\\ud800)")
    return doc


def _has_lone_surrogate(doc: object) -> bool:
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
    return False


def header_length_of(raw: str | None) -> int | None:
    """The Inference-Header-Content-Length header as a size (None: the body is all JSON)."""
    if raw is None:
        return None
    if not raw.isascii() or not raw.strip().isdigit() or len(raw.strip()) > 20:
        raise invalid(f"{HEADER_LENGTH} {quoted(raw)} is not an integer")
    return int(raw)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary rest) of an infer body; no header length: all of it is JSON."""
    size = header_length_of(header_length)
    if size is None:
        return body, memoryview(b"")
    if not 0 <= size <= len(body):
        raise invalid(f"{HEADER_LENGTH} {size} is not within the body's {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:size]), view[size:]


@dataclass
class InputPlan:
    """One input as its JSON header declares it: its binary part's size, or its JSON data
    (dropped once decoded, so that a large one is freed by the thread that decodes it)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    binary_size: int | None  # None: the values are `data`
    data: object = None


@dataclass(frozen=True)
class InferHeader:
    """An infer request's JSON header, checked against what it declares (shapes, datatypes,
    binary sizes, BYTES elements) before any tensor data is read or decoded."""

    model: str
    version: str
    id: str
    inputs: tuple[InputPlan, ...]
    outputs: tuple[RequestedOutput, ...]
    parameters: dict[str, ParamValue]
    choice: OutputChoice
    binary_bytes: int  # what the inputs' binary_data_size add up to
    max_bytes_elements: int

    def decode(self, binary: memoryview) -> InferRequest:
        """The request with its tensors (cost grows with the data: large ones off the loop)."""
        if len(binary) != self.binary_bytes:
            raise invalid(
                f"the body holds {len(binary)} bytes of binary tensor data but the inputs' "
                f"binary_data_size add up to {self.binary_bytes}"
            )
        decoded, offset = [], 0
        for plan in self.inputs:
            if plan.binary_size is None:
                values, plan.data = plan.data, None
                data = json_tensor(plan.name, values, plan.datatype, plan.shape,
                                   self.max_bytes_elements)  # fmt: skip
                del values
            else:
                raw = bytes(binary[offset : offset + plan.binary_size])
                offset += plan.binary_size
                data = from_raw(plan.name, plan.datatype, plan.shape, raw,
                                self.max_bytes_elements)  # fmt: skip
            decoded.append(InferInput(plan.name, plan.datatype, plan.shape, data))
        return InferRequest(
            model=self.model, version=self.version, id=self.id, inputs=tuple(decoded),
            outputs=self.outputs, parameters=self.parameters,
        )  # fmt: skip


def parse_infer_request(
    model: str, version: str, body: bytes, header_length: str | None,
    max_bytes_elements: int = MAX_BYTES_ELEMENTS,
) -> tuple[InferRequest, OutputChoice]:  # fmt: skip
    """A whole infer body -> the neutral request and how each output is to be sent back."""
    header, binary = split_body(body, header_length)
    doc = parse_json(header, "the inference request")
    plan = parse_infer_header(model, version, doc, len(binary), max_bytes_elements)
    return plan.decode(binary), plan.choice


def parse_infer_header(
    model: str, version: str, doc: object, binary_bytes: int | None,
    max_bytes_elements: int = MAX_BYTES_ELEMENTS,
) -> InferHeader:  # fmt: skip
    """The parsed JSON header -> its checked plan. `binary_bytes`: the binary part's size when
    known (None: not yet read), to name an input that goes past its end."""
    if not isinstance(doc, dict):
        raise invalid("the inference request must be a JSON object")
    params = parameters(doc.get("parameters"), "parameters")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid("the inference request needs 'inputs': a non-empty list of tensors")
    plans, used, strings = [], 0, 0
    for i, item in enumerate(inputs):
        plan = parse_input(item, i)
        if plan.datatype == BYTES:
            strings = check_bytes_elements(plan.name, element_count(plan.shape), strings,
                                           max_bytes_elements)  # fmt: skip
        if plan.binary_size is not None:
            if binary_bytes is not None and used + plan.binary_size > binary_bytes:
                raise invalid(
                    f"input {quoted(plan.name)}: binary_data_size {plan.binary_size} goes past "
                    f"the end of the body's binary data ({binary_bytes - used} bytes left)"
                )
            used += plan.binary_size
        plans.append(plan)
    outputs = parse_outputs(doc.get("outputs"))
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise invalid("'id' must be a string")
    default = params.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise invalid("parameter 'binary_data_output' must be true or false")
    choice = OutputChoice(default, {o.name: b for o, b in outputs if b is not None})
    return InferHeader(
        model=model, version=version, id=request_id, inputs=tuple(plans),
        outputs=tuple(o for o, _ in outputs), parameters=params, choice=choice,
        binary_bytes=used, max_bytes_elements=max_bytes_elements,
    )  # fmt: skip


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


def parse_input(item: object, index: int) -> InputPlan:
    """One request input as declared: its name, datatype, shape and where its values are;
    a binary part's size is checked against the datatype and shape."""
    if not isinstance(item, dict):
        raise invalid(f"inputs[{index}] must be a JSON object")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise invalid(f"inputs[{index}] needs a 'name'")
    field = f"input {quoted(name)}"
    datatype = item.get("datatype")
    if not isinstance(datatype, str) or datatype not in DTYPES:
        shown = quoted(datatype) if isinstance(datatype, str) else "(not a string)"
        raise invalid(f"{field}: datatype {shown} is not a KServe v2 datatype")
    shape = check_shape(name, parse_shape(item.get("shape"), field))
    params = parameters(item.get("parameters"), f"{field} parameters")
    if "shared_memory_region" in params:
        raise TritonError("UNIMPLEMENTED", f"{field}: shared memory is not supported by "
                          "lstm-serve: send the tensor in the body")  # fmt: skip
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in item:
            raise invalid(f"{field} has neither 'data' nor a binary_data_size parameter")
        return InputPlan(name, datatype, shape, None, item["data"])
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise invalid(f"{field}: binary_data_size must be a non-negative integer")
    check_raw_size(name, datatype, shape, size)
    return InputPlan(name, datatype, shape, size)


def parse_shape(raw: object, field: str) -> list[int]:
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    ):
        raise invalid(f"{field}: 'shape' must be a list of non-negative integers")
    return raw


def json_tensor(
    name: str, values: object, datatype: str, shape: tuple[int, ...],
    max_bytes_elements: int = MAX_BYTES_ELEMENTS,
) -> np.ndarray:  # fmt: skip
    """JSON 'data' (flat or nested, row-major) -> an array of `shape`; numbers only for
    numeric types (no strings, no fractions for integers), strings for BYTES."""
    flat = _flatten(values, element_count(shape))
    if datatype == BYTES:
        if not all(isinstance(v, str) for v in flat):
            raise invalid(f"input {quoted(name)}: BYTES data must be strings")
        return from_values(name, datatype, shape, flat, max_bytes_elements)
    kinds = JSON_KINDS[DTYPES[datatype].kind]
    if not all(_is_json_number(v, datatype) for v in flat) or (
        flat and _json_kind(flat) not in kinds
    ):
        raise invalid(f"input {quoted(name)}: 'data' holds values a {datatype} tensor cannot take")
    return from_values(name, datatype, shape, flat)


def _json_kind(flat: list[object]) -> str:
    """The numpy kind of JSON numbers: b (all bool), i, u or f (any float); an integer beyond
    64 bits is "O" (no datatype takes it). In slices: no C call holds the GIL for long."""
    if isinstance(flat[0], bool):
        return "b"
    low, high = 0, 0
    for start in range(0, len(flat), VALUES_SLICE):
        part = flat[start : start + VALUES_SLICE]
        if any(isinstance(v, float) for v in part):
            return "f"
        low, high = min(low, *part), max(high, *part)  # type: ignore[call-overload]
    if low >= -(1 << 63) and high < 1 << 63:
        return "i"
    return "u" if low >= 0 and high < 1 << 64 else "O"


def _is_json_number(value: object, datatype: str) -> bool:
    """true / false for BOOL; numbers (not booleans) for the numeric types."""
    if datatype == "BOOL":
        return isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flatten(values: object, expected: int) -> list[object]:
    """Nested lists -> their leaves in row-major order (a scalar is one value); stops once
    past `expected` leaves (the count is wrong then: no need to read on)."""
    out: list[object] = []
    stack = [values]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
            if len(out) > expected:
                break
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
