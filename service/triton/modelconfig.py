"""A served version as Triton describes models: its ModelConfig, its metadata, its tensor names.

For a contract-v1 model the config is derived from the description: input `tokens` (INT64,
dims [-1]) or `features` (FP32, [-1, F]), optional BYTES `text` for a token model with a
tokenizer, outputs `probs` (FP32 [C]) and `step_probs` (FP32 [-1, C]), max_batch_size > 0
(so requests carry a batch dimension first), sequence batching with the session idle timeout.
The recurrent state and the lengths stay implicit (Triton's implicit state). A model that came
with its own config.pbtxt (`worker.triton_config`) keeps that config and its tensor names.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

from tritonclient.grpc import model_config_pb2 as mc

from lstmserve.contract import (
    INPUT_FEATURES,
    INPUT_LENGTHS,
    INPUT_TOKENS,
    OUTPUT_PROBS,
    OUTPUT_STEP_PROBS,
)
from service.engine.model.worker import ModelWorker
from service.triton.types import ModelMetadata, TensorMetadata

INPUT_TEXT = "text"  # our extension: BYTES [1] per sequence, tokenized by the model's tokenizer
PLATFORM = "onnxruntime_onnx"

_TYPE = {
    mc.TYPE_BOOL: "BOOL", mc.TYPE_UINT8: "UINT8", mc.TYPE_UINT16: "UINT16",
    mc.TYPE_UINT32: "UINT32", mc.TYPE_UINT64: "UINT64", mc.TYPE_INT8: "INT8",
    mc.TYPE_INT16: "INT16", mc.TYPE_INT32: "INT32", mc.TYPE_INT64: "INT64",
    mc.TYPE_FP16: "FP16", mc.TYPE_FP32: "FP32", mc.TYPE_FP64: "FP64", mc.TYPE_STRING: "BYTES",
}  # fmt: skip


@dataclass(frozen=True)
class ConfigLimits:
    """What the server's configuration puts into every derived ModelConfig."""

    max_batch_size: int  # sequences per non-sequence request (--max-classify-sequences)
    idle_timeout_s: float  # a sequence's idle timeout (the session idle timeout)


@dataclass(frozen=True)
class TensorNames:
    """The client's tensor names -> ours (`tokens`/`features`/`text`, `probs`/`step_probs`)."""

    inputs: dict[str, str]
    outputs: dict[str, str]
    datatypes: dict[str, str]  # the client's input name -> the datatype it must send

    def output_name(self, ours: str) -> str:
        for theirs, name in self.outputs.items():
            if name == ours:
                return theirs
        return ours


def datatype_name(data_type: int) -> str:
    return _TYPE.get(data_type, "BYTES")


def custom_config(worker: ModelWorker) -> mc.ModelConfig | None:
    """The config the model came with (config.pbtxt), if any."""
    config = getattr(worker, "triton_config", None)
    return config if isinstance(config, mc.ModelConfig) else None


def model_config(worker: ModelWorker, limits: ConfigLimits) -> mc.ModelConfig:
    """The version's ModelConfig: its own config.pbtxt, else derived from the description."""
    own = custom_config(worker)
    if own is not None:
        config = mc.ModelConfig()
        config.CopyFrom(own)
        config.name = worker.name
        batching = config.sequence_batching
        if config.HasField("sequence_batching") and not batching.max_sequence_idle_microseconds:
            # unset is not Triton's 1 s here: the server's idle timeout applies; say so
            batching.max_sequence_idle_microseconds = int(limits.idle_timeout_s * 1_000_000)
        return config
    desc = worker.description
    config = mc.ModelConfig(
        name=worker.name, platform=PLATFORM, backend="onnxruntime",
        max_batch_size=limits.max_batch_size,
    )  # fmt: skip
    config.version_policy.latest.num_versions = 1
    if desc.input_kind == "tokens":
        config.input.add(name=INPUT_TOKENS, data_type=mc.TYPE_INT64, dims=[-1])
        if desc.tokenizer is not None:
            config.input.add(name=INPUT_TEXT, data_type=mc.TYPE_STRING, dims=[1], optional=True)
            config.input[0].optional = True  # one of the two
    else:
        config.input.add(name=INPUT_FEATURES, data_type=mc.TYPE_FP32, dims=[-1, desc.feature_dim])
    classes = desc.num_classes
    config.output.add(name=OUTPUT_PROBS, data_type=mc.TYPE_FP32, dims=[classes])
    config.output.add(name=OUTPUT_STEP_PROBS, data_type=mc.TYPE_FP32, dims=[-1, classes])
    if desc.streamable:
        batching = config.sequence_batching
        idle = worker.idle_timeout_s if worker.idle_timeout_s is not None else limits.idle_timeout_s
        batching.max_sequence_idle_microseconds = int(idle * 1_000_000)
        policy = worker.batcher.policy  # sequences batched together, as Triton's candidates
        batching.oldest.max_candidate_sequences = policy.max_batch_size
        batching.oldest.max_queue_delay_microseconds = int(policy.max_queue_delay_s * 1_000_000)
    else:
        config.dynamic_batching.SetInParent()
    config.parameters["labels"].string_value = json.dumps(list(desc.labels), ensure_ascii=False)
    config.parameters["input_kind"].string_value = desc.input_kind
    config.parameters["streamable"].string_value = "true" if desc.streamable else "false"
    return config


