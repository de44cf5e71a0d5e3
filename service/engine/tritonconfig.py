"""A Triton `config.pbtxt` beside a user's own recurrent ONNX model: parse, refuse, read.

`REPO/NAME/config.pbtxt` (Triton's ModelConfig in protobuf text format, parsed into tritonclient's
generated `model_config_pb2.ModelConfig`) describes `REPO/NAME/VERSION/model.onnx`. Only a subset
of the message is served (SUPPORTED); every other field that is set is refused by name, so that
nothing in a config is silently ignored. What the config says is checked against the ONNX graph
in service/engine/generic.py; this module reads the config alone (and its label file).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.errors import ConfigError

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as mc

CONFIG_FILE = "config.pbtxt"

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
    "inference.ModelSequenceBatching.State": frozenset(
        {"input_name", "output_name", "data_type", "dims", "initial_state"}
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

# parameters { key: ... } that lstm-serve reads (every other key is refused).
PARAMETERS = {
    "output_kind": "logits (softmax applied, the default) or probs",
    "state_batch_axis": "the batch axis of every state tensor in the ONNX graph",
    "lengths_input": "the ONNX input that takes each row's valid steps (int64)",
    "vocab_size": "token ids accepted: 0 .. vocab_size - 1",
    "vocab_filename": "a file beside config.pbtxt, one character per line (line i = token id "
    "i, line 0 the unknown character): text in, as for the shipped models",
    "lowercase": "true: text is lowercased before the vocab_filename lookup (default false)",
}

DTYPES: dict[str, np.dtype] = {
    "TYPE_BOOL": np.dtype(np.bool_),
    "TYPE_INT32": np.dtype(np.int32),
    "TYPE_INT64": np.dtype(np.int64),
    "TYPE_UINT32": np.dtype(np.uint32),
    "TYPE_UINT64": np.dtype(np.uint64),
    "TYPE_FP16": np.dtype(np.float16),
    "TYPE_FP32": np.dtype(np.float32),
}
CONTROL_KINDS = {
    "CONTROL_SEQUENCE_START": "START",
    "CONTROL_SEQUENCE_END": "END",
    "CONTROL_SEQUENCE_READY": "READY",
    "CONTROL_SEQUENCE_CORRID": "CORRID",
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


def model_config_pb2() -> Any:
    """tritonclient's generated model_config_pb2, imported when a config is read (the engine
    imports no protobuf or grpc module by itself)."""
    from tritonclient.grpc import model_config_pb2 as mc

    return mc


def parse_config(text: str, where: str) -> mc.ModelConfig:
    """config.pbtxt text -> ModelConfig; ConfigError naming the file and the parse error."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, model_config_pb2().ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{where}: not a Triton ModelConfig: {exc}") from exc


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor: fed as `input_name`, read back from `output_name`."""

    input_name: str
    output_name: str
    dtype: np.dtype
    dims: tuple[int, ...]  # as the config gives them (without the batch axis when batching)


@dataclass(frozen=True)
class ControlSpec:
    """A sequence control input (START / END / READY) and its false / true values."""

    name: str
    kind: str
    dtype: np.dtype
    false_true: tuple[float, float]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int, ...]  # as clients see it (Triton's dims)
    label_filename: str = ""
    reshape: tuple[int, ...] | None = None  # as the graph takes it, when the config reshapes

    @property
    def graph_dims(self) -> tuple[int, ...]:
        return self.dims if self.reshape is None else self.reshape


@dataclass(frozen=True)
class TritonModel:
    """What lstm-serve reads from one config.pbtxt (before checking it against the ONNX file)."""

    config: mc.ModelConfig
    path: Path  # the config.pbtxt
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    states: tuple[StateSpec, ...]
    controls: tuple[ControlSpec, ...]
    parameters: dict[str, str]
    idle_timeout_s: float | None
    queue_delay_s: float | None
    batch_cap: int | None  # oldest: the largest preferred_batch_size, max_candidate_sequences
    instance_kind: str  # KIND_AUTO, KIND_CPU or KIND_GPU
    instances: int  # instance_group counts summed: batches of this model run at once (0: unset)

    @property
    def output_kind(self) -> str:
        return self.parameters.get("output_kind", "logits")

    @property
    def state_inputs(self) -> frozenset[str]:
        return frozenset(s.input_name for s in self.states)

    def labels(self, output: TensorSpec, classes: int) -> tuple[str, ...]:
        """The output's labels (label_filename, one per line, beside config.pbtxt), or
        class_0 .. class_{C-1}; a file with another count of lines than C is refused."""
        if not output.label_filename:
            return tuple(f"class_{c}" for c in range(classes))
        file = self.path.parent / output.label_filename
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(
                f"{self.path}: output {output.name!r} label_filename "
                f"{output.label_filename!r}: cannot read {file}: {exc.strerror}"
            ) from exc
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) != classes:
            raise ConfigError(
                f"{file}: label_filename of output {output.name!r} has {len(lines)} lines, "
                f"the output has {classes} classes"
            )
        return tuple(line.strip() for line in lines)


def read_vocabulary(triton: TritonModel) -> tuple[tuple[str, ...], bool] | None:
    """parameters vocab_filename: (one character per line, lowercase), or None."""
    name = triton.parameters.get("vocab_filename")
    if not name:
        return None
    file = triton.path.parent / name
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"{triton.path}: parameters vocab_filename {name[:64]!r}: cannot read {file}: "
            f"{exc.strerror}"
        ) from exc
    vocab = tuple(text.replace("\r\n", "\n").split("\n"))
    if vocab and vocab[-1] == "":
        vocab = vocab[:-1]  # the last line's newline
    bad = [i for i, ch in enumerate(vocab) if len(ch) != 1 and i != 0]
    if bad or len(vocab) < 2:
        raise ConfigError(
            f"{file}: vocab_filename needs one character per line (line 1 may name the unknown "
            f"token); line {bad[0] + 1 if bad else len(vocab)} is not one character"
        )
    lowercase = triton.parameters.get("lowercase", "false").strip().lower()
    if lowercase not in ("true", "false"):
        raise ConfigError(f"{triton.path}: parameters lowercase {lowercase[:64]!r} is not "
                          "true or false")  # fmt: skip
    return vocab, lowercase == "true"


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
    if params.get("output_kind", "logits") not in ("logits", "probs"):
        raise ConfigError(
            f"{path}: parameters output_kind {params['output_kind']!r} is not logits or probs"
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
    types = model_config_pb2().DataType
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
    kind = model_config_pb2().ModelSequenceBatching.Control.Kind.Name(ctl.kind)
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
    kind_name = model_config_pb2().ModelInstanceGroup.Kind.Name
    kinds = {kind_name(g.kind) for g in config.instance_group}
    if "KIND_MODEL" in kinds:
        raise ConfigError(f"{path}: instance_group kind KIND_MODEL is not supported")
    if len(kinds) > 1:
        raise ConfigError(f"{path}: instance_group kinds {sorted(kinds)}: use one kind")
    return kinds.pop() if kinds else "KIND_AUTO"
