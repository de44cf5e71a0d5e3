"""inference.GRPCInferenceService messages (tritonclient's generated modules) <-> the core's.

Inputs come as raw_input_contents (what tritonclient sends: one entry per input, in order) or
as typed `contents`; replies carry raw_output_contents, one entry per output, as Triton does.
A request is judged by what it declares before any tensor is decoded: each input's rank and
element count, its raw byte size or typed value count against its shape, and the BYTES
elements of all its inputs together (`max_bytes_elements`, --max-bytes-elements). gRPC itself
bounds a message at 4 MiB, compressed ones once inflated (RESOURCE_EXHAUSTED "Decompressed
message larger than max", measured: a 1 GiB gzip message costs the server nothing more).
"""

from __future__ import annotations

from typing import Any

from tritonclient.grpc import service_pb2 as pb

from service.engine.text.inputs import quoted
from service.triton import tensors
from service.triton.types import (
    InferInput,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelStats,
    ParamValue,
    RequestedOutput,
    TritonError,
    invalid,
)

# A datatype -> the InferTensorContents field its typed values travel in.
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip
SHARED_MEMORY_PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def param_value(param: pb.InferParameter) -> ParamValue | None:
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def params(mapping: Any) -> dict[str, ParamValue]:
    """A protobuf parameters map -> plain values (unset entries dropped)."""
    out: dict[str, ParamValue] = {}
    for key, param in mapping.items():
        value = param_value(param)
        if value is not None:
            out[key] = value
    return out


def _no_shared_memory(what: str, mapping: Any) -> None:
    for key in SHARED_MEMORY_PARAMS:
        if key in mapping:
            raise TritonError(
                "UNIMPLEMENTED",
                f"{what} names {key}: shared memory is not supported by lstm-serve; send the "
                "tensor in the request",
            )


def _tensor(msg: Any, raw: bytes | None, max_bytes_elements: int) -> InferInput:
    name, datatype, shape = msg.name, msg.datatype, tensors.check_shape(msg.name, msg.shape)
    if len(msg.parameters):
        _no_shared_memory(f"input {quoted(name)}", msg.parameters)
    if raw is not None:
        data = tensors.from_raw(name, datatype, shape, raw, max_bytes_elements)
    else:
        field = CONTENTS_FIELD.get(datatype)
        if field is None:
            raise invalid(
                f"input {quoted(name)}: datatype {quoted(datatype)} has no typed contents: "
                "send it in raw_input_contents"
            )
        # the repeated field as it is: its length is checked before a value is copied
        values = getattr(msg.contents, field)
        data = tensors.from_values(name, datatype, shape, values, max_bytes_elements)
    return InferInput(name, datatype, tuple(data.shape), data)


def _bytes_elements(msg: pb.ModelInferRequest, limit: int) -> int:
    """The BYTES elements all inputs declare, refused past `limit` before any is read."""
    total = 0
    for t in msg.inputs:
        if t.datatype == "BYTES":
            shape = tensors.check_shape(t.name, t.shape)
            total = tensors.check_bytes_elements(t.name, tensors.element_count(shape), total,
                                                 limit)  # fmt: skip
    return total


def infer_request(
    msg: pb.ModelInferRequest, max_bytes_elements: int = tensors.MAX_BYTES_ELEMENTS
) -> InferRequest:
    """A ModelInferRequest as the core's request (tensor errors name the tensor)."""
    raw = msg.raw_input_contents
    if len(raw) and len(raw) != len(msg.inputs):
        raise invalid(
            f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs: send one "
            "per input, or use contents for every input"
        )
    _bytes_elements(msg, max_bytes_elements)
    inputs = tuple(_tensor(t, raw[i] if len(raw) else None, max_bytes_elements)
                   for i, t in enumerate(msg.inputs))  # fmt: skip
    outputs = []
    for out in msg.outputs:
        if not len(out.parameters):
            outputs.append(RequestedOutput(out.name))
            continue
        _no_shared_memory(f"output {quoted(out.name)}", out.parameters)
        outputs.append(RequestedOutput(out.name, params(out.parameters)))
    return InferRequest(
        model=msg.model_name, version=msg.model_version, id=msg.id, inputs=inputs,
        outputs=tuple(outputs), parameters=params(msg.parameters),
    )  # fmt: skip


def _set_param(param: pb.InferParameter, value: ParamValue) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = value


def infer_response(reply: InferResponse) -> pb.ModelInferResponse:
    msg = pb.ModelInferResponse(model_name=reply.model, model_version=reply.version, id=reply.id)
    for key, value in reply.parameters.items():
        _set_param(msg.parameters[key], value)
    for out in reply.outputs:
        msg.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.shape))
        msg.raw_output_contents.append(tensors.to_raw(out.data, out.datatype))
    return msg


def model_metadata(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    def tensor(t: Any) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(
            name=t.name, datatype=t.datatype, shape=list(t.shape)
        )

    return pb.ModelMetadataResponse(
        name=meta.name, versions=list(meta.versions), platform=meta.platform,
        inputs=[tensor(t) for t in meta.inputs], outputs=[tensor(t) for t in meta.outputs],
    )  # fmt: skip


def model_statistics(stats: list[ModelStats]) -> pb.ModelStatisticsResponse:
    reply = pb.ModelStatisticsResponse()
    for s in stats:
        entry = reply.model_stats.add(
            name=s.name, version=s.version, last_inference=s.last_inference,
            inference_count=s.inference_count, execution_count=s.execution_count,
        )  # fmt: skip
        entry.inference_stats.success.count = s.success.count
        entry.inference_stats.success.ns = s.success.ns
        entry.inference_stats.fail.count = s.fail.count
        entry.inference_stats.fail.ns = s.fail.ns
    return reply
