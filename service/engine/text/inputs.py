"""Checks and conversions of one sequence's steps into model inputs, with named-field errors.

Protocol-neutral: the gRPC codec (and any later protocol) calls these with plain Python values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lstmserve.contract import ModelDescription
from service.engine.text.textstream import HeldText, TextCodec, text_codec, with_tail
from service.errors import InvalidInput

QUOTE_CHARS = 64  # the most characters of a client's value an error message quotes
# Normalisation (NFC) composes at most a few code points into one character (a base and its
# marks, Hangul jamo), a subword token is a few characters: a text longer than this many code
# points per allowed step is refused before it is tokenized.
MAX_CHARS_PER_STEP = 8
SMALL_CHUNK = 32  # up to this many token ids, the range check runs in Python


def quoted(value: str, limit: int = QUOTE_CHARS) -> str:
    """repr() of at most `limit` characters of a client's value; a cut one names its length."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def check_steps(steps: int, max_steps: int, field: str) -> None:
    """A sequence or chunk must have 1..max_steps steps."""
    if steps < 1:
        raise InvalidInput(f"{field} is empty: a chunk needs at least one step")
    if steps > max_steps:
        raise InvalidInput(f"{field} has {steps} steps, more than the maximum {max_steps}")


def _need_kind(desc: ModelDescription, kind: str, field: str) -> None:
    if desc.input_kind != kind:
        raise InvalidInput(
            f"{field}: model {desc.name} v{desc.version} takes {desc.input_kind}, not {kind}"
        )


def tokens_from_ids(
    desc: ModelDescription, ids: Sequence[int], max_steps: int, field: str
) -> np.ndarray:
    """Token ids -> (T,) int64, every id in [0, vocab_size)."""
    _need_kind(desc, "tokens", field)
    check_steps(len(ids), max_steps, field)
    tokens = np.array(ids, dtype=np.int64)  # (T,)
    if len(ids) <= SMALL_CHUNK:  # a few ids: Python's min/max cost less than numpy's
        low, high = min(ids), max(ids)
    else:
        low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= desc.vocab_size:  # rare: find the first bad id
        i = int(np.flatnonzero((tokens < 0) | (tokens >= desc.vocab_size))[0])
        raise InvalidInput(
            f"{field}[{i}] = {int(tokens[i])} is out of range [0, {desc.vocab_size})"
        )
    return tokens


def _text_codec(desc: ModelDescription, text: str, max_steps: int, field: str) -> TextCodec:
    _need_kind(desc, "tokens", field)
    if desc.tokenizer is None:
        raise InvalidInput(f"{field}: model {desc.name} v{desc.version} has no tokenizer")
    if len(text) > MAX_CHARS_PER_STEP * max_steps:  # cannot fit: refused before any copy
        raise InvalidInput(
            f"{field} has {len(text)} characters: more than the maximum {max_steps} steps"
        )
    return text_codec(desc.tokenizer)


def tokens_from_text(
    desc: ModelDescription, text: str, max_steps: int, field: str, require_known: bool = True
) -> np.ndarray:
    """A whole text -> (T,) int64 with the model's own tokenizer; unknown characters map to the
    unknown token, but (`require_known`) some token must be known. Streamed text goes through
    tokens_from_stream instead, which holds back what may still change."""
    codec = _text_codec(desc, text, max_steps, field)
    if not text:
        check_steps(0, max_steps, field)
    ids = codec.encode(text)
    check_steps(len(ids), max_steps, field)
    if require_known and not codec.known(ids):
        raise InvalidInput(f"{field} = {quoted(text)} has no character in the model's vocabulary")
    return np.asarray(ids, dtype=np.int64)


def tokens_from_stream(
    desc: ModelDescription, held: HeldText, text: str, max_steps: int, field: str
) -> tuple[np.ndarray, HeldText]:
    """A streamed chunk of text -> the (T,) int64 ids it settles (T may be 0: all of it is
    held) and what is held back, with the ids a reply runs for it (its tail,
    service/engine/text/textstream.py). Unknown characters are fed as the unknown token, as
    Classify feeds them inside a text; but a chunk after which the text sent has no known
    character (settled or held) is refused, as Classify refuses such a text."""
    codec = _text_codec(desc, text, max_steps, field)
    if not text:
        check_steps(0, max_steps, field)
    feed = codec.feed(held, text, final=False)
    if len(feed.ids) > max_steps:
        check_steps(len(feed.ids), max_steps, field)
    after = feed.held
    # Only where unknowns are final (a character tokenizer) is text with nothing known refused
    # as it streams; a partial word may still become a known word (Classify refuses either).
    if not after.known and codec.unknowns_are_final:
        if codec.known(feed.ids):
            after = dataclasses.replace(after, known=True)  # once per session
        elif (feed.ids or after.tail) and not codec.known(list(after.tail)):  # a word-level
            # tokenizer gives no id for a partial word: nothing to feed yet, held, not refused
            raise InvalidInput(
                f"{field} = {quoted(text)}: the text sent so far has no character in the "
                "model's vocabulary (refused, as Classify refuses such a text)"
            )
    return np.asarray(feed.ids, dtype=np.int64), after


def held_text(desc: ModelDescription, text: str, cased: bool, known: bool) -> HeldText:
    """Held text as a snapshot records it, with its tail (the model's tokenizer)."""
    if not text or desc.tokenizer is None:
        return HeldText(text, cased, (), known)
    return with_tail(text_codec(desc.tokenizer), text, cased, known)


def _check_finite(frames: np.ndarray, field: str) -> None:
    bad = np.flatnonzero(~np.isfinite(frames))
    if bad.size:
        t, f = divmod(int(bad[0]), frames.shape[1])
        raise InvalidInput(f"{field}: frame {t} value {f} is {frames[t, f]} (must be finite)")


def frames_from_flat(
    desc: ModelDescription, values: Sequence[float], frame_count: int, max_steps: int, field: str
) -> np.ndarray:
    """Row-major floats -> (T, F) float32; frame_count 0 means len(values) / F."""
    _need_kind(desc, "features", field)
    dim = desc.feature_dim
    if frame_count == 0:
        if len(values) % dim:
            raise InvalidInput(
                f"{field}.values has {len(values)} floats, not a multiple of feature_dim {dim}"
            )
        frame_count = len(values) // dim
    elif len(values) != frame_count * dim:
        raise InvalidInput(
            f"{field}.values has {len(values)} floats, not frame_count {frame_count} "
            f"x feature_dim {dim} = {frame_count * dim}"
        )
    check_steps(frame_count, max_steps, field)
    frames = np.asarray(values, dtype=np.float32).reshape(frame_count, dim)  # (T, F)
    _check_finite(frames, field)
    return frames


def frames_from_rows(
    desc: ModelDescription, rows: Sequence[Sequence[float]], max_steps: int, field: str
) -> np.ndarray:
    """One list of F floats per frame -> (T, F) float32."""
    _need_kind(desc, "features", field)
    check_steps(len(rows), max_steps, field)
    for t, row in enumerate(rows):
        if len(row) != desc.feature_dim:
            raise InvalidInput(
                f"{field}.frames[{t}] has {len(row)} values, the model's feature_dim is "
                f"{desc.feature_dim}"
            )
    frames = np.asarray(rows, dtype=np.float32)  # (T, F)
    _check_finite(frames, field)
    return frames
