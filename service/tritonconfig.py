"""Parse a Triton `config.pbtxt` (tritonclient's generated `model_config_pb2.ModelConfig`, in
protobuf text format) into the engine's plain `TritonModel` (service/engine/byo/tritonconfig.py).

Only a subset of the message is served (SUPPORTED); every other field that is set is refused by
name, so that nothing in a config is silently ignored. `TritonConfigReader` is what the
composition root gives the engine (`RuntimeOptions.model_configs`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from lstmserve.contract import KIND_LOGITS, OUTPUT_KINDS
from service.engine.byo.tritonconfig import (
    CONFIG_FILE,
    CONTROL_KINDS,
    DTYPES,
    PARAMETERS,
    ControlSpec,
    StateSpec,
    TensorSpec,
    TritonModel,
)
from service.errors import ConfigError

# The fields served, per message type; any other field set is refused by its path.
SUPPORTED: dict[str, frozenset[str]] = {
    "inference.ModelConfig": frozenset(
        [
            "name",
            "platform",
            "backend",
            "max_batch_size",
            "input",
            "output",
            "sequence_batching",
            "instance_group",
            "parameters",
            "version_policy",
        ]
    ),
    "inference.ModelVersionPolicy": frozenset({"latest", "all", "specific"}),
    "inference.ModelVersionPolicy.Latest": frozenset({"num_versions"}),
    "inference.ModelVersionPolicy.All": frozenset(),
    "inference.ModelVersionPolicy.Specific": frozenset({"versions"}),
    "inference.ModelConfig.ParametersEntry": frozenset({"key", "value"}),
    "inference.ModelParameter": frozenset({"string_value"}),
    "inference.ModelInput": frozenset({"name", "data_type", "dims", "reshape"}),
    "inference.ModelOutput": frozenset({"name", "data_type", "dims", "reshape", "label_filename"}),
    "inference.ModelTensorReshape": frozenset({"shape"}),
    "inference.ModelSequenceBatching": frozenset(
        {"direct", "oldest", "max_sequence_idle_microseconds", "control_input", "state"}
    ),
    "inference.ModelSequenceBatching.StrategyDirect": frozenset({"max_queue_delay_microseconds"}),
    "inference.ModelSequenceBatching.StrategyOldest": frozenset(
        {
            "max_queue_delay_microseconds",
            "preferred_batch_size",
            "max_candidate_sequences",
            "preserve_ordering",
        }
    ),
    # use_same_buffer_for_input_output and use_growable_memory tune Triton's own state buffers
    # (its implicit-state docs show them); the server keeps states in its own slab: no effect.
    "inference.ModelSequenceBatching.State": frozenset(
        {
            "input_name",
            "output_name",
            "data_type",
            "dims",
            "initial_state",
            "use_same_buffer_for_input_output",
            "use_growable_memory",
        }
    ),
    "inference.ModelSequenceBatching.InitialState": frozenset(
        {"data_type", "dims", "zero_data", "name"}
    ),
    "inference.ModelSequenceBatching.ControlInput": frozenset({"name", "control"}),
    "inference.ModelSequenceBatching.Control": frozenset(
        {"kind", "int32_false_true", "fp32_false_true", "bool_false_true", "data_type"}
    ),
    "inference.ModelInstanceGroup": frozenset({"name", "kind", "count"}),
}


def unsupported_fields(message: Any, prefix: str = "") -> Iterator[str]:
    """The path of every field set in `message` that SUPPORTED does not list (depth first)."""
    allowed = SUPPORTED.get(message.DESCRIPTOR.full_name, frozenset())
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.name not in allowed:
            yield path
            continue
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            for key in value:
                item = value[key]
                if hasattr(item, "ListFields"):
                    yield from unsupported_fields(item, f"{path}[{key!r}].")
        elif field.is_repeated:
            for index, item in enumerate(value):
                yield from unsupported_fields(item, f"{path}[{index}].")
        else:
            yield from unsupported_fields(value, f"{path}.")


def parse_config(text: str, where: str) -> mc.ModelConfig:
    """config.pbtxt text -> ModelConfig; ConfigError naming the file and the parse error."""
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{where}: not a Triton ModelConfig: {exc}") from exc


def served_versions(model_dir: Path, versions: list[int]) -> list[int]:
    """The versions a config.pbtxt's version_policy serves (Triton's: latest N, all, or the
    ones listed); all of them without a config or a policy. A config that does not parse
    serves them all here: loading them reports the error."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return versions
    try:
        config = parse_config(path.read_text(encoding="utf-8"), str(path))
    except (OSError, ConfigError):
        return versions
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice") if config.HasField("version_policy") else None
    if which == "latest":
        count = max(1, policy.latest.num_versions)
        return sorted(versions)[-count:]
    if which == "specific":
        listed = set(policy.specific.versions)
        return [v for v in versions if v in listed]
    return versions