_NAMES: weakref.WeakKeyDictionary[ModelWorker, TensorNames] = weakref.WeakKeyDictionary()


def tensor_names(worker: ModelWorker) -> TensorNames:
    """Which of the client's names is which of our tensors (worked out once per version)."""
    names = _NAMES.get(worker)
    if names is None:
        names = _NAMES[worker] = _tensor_names(worker)
    return names


def _tensor_names(worker: ModelWorker) -> TensorNames:
    desc = worker.description
    own = custom_config(worker)
    if own is None:
        inputs = {desc.input_name: desc.input_name}
        if desc.tokenizer is not None:
            inputs[INPUT_TEXT] = INPUT_TEXT
        outputs = {OUTPUT_PROBS: OUTPUT_PROBS, OUTPUT_STEP_PROBS: OUTPUT_STEP_PROBS}
        types = {INPUT_TOKENS: "INT64", INPUT_FEATURES: "FP32", INPUT_TEXT: "BYTES"}
        return TensorNames(inputs, outputs, {n: types[n] for n in inputs})
    lengths = _lengths_input(own)
    ins = {i.name: (INPUT_LENGTHS if i.name == lengths else desc.input_name) for i in own.input}
    batch_axis = 1 if own.max_batch_size > 0 else 0  # config dims hold the batch when 0
    outs: dict[str, str] = {}
    for out in own.output:
        if out.name in (OUTPUT_PROBS, OUTPUT_STEP_PROBS):
            outs[out.name] = out.name
        else:  # by rank: [B, C] is the final distribution, [B, T, C] the per-step one
            rank = len(out.dims) + batch_axis
            outs[out.name] = OUTPUT_PROBS if rank == 2 else OUTPUT_STEP_PROBS
    types = {i.name: datatype_name(i.data_type) for i in own.input}
    return TensorNames(ins, outs, types)


def _lengths_input(config: mc.ModelConfig) -> str:
    """The config's lengths input (parameters lengths_input, or an input named lengths)."""
    if "lengths_input" in config.parameters:
        return config.parameters["lengths_input"].string_value
    return INPUT_LENGTHS if any(i.name == INPUT_LENGTHS for i in config.input) else ""


def _metadata_tensors(
    tensors: list[mc.ModelInput] | list[mc.ModelOutput], batched: bool
) -> tuple[TensorMetadata, ...]:
    lead = (-1,) if batched else ()
    return tuple(
        TensorMetadata(t.name, datatype_name(t.data_type), lead + tuple(t.dims)) for t in tensors
    )


def model_metadata(worker: ModelWorker, versions: list[int], limits: ConfigLimits) -> ModelMetadata:
    """ModelMetadata of a model (the batch dimension first, as -1)."""
    config = model_config(worker, limits)
    batched = config.max_batch_size > 0
    return ModelMetadata(
        name=worker.name,
        versions=tuple(str(v) for v in versions),
        platform=config.platform or PLATFORM,
        inputs=_metadata_tensors(list(config.input), batched),
        outputs=_metadata_tensors(list(config.output), batched),
    )
