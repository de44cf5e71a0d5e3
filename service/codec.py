"""Protobuf <-> numpy: request inputs to validated arrays, engine results to replies.

dtypes on the wire -> in the model: token ids int64 -> int64 (T,); frames float (float32) ->
float32 (T, F); probabilities float32 (C,) / (T, C) -> repeated float.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import Message

from lstmserve.contract import ModelDescription, Tokenizer
from lstmserve.v1 import lstm_serve_pb2 as pb
from service.engine.model.worker import ModelWorker
from service.engine.text.inputs import (
    check_steps,
    frames_from_flat,
    frames_from_rows,
    tokens_from_ids,
    tokens_from_text,
)
from service.engine.types import (
    ChunkOutcome,
    DecisionRule,
    StepResult,
    StreamOptions,
    VersionStatus,
)
from service.errors import InvalidInput, MalformedRequest
from service.protocol import messages as m
from service.protocol.columns import ColumnsMessage, ColumnsReply
from service.status import numeric_code, status_code, status_message

TOKEN_DTYPE = np.int64
FRAME_DTYPE = np.float32


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request whose bytes did not parse: what the handler gets instead of a message."""

    message: str  # the protobuf type's full name, e.g. lstmserve.v1.ClassifyRequest
    size: int  # bytes received

    def error(self) -> MalformedRequest:
        """The INVALID_ARGUMENT it is answered with; never quotes the bytes themselves."""
        return MalformedRequest(f"the request is not a valid {self.message} ({self.size} bytes)")


