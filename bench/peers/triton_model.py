"""Triton Python backend model (copied as MODEL/1/model.py beside lstm_states.py, model.onnx).

The sequence batcher (direct strategy) hands over up to max_batch_size requests, one per
sequence slot, each with the START / END control inputs and its correlation id; the whole batch
is one onnxruntime call (SequenceStates), the state kept here keyed by correlation id.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
# numpy and onnxruntime come from the bench's own environment (the onnxruntime lstm-serve runs on):
# the stub's embedded interpreter does not see PYTHONPATH, so the bench writes the path beside us
with open(os.path.join(HERE, "site_packages.txt")) as listing:
    sys.path[0:0] = [HERE, *(p for p in listing.read().split(":") if p.strip())]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        from lstm_states import SequenceStates

        self.classes = int(config["output"][0]["dims"][0])
        self.states = SequenceStates(
            os.path.join(HERE, "model.onnx"), threads=int(params.get("intra_op_threads", "2"))
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        """One onnxruntime call for the batch's live slots; the direct strategy fills empty
        slots below the highest busy one with null requests (READY 0), answered with zeros."""
        keys, tokens, starts, ends, live = [], [], [], [], []
        for i, request in enumerate(requests):
            if not self._flag(request, "READY"):
                continue
            live.append(i)
            keys.append(str(request.correlation_id()))
            ids = pb_utils.get_input_tensor_by_name(request, "tokens").as_numpy()
            tokens.append(ids.reshape(-1).astype("int64"))
            starts.append(self._flag(request, "START"))
            ends.append(self._flag(request, "END"))
        probs = np.zeros((len(requests), self.classes), dtype=np.float32)
        if live:
            probs[live] = self.states.step(keys, tokens, starts, ends)
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("probs", probs[i : i + 1])])
            for i in range(len(requests))
        ]

    @staticmethod
    def _flag(request: Any, name: str) -> bool:
        return bool(pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0])
