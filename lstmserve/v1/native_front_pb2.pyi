from lstmserve.v1 import lstm_serve_pb2 as _lstm_serve_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TickEntry(_message.Message):
    __slots__ = ("stream", "request", "first", "authorization", "has_authorization", "malformed", "size", "cert_cn", "multi", "multi_stream", "traceparent", "tracestate")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZATION_FIELD_NUMBER: _ClassVar[int]
    HAS_AUTHORIZATION_FIELD_NUMBER: _ClassVar[int]
    MALFORMED_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CERT_CN_FIELD_NUMBER: _ClassVar[int]
    MULTI_FIELD_NUMBER: _ClassVar[int]
    MULTI_STREAM_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    TRACESTATE_FIELD_NUMBER: _ClassVar[int]
    stream: int
    request: _lstm_serve_pb2.StreamRequest
    first: bool
    authorization: str
    has_authorization: bool
    malformed: bool
    size: int
    cert_cn: str
    multi: _lstm_serve_pb2.StreamMultiRequest
    multi_stream: bool
    traceparent: str
    tracestate: str
    def __init__(self, stream: _Optional[int] = ..., request: _Optional[_Union[_lstm_serve_pb2.StreamRequest, _Mapping]] = ..., first: _Optional[bool] = ..., authorization: _Optional[str] = ..., has_authorization: _Optional[bool] = ..., malformed: _Optional[bool] = ..., size: _Optional[int] = ..., cert_cn: _Optional[str] = ..., multi: _Optional[_Union[_lstm_serve_pb2.StreamMultiRequest, _Mapping]] = ..., multi_stream: _Optional[bool] = ..., traceparent: _Optional[str] = ..., tracestate: _Optional[str] = ...) -> None: ...

class Tick(_message.Message):
    __slots__ = ("entries", "closed", "closed_ok", "id", "chunk_streams", "chunk_seqs", "chunk_offsets", "chunk_tokens", "frame_streams", "frame_seqs", "frame_counts", "frame_offsets", "frame_values", "text_streams", "text_seqs", "text_offsets", "text_bytes")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_OK_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_STREAMS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SEQS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FRAME_STREAMS_FIELD_NUMBER: _ClassVar[int]
    FRAME_SEQS_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNTS_FIELD_NUMBER: _ClassVar[int]
    FRAME_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    FRAME_VALUES_FIELD_NUMBER: _ClassVar[int]
    TEXT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    TEXT_SEQS_FIELD_NUMBER: _ClassVar[int]
    TEXT_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[TickEntry]
    closed: _containers.RepeatedScalarFieldContainer[int]
    closed_ok: _containers.RepeatedScalarFieldContainer[bool]
    id: int
    chunk_streams: bytes
    chunk_seqs: bytes
    chunk_offsets: bytes
    chunk_tokens: bytes
    frame_streams: bytes
    frame_seqs: bytes
    frame_counts: bytes
    frame_offsets: bytes
    frame_values: bytes
    text_streams: bytes
    text_seqs: bytes
    text_offsets: bytes
    text_bytes: bytes
    def __init__(self, entries: _Optional[_Iterable[_Union[TickEntry, _Mapping]]] = ..., closed: _Optional[_Iterable[int]] = ..., closed_ok: _Optional[_Iterable[bool]] = ..., id: _Optional[int] = ..., chunk_streams: _Optional[bytes] = ..., chunk_seqs: _Optional[bytes] = ..., chunk_offsets: _Optional[bytes] = ..., chunk_tokens: _Optional[bytes] = ..., frame_streams: _Optional[bytes] = ..., frame_seqs: _Optional[bytes] = ..., frame_counts: _Optional[bytes] = ..., frame_offsets: _Optional[bytes] = ..., frame_values: _Optional[bytes] = ..., text_streams: _Optional[bytes] = ..., text_seqs: _Optional[bytes] = ..., text_offsets: _Optional[bytes] = ..., text_bytes: _Optional[bytes] = ...) -> None: ...

class TickOutcome(_message.Message):
    __slots__ = ("reply", "code", "message", "finish", "stream", "index", "multi_reply")
    REPLY_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MULTI_REPLY_FIELD_NUMBER: _ClassVar[int]
    reply: _lstm_serve_pb2.StreamResponse
    code: int
    message: str
    finish: bool
    stream: int
    index: int
    multi_reply: bytes
    def __init__(self, reply: _Optional[_Union[_lstm_serve_pb2.StreamResponse, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., finish: _Optional[bool] = ..., stream: _Optional[int] = ..., index: _Optional[int] = ..., multi_reply: _Optional[bytes] = ...) -> None: ...

class TickReply(_message.Message):
    __slots__ = ("outcomes", "tick", "packed", "seqs", "total_steps", "steps", "held_characters", "rewound_steps", "flags", "probabilities", "drain", "drain_first_message_ms")
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    TICK_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    HELD_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    REWOUND_STEPS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIRST_MESSAGE_MS_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[TickOutcome]
    tick: int
    packed: bytes
    seqs: bytes
    total_steps: bytes
    steps: bytes
    held_characters: bytes
    rewound_steps: bytes
    flags: bytes
    probabilities: bytes
    drain: TickOutcome
    drain_first_message_ms: int
    def __init__(self, outcomes: _Optional[_Iterable[_Union[TickOutcome, _Mapping]]] = ..., tick: _Optional[int] = ..., packed: _Optional[bytes] = ..., seqs: _Optional[bytes] = ..., total_steps: _Optional[bytes] = ..., steps: _Optional[bytes] = ..., held_characters: _Optional[bytes] = ..., rewound_steps: _Optional[bytes] = ..., flags: _Optional[bytes] = ..., probabilities: _Optional[bytes] = ..., drain: _Optional[_Union[TickOutcome, _Mapping]] = ..., drain_first_message_ms: _Optional[int] = ...) -> None: ...
