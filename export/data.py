"""Real data sets, read from what installed packages ship; nothing is downloaded.

- JapaneseVowels (UCI / UEA archive; Kudo, Toyama & Shimbo 1999; CC BY 4.0), shipped inside the
  `aeon` wheel: 9 speakers, 12 LPC cepstrum coefficients per frame, 7-29 frames per utterance.
  Official split: 270 train, 370 test series.
- Word lists installed by Debian packages under /usr/share/dict (wamerican, wngerman, ...): the
  language of a word, character by character. The split is fixed by a hash of the word.
"""

from __future__ import annotations

import hashlib
import random
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DICT_DIR = Path("/usr/share/dict")


@dataclass(frozen=True)
class Example:
    """One sequence: `x` is int64 ids [T] or float32 frames [T, F]; `label` an index."""

    x: np.ndarray
    label: int


@dataclass(frozen=True)
class Dataset:
    name: str
    labels: list[str]
    train: list[Example]
    val: list[Example]
    test: list[Example]
    source: dict[str, str]


def _stratified_split(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split off `fraction` of each class (at least one) as validation, deterministically;
    a fraction of 0 keeps every example for training."""
    if fraction <= 0:
        return examples, []
    rng = random.Random(seed)
    by_label: dict[int, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    train, val = [], []
    for label in sorted(by_label):
        items = by_label[label][:]
        rng.shuffle(items)
        k = max(1, round(len(items) * fraction))
        val += items[:k]
        train += items[k:]
    return train, val


def load_japanese_vowels(val_fraction: float = 0.15, seed: int = 0) -> Dataset:
    """JapaneseVowels from the aeon wheel: frames [T, 12] as the data set gives them."""
    from aeon.datasets import load_classification

    def read(split: str) -> list[Example]:
        xs, ys = load_classification("JapaneseVowels", split=split)
        # aeon gives (channels=12, T) per series; the model reads frames (T, 12).
        return [
            Example(np.ascontiguousarray(np.asarray(x, dtype=np.float32).T), int(y) - 1)
            for x, y in zip(xs, ys, strict=True)
        ]

    train, val = _stratified_split(read("train"), val_fraction, seed)
    return Dataset(
        name="JapaneseVowels",
        labels=[f"speaker{i}" for i in range(1, 10)],
        train=train,
        val=val,
        test=read("test"),
        source={
            "data": "JapaneseVowels (Kudo, Toyama & Shimbo 1999), UCI / UEA archive",
            "licence": "CC BY 4.0 (UCI Machine Learning Repository)",
            "shipped_by": "the aeon wheel (aeon/datasets/data/JapaneseVowels)",
            "split": (
                f"official: 270 train (a stratified {val_fraction:.0%} of it held out for "
                "validation), 370 test"
            ),
        },
    )


@dataclass(frozen=True)
class WordList:
    language: str
    file: str
    package: str
    licence: str
    encoding: str = "utf-8"


WORD_LISTS: tuple[WordList, ...] = (
    WordList("english", "american-english", "wamerican", "SCOWL (permissive, Kevin Atkinson)"),
    WordList("german", "ngerman", "wngerman", "GPL-2+"),
    WordList("french", "french", "wfrench", "GPL-2+"),
    WordList("spanish", "spanish", "wspanish", "public domain"),
    WordList("italian", "italian", "witalian", "GPL-3+"),
    WordList("portuguese", "portuguese", "wportuguese", "GPL-2+ / LGPL-2.1+ / MPL-1.1"),
    WordList("dutch", "dutch", "wdutch", "BSD or CC BY 3.0 (OpenTaal)"),
    WordList("swedish", "swedish", "wswedish", "GPL-2+", encoding="latin-1"),
    WordList("polish", "polish", "wpolish", "GPL-2 / LGPL-2.1 / MPL-1.1 / Apache-2.0 / CC BY 4.0"),
    WordList("danish", "danish", "wdanish", "GPL-2+"),
)


def normalize_word(word: str) -> str:
    return unicodedata.normalize("NFC", word.strip()).lower()


def read_word_list(wl: WordList, dict_dir: Path = DICT_DIR) -> set[str]:
    """The distinct lower-case words of one list, without possessives or very short/long words."""
    text = (dict_dir / wl.file).read_text(encoding=wl.encoding)
    words = set()
    for line in text.splitlines():
        word = normalize_word(line)
        if 2 <= len(word) <= 24 and not word.endswith("'s") and " " not in word:
            words.add(word)
    return words


def word_split(word: str) -> str:
    """A fixed split by hash of the word: 80 % train, 10 % val, 10 % test."""
    bucket = int.from_bytes(hashlib.sha1(word.encode("utf-8")).digest()[:4], "big") % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def build_char_vocab(words: list[str], min_count: int = 20) -> list[str]:
    """Index 0 is the unknown character; then characters seen at least `min_count` times."""
    counts = Counter(ch for w in words for ch in w)
    return ["<unk>", *sorted(ch for ch, n in counts.items() if n >= min_count)]


def load_word_languages(
    per_language: int = 20000, seed: int = 0, dict_dir: Path = DICT_DIR
) -> tuple[Dataset, list[str]]:
    """Words of each language (ambiguous words dropped), sampled per split; returns the vocab."""
    lists = [wl for wl in WORD_LISTS if (dict_dir / wl.file).exists()]
    vocab_words = {wl.language: read_word_list(wl, dict_dir) for wl in lists}
    seen = Counter(w for words in vocab_words.values() for w in words)
    rng = random.Random(seed)
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    sizes = {"train": per_language, "val": per_language // 8, "test": per_language // 8}
    for label, wl in enumerate(lists):
        unique = sorted(w for w in vocab_words[wl.language] if seen[w] == 1)
        for split in splits:
            pool = [w for w in unique if word_split(w) == split]
            chosen = rng.sample(pool, min(sizes[split], len(pool)))
            splits[split] += [(w, label) for w in chosen]
    vocab = build_char_vocab([w for w, _ in splits["train"]])
    index = {ch: i for i, ch in enumerate(vocab)}

    def encode(items: list[tuple[str, int]]) -> list[Example]:
        return [
            Example(np.array([index.get(ch, 0) for ch in w], dtype=np.int64), y) for w, y in items
        ]

    packages = ", ".join(f"{wl.package} ({wl.language}: {wl.licence})" for wl in lists)
    dataset = Dataset(
        name="debian-word-lists",
        labels=[wl.language for wl in lists],
        train=encode(splits["train"]),
        val=encode(splits["val"]),
        test=encode(splits["test"]),
        source={
            "data": f"Debian word lists under {dict_dir}: {packages}",
            "licence": "each list's own licence, as above; the lists are not redistributed",
            "split": (
                "fixed by sha1(word) mod 10 (0 test, 1 val, else train); words present in "
                f"more than one list dropped; {per_language} train words sampled per language"
            ),
        },
    )
    return dataset, vocab
