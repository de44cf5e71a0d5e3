"""Streamed text's settled ids and held tail, without a model: after every chunk, what is
settled followed by the held text's tail is exactly the tokenization of the text so far, and
what is settled never changes (service/engine/text/textstream.py)."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lstmserve.contract import Tokenizer
from service.engine.text.textstream import (
    NOTHING_HELD,
    HeldText,
    char_codec,
    held_change,
    with_tail,
)

VOCAB = ("<unk>", " ", *"abcdefghijklmnopqrstuvwxyz", "é", "ï", "σ", "ς", "가", "각", "ß")
CODEC = char_codec(Tokenizer(vocab=VOCAB))
TRICKY = (
    "aeiouxq AEIΣσςΑ'.?-"
    "\u0301\u0300\u0308\u0323\u0327\u0316\u0345"  # combining marks of several classes
    "\u1100\u1112\u1161\u1175\u11a8\u11c2가각"  # Hangul jamo (L, V, T) and syllables
    "éǖİﬁﬀ\u0f73ßẞǅ☃"
)
TEXTS = st.one_of(
    st.text(st.sampled_from(TRICKY), min_size=1, max_size=24),
    st.text(min_size=1, max_size=12),
)


def feed_all(pieces: list[str]) -> list[tuple[list[int], HeldText]]:
    held, settled, seen = NOTHING_HELD, [], []
    for piece in pieces:
        feed = CODEC.feed(held, piece, final=False)
        settled = settled + feed.ids
        held = feed.held
        seen.append((settled, held))
    return seen


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)  # fmt: skip
@given(text=TEXTS, cuts=st.lists(st.integers(1, 23), max_size=10), each=st.booleans())
@example(text="\u1100\u1161\u11a8", cuts=[], each=True)  # L, V, T one per chunk: one syllable
@example(text="a\u1100\u1161\u11a8x", cuts=[2, 3, 4], each=False)
@example(text="cafe\u0301", cuts=[4], each=False)  # a mark composes with the held letter
@example(text="ΑΣ", cuts=[], each=True)  # a final capital sigma, then nothing: "ς"
@example(text="ΑΣA", cuts=[], each=True)  # ... then a letter: "σ"
@example(text="e" + "\u0301" * 80, cuts=[], each=True)  # a run of marks beyond the held bound
def test_settled_then_tail_is_the_tokenization_of_the_text_so_far(
    text: str, cuts: list[int], each: bool
) -> None:
    points = range(1, len(text)) if each else sorted({c for c in cuts if 0 < c < len(text)})
    ends = [*points, len(text)]
    pieces = [text[a:b] for a, b in zip([0, *points], ends, strict=True)]
    previous: list[int] = []
    for (settled, held), end in zip(feed_all(pieces), ends, strict=True):
        assert settled[: len(previous)] == previous  # settled ids never change
        assert settled + list(held.tail) == CODEC.encode(text[:end]), (text[:end], held)
        assert with_tail(CODEC, held.text, held.cased) == held  # what a snapshot restores
        previous = settled


def test_a_change_keeps_the_steps_that_repeat_the_previous_tail() -> None:
    first = CODEC.feed(NOTHING_HELD, "ab", final=False)  # "a" settled, "b" held
    second = CODEC.feed(first.held, "e", final=False)  # "b" settled, "e" held
    change = held_change(first.held, second.ids, second.held)
    assert (change.kept, change.rewound) == (1, 0)  # "b" was the previous reply's last step
    accent = CODEC.feed(second.held, "\u0301", final=False)  # "é", not "e"
    change = held_change(second.held, accent.ids, accent.held)
    assert (change.kept, change.rewound) == (0, 1)
    mark = CODEC.feed(NOTHING_HELD, "c\u0308", final=False)  # no "c" with a diaeresis
    assert mark.held.tail[0] == CODEC.encode("c")[0]  # "c" stays, the mark is unknown
