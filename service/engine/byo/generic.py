"""A user's own recurrent ONNX model, described by a Triton config.pbtxt, behind ModelRuntime.

`GenericRuntime` presents the engine's interface (`run(inputs, lengths, state) -> RunOutput`, a
ModelDescription) for any graph the config describes: one data input (tokens [B, T] or features
[B, T, F]), an optional lengths input, any number of state tensors (each its own shape, float32
or float16, the batch on any axis), START / END / READY / CORRID controls, a per-step
[B, T, C] and / or a final [B, C] output of probabilities, log-probabilities or logits, returned
as the model computed them (the description's `output_kind` says which: StepResult.probs
converts for the native API, the Triton API returns them as they are). The engine keeps one flat
float32 row per session (the StateLayout packs and unpacks it), so snapshots, the Redis store,
resume and StreamMulti work unchanged.

How a chunk is run:
  * a lengths input and a per-step output with a free time axis: one run, as for our models;
  * otherwise rows are grouped by length (padding would run into their state), and each group
    is run in windows: the fixed time dimension, 1 step for a model with a final output only
    (so every step has its probabilities), or the whole chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.engine.byo.binding import BoundState, bind
from service.engine.byo.tritonconfig import TritonModel
from service.engine.compute.runtime import SHRINK, ModelRuntime, RunOutput, open_session
from service.errors import InvalidInput


class StateLayout:
    """Packs a session's state tensors into one flat float32 row (S, H) and back."""

    def __init__(self, states: tuple[BoundState, ...]) -> None:
        self.states = states
        self.total = sum(s.size for s in states)
        lasts = {s.shape[-1] if s.shape else 1 for s in states}
        hidden = lasts.pop() if len(lasts) == 1 else self.total
        self.hidden = hidden
        self.rows = self.total // hidden
        self.row_names = tuple(self._row_names()) if self.rows > 1 else ("state",)

    def _row_names(self) -> list[str]:
        names = []
        for s in self.states:
            for index in np.ndindex(*s.shape[:-1]):
                names.append(s.spec.input_name + "".join(f"[{i}]" for i in index))
        return names

    def unpack(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """(B, S, H) float32 -> {input name: the tensor as the graph takes it}."""
        batch = flat.shape[0]
        rows = flat.reshape(batch, self.total)
        feeds, start = {}, 0
        for s in self.states:
            part = rows[:, start : start + s.size].reshape(batch, *s.shape)
            if s.batch_axis:
                part = np.moveaxis(part, 0, s.batch_axis)
            feeds[s.spec.input_name] = np.ascontiguousarray(part, dtype=s.spec.dtype)
            start += s.size
        return feeds

    def pack(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """{output name: tensor} -> (B, S, H) float32."""
        parts = []
        for s in self.states:
            value = outputs[s.spec.output_name]
            if s.batch_axis:
                value = np.moveaxis(value, s.batch_axis, 0)
            parts.append(value.reshape(value.shape[0], s.size).astype(np.float32, copy=False))
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)  # (B, S * H)
        return flat.reshape(flat.shape[0], self.rows, self.hidden)


@dataclass(frozen=True)
class RowMarks:
    """Per row of a run: whether its sequence starts here (its state is the zero initial
    state: a new or reset session) and its correlation id (from its session id)."""

    fresh: np.ndarray  # (B,) bool
    corrid: np.ndarray  # (B,) uint64

    @classmethod
    def of(cls, state: np.ndarray, ids: Sequence[str] | None) -> RowMarks:
        fresh = ~state.reshape(state.shape[0], -1).any(axis=1)
        if ids is None:  # Classify: no sessions, the rows are numbered
            corrid = np.arange(1, state.shape[0] + 1, dtype=np.uint64)
        else:
            corrid = np.array([correlation_id(i) for i in ids], dtype=np.uint64)
        return cls(fresh, corrid)

    def subset(self, rows: np.ndarray) -> RowMarks:
        return self if not self.fresh.size else RowMarks(self.fresh[rows], self.corrid[rows])

    def going_on(self) -> RowMarks:
        """The same rows in a later window of the chunk: no longer at their start."""
        return self if not self.fresh.size else RowMarks(np.zeros_like(self.fresh), self.corrid)


HEX = frozenset("0123456789abcdefABCDEF")
NO_MARKS = RowMarks(np.zeros(0, bool), np.zeros(0, np.uint64))  # a model without controls


def correlation_id(session_id: str) -> int:
    """A session's CORRID: the first 63 bits of its (hex) id, the same on every replica and
    after a resume; 1 + a hash for an id that is not hex."""
    head = session_id[:16]
    if head and all(c in HEX for c in head):
        return int(head, 16) >> 1 or 1
    return 1 + (int.from_bytes(session_id.encode()[:8].ljust(8, b"\0"), "big") >> 2)


def _floats(values: np.ndarray) -> np.ndarray:
    """A class output as the model computed it, as float32 (a float16 output widened)."""
    return values.astype(np.float32, copy=False)


class GenericRuntime(ModelRuntime):
    """A config.pbtxt model behind the engine's ModelRuntime interface."""

    def __init__(self, path: Path, triton: TritonModel, providers: tuple[str, ...],
                 intra_op_threads: int = 0, inter_op_threads: int = 0) -> None:  # fmt: skip
        self.session = open_session(path, providers, intra_op_threads, inter_op_threads)
        self.triton = triton
        self.providers = tuple(self.session.get_providers())
        self.provider = self.providers[0]
        self.binding = bind(triton, self.session, path)
        self.layout = StateLayout(self.binding.states)
        # Batches of one length: without a lengths input (padding would run into the state),
        # or with a fixed time window (a chunk of a length it does not take fails alone).
        self.equal_lengths = self.binding.lengths is None or self.binding.window is not None
        name, version = path.parent.parent.name, int(path.parent.name)
        self.description = self.binding.describe(
            name, version, self.layout.rows, self.layout.hidden, self.layout.row_names
        )

    def run(self, inputs: np.ndarray, lengths: np.ndarray, state: np.ndarray,
            shrink: bool = False, ids: Sequence[str] | None = None,
            steps: bool = True) -> RunOutput:  # fmt: skip
        """inputs (B, T[, F]), lengths (B,), state (B, S, H) float32, as for our models; `ids`
        the rows' session ids (a CORRID control input gets a number from each). The per-step
        probabilities come whatever `steps` says (a windowed model computes them anyway)."""
        cap = self.triton.max_batch_size
        if cap and inputs.shape[0] > cap:  # a Classify request of more rows than the model takes
            return self._in_blocks(inputs, lengths, state, shrink, ids, cap)
        b = self.binding
        marks = RowMarks.of(state, ids) if b.controls else NO_MARKS
        if b.lengths is not None and b.step_output and b.window is None:
            return self._one_run(inputs, lengths, state, marks, shrink)
        batch, longest = inputs.shape[:2]
        classes = self.description.num_classes
        step_probs = np.zeros((batch, longest, classes), np.float32)  # (B, T, C)
        probs = np.zeros((batch, classes), np.float32)  # (B, C)
        state_out = np.zeros_like(state)  # (B, S, H)
        for length in np.unique(lengths):
            rows = np.flatnonzero(lengths == length)
            n = int(length)
            steps, final, st = self._group(inputs[rows, :n], state[rows], marks.subset(rows),
                                           shrink)  # fmt: skip
            step_probs[rows, :n], probs[rows], state_out[rows] = steps, final, st
        return RunOutput(step_probs=step_probs, probs=probs, state_out=state_out)

    def _in_blocks(self, inputs: np.ndarray, lengths: np.ndarray, state: np.ndarray,
                   shrink: bool, ids: Sequence[str] | None, cap: int) -> RunOutput:  # fmt: skip
        """Rows in blocks of at most max_batch_size, one run() each."""
        outs = [
            self.run(inputs[r : r + cap], lengths[r : r + cap], state[r : r + cap], shrink,
                     None if ids is None else ids[r : r + cap])
            for r in range(0, inputs.shape[0], cap)
        ]  # fmt: skip
        return RunOutput(
            step_probs=np.concatenate([o.step_probs for o in outs]),
            probs=np.concatenate([o.probs for o in outs]),
            state_out=np.concatenate([o.state_out for o in outs]),
        )

    def _one_run(self, inputs: np.ndarray, lengths: np.ndarray, state: np.ndarray,
                 marks: RowMarks, shrink: bool) -> RunOutput:  # fmt: skip
        steps, final, state_out = self._call(inputs, lengths, state, marks, shrink)
        assert steps is not None
        if final is None:
            final = steps[np.arange(steps.shape[0]), lengths - 1]
        return RunOutput(step_probs=steps, probs=final, state_out=state_out)

    def _group(self, inputs: np.ndarray, state: np.ndarray, marks: RowMarks,
               shrink: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """Rows of one length, run window by window, each carrying the state on."""
        length = inputs.shape[1]
        window = self.binding.window or (length if self.binding.step_output else 1)
        if length % window:
            raise InvalidInput(
                f"model {self.description.name} has a fixed time dimension of {window} steps: "
                f"a chunk of {length} steps is not a multiple of it"
            )
        parts, final = [], None
        lengths = np.full(inputs.shape[0], window, np.int64)
        for start in range(0, length, window):
            now = marks if start == 0 else marks.going_on()
            steps, final, state = self._call(inputs[:, start : start + window], lengths, state,
                                             now, shrink)  # fmt: skip
            if steps is None:
                assert final is not None
                steps = final[:, None]  # (G, 1, C): a one-step window
            parts.append(steps)
        if final is None:
            final = parts[-1][:, -1]
        return np.concatenate(parts, axis=1), final, state

    def _call(self, inputs: np.ndarray, lengths: np.ndarray, state: np.ndarray,
              marks: RowMarks, shrink: bool,
              ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:  # fmt: skip
        """One onnxruntime run: (step probs (B, T, C) | None, probs (B, C) | None, state)."""
        b = self.binding
        feeds = {b.data.name: np.ascontiguousarray(inputs, dtype=b.data.dtype)}
        if b.lengths is not None:
            feeds[b.lengths.name] = lengths.reshape(-1, *b.lengths_tail).astype(
                b.lengths.dtype, copy=False
            )
        feeds.update(self.layout.unpack(state))
        feeds.update(b.control_feeds(marks.fresh, marks.corrid))
        names = [s.spec.output_name for s in b.states]
        heads = [o.name for o in (b.step_output, b.final_output) if o is not None]
        values = self.session.run(heads + names, feeds, SHRINK if shrink else None)
        results = dict(zip(heads + names, values, strict=True))
        state_out = self.layout.pack(results)
        steps = _floats(results[b.step_output.name]) if b.step_output else None
        final = _floats(results[b.final_output.name]) if b.final_output else None
        return steps, final, state_out

    def warm_up(self) -> None:
        desc = self.description
        steps = self.binding.window or 1
        if desc.input_kind == "tokens":
            inputs = np.zeros((1, steps), dtype=np.int64)  # (B, T)
        else:
            inputs = np.zeros((1, steps, desc.feature_dim), dtype=np.float32)  # (B, T, F)
        state = np.zeros((1, desc.state_rows, desc.hidden_size), dtype=np.float32)  # (B, S, H)
        self.run(inputs, np.full(1, steps, dtype=np.int64), state)


__all__ = ["GenericRuntime", "StateLayout"]
