"""Streamed text fed exactly as Classify feeds the whole text: what may still change is run
speculatively, never kept.

A character tokenizer normalises (NFC) and lowercases before it maps characters to ids, and
both look at neighbours: a combining mark composes with the letter before it ("e" + U+0301 ->
"é"), marks are put in canonical order, Hangul jamo compose into syllables, and Python's
`lower()` turns a capital sigma into the final "ς" only when no cased letter follows. A chunk
boundary can fall inside any of these. So a stream keeps back the text whose tokens could still
change with what comes next (usually the last character; nothing after a space or a
punctuation mark) and settles the rest: what is settled, chunk after chunk, is the token
sequence of the whole text, and the session's state is kept at that settled point. Each reply
also runs the held text's tokens as if the text ended there (its `tail`) from the settled state,
without keeping that state (a probe), so every reply is Classify of the text sent so far; when
the next chunk changes how the held text tokenizes, the probe's steps are taken back (rewound)
and the new tail is run instead.

A subword tokenizer (`tokenizer.json`) is held back to the last word boundary the same way
(service/engine/text/subwords.py). Both give a `TextFeed` for `feed(held, chunk, final)`.

The held text is part of the session (snapshots and the shared store carry it), bounded by
MAX_HELD_CHARS: beyond that, everything is fed (a run of that many combining marks on one
letter is not text anyone streams).
"""

from __future__ import annotations

import functools
import itertools
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lstmserve.contract import Tokenizer

MAX_HELD_CHARS = 64
# How many candidate boundaries (from the end) are tried before everything is held.
MAX_TRIES = 16
# A cased letter that composes with nothing and lowercases to one character: put before a
# piece of text it stands for "the text before ended with a cased letter" (final sigma), and
# appended it stands for "a cased letter may follow".
CASED = "Q"
SIGMA, FINAL_SIGMA = "Σ", "ς"


@dataclass(frozen=True, slots=True)
class HeldText:
    """A session's text not settled yet, the one fact about the settled text it depends on, and
    its ids were the text to end here (`tail`: what a reply runs after the settled state)."""

    text: str = ""
    cased: bool = False  # the settled text ends (case-ignorables aside) in a cased letter
    tail: tuple[int, ...] = ()
    known: bool = False  # the settled text has a known token (service/engine/text/inputs.py)


NOTHING_HELD = HeldText()


@dataclass(frozen=True, slots=True)
class HeldChange:
    """What a text chunk does to its session's held text: decoded against `before` (outside
    the session's lock), it may only be applied if the session still holds `before`. `kept`:
    how many leading steps of what the chunk runs (its settled ids, then `after.tail`) repeat
    the end of the previous reply (`before.tail`); the rest of `before.tail` is rewound."""

    before: HeldText
    after: HeldText
    kept: int = 0

    @property
    def rewound(self) -> int:
        """Steps of the previous reply taken back: its tail, beyond what this chunk repeats."""
        return len(self.before.tail) - self.kept


@dataclass(frozen=True, slots=True)
class TextFeed:
    """The token ids settled now, and what is held back for the next chunk (with its tail)."""

    ids: list[int]
    held: HeldText


def held_change(before: HeldText, settled: Sequence[int], after: HeldText) -> HeldChange:
    """A text chunk's change: from `before`, settling `settled` ids, holding `after`."""
    kept = 0
    for a, b in zip(before.tail, itertools.chain(settled, after.tail), strict=False):
        if a != b:
            break
        kept += 1
    return HeldChange(before, after, kept)


def ids_after_held(before: HeldText, ids: np.ndarray) -> tuple[np.ndarray, HeldChange | None]:
    """Token ids sent to a text session: they settle its held text first (nothing may combine
    with it any more; its tail's ids run before them, as the previous reply's probe did) and
    count as known. (ids, None) when nothing held changes."""
    if before.known and not before.tail:
        return ids, None
    tail = np.asarray(before.tail, dtype=ids.dtype)
    change = HeldChange(before, HeldText(known=True), len(tail))
    return (np.concatenate([tail, ids]) if len(tail) else ids), change


class TextCodec(Protocol):
    """A model's text tokenizer as the service uses it."""

    def encode(self, text: str) -> list[int]:
        """A whole text's ids (Classify)."""
        ...

    def feed(self, held: HeldText, chunk: str, final: bool) -> TextFeed:
        """The ids of `held.text + chunk` that can no longer change (all of them if `final`),
        and the rest held back with its tail."""
        ...

    # Whether an unknown token stays unknown as the text grows (a character's does; a word or
    # subword tokenizer's partial word may become a known word): only then is streamed text
    # with nothing known refused chunk by chunk (service/engine/text/inputs.py).
    unknowns_are_final: bool

    def known(self, ids: list[int]) -> bool:
        """Whether any id is a known token (a whole text of unknowns is refused)."""
        ...


