"""The model description: the v1 contract between the exporter and the service.

The exporter writes it as JSON into the ONNX file's metadata (key `DESCRIPTION_KEY`), so the
weights and their description can never drift apart. The service reads it back with
onnxruntime alone (`InferenceSession.get_modelmeta().custom_metadata_map`).

This module imports neither torch nor grpc.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from typing import Any

DESCRIPTION_KEY = "lstm_serve.description"
CONTRACT_VERSION = "lstm-serve/v1"

# Graph input and output names of the v1 contract.
INPUT_TOKENS = "tokens"  # int64 [B, T]
INPUT_FEATURES = "features"  # float32 [B, T, F]
INPUT_LENGTHS = "lengths"  # int64 [B], 1 <= lengths[b] <= T
INPUT_STATE = "state"  # float32 [B, S, H], zeros = fresh session
OUTPUT_STEP_PROBS = "step_probs"  # float32 [B, T, C]
OUTPUT_PROBS = "probs"  # float32 [B, C], after each row's last valid step
OUTPUT_STATE = "state_out"  # float32 [B, S, H], after each row's last valid step

# What a model's class outputs are (ModelDescription.output_kind): probabilities as they are,
# log-probabilities (exp gives the probabilities) or logits (softmax gives them).
KIND_PROBS, KIND_LOG_PROBS, KIND_LOGITS = "probs", "log_probs", "logits"
OUTPUT_KINDS = (KIND_PROBS, KIND_LOG_PROBS, KIND_LOGITS)
CONTRACT_OUTPUT_RULE = "lstm-serve contract v1: probs and step_probs are probabilities"


class DescriptionError(ValueError):
    """A model description is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Tokenizer:
    """Text -> token ids, one id per character after normalisation; unknown characters map to
    `unknown_id` (index 0 of `vocab` by convention)."""

    vocab: tuple[str, ...]
    lowercase: bool = True
    unknown_id: int = 0
    normalization: str = "NFC"
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        index = {ch: i for i, ch in enumerate(self.vocab) if i != self.unknown_id}
        object.__setattr__(self, "_index", index)

    def normalize(self, text: str) -> str:
        text = unicodedata.normalize(self.normalization, text)
        return text.lower() if self.lowercase else text

    def encode(self, text: str) -> list[int]:
        return self.encode_normalized(self.normalize(text))

    def encode_normalized(self, normalized: str) -> list[int]:
        """Ids of text already normalised (one per character)."""
        index, unknown = self._index, self.unknown_id
        return [index.get(ch, unknown) for ch in normalized]

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "chars",
            "vocab": list(self.vocab),
            "lowercase": self.lowercase,
            "unknown_id": self.unknown_id,
            "normalization": self.normalization,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tokenizer:
        if data.get("type", "chars") != "chars":
            raise DescriptionError(f"tokenizer.type {data.get('type')!r} is not supported")
        return cls(
            vocab=tuple(data["vocab"]),
            lowercase=bool(data.get("lowercase", True)),
            unknown_id=int(data.get("unknown_id", 0)),
            normalization=str(data.get("normalization", "NFC")),
        )


@dataclass(frozen=True)
class ModelDescription:
    """What the service needs to know about one model version, and what it tells clients."""

    name: str
    version: int
    labels: tuple[str, ...]
    input_kind: str  # "tokens" or "features"
    state_rows: int  # S
    hidden_size: int  # H
    state_row_names: tuple[str, ...]
    streamable: bool
    architecture: dict[str, Any]
    vocab_size: int = 0
    feature_dim: int = 0
    tokenizer: Tokenizer | None = None
    cuda: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    contract: str = CONTRACT_VERSION
    # What the class outputs are, and the rule that says so (a config.pbtxt model's is
    # inferred from its graph or set in its config: service/engine/byo/inferred.py).
    output_kind: str = KIND_PROBS
    output_kind_rule: str = CONTRACT_OUTPUT_RULE

    def __post_init__(self) -> None:
        if self.contract != CONTRACT_VERSION:
            raise DescriptionError(f"contract {self.contract!r} is not {CONTRACT_VERSION!r}")
        if self.input_kind not in ("tokens", "features"):
            raise DescriptionError(f"input_kind {self.input_kind!r} is not tokens or features")
        if self.input_kind == "tokens" and self.vocab_size < 1:
            raise DescriptionError("a token model needs vocab_size >= 1")
        if self.input_kind == "features" and self.feature_dim < 1:
            raise DescriptionError("a feature model needs feature_dim >= 1")
        if len(self.state_row_names) != self.state_rows:
            raise DescriptionError(
                f"state_row_names has {len(self.state_row_names)} entries, S is {self.state_rows}"
            )
        if len(self.labels) < 2:
            raise DescriptionError("a classifier needs at least two labels")
        if self.output_kind not in OUTPUT_KINDS:
            raise DescriptionError(
                f"output_kind {self.output_kind!r} is not one of {', '.join(OUTPUT_KINDS)}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_name(self) -> str:
        return INPUT_TOKENS if self.input_kind == "tokens" else INPUT_FEATURES

    @property
    def state_bytes(self) -> int:
        """Bytes of one session's float32 state block [S, H]."""
        return self.state_rows * self.hidden_size * 4

    def to_dict(self) -> dict[str, Any]:
        return {
            "contract": self.contract,
            "name": self.name,
            "version": self.version,
            "labels": list(self.labels),
            "input_kind": self.input_kind,
            "vocab_size": self.vocab_size,
            "feature_dim": self.feature_dim,
            "tokenizer": self.tokenizer.to_dict() if self.tokenizer else None,
            "state_rows": self.state_rows,
            "hidden_size": self.hidden_size,
            "state_row_names": list(self.state_row_names),
            "streamable": self.streamable,
            "architecture": self.architecture,
            "cuda": self.cuda,
            "training": self.training,
            "output_kind": self.output_kind,
            "output_kind_rule": self.output_kind_rule,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelDescription:
        try:
            tok = data.get("tokenizer")
            return cls(
                contract=str(data.get("contract", "")),
                name=str(data["name"]),
                version=int(data["version"]),
                labels=tuple(str(x) for x in data["labels"]),
                input_kind=str(data["input_kind"]),
                vocab_size=int(data.get("vocab_size", 0)),
                feature_dim=int(data.get("feature_dim", 0)),
                tokenizer=Tokenizer.from_dict(tok) if tok else None,
                state_rows=int(data["state_rows"]),
                hidden_size=int(data["hidden_size"]),
                state_row_names=tuple(data["state_row_names"]),
                streamable=bool(data["streamable"]),
                architecture=dict(data["architecture"]),
                cuda=dict(data.get("cuda") or {}),
                training=dict(data.get("training") or {}),
                output_kind=str(data.get("output_kind") or KIND_PROBS),
                output_kind_rule=str(data.get("output_kind_rule") or CONTRACT_OUTPUT_RULE),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DescriptionError):
                raise
            raise DescriptionError(f"malformed model description: {exc!r}") from exc

    @classmethod
    def from_json(cls, text: str) -> ModelDescription:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DescriptionError(f"model description is not JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> ModelDescription:
        """Read the description from ONNX metadata_props (as onnxruntime exposes them)."""
        if DESCRIPTION_KEY not in metadata:
            raise DescriptionError(f"ONNX metadata has no {DESCRIPTION_KEY!r} entry")
        return cls.from_json(metadata[DESCRIPTION_KEY])


def read_description(model_path: str) -> ModelDescription:
    """Read a model's description with onnxruntime only (no onnx, no torch)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    return ModelDescription.from_metadata(sess.get_modelmeta().custom_metadata_map)
