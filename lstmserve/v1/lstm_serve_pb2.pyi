from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_DRAINING: _ClassVar[ModelState]
    MODEL_STATE_UNAVAILABLE: _ClassVar[ModelState]
    MODEL_STATE_RETIRED: _ClassVar[ModelState]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_DRAINING: ModelState
MODEL_STATE_UNAVAILABLE: ModelState
MODEL_STATE_RETIRED: ModelState

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Frames(_message.Message):
    __slots__ = ("values", "frame_count", "frames")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    frame_count: int
    frames: _containers.RepeatedCompositeFieldContainer[Frame]
    def __init__(self, values: _Optional[_Iterable[float]] = ..., frame_count: _Optional[int] = ..., frames: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ...) -> None: ...

class SequenceInput(_message.Message):
    __slots__ = ("tokens", "text", "frames")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    tokens: TokenIds
    text: str
    frames: Frames
    def __init__(self, tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., text: _Optional[str] = ..., frames: _Optional[_Union[Frames, _Mapping]] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "index", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    probability: float
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

class Probabilities(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class ErrorStatus(_message.Message):
    __slots__ = ("code", "numeric_code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    numeric_code: int
    message: str
    def __init__(self, code: _Optional[str] = ..., numeric_code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "version", "sequences", "step_probabilities", "top_k")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    STEP_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceInput]
    step_probabilities: bool
    top_k: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., sequences: _Optional[_Iterable[_Union[SequenceInput, _Mapping]]] = ..., step_probabilities: _Optional[bool] = ..., top_k: _Optional[int] = ...) -> None: ...

class SequenceResult(_message.Message):
    __slots__ = ("probabilities", "top", "steps", "length")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    top: _containers.RepeatedCompositeFieldContainer[LabelScore]
    steps: _containers.RepeatedCompositeFieldContainer[Probabilities]
    length: int
    def __init__(self, probabilities: _Optional[_Iterable[float]] = ..., top: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., steps: _Optional[_Iterable[_Union[Probabilities, _Mapping]]] = ..., length: _Optional[int] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "version", "results")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    results: _containers.RepeatedCompositeFieldContainer[SequenceResult]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., results: _Optional[_Iterable[_Union[SequenceResult, _Mapping]]] = ...) -> None: ...

class StreamOptions(_message.Message):
    __slots__ = ("every_step", "top_k", "decide")
    EVERY_STEP_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    DECIDE_FIELD_NUMBER: _ClassVar[int]
    every_step: bool
    top_k: int
    decide: DecisionRule
    def __init__(self, every_step: _Optional[bool] = ..., top_k: _Optional[int] = ..., decide: _Optional[_Union[DecisionRule, _Mapping]] = ...) -> None: ...

class DecisionRule(_message.Message):
    __slots__ = ("probability", "margin", "steps", "end_when_decided")
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    END_WHEN_DECIDED_FIELD_NUMBER: _ClassVar[int]
    probability: float
    margin: float
    steps: int
    end_when_decided: bool
    def __init__(self, probability: _Optional[float] = ..., margin: _Optional[float] = ..., steps: _Optional[int] = ..., end_when_decided: _Optional[bool] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("label", "index", "probability", "step", "ended")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    probability: float
    step: int
    ended: bool
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., probability: _Optional[float] = ..., step: _Optional[int] = ..., ended: _Optional[bool] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("model", "version", "options")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    options: StreamOptions
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., options: _Optional[_Union[StreamOptions, _Mapping]] = ...) -> None: ...