@functools.cache
def _forward_composers() -> frozenset[str]:
    """Characters that start a canonical composition pair (a letter a mark may combine with)."""
    first = set()
    for cp in range(0x110000):
        d = unicodedata.decomposition(chr(cp))
        if d and not d.startswith("<"):
            parts = d.split()
            if len(parts) == 2:
                first.add(chr(int(parts[0], 16)))
    return frozenset(first)


def _hangul_open(ch: str) -> bool:
    """A leading jamo, a vowel jamo (it may have composed with a leading one before it) or an
    LV syllable: a following vowel / trailing jamo composes with it."""
    cp = ord(ch)
    return (
        0x1100 <= cp <= 0x1112
        or 0x1161 <= cp <= 0x1175
        or (0xAC00 <= cp <= 0xD7A3 and (cp - 0xAC00) % 28 == 0)
    )


@functools.lru_cache(maxsize=4096)
def open_end(ch: str) -> bool:
    """Whether a character's normal form may still change with the next character."""
    decomposed = unicodedata.normalize("NFD", ch)
    last = decomposed[-1]
    return (
        unicodedata.combining(last) != 0
        or ch in _forward_composers()
        or last in _forward_composers()
        or _hangul_open(ch)
        or _hangul_open(last)
    )


@functools.lru_cache(maxsize=4096)
def starter(ch: str) -> bool:
    """Whether a character starts with a starter (no mark before it can be reordered past it)."""
    return unicodedata.combining(unicodedata.normalize("NFD", ch)[0]) == 0


class CharTextCodec:
    """The character tokenizer of lstmserve.contract, streamed."""

    unknowns_are_final = True  # a character unknown now stays unknown whatever follows

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        _forward_composers()  # built once (~0.1 s), at load rather than on a first chunk

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def known(self, ids: list[int]) -> bool:
        unknown = self.tokenizer.unknown_id
        return any(i != unknown for i in ids)

    def _norm(self, cased: bool, text: str) -> str:
        """`text` normalised as it would be after text ending in a cased letter (or not)."""
        if not cased:
            return self.tokenizer.normalize(text)
        return self.tokenizer.normalize(CASED + text)[1:]

    def _ids(self, normalized: str) -> list[int]:
        return self.tokenizer.encode_normalized(normalized)

    def _cased_after(self, cased: bool, text: str) -> bool:
        """Whether text ends (case-ignorables aside) in a cased letter, as lower() decides."""
        if not self.tokenizer.lowercase:
            return False  # nothing depends on it
        return self._norm(cased, text + SIGMA).endswith(FINAL_SIGMA)

    def feed(self, held: HeldText, chunk: str, final: bool) -> TextFeed:
        full = held.text + chunk
        whole = self._norm(held.cased, full)
        if final:
            return TextFeed(self._ids(whole), NOTHING_HELD)
        probe = self._norm(held.cased, full + CASED)  # a cased letter next flips a final sigma
        for tries, i in enumerate(self._boundaries(full)):
            if tries >= MAX_TRIES:
                break
            fed = whole if i == len(full) else self._norm(held.cased, full[:i])
            if not (whole.startswith(fed) and probe.startswith(fed)):
                continue
            cased = self._cased_after(held.cased, full[:i])
            if fed + self._norm(cased, full[i:]) != whole:
                continue
            tail = tuple(self._ids(whole[len(fed) :]))  # the rest of the whole text's ids
            return TextFeed(self._ids(fed), HeldText(full[i:], cased, tail, held.known))
        if len(full) > MAX_HELD_CHARS:  # no stable boundary in a long run: feed it all
            cased = self._cased_after(held.cased, full)
            return TextFeed(self._ids(whole), HeldText("", cased, (), held.known))
        return TextFeed([], HeldText(full, held.cased, tuple(self._ids(whole)), held.known))

    @staticmethod
    def _boundaries(full: str) -> list[int]:
        """Candidate split points, last first: the end if its last character is settled,
        then before each starter (never 0: holding everything is the fallback)."""
        out = []
        n = len(full)
        if n and not open_end(full[-1]):
            out.append(n)
        for i in range(n - 1, 0, -1):
            if starter(full[i]):
                out.append(i)
                if len(out) >= MAX_TRIES:
                    break
        return out


@functools.lru_cache(maxsize=256)
def char_codec(tokenizer: Tokenizer) -> CharTextCodec:
    return CharTextCodec(tokenizer)


def with_tail(codec: TextCodec, text: str, cased: bool, known: bool = False) -> HeldText:
    """Held text as a snapshot or the shared store records it, with its tail."""
    if not text:
        return HeldText("", cased, (), known)
    tail = tuple(codec.feed(HeldText(text, cased), "", final=True).ids)
    return HeldText(text, cased, tail, known)


def text_codec(tokenizer: object) -> TextCodec:
    """The codec of a model's tokenizer (the character one of our contract, or a subword one
    that is its own codec)."""
    if isinstance(tokenizer, Tokenizer):
        return char_codec(tokenizer)
    assert hasattr(tokenizer, "feed"), type(tokenizer)
    return tokenizer  # type: ignore[return-value]
