"""The real data sets load from installed packages, with fixed, leak-free splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.data import (
    DICT_DIR,
    WORD_LISTS,
    WordList,
    load_japanese_vowels,
    load_word_languages,
    read_word_list,
    word_split,
)


def test_japanese_vowels_has_the_official_split_and_raw_frames() -> None:
    ds = load_japanese_vowels()
    assert len(ds.train) + len(ds.val) == 270 and len(ds.test) == 370
    assert ds.labels == [f"speaker{i}" for i in range(1, 10)]
    lengths = [len(e.x) for e in ds.train + ds.val + ds.test]
    assert min(lengths) == 7 and max(lengths) == 29
    assert all(e.x.shape[1] == 12 and e.x.dtype == np.float32 for e in ds.test)
    assert {e.label for e in ds.val} == set(range(9)), "validation is stratified"
    again = load_japanese_vowels()
    assert [e.x.tobytes() for e in again.val] == [e.x.tobytes() for e in ds.val], "fixed seed"


def test_word_split_is_a_fixed_function_of_the_word() -> None:
    words = [f"w{i}" for i in range(5000)]
    splits = [word_split(w) for w in words]
    assert splits == [word_split(w) for w in words]
    share = {s: splits.count(s) / len(words) for s in ("train", "val", "test")}
    assert 0.07 < share["test"] < 0.13 and 0.07 < share["val"] < 0.13


def _write(tmp: Path, name: str, words: list[str], encoding: str = "utf-8") -> None:
    (tmp / name).write_text("\n".join(words) + "\n", encoding=encoding)


def test_word_languages_drop_shared_words_and_never_leak_across_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    letters = "abcdehrs"
    for wl in WORD_LISTS[:3]:
        words = ["".join(rng.choice(list(letters), size=6)) + wl.language[:2] for _ in range(400)]
        _write(tmp_path, wl.file, [*words, "shared", "Shared", "x"], wl.encoding)
    ds, vocab = load_word_languages(per_language=200, dict_dir=tmp_path)
    assert ds.labels == [wl.language for wl in WORD_LISTS[:3]]
    words = {
        split: ["".join(vocab[i] for i in e.x) for e in getattr(ds, split)]
        for split in ("train", "val", "test")
    }
    for split, items in words.items():
        assert "shared" not in items, f"a word of several lists leaked into {split}"
        assert all(len(w) >= 2 for w in items), "one-letter words are dropped"
    assert not set(words["train"]) & set(words["test"])
    assert len(words["train"]) > 8 * len(words["test"]) / 2
    assert vocab[0] == "<unk>"


def test_latin1_word_list_is_decoded(tmp_path: Path) -> None:
    wl = WordList("swedish", "swedish", "wswedish", "GPL-2+", encoding="latin-1")
    _write(tmp_path, "swedish", ["Smörgåsbord", "öl"], "latin-1")
    assert read_word_list(wl, tmp_path) == {"smörgåsbord", "öl"}


@pytest.mark.skipif(not (DICT_DIR / "american-english").exists(), reason="wamerican not installed")
def test_installed_english_list_is_read_without_possessives() -> None:
    words = read_word_list(WORD_LISTS[0])
    assert len(words) > 50000
    assert not any(w.endswith("'s") for w in words)
    assert "language" in words
