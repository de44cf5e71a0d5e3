"""The peers' model code: the bench ONNX model on onnxruntime, recurrent state kept per sequence.

Shipped as-is into the TorchServe archive and the Triton Python backend model directory (both
import it from their model directory), so the peers run the same model file on the same runtime
as lstm-serve, one batched onnxruntime call per batch the peer's sequence batcher hands over.
Needs numpy and onnxruntime only.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import onnxruntime as ort


class SequenceStates:
    """An onnxruntime session and the state of every live sequence, keyed by its id.

    `step` runs one batch: each entry is one request of one sequence (a sequence batcher never
    puts two requests of one sequence in a batch). A start (or an id not seen) begins from zeros;
    an end drops the state; past `max_sequences` the least recently used state is dropped.
    """

    def __init__(self, model_path: str, threads: int = 2, max_sequences: int = 4096) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.state_shape = tuple(int(d) for d in inputs["state"].shape[1:])
        self.max_sequences = max_sequences
        self.states: OrderedDict[str, np.ndarray] = OrderedDict()

    def step(
        self, keys: list[str], tokens: list[np.ndarray], starts: list[bool], ends: list[bool]
    ) -> np.ndarray:
        """Probabilities (B, classes) for one batch of (sequence id, 1-D token ids) requests."""
        lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        padded = np.zeros((len(tokens), int(lengths.max())), dtype=np.int64)
        for i, ids in enumerate(tokens):
            padded[i, : len(ids)] = ids
        state = np.zeros((len(keys), *self.state_shape), dtype=np.float32)
        for i, (key, start) in enumerate(zip(keys, starts, strict=True)):
            kept = None if start else self.states.get(key)
            if kept is not None:
                state[i] = kept
        probs, state_out = self.session.run(
            ["probs", "state_out"], {"tokens": padded, "lengths": lengths, "state": state}
        )
        for i, (key, end) in enumerate(zip(keys, ends, strict=True)):
            if end:
                self.states.pop(key, None)
                continue
            self.states[key] = state_out[i]
            self.states.move_to_end(key)
        while len(self.states) > self.max_sequences:
            self.states.popitem(last=False)
        return np.asarray(probs)
