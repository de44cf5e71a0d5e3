"""ModelInfer over the engine: whole-batch requests (Classify) and sequence requests (sessions).

Without a sequence_id, a batch [N, ...] is N independent whole sequences, run on the Classify
lane from zero states. With one, the request is one chunk [1, T, ...] of that sequence's
session (service/triton/sequences.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service import principal
from service.engine.core import Engine
from service.engine.inputs import tokens_from_stream, tokens_held
from service.engine.sessions import Session
from service.engine.textstream import NOTHING_HELD, HeldChange, HeldText
from service.engine.types import StepResult, StreamOptions
from service.engine.worker import ModelWorker
from service.errors import InvalidInput, SessionNotFound
from service.triton.infer_io import (
    decode_chunk,
    decode_sequences,
    encode_outputs,
    step_probs_wanted,
    wanted_outputs,
)
from service.triton.modelconfig import tensor_names
from service.triton.sequences import Entry, SequenceParams, SequenceTable, gone, not_started
from service.triton.types import InferRequest, InferResponse, TritonError, invalid


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
    """Runs infer requests on the engine; the sequences' table is its own."""

    def __init__(self, engine: Engine, limits: InferLimits) -> None:
        self.engine = engine
        self.limits = limits
        self.sequences = SequenceTable()

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
        """One chunk of a sequence, in the sequence's arrival order."""
        assert params.key is not None
        table = self.sequences
        key = (principal.current(), request.model, params.key)
        entry = table.enter(key)  # before any await: FIFO order
        try:
            async with entry.lock:
                return await self._locked(request, params, version, entry)
        finally:
            table.leave(key, entry)

    async def _locked(
        self, request: InferRequest, params: SequenceParams, version: int, entry: Entry
    ) -> tuple[InferResponse, ModelWorker]:
        engine, model = self.engine, request.model
        session = await self._current(entry, params, model)
        if session is not None and version and session.model.version != version:
            raise invalid(f"{params.name(model)} runs on version "
                          f"{session.model.version}, not {version}")  # fmt: skip
        restart = params.start and not self._is_resend(session, params)
        if session is None and not restart:
            raise not_started(params, model)
        if restart:
            worker = engine.classify_model(model, version)
            if not worker.description.streamable:
                raise TritonError("FAILED_PRECONDITION", (
                    f"model {worker.key} is bidirectional: it has no sequence batching (see its "
                    "ModelConfig); send each whole sequence without a sequence_id"
                ))  # fmt: skip
        else:
            assert session is not None
            worker = session.model
        names = tensor_names(worker)
        wanted = wanted_outputs(request, names, worker.description.num_classes)
        chunk = decode_chunk(request, names, worker.description, self.limits.max_chunk_steps)
        if restart:  # checked before the old sequence ends: a bad request changes nothing
            self._steps(worker, chunk, NOTHING_HELD)
            if session is not None:  # a restart: the old sequence ends here
                await engine.end(session)
                entry.session_id = None
            session = await engine.open_session(model, version, StreamOptions())
            entry.session_id = session.id
            self.sequences.started(lambda sid: sid in engine.store)
        assert session is not None
        worker = session.model
        every = step_probs_wanted(wanted)
        if session.options.every_step != every:
            session.options = StreamOptions(every_step=every, top_k=session.options.top_k)
        steps, held = self._steps(worker, chunk, session.held)
        seq = params.seq if params.seq is not None else session.last_seq + 1
        outcome = await engine.apply_chunk(session, seq, steps, held)
        result = outcome.result
        if result is None:
            raise TritonError("ALREADY_EXISTS", (
                f"lstm_serve_seq {seq} of {params.name(model)} was applied already "
                f"(last applied: {session.last_seq}); only the last one's result is kept"
            ))  # fmt: skip
        extra = {"lstm_serve_seq": seq, "lstm_serve_total_steps": outcome.total_steps,
                 "lstm_serve_duplicate": outcome.duplicate,
                 "lstm_serve_held_characters": outcome.held_characters}  # fmt: skip
        if params.end:
            result = await self._end(session, result)
            extra["lstm_serve_total_steps"] = result.total_steps
            extra["lstm_serve_held_characters"] = 0
            entry.session_id = None
        outputs = encode_outputs(wanted, [result], worker.description)
        reply = InferResponse(worker.name, str(worker.version), request.id, outputs, extra)
        return reply, worker

    def _steps(
        self, worker: ModelWorker, chunk: np.ndarray | str, before: HeldText
    ) -> tuple[np.ndarray, HeldChange | None]:
        """A chunk's steps; text after the text the sequence holds back (which may change)."""
        if not isinstance(chunk, str):
            return chunk, None
        try:
            desc, limit = worker.description, self.limits.max_chunk_steps
            ids, after = tokens_from_stream(desc, before, chunk, limit, "input 'text'")
        except InvalidInput as exc:
            raise invalid(str(exc)) from exc
        return ids, HeldChange(before, after)

    async def _end(self, session: Session, result: StepResult) -> StepResult:
        """END: the held-back text is fed, then the session is freed; the reply covers both."""
        flush = tokens_held(session.model.description, session.held)
        final = await self.engine.end(session, flush)
        if not len(flush) or final is None:
            return result
        every = result.step_probs
        if every is not None and final.step_probs is not None:
            every = np.concatenate([every, final.step_probs])
        return StepResult(final.probs, every, result.steps + final.steps, final.total_steps)

    def _is_resend(self, session: Session | None, params: SequenceParams) -> bool:
        """A START resent with an lstm_serve_seq already applied: not a restart."""
        return session is not None and params.seq is not None and params.seq <= session.last_seq

    async def _current(self, entry: Entry, params: SequenceParams, model: str) -> Session | None:
        """The sequence's live session; None if it has none (START opens one)."""
        if entry.session_id is None:
            return None
        try:
            return await self.engine.find_session(entry.session_id, local_first=True)
        except SessionNotFound as exc:
            entry.session_id = None
            if params.start:
                return None
            raise gone(params, model, exc) from exc
