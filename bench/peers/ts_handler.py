"""TorchServe stateful handler (the archive's handler; lstm_states.py and model.onnx beside it).

With `sequenceBatching: true` TorchServe's frontend batches at most one request per sequence
(up to batchSize, waiting up to maxBatchDelay ms); every request carries its sequence id
(`ts_request_sequence_id`). The body is the step's token ids as little-endian int64; the reply is
the probabilities as JSON. The whole batch is one onnxruntime call (SequenceStates).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from lstm_states import SequenceStates

_states: SequenceStates | None = None
END_HEADER = "ts_request_sequence_end"


def _model(context: Any) -> SequenceStates:
    global _states
    if _states is None:
        model_dir = context.system_properties["model_dir"]
        handler = (context.model_yaml_config or {}).get("handler") or {}
        threads = int(handler.get("intra_op_threads", 2))
        _states = SequenceStates(os.path.join(model_dir, "model.onnx"), threads=threads)
    return _states


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[str] | None:
    states = _model(context)
    if data is None:  # the load-time call
        return None
    keys, tokens, starts, ends = [], [], [], []
    for idx, row in enumerate(data):
        body = row.get("data") or row.get("body") or b""
        keys.append(str(context.get_sequence_id(idx)))
        tokens.append(np.frombuffer(bytes(body), dtype="<i8").astype(np.int64))
        starts.append(False)  # a sequence id not seen yet starts from zeros
        end = context.get_request_header(idx, END_HEADER)
        ends.append(str(end).lower() == "true")
    probs = states.step(keys, tokens, starts, ends)
    return [json.dumps(p.tolist()) for p in probs]