def load_triton_config(model_dir: Path) -> TritonModel:
    """Read `model_dir/config.pbtxt`; ConfigError naming the field for anything not served."""
    path = model_dir / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    config = parse_config(text, str(path))
    refused = list(unsupported_fields(config))
    if refused:
        raise ConfigError(
            f"{path}: field {', '.join(refused[:8])} is not supported by lstm-serve "
            f"(supported: docs/own-model-onnx.md)"
        )
    return _read(config, path, model_dir.name)


def _read(config: mc.ModelConfig, path: Path, folder: str) -> TritonModel:
    if config.name and config.name != folder:
        raise ConfigError(f"{path}: name {config.name!r} is not the folder's name {folder!r}")
    if config.platform not in ("", "onnxruntime_onnx"):
        raise ConfigError(f"{path}: platform {config.platform!r} is not onnxruntime_onnx")
    if config.backend not in ("", "onnxruntime"):
        raise ConfigError(f"{path}: backend {config.backend!r} is not onnxruntime")
    if config.max_batch_size < 0:
        raise ConfigError(f"{path}: max_batch_size {config.max_batch_size} is negative")
    params = {key: config.parameters[key].string_value for key in config.parameters}
    for key in params:
        if key not in PARAMETERS:
            known = ", ".join(PARAMETERS)
            raise ConfigError(f"{path}: parameters key {key!r} is not one of {known}")
    if params.get("output_kind", KIND_LOGITS) not in OUTPUT_KINDS:
        raise ConfigError(
            f"{path}: parameters output_kind {params['output_kind'][:64]!r} is not one of "
            f"{', '.join(OUTPUT_KINDS)}"
        )
    seq = config.sequence_batching
    if not config.HasField("sequence_batching") or not seq.state:
        raise ConfigError(
            f"{path}: sequence_batching.state is missing: lstm-serve serves recurrent models "
            "whose state is an input / output pair (sequence_batching { state [...] })"
        )
    delay, cap = _strategy(seq, path)
    idle = seq.max_sequence_idle_microseconds
    return TritonModel(
        config=config, path=path, max_batch_size=config.max_batch_size,
        inputs=tuple(_tensor(t, path, "input") for t in config.input),
        outputs=tuple(_tensor(t, path, "output") for t in config.output),
        states=tuple(_state(s, i, path) for i, s in enumerate(seq.state)),
        controls=tuple(_control(c, path) for c in seq.control_input),
        parameters=params, idle_timeout_s=idle / 1e6 if idle else None,
        queue_delay_s=delay, batch_cap=cap,
        instance_kind=_instance_kind(config, path),
        instances=sum(max(1, g.count) for g in config.instance_group),
    )  # fmt: skip


def _dtype(code: int, path: Path, what: str) -> np.dtype:
    types = mc.DataType
    name = types.Name(code) if code in types.values() else str(code)
    if name not in DTYPES:
        supported = ", ".join(DTYPES)
        raise ConfigError(f"{path}: {what} data_type {name} is not one of {supported}")
    return DTYPES[name]


def _tensor(t: mc.ModelInput | mc.ModelOutput, path: Path, kind: str) -> TensorSpec:
    label = getattr(t, "label_filename", "")
    dims = tuple(int(d) for d in t.dims)
    reshape = tuple(int(d) for d in t.reshape.shape) if t.HasField("reshape") else None
    dtype = _dtype(t.data_type, path, f"{kind} {t.name!r}")
    return TensorSpec(t.name, dtype, dims, label, reshape)


