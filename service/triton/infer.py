"""ModelInfer over the engine: whole-batch requests (Classify) and sequence requests (sessions).

Without a sequence_id, a batch [N, ...] is N independent whole sequences, run on the Classify
lane from zero states. With one, the request is one chunk [1, T, ...] of that sequence's
session (service/protocol/sequences.py: the sequence rules live there, for every front).
"""

from __future__ import annotations

from dataclasses import dataclass

from service import principal
from service.engine.core import Engine
from service.engine.model.worker import ModelWorker
from service.protocol.sequences import SequenceRequest, Sequences
from service.triton.infer_io import (
    SequenceChunk,
    WantedOutput,
    decode_sequences,
    encode_outputs,
    step_probs_wanted,
    wanted_outputs,
)
from service.triton.modelconfig import tensor_names
from service.triton.sequences import SequenceParams
from service.triton.types import InferRequest, InferResponse, ParamValue, invalid


@dataclass(frozen=True)
class InferLimits:
    max_batch_size: int  # sequences per non-sequence request
    max_sequence_steps: int  # steps per whole sequence
    max_chunk_steps: int  # steps per sequence request


def parse_version(version: str) -> int:
    """ "" is the latest READY version; else a positive integer."""
    if version == "":
        return 0
    if not version.isdigit() or int(version) < 1:
        raise invalid(f"model_version {version[:64]!r} is not a positive integer")
    return int(version)


class Inference:
    """Runs infer requests: whole batches on the engine, sequences through the session layer."""

    def __init__(self, engine: Engine, sequences: Sequences, limits: InferLimits) -> None:
        self.engine = engine
        self.sequences = sequences
        self.limits = limits

    # -- whole sequences ---------------------------------------------------------------------

    async def run_batch(self, request: InferRequest, worker: ModelWorker) -> InferResponse:
        desc = worker.description
        names = tensor_names(worker)
        wanted = wanted_outputs(request, names, desc.num_classes)
        arrays = decode_sequences(request, names, desc, self.limits.max_sequence_steps,
                                  self.limits.max_batch_size)  # fmt: skip
        results = await self.engine.classify(worker, arrays, step_probs_wanted(wanted))
        outputs = encode_outputs(wanted, results, desc)
        return InferResponse(worker.name, str(worker.version), request.id, outputs)

    # -- sequences ---------------------------------------------------------------------------

    async def run_sequence(
        self, request: InferRequest, params: SequenceParams, version: int
    ) -> tuple[InferResponse, ModelWorker]:
        """One chunk of a sequence: a session of the session layer (service/protocol/sequences.py),
        found by any replica that shares the store and the key."""
        assert params.key is not None
        wanted: list[WantedOutput] = []

        def source(worker: ModelWorker) -> SequenceChunk:
            names, desc = tensor_names(worker), worker.description
            wanted[:] = wanted_outputs(request, names, desc.num_classes)
            return SequenceChunk(request, names, desc, self.limits.max_chunk_steps,
                                 step_probs_wanted(wanted))  # fmt: skip

        reply = await self.sequences.run(SequenceRequest(
            principal.current(), request.model, version, params.key, params.start, params.end,
            params.seq, params.decide,
        ), source)  # fmt: skip
        worker = reply.model
        extra: dict[str, ParamValue] = {
            "lstm_serve_seq": reply.seq, "lstm_serve_total_steps": reply.total_steps,
            "lstm_serve_duplicate": reply.duplicate,
            "lstm_serve_held_characters": reply.held_characters,
            "lstm_serve_rewound_steps": reply.result.rewound_steps,
        }  # fmt: skip
        decision = reply.result.decision
        if decision is not None:  # the reply in which the sequence's rule first held
            extra |= {
                "lstm_serve_decided_label": worker.description.labels[decision.label],
                "lstm_serve_decided_step": decision.step,
                "lstm_serve_decided_probability": decision.probability,
                "lstm_serve_sequence_ended": reply.ended,
            }  # fmt: skip
        outputs = encode_outputs(wanted, [reply.result], worker.description)
        return InferResponse(worker.name, str(worker.version), request.id, outputs, extra), worker
