"""The architecture description shared by the PyTorch model, the exporter and the verifier.

This module imports neither torch nor onnx so that it can describe a model anywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

CellKind = Literal["rnn", "gru", "lstm", "jordan"]
InputKind = Literal["tokens", "features"]

CELLS: tuple[str, ...] = ("rnn", "gru", "lstm", "jordan")
# Number of stacked gate blocks in the input / recurrent weight matrices of each cell.
GATES: dict[str, int] = {"rnn": 1, "gru": 3, "lstm": 4, "jordan": 1}


@dataclass(frozen=True)
class ArchConfig:
    """Everything needed to rebuild a recurrent classifier with the same parameter shapes."""

    cell: CellKind
    hidden_size: int
    num_classes: int
    input_kind: InputKind
    num_layers: int = 1
    bidirectional: bool = False
    peephole: bool = False
    cifg: bool = False
    forget_bias: float = 1.0
    vocab_size: int = 0
    embedding_dim: int = 0
    feature_dim: int = 0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.input_kind not in ("tokens", "features"):
            raise ValueError(f"input_kind must be 'tokens' or 'features', got {self.input_kind!r}")
        if (self.peephole or self.cifg) and self.cell != "lstm":
            raise ValueError(f"peephole / cifg are LSTM options, not valid for cell={self.cell!r}")
        if self.cell == "jordan" and (self.num_layers != 1 or self.bidirectional):
            raise ValueError("a Jordan network (cell='jordan') has one forward layer")
        if self.hidden_size < 1 or self.num_layers < 1 or self.num_classes < 2:
            raise ValueError("hidden_size and num_layers must be >= 1 and num_classes >= 2")
        if self.input_kind == "tokens" and (self.vocab_size < 1 or self.embedding_dim < 1):
            raise ValueError("token models need vocab_size >= 1 and embedding_dim >= 1")
        if self.input_kind == "features" and self.feature_dim < 1:
            raise ValueError("feature models need feature_dim >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def state_kinds(self) -> tuple[str, ...]:
        """The state vectors one layer-direction carries: h (and c for an LSTM); a Jordan network
        carries its previous output y (the class probabilities) instead of h."""
        if self.cell == "jordan":
            return ("y",)
        return ("h", "c") if self.cell == "lstm" else ("h",)

    @property
    def state_width(self) -> int:
        """H of the served state [B, S, H]: hidden_size, or num_classes for a Jordan network."""
        return self.num_classes if self.cell == "jordan" else self.hidden_size

    @property
    def state_rows(self) -> int:
        """S: the number of H-wide vectors in one session's state."""
        return self.num_layers * self.directions * len(self.state_kinds)

    @property
    def input_size(self) -> int:
        return self.embedding_dim if self.input_kind == "tokens" else self.feature_dim

    def state_row_names(self) -> list[str]:
        """What each of the S rows holds, in order: per layer, per kind (h, c), per direction."""
        dirs = ("fwd", "bwd")[: self.directions]
        return [
            f"layer{layer}.{d}.{kind}"
            for layer in range(self.num_layers)
            for kind in self.state_kinds
            for d in dirs
        ]

    def state_slice(self, layer: int, kind: str) -> tuple[int, int]:
        """The [start, end) rows of `state` that hold `kind` ('h' or 'c') for all directions."""
        per_layer = self.directions * len(self.state_kinds)
        start = layer * per_layer + self.state_kinds.index(kind) * self.directions
        return start, start + self.directions

    @property
    def streamable(self) -> bool:
        """A bidirectional model needs the whole sequence, so it cannot be fed chunk by chunk."""
        return not self.bidirectional

    @property
    def cuda_fallback_reasons(self) -> list[str]:
        """Why onnxruntime's CUDA provider would run this model's recurrent nodes on the CPU."""
        reasons = []
        if self.peephole:
            reasons.append("LSTM input P (peepholes) is not implemented by the CUDA provider")
        if self.cifg:
            reasons.append("LSTM input_forget=1 (CIFG) is not implemented by the CUDA provider")
        return reasons

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})