def _state(s: mc.ModelSequenceBatching.State, index: int, path: Path) -> StateSpec:
    what = f"sequence_batching.state[{index}] ({s.input_name!r} -> {s.output_name!r})"
    if not s.input_name or not s.output_name:
        raise ConfigError(f"{path}: {what} needs both input_name and output_name")
    dtype = _dtype(s.data_type, path, what)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ConfigError(f"{path}: {what} data_type must be TYPE_FP32 or TYPE_FP16")
    dims = tuple(int(d) for d in s.dims)
    for init in s.initial_state:
        if init.WhichOneof("state_data") != "zero_data" or not init.zero_data:
            raise ConfigError(f"{path}: {what} initial_state must be zero_data: true")
        if init.dims and tuple(init.dims) != dims:
            raise ConfigError(f"{path}: {what} initial_state dims {list(init.dims)} != dims")
    return StateSpec(s.input_name, s.output_name, dtype, dims)


def _control(c: mc.ModelSequenceBatching.ControlInput, path: Path) -> ControlSpec:
    what = f"sequence_batching.control_input {c.name!r}"
    if len(c.control) != 1:
        raise ConfigError(f"{path}: {what} needs exactly one control")
    ctl = c.control[0]
    kind = mc.ModelSequenceBatching.Control.Kind.Name(ctl.kind)
    if kind not in CONTROL_KINDS:
        raise ConfigError(f"{path}: {what} kind {kind} is not supported")
    if kind == "CONTROL_SEQUENCE_CORRID":
        dtype = _dtype(ctl.data_type, path, f"{what} (CORRID)")
        if dtype not in (np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.uint32),
                         np.dtype(np.uint64)):  # fmt: skip
            raise ConfigError(f"{path}: {what} CORRID data_type must be an integer type")
        return ControlSpec(c.name, "CORRID", dtype, (0.0, 0.0))
    for field, dtype in (("int32_false_true", np.int32), ("fp32_false_true", np.float32),
                         ("bool_false_true", np.bool_)):  # fmt: skip
        values = list(getattr(ctl, field))
        if values:
            if len(values) != 2:
                raise ConfigError(f"{path}: {what} {field} needs two values (false, true)")
            return ControlSpec(c.name, CONTROL_KINDS[kind], np.dtype(dtype),
                               (float(values[0]), float(values[1])))  # fmt: skip
    raise ConfigError(f"{path}: {what} needs int32_false_true, fp32_false_true or bool_false_true")


def _strategy(seq: mc.ModelSequenceBatching, path: Path) -> tuple[float | None, int | None]:
    """(max queue delay in s, most sessions in one batch) from direct / oldest. preserve_ordering
    is what the server does anyway (each stream is answered in order)."""
    which = seq.WhichOneof("strategy_choice")
    if which is None:
        return None, None
    strategy = getattr(seq, which)
    micros = strategy.max_queue_delay_microseconds
    delay = micros / 1e6 if micros else None
    caps = []
    if which == "oldest" and strategy.preferred_batch_size:
        if min(strategy.preferred_batch_size) < 1:
            raise ConfigError(f"{path}: sequence_batching.oldest.preferred_batch_size must be >= 1")
        caps.append(max(strategy.preferred_batch_size))
    if which == "oldest" and strategy.max_candidate_sequences:
        caps.append(strategy.max_candidate_sequences)
    return delay, min(caps) if caps else None


def _instance_kind(config: mc.ModelConfig, path: Path) -> str:
    kind_name = mc.ModelInstanceGroup.Kind.Name
    kinds = {kind_name(g.kind) for g in config.instance_group}
    if "KIND_MODEL" in kinds:
        raise ConfigError(f"{path}: instance_group kind KIND_MODEL is not supported")
    if len(kinds) > 1:
        raise ConfigError(f"{path}: instance_group kinds {sorted(kinds)}: use one kind")
    return kinds.pop() if kinds else "KIND_AUTO"


class TritonConfigReader:
    """The engine's ConfigReader: config.pbtxt files parsed with tritonclient's messages."""

    def load(self, model_dir: Path) -> TritonModel:
        return load_triton_config(model_dir)

    def served_versions(self, model_dir: Path, versions: list[int]) -> list[int]:
        return served_versions(model_dir, versions)