def lenient_parser(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    """A request deserializer that never raises: bytes that do not parse give a Malformed."""
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except Exception:  # DecodeError and whatever else a parser may raise on hostile bytes
            return Malformed(name, len(data))

    return parse


def decode_input(
    msg: pb.SequenceInput, desc: ModelDescription, max_steps: int, field: str,
    whole: bool = True,
) -> np.ndarray:  # fmt: skip
    """One SequenceInput -> (T,) int64 tokens or (T, F) float32 frames, validated. `whole`: a
    whole sequence (Classify), whose text must have some known character; a chunk need not."""
    kind = msg.WhichOneof("input")
    if kind == "tokens":
        return tokens_from_ids(desc, msg.tokens.ids, max_steps, f"{field}.tokens.ids")
    if kind == "text":
        return tokens_from_text(desc, msg.text, max_steps, f"{field}.text", require_known=whole)
    if kind == "frames":
        frames = msg.frames
        if len(frames.frames) and len(frames.values):
            raise InvalidInput(f"{field}.frames: set either values or frames, not both")
        if len(frames.frames):
            check_steps(len(frames.frames), max_steps, f"{field}.frames")  # before copying rows
            rows = [list(f.values) for f in frames.frames]
            return frames_from_rows(desc, rows, max_steps, f"{field}.frames")
        return frames_from_flat(
            desc, frames.values, frames.frame_count, max_steps, f"{field}.frames"
        )
    raise InvalidInput(f"{field} is empty: set tokens, text or frames")


class PbInput:
    """A chunk's SequenceInput, decoded once the session's model is known."""

    __slots__ = ("msg",)

    def __init__(self, msg: pb.SequenceInput) -> None:
        self.msg = msg

    def decode(self, desc: ModelDescription, max_steps: int, field: str) -> np.ndarray:
        return decode_input(self.msg, desc, max_steps, field, whole=False)

    def text(self) -> str | None:
        msg = self.msg
        return msg.text if msg.WhichOneof("input") == "text" else None

    def nbytes(self) -> int:
        return self.msg.ByteSize()

    def steps_hint(self) -> int:
        msg = self.msg
        kind = msg.WhichOneof("input")
        if kind == "tokens":
            return len(msg.tokens.ids)
        if kind == "text":
            return len(msg.text)
        if kind == "frames":
            frames = msg.frames
            return len(frames.frames) or frames.frame_count or len(frames.values)
        return 0


def decode_options(msg: pb.StreamOptions) -> StreamOptions:
    """The options as sent (a decision rule is checked when a session takes it)."""
    decide = None
    if msg.HasField("decide"):
        d = msg.decide
        decide = DecisionRule(d.probability, d.margin, max(1, d.steps), d.end_when_decided)
    return StreamOptions(every_step=msg.every_step, top_k=max(1, msg.top_k), decide=decide)


def encode_options(options: StreamOptions) -> pb.StreamOptions:
    out = pb.StreamOptions(every_step=options.every_step, top_k=options.top_k)
    d = options.decide
    if d is not None:
        rule = out.decide
        rule.probability, rule.margin, rule.steps = d.probability, d.margin, d.steps
        rule.end_when_decided = d.end_when_decided
    return out


def add_top_labels(top: Any, labels: Sequence[str], probs: np.ndarray, k: int) -> None:
    """Add the k most probable of a (C,) distribution's `labels` to `top` (a repeated
    LabelScore field), most probable first, in place."""
    k = min(max(k, 1), len(labels))
    if k == 1:  # the common case: argmax (the first of ties, as the stable sort) is cheaper
        order: list[int] = [int(probs.argmax())]
    else:
        order = np.argsort(-probs, kind="stable")[:k].tolist()
    for i in order:
        label = top.add()
        label.label, label.index, label.probability = labels[i], i, float(probs[i])


def top_labels(desc: ModelDescription, probs: np.ndarray, k: int) -> list[pb.LabelScore]:
    """The k most probable labels of a (C,) distribution, most probable first."""
    holder = pb.SequenceResult()
    add_top_labels(holder.top, desc.labels, probs, k)
    return list(holder.top)


def _steps(step_probs: np.ndarray | None) -> list[pb.Probabilities]:
    if step_probs is None:
        return []
    return [pb.Probabilities(values=row.tolist()) for row in step_probs]


def fill_chunk_result(
    out: pb.ChunkResult, outcome: ChunkOutcome, labels: Sequence[str], top_k: int
) -> None:
    """Set a chunk's reply fields in place, in the message that is sent (no nested copies)."""
    out.seq = outcome.seq
    out.total_steps = outcome.total_steps
    if outcome.duplicate:
        out.duplicate = True
    if outcome.held_characters:
        out.held_characters = outcome.held_characters
    result = outcome.result
    if result is None:
        return
    out.steps = result.steps
    if result.rewound_steps:
        out.rewound_steps = result.rewound_steps
    probs = result.probs  # (C,); (0,) before a session's first step
    if probs.size:
        out.probabilities.extend(probs.tolist())
        add_top_labels(out.top, labels, probs, top_k)
    if result.step_probs is not None:
        out.step_probabilities.extend(_steps(result.step_probs))
    decision = result.decision
    if decision is not None:
        d = out.decision
        d.label, d.index, d.probability = (
            labels[decision.label],
            decision.label,
            decision.probability,
        )
        d.step, d.ended = decision.step, outcome.ended


def encode_chunk_error(seq: int, exc: BaseException, total_steps: int) -> pb.ChunkResult:
    """A rejected chunk's in-band reply: the session is unchanged (`total_steps`, its own)."""
    return pb.ChunkResult(seq=seq, total_steps=total_steps, error=encode_error(exc))


def encode_error(exc: BaseException) -> pb.ErrorStatus:
    code = status_code(exc)
    return pb.ErrorStatus(
        code=code.name, numeric_code=numeric_code(code), message=status_message(exc)
    )


def encode_sequence_result(
    result: StepResult, desc: ModelDescription, top_k: int
) -> pb.SequenceResult:
    out = pb.SequenceResult(
        probabilities=result.probs.tolist(), steps=_steps(result.step_probs), length=result.steps
    )
    add_top_labels(out.top, desc.labels, result.probs, top_k)
    return out


def session_opened(opened: m.Opened, idle_timeout_s: float) -> pb.SessionOpened:
    return pb.SessionOpened(
        session_id=opened.session_id,
        model=opened.model,
        version=opened.version,
        resumed=opened.resumed,
        last_applied_seq=opened.last_seq,
        total_steps=opened.total_steps,
        options=encode_options(opened.options),
        labels=list(opened.labels),
        idle_timeout_seconds=idle_timeout_s,
    )


STATE_ENUM = {
    "LOADING": pb.MODEL_STATE_LOADING, "READY": pb.MODEL_STATE_READY,
    "DRAINING": pb.MODEL_STATE_DRAINING, "UNAVAILABLE": pb.MODEL_STATE_UNAVAILABLE,
    "RETIRED": pb.MODEL_STATE_RETIRED,
}  # fmt: skip


def model_info(model: ModelWorker, latest: bool) -> pb.ModelInfo:
    """Everything a client may want to know about one loaded model version."""
    desc = model.description
    info = pb.ModelInfo(
        name=model.name,
        version=model.version,
        latest=latest,
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
        state=STATE_ENUM[model.lifecycle.value],
        sessions=model.sessions,
        output_kind=desc.output_kind,
        output_kind_rule=desc.output_kind_rule,
    )
    tok = desc.tokenizer
    if isinstance(tok, Tokenizer):
        info.tokenizer.CopyFrom(
            pb.TokenizerInfo(
                type="chars", vocab=list(tok.vocab), lowercase=tok.lowercase,
                unknown_id=tok.unknown_id, normalization=tok.normalization,
            )
        )  # fmt: skip
    elif tok is not None:  # a subword tokenizer.json: its vocabulary stays on the server
        unknown = tok.to_dict().get("unknown_id")
        info.tokenizer.CopyFrom(pb.TokenizerInfo(type="tokenizer.json", unknown_id=unknown or 0))
    return info


def unavailable_info(status: VersionStatus) -> pb.ModelInfo:
    """A version that failed to load: its name, version, state and reason."""
    return pb.ModelInfo(name=status.name, version=status.version,
                        state=STATE_ENUM[status.state.value], reason=status.reason)  # fmt: skip


def repository_model(status: VersionStatus) -> pb.RepositoryModel:
    state = STATE_ENUM[status.state.value]
    return pb.RepositoryModel(
        name=status.name, version=status.version, state=state, reason=status.reason
    )


# -- Stream / StreamMulti messages <-> the session layer's ------------------------------------


def _optional_options(msg: pb.ResumeSession | pb.RestoreSession) -> StreamOptions | None:
    return decode_options(msg.options) if msg.HasField("options") else None


def _request(
    kind: str | None, msg: pb.StreamRequest | pb.SessionRequest, expected: str
) -> m.Request:
    """The session layer's request for a message's `kind` oneof."""
    if kind == "chunk":
        return m.Chunk(msg.chunk.seq, PbInput(msg.chunk.input))
    if kind == "open":
        o = msg.open
        return m.Open(o.model, o.version, decode_options(o.options))
    if kind == "resume":
        return m.Resume(msg.resume.session_id, _optional_options(msg.resume))
    if kind == "restore":
        return m.Restore(msg.restore.snapshot, _optional_options(msg.restore))
    if kind == "reset":
        return m.Reset(msg.reset.seq)
    if kind == "end":
        return m.End()
    if kind == "snapshot":
        return m.TakeSnapshot()
    return m.Unset(expected)


def stream_request(msg: pb.StreamRequest) -> m.Request:
    return _request(msg.WhichOneof("kind"), msg, "open, resume or restore")


def session_entry(msg: pb.SessionRequest) -> m.SessionEntry:
    kind = msg.WhichOneof("kind")
    session_id = msg.resume.session_id if kind == "resume" else msg.session_id
    return m.SessionEntry(session_id, _request(kind, msg, "open, resume, chunk, reset or end"))


def _fill_chunk(out: pb.ChunkResult, done: m.ChunkDone) -> None:
    if done.error is not None:
        out.CopyFrom(encode_chunk_error(done.seq, done.error, done.total_steps))
        return
    assert done.outcome is not None
    fill_chunk_result(out, done.outcome, done.labels, done.top_k)


def _snapshot(snap: m.Snapshot) -> pb.SessionSnapshot:
    return pb.SessionSnapshot(data=snap.data, last_applied_seq=snap.last_seq,
                              total_steps=snap.total_steps, final=snap.final)  # fmt: skip


def session_ended(body: m.Ended) -> pb.SessionEnded:
    reply = pb.SessionEnded(total_steps=body.total_steps, last_applied_seq=body.last_seq,
                            flushed_steps=body.flushed_steps, duplicate=body.duplicate)  # fmt: skip
    final = body.final
    if final is not None and final.probs.size and body.labels:
        reply.probabilities.extend(final.probs.tolist())
        add_top_labels(reply.top, body.labels, final.probs, body.top_k)
    return reply


def _body_field(body: m.Body, idle_timeout_s: float) -> tuple[str, object]:
    """(oneof field name, message) of a reply body other than a chunk's (`_fill_body`)."""
    if isinstance(body, m.Opened):
        return "opened", session_opened(body, idle_timeout_s)
    if isinstance(body, m.ResetDone):
        return "reset", pb.ResetDone(seq=body.seq, duplicate=body.duplicate)
    if isinstance(body, m.Snapshot):
        return "snapshot", _snapshot(body)
    if isinstance(body, m.Ended):
        return "ended", session_ended(body)
    return "error", encode_error(body.error)


def _fill_body(out: pb.StreamResponse | pb.SessionResult, body: m.Body,
               idle_timeout_s: float) -> None:  # fmt: skip
    """Set a reply's body in the message that is sent (Stream's and StreamMulti's replies share
    the oneof): a chunk's fields directly, built once; any other body copied in once."""
    if isinstance(body, m.ChunkDone):  # the per-chunk path
        _fill_chunk(out.chunk, body)
        return
    name, value = _body_field(body, idle_timeout_s)
    getattr(out, name).CopyFrom(value)


def stream_response(reply: m.Reply, idle_timeout_s: float) -> pb.StreamResponse:
    response = pb.StreamResponse(session_id=reply.session_id)
    _fill_body(response, reply.body, idle_timeout_s)
    return response


def fill_stream_response(out: pb.StreamResponse, reply: m.Reply, idle_timeout_s: float) -> None:
    """`stream_response` written into a message that is sent (the native front's tick reply)."""
    out.session_id = reply.session_id
    _fill_body(out, reply.body, idle_timeout_s)


def multi_response(reply: m.MultiReply, idle_timeout_s: float) -> pb.StreamMultiResponse:
    response = pb.StreamMultiResponse()
    for r in reply.replies:
        out = response.results.add()
        out.session_id = r.session_id
        _fill_body(out, r.body, idle_timeout_s)
    return response


# -- StreamColumns: packed arrays <-> the session layer's columns messages ---------------------


def columns_request(msg: pb.ColumnsRequest) -> ColumnsMessage:
    """The request with its packed fields kept as bytes (decoded by service/protocol/columns.py)."""
    opens = [m.Open(o.model, o.version, decode_options(o.options)) for o in msg.open]
    return ColumnsMessage(opens, list(msg.resume), msg.handles, msg.seqs, msg.offsets,
                          msg.tokens, msg.frames, msg.end)  # fmt: skip


def _codes(count: int, failed: list[tuple[int, BaseException]]) -> tuple[bytes, list]:
    """A uint32 LE status array (0 = OK) and a ColumnsError per failed index."""
    codes = np.zeros(count, dtype="<u4")
    errors = []
    for i, exc in failed:
        code = numeric_code(status_code(exc))
        codes[i] = code
        errors.append(pb.ColumnsError(index=i, code=code, message=status_message(exc)))
    return codes.tobytes(), errors


def columns_response(reply: ColumnsReply) -> pb.ColumnsResponse:
    msg = pb.ColumnsResponse()
    model = reply.model
    if model is not None:
        msg.model, msg.version = model.name, model.version
        msg.num_classes = model.description.num_classes
        if reply.fixed:
            msg.labels.extend(model.description.labels)
    if reply.attached:
        handles = np.zeros(len(reply.attached), dtype="<u4")
        failed: list[tuple[int, BaseException]] = []
        for i, item in enumerate(reply.attached):
            if isinstance(item, BaseException):
                failed.append((i, item))
                msg.session_ids.append("")
            else:
                handles[i] = item[0]
                msg.session_ids.append(item[1])
        msg.attached = handles.tobytes()
        msg.attach_errors.extend(_codes(len(handles), failed)[1])
    if reply.probs.shape[0]:
        msg.status, errors = _codes(reply.probs.shape[0], reply.failed)  # type: ignore[arg-type]
        msg.errors.extend(errors)
        msg.probabilities = reply.probs.astype("<f4", copy=False).tobytes()
        msg.total_steps = reply.total_steps.astype("<u8", copy=False).tobytes()
        msg.duplicate = reply.duplicate.tobytes()
    if reply.ended:
        steps = np.zeros(len(reply.ended), dtype="<u8")
        gone = [(i, e) for i, e in enumerate(reply.ended) if isinstance(e, BaseException)]
        for i, e in enumerate(reply.ended):
            if isinstance(e, m.Ended):
                steps[i] = e.total_steps
        msg.end_status, end_errors = _codes(len(reply.ended), gone)
        msg.end_errors.extend(end_errors)
        msg.end_total_steps = steps.tobytes()
    if reply.snapshots:
        msg.snapshot_handles = np.array([h for h, _ in reply.snapshots], dtype="<u4").tobytes()
        msg.snapshots.extend(_snapshot(s) for _, s in reply.snapshots)
    return msg
