"""Protobuf <-> numpy: request inputs to validated arrays, engine results to replies.

dtypes on the wire -> in the model: token ids int64 -> int64 (T,); frames float (float32) ->
float32 (T, F); probabilities float32 (C,) / (T, C) -> repeated float.
"""

from __future__ import annotations

import json

import numpy as np

from lstmserve.contract import ModelDescription
from lstmserve.v1 import lstm_serve_pb2 as pb
from service.engine.core import ChunkOutcome, StepResult
from service.engine.inputs import (
    frames_from_flat,
    frames_from_rows,
    tokens_from_ids,
    tokens_from_text,
)
from service.engine.registry import LoadedModel
from service.engine.sessions import Session, StreamOptions
from service.errors import InvalidInput
from service.status import numeric_code, status_code, status_message

TOKEN_DTYPE = np.int64
FRAME_DTYPE = np.float32


def decode_input(
    msg: pb.SequenceInput, desc: ModelDescription, max_steps: int, field: str
) -> np.ndarray:
    """One SequenceInput -> (T,) int64 tokens or (T, F) float32 frames, validated."""
    kind = msg.WhichOneof("input")
    if kind == "tokens":
        return tokens_from_ids(desc, msg.tokens.ids, max_steps, f"{field}.tokens.ids")
    if kind == "text":
        return tokens_from_text(desc, msg.text, max_steps, f"{field}.text")
    if kind == "frames":
        frames = msg.frames
        if len(frames.frames) and len(frames.values):
            raise InvalidInput(f"{field}.frames: set either values or frames, not both")
        if len(frames.frames):
            rows = [list(f.values) for f in frames.frames]
            return frames_from_rows(desc, rows, max_steps, f"{field}.frames")
        return frames_from_flat(
            desc, frames.values, frames.frame_count, max_steps, f"{field}.frames"
        )
    raise InvalidInput(f"{field} is empty: set tokens, text or frames")


def decode_options(msg: pb.StreamOptions) -> StreamOptions:
    return StreamOptions(every_step=msg.every_step, top_k=max(1, msg.top_k))


def encode_options(options: StreamOptions) -> pb.StreamOptions:
    return pb.StreamOptions(every_step=options.every_step, top_k=options.top_k)


def top_labels(desc: ModelDescription, probs: np.ndarray, k: int) -> list[pb.LabelScore]:
    """The k most probable labels of a (C,) distribution, most probable first."""
    k = min(max(k, 1), desc.num_classes)
    if k == 1:  # the common case: argmax (the first of ties, as the stable sort) is cheaper
        i = int(probs.argmax())
        return [pb.LabelScore(label=desc.labels[i], index=i, probability=float(probs[i]))]
    order = np.argsort(-probs, kind="stable")[:k]
    return [
        pb.LabelScore(label=desc.labels[i], index=int(i), probability=float(probs[i]))
        for i in order
    ]


def _steps(step_probs: np.ndarray | None) -> list[pb.Probabilities]:
    if step_probs is None:
        return []
    return [pb.Probabilities(values=row.tolist()) for row in step_probs]


def encode_chunk_result(outcome: ChunkOutcome, session: Session) -> pb.ChunkResult:
    result = outcome.result
    if result is None:
        return pb.ChunkResult(
            seq=outcome.seq, duplicate=outcome.duplicate, total_steps=outcome.total_steps
        )
    probs = result.probs  # (C,)
    return pb.ChunkResult(
        seq=outcome.seq,
        steps=result.steps,
        probabilities=probs.tolist(),
        top=top_labels(session.model.description, probs, session.options.top_k),
        step_probabilities=_steps(result.step_probs),
        total_steps=outcome.total_steps,
        duplicate=outcome.duplicate,
    )


def encode_chunk_error(seq: int, exc: BaseException, session: Session) -> pb.ChunkResult:
    """A rejected chunk's in-band reply: the session is unchanged."""
    return pb.ChunkResult(seq=seq, total_steps=session.total_steps, error=encode_error(exc))


def encode_error(exc: BaseException) -> pb.ErrorStatus:
    code = status_code(exc)
    return pb.ErrorStatus(
        code=code.name, numeric_code=numeric_code(code), message=status_message(exc)
    )


def encode_sequence_result(
    result: StepResult, desc: ModelDescription, top_k: int
) -> pb.SequenceResult:
    return pb.SequenceResult(
        probabilities=result.probs.tolist(),
        top=top_labels(desc, result.probs, top_k),
        steps=_steps(result.step_probs),
        length=result.steps,
    )


def session_opened(session: Session, resumed: bool, idle_timeout_s: float) -> pb.SessionOpened:
    desc = session.model.description
    return pb.SessionOpened(
        session_id=session.id,
        model=desc.name,
        version=desc.version,
        resumed=resumed,
        last_applied_seq=session.last_seq,
        total_steps=session.total_steps,
        options=encode_options(session.options),
        labels=list(desc.labels),
        idle_timeout_seconds=idle_timeout_s,
    )


def model_info(model: LoadedModel) -> pb.ModelInfo:
    """Everything a client may want to know about one loaded model version."""
    desc = model.description
    info = pb.ModelInfo(
        name=desc.name,
        version=desc.version,
        latest=model.latest,
        labels=list(desc.labels),
        input_kind=desc.input_kind,
        vocab_size=desc.vocab_size,
        feature_dim=desc.feature_dim,
        streamable=desc.streamable,
        state_rows=desc.state_rows,
        hidden_size=desc.hidden_size,
        state_row_names=list(desc.state_row_names),
        provider=model.runtime.provider,
        providers=list(model.runtime.providers),
        cpu_fallback=list(model.runtime.cpu_fallback),
        architecture_json=json.dumps(desc.architecture, sort_keys=True),
        training_json=json.dumps(desc.training, sort_keys=True),
        load_seconds=model.load_seconds,
    )
    if desc.tokenizer is not None:
        tok = desc.tokenizer
        info.tokenizer.CopyFrom(
            pb.TokenizerInfo(
                type="chars", vocab=list(tok.vocab), lowercase=tok.lowercase,
                unknown_id=tok.unknown_id, normalization=tok.normalization,
            )
        )  # fmt: skip
    return info
