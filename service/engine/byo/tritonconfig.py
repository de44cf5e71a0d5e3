"""What a Triton `config.pbtxt` beside a user's own recurrent ONNX model says, read into plain
dataclasses (`TritonModel`), and the seam the engine reads configs through (`ConfigReader`).

The config is Triton's ModelConfig in protobuf text format; the engine imports no protobuf, so
the parsing lives in service/tritonconfig.py (given to the engine by the composition root as
`RuntimeOptions.model_configs`). What the config says is checked against the ONNX graph in
service/engine/byo/binding.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from service.errors import ConfigError

CONFIG_FILE = "config.pbtxt"


class ConfigReader(Protocol):
    """Reads a model folder's config.pbtxt (service/tritonconfig.py)."""

    def load(self, model_dir: Path) -> TritonModel:
        """The config; ConfigError naming the field for anything not served."""
        ...

    def served_versions(self, model_dir: Path, versions: list[int]) -> list[int]:
        """The versions its version_policy serves (all of them without a config)."""
        ...


# parameters { key: ... } that lstm-serve reads (every other key is refused).
PARAMETERS = {
    "output_kind": "probs, log_probs or logits: what the class outputs are (default: inferred "
    "from the graph, service/engine/byo/inferred.py)",
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

    config: object  # the parsed ModelConfig message, opaque here (the Triton front reads it)
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
    def output_kind(self) -> str | None:
        """parameters output_kind, or None: the graph says (service/engine/byo/inferred.py)."""
        return self.parameters.get("output_kind")

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