class ResumeSession(_message.Message):
    __slots__ = ("session_id", "options")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    options: StreamOptions
    def __init__(self, session_id: _Optional[str] = ..., options: _Optional[_Union[StreamOptions, _Mapping]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("seq", "input")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    input: SequenceInput
    def __init__(self, seq: _Optional[int] = ..., input: _Optional[_Union[SequenceInput, _Mapping]] = ...) -> None: ...

class Reset(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class End(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("open", "resume", "chunk", "reset", "end", "restore", "snapshot")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    resume: ResumeSession
    chunk: Chunk
    reset: Reset
    end: End
    restore: RestoreSession
    snapshot: TakeSnapshot
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., resume: _Optional[_Union[ResumeSession, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., reset: _Optional[_Union[Reset, _Mapping]] = ..., end: _Optional[_Union[End, _Mapping]] = ..., restore: _Optional[_Union[RestoreSession, _Mapping]] = ..., snapshot: _Optional[_Union[TakeSnapshot, _Mapping]] = ...) -> None: ...

class RestoreSession(_message.Message):
    __slots__ = ("snapshot", "options")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    snapshot: bytes
    options: StreamOptions
    def __init__(self, snapshot: _Optional[bytes] = ..., options: _Optional[_Union[StreamOptions, _Mapping]] = ...) -> None: ...

class TakeSnapshot(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionSnapshot(_message.Message):
    __slots__ = ("data", "last_applied_seq", "total_steps", "final")
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_APPLIED_SEQ_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    last_applied_seq: int
    total_steps: int
    final: bool
    def __init__(self, data: _Optional[bytes] = ..., last_applied_seq: _Optional[int] = ..., total_steps: _Optional[int] = ..., final: _Optional[bool] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "model", "version", "resumed", "last_applied_seq", "total_steps", "options", "labels", "idle_timeout_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    LAST_APPLIED_SEQ_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    version: int
    resumed: bool
    last_applied_seq: int
    total_steps: int
    options: StreamOptions
    labels: _containers.RepeatedScalarFieldContainer[str]
    idle_timeout_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., resumed: _Optional[bool] = ..., last_applied_seq: _Optional[int] = ..., total_steps: _Optional[int] = ..., options: _Optional[_Union[StreamOptions, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ..., idle_timeout_seconds: _Optional[float] = ...) -> None: ...

class ChunkResult(_message.Message):
    __slots__ = ("seq", "steps", "probabilities", "top", "step_probabilities", "total_steps", "duplicate", "error", "held_characters", "rewound_steps", "decision")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    STEP_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    HELD_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    REWOUND_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    seq: int
    steps: int
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    top: _containers.RepeatedCompositeFieldContainer[LabelScore]
    step_probabilities: _containers.RepeatedCompositeFieldContainer[Probabilities]
    total_steps: int
    duplicate: bool
    error: ErrorStatus
    held_characters: int
    rewound_steps: int
    decision: Decision
    def __init__(self, seq: _Optional[int] = ..., steps: _Optional[int] = ..., probabilities: _Optional[_Iterable[float]] = ..., top: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., step_probabilities: _Optional[_Iterable[_Union[Probabilities, _Mapping]]] = ..., total_steps: _Optional[int] = ..., duplicate: _Optional[bool] = ..., error: _Optional[_Union[ErrorStatus, _Mapping]] = ..., held_characters: _Optional[int] = ..., rewound_steps: _Optional[int] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ...) -> None: ...

class ResetDone(_message.Message):
    __slots__ = ("seq", "duplicate")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    duplicate: bool
    def __init__(self, seq: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class SessionEnded(_message.Message):
    __slots__ = ("total_steps", "last_applied_seq", "flushed_steps", "probabilities", "top", "duplicate")
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LAST_APPLIED_SEQ_FIELD_NUMBER: _ClassVar[int]
    FLUSHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    total_steps: int
    last_applied_seq: int
    flushed_steps: int
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    top: _containers.RepeatedCompositeFieldContainer[LabelScore]
    duplicate: bool
    def __init__(self, total_steps: _Optional[int] = ..., last_applied_seq: _Optional[int] = ..., flushed_steps: _Optional[int] = ..., probabilities: _Optional[_Iterable[float]] = ..., top: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("session_id", "opened", "chunk", "reset", "ended", "snapshot")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    opened: SessionOpened
    chunk: ChunkResult
    reset: ResetDone
    ended: SessionEnded
    snapshot: SessionSnapshot
    def __init__(self, session_id: _Optional[str] = ..., opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., chunk: _Optional[_Union[ChunkResult, _Mapping]] = ..., reset: _Optional[_Union[ResetDone, _Mapping]] = ..., ended: _Optional[_Union[SessionEnded, _Mapping]] = ..., snapshot: _Optional[_Union[SessionSnapshot, _Mapping]] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("session_id", "open", "resume", "chunk", "reset", "end", "restore")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    open: OpenSession
    resume: ResumeSession
    chunk: Chunk
    reset: Reset
    end: End
    restore: RestoreSession
    def __init__(self, session_id: _Optional[str] = ..., open: _Optional[_Union[OpenSession, _Mapping]] = ..., resume: _Optional[_Union[ResumeSession, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., reset: _Optional[_Union[Reset, _Mapping]] = ..., end: _Optional[_Union[End, _Mapping]] = ..., restore: _Optional[_Union[RestoreSession, _Mapping]] = ...) -> None: ...

class StreamMultiRequest(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[SessionRequest]
    def __init__(self, entries: _Optional[_Iterable[_Union[SessionRequest, _Mapping]]] = ...) -> None: ...

class SessionResult(_message.Message):
    __slots__ = ("session_id", "opened", "chunk", "reset", "ended", "error", "snapshot")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    opened: SessionOpened
    chunk: ChunkResult
    reset: ResetDone
    ended: SessionEnded
    error: ErrorStatus
    snapshot: SessionSnapshot
    def __init__(self, session_id: _Optional[str] = ..., opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., chunk: _Optional[_Union[ChunkResult, _Mapping]] = ..., reset: _Optional[_Union[ResetDone, _Mapping]] = ..., ended: _Optional[_Union[SessionEnded, _Mapping]] = ..., error: _Optional[_Union[ErrorStatus, _Mapping]] = ..., snapshot: _Optional[_Union[SessionSnapshot, _Mapping]] = ...) -> None: ...

class StreamMultiResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SessionResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SessionResult, _Mapping]]] = ...) -> None: ...

class ColumnsRequest(_message.Message):
    __slots__ = ("open", "resume", "handles", "seqs", "offsets", "tokens", "frames", "end")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    open: _containers.RepeatedCompositeFieldContainer[OpenSession]
    resume: _containers.RepeatedScalarFieldContainer[str]
    handles: bytes
    seqs: bytes
    offsets: bytes
    tokens: bytes
    frames: bytes
    end: bytes
    def __init__(self, open: _Optional[_Iterable[_Union[OpenSession, _Mapping]]] = ..., resume: _Optional[_Iterable[str]] = ..., handles: _Optional[bytes] = ..., seqs: _Optional[bytes] = ..., offsets: _Optional[bytes] = ..., tokens: _Optional[bytes] = ..., frames: _Optional[bytes] = ..., end: _Optional[bytes] = ...) -> None: ...

class ColumnsError(_message.Message):
    __slots__ = ("index", "code", "message")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    code: int
    message: str
    def __init__(self, index: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ColumnsResponse(_message.Message):
    __slots__ = ("attached", "session_ids", "attach_errors", "model", "version", "labels", "num_classes", "status", "probabilities", "total_steps", "duplicate", "errors", "end_status", "end_total_steps", "end_errors", "snapshot_handles", "snapshots")
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTACH_ERRORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    END_STATUS_FIELD_NUMBER: _ClassVar[int]
    END_TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    END_ERRORS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_HANDLES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    attached: bytes
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    attach_errors: _containers.RepeatedCompositeFieldContainer[ColumnsError]
    model: str
    version: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    num_classes: int
    status: bytes
    probabilities: bytes
    total_steps: bytes
    duplicate: bytes
    errors: _containers.RepeatedCompositeFieldContainer[ColumnsError]
    end_status: bytes
    end_total_steps: bytes
    end_errors: _containers.RepeatedCompositeFieldContainer[ColumnsError]
    snapshot_handles: bytes
    snapshots: _containers.RepeatedCompositeFieldContainer[SessionSnapshot]
    def __init__(self, attached: _Optional[bytes] = ..., session_ids: _Optional[_Iterable[str]] = ..., attach_errors: _Optional[_Iterable[_Union[ColumnsError, _Mapping]]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., num_classes: _Optional[int] = ..., status: _Optional[bytes] = ..., probabilities: _Optional[bytes] = ..., total_steps: _Optional[bytes] = ..., duplicate: _Optional[bytes] = ..., errors: _Optional[_Iterable[_Union[ColumnsError, _Mapping]]] = ..., end_status: _Optional[bytes] = ..., end_total_steps: _Optional[bytes] = ..., end_errors: _Optional[_Iterable[_Union[ColumnsError, _Mapping]]] = ..., snapshot_handles: _Optional[bytes] = ..., snapshots: _Optional[_Iterable[_Union[SessionSnapshot, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class TokenizerInfo(_message.Message):
    __slots__ = ("type", "vocab", "lowercase", "unknown_id", "normalization")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FIELD_NUMBER: _ClassVar[int]
    LOWERCASE_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ID_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    type: str
    vocab: _containers.RepeatedScalarFieldContainer[str]
    lowercase: bool
    unknown_id: int
    normalization: str
    def __init__(self, type: _Optional[str] = ..., vocab: _Optional[_Iterable[str]] = ..., lowercase: _Optional[bool] = ..., unknown_id: _Optional[int] = ..., normalization: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "latest", "labels", "input_kind", "vocab_size", "feature_dim", "tokenizer", "streamable", "state_rows", "hidden_size", "state_row_names", "provider", "providers", "cpu_fallback", "architecture_json", "training_json", "load_seconds", "state", "reason", "sessions", "output_kind", "output_kind_rule")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    STREAMABLE_FIELD_NUMBER: _ClassVar[int]
    STATE_ROWS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    STATE_ROW_NAMES_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    CPU_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_JSON_FIELD_NUMBER: _ClassVar[int]
    TRAINING_JSON_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_KIND_RULE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    latest: bool
    labels: _containers.RepeatedScalarFieldContainer[str]
    input_kind: str
    vocab_size: int
    feature_dim: int
    tokenizer: TokenizerInfo
    streamable: bool
    state_rows: int
    hidden_size: int
    state_row_names: _containers.RepeatedScalarFieldContainer[str]
    provider: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    cpu_fallback: _containers.RepeatedScalarFieldContainer[str]
    architecture_json: str
    training_json: str
    load_seconds: float
    state: ModelState
    reason: str
    sessions: int
    output_kind: str
    output_kind_rule: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., latest: _Optional[bool] = ..., labels: _Optional[_Iterable[str]] = ..., input_kind: _Optional[str] = ..., vocab_size: _Optional[int] = ..., feature_dim: _Optional[int] = ..., tokenizer: _Optional[_Union[TokenizerInfo, _Mapping]] = ..., streamable: _Optional[bool] = ..., state_rows: _Optional[int] = ..., hidden_size: _Optional[int] = ..., state_row_names: _Optional[_Iterable[str]] = ..., provider: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., cpu_fallback: _Optional[_Iterable[str]] = ..., architecture_json: _Optional[str] = ..., training_json: _Optional[str] = ..., load_seconds: _Optional[float] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ..., sessions: _Optional[int] = ..., output_kind: _Optional[str] = ..., output_kind_rule: _Optional[str] = ...) -> None: ...

class RepositoryIndexRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RepositoryModel(_message.Message):
    __slots__ = ("name", "version", "state", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    state: ModelState
    reason: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class RepositoryIndexResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[RepositoryModel]
    def __init__(self, models: _Optional[_Iterable[_Union[RepositoryModel, _Mapping]]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("draining",)
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    draining: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, draining: _Optional[_Iterable[str]] = ...) -> None: ...
