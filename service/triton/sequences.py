"""Triton's sequence parameters, read and checked: sequence_id, sequence_start, sequence_end,
lstm_serve_seq (exactly-once resends, as on the native API) and an early decision rule
(lstm_serve_decide_at, lstm_serve_end_when_decided: lstmserve/decisions.py).

What a sequence is lives in the session layer (service/protocol/sequences.py): a session whose
id is derived from (caller, model, sequence_id), so any replica sharing the store continues it.
Text (`text` BYTES) streams as on the native Stream: every reply is Classify of the sequence's
text so far; what may still change with the next chunk is held (service/engine/text/textstream.py)
and run as if final without being kept (lstm_serve_held_characters), and the steps a later chunk
takes back are lstm_serve_rewound_steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from lstmserve.decisions import parse_decide_at
from service.engine.text.inputs import quoted
from service.engine.types import DecisionRule
from service.triton.types import ParamValue, invalid

MAX_STRING_ID = 256  # characters of a string sequence_id


@dataclass(frozen=True)
class SequenceParams:
    """A request's sequence parameters; `key` None: not a sequence request."""

    key: int | str | None
    start: bool = False
    end: bool = False
    seq: int | None = None  # lstm_serve_seq
    decide: DecisionRule | None = None  # lstm_serve_decide_at, lstm_serve_end_when_decided


def _flag(params: dict[str, ParamValue], key: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise invalid(f"parameter {key} = {quoted(str(value))} is not a bool")
    return value


def sequence_params(params: dict[str, ParamValue]) -> SequenceParams:
    """Check and read sequence_id, sequence_start, sequence_end and lstm_serve_seq."""
    raw = params.get("sequence_id", 0)
    key: int | str | None
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise invalid(f"parameter sequence_id = {quoted(str(raw))} is not an integer or string")
    if isinstance(raw, int) and (raw < 0 or raw >= 1 << 64):
        raise invalid(f"parameter sequence_id = {raw} is not a uint64")
    if isinstance(raw, str) and len(raw) > MAX_STRING_ID:
        raise invalid(f"parameter sequence_id = {quoted(raw)} is longer than {MAX_STRING_ID}")
    key = raw if raw not in (0, "") else None
    start, end = _flag(params, "sequence_start"), _flag(params, "sequence_end")
    seq = params.get("lstm_serve_seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 1):
        raise invalid(f"parameter lstm_serve_seq = {quoted(str(seq))} is not an integer >= 1")
    decide = _decide(params)
    if key is None and (start or end or seq is not None or decide is not None):
        raise invalid(
            "sequence_start, sequence_end, lstm_serve_seq and lstm_serve_decide_at need a "
            "sequence_id"
        )
    return SequenceParams(key, start, end, seq, decide)


def _decide(params: dict[str, ParamValue]) -> DecisionRule | None:
    """lstm_serve_decide_at ("P[,N]", "margin:M[,N]" or a number P) and
    lstm_serve_end_when_decided (bool): the sequence's early decision rule, if given."""
    spec = params.get("lstm_serve_decide_at")
    end = _flag(params, "lstm_serve_end_when_decided")
    if spec is None:
        if end:
            raise invalid("parameter lstm_serve_end_when_decided needs lstm_serve_decide_at")
        return None
    if isinstance(spec, bool) or not isinstance(spec, str | int | float):
        raise invalid(f"parameter lstm_serve_decide_at = {quoted(str(spec))} is not a string")
    try:
        probability, margin, steps = parse_decide_at(str(spec))
    except ValueError as exc:
        raise invalid(f"parameter lstm_serve_decide_at = {exc}") from None
    return DecisionRule(probability, margin, steps, end)
