"""A subword tokenizer beside a model (`tokenizer.json`, the Hugging Face `tokenizers` format).

Text is encoded without special tokens (a stream has no known end to put a [SEP] at, and
Classify must equal streaming). Streamed text is settled up to the last word boundary: the
words before the last whitespace run whose ids no longer change, checked by encoding (the
prefix's ids must start the ids of everything received, and the rest must encode to the
remainder); the partial word is held, and run as a probe (its tail) after the settled state.
The `tokenizers` library is optional: it is imported only when a model folder has a
tokenizer.json (`pip install 'lstm-serve[tokenizers]'`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lstmserve.contract import ModelDescription
from service.engine.text.textstream import NOTHING_HELD, HeldText, TextFeed
from service.errors import ConfigError

TOKENIZER_FILE = "tokenizer.json"
MAX_HELD_WORD_CHARS = 256  # a longer "word" (no whitespace) is fed without waiting
MAX_TRIES = 8  # word boundaries tried from the end


class SubwordCodec:
    """A tokenizer.json, as a TextCodec (service/engine/text/textstream.py)."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as HfTokenizer
        except ImportError as exc:
            raise ConfigError(
                f"{path}: reading a tokenizer.json needs the tokenizers package: "
                "pip install 'lstm-serve[tokenizers]'"
            ) from exc
        try:
            self._tok = HfTokenizer.from_file(str(path))
        except Exception as exc:  # the library's own parse errors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"{path}: not a tokenizer.json the tokenizers library reads: "
                              f"{first[:200]}") from exc  # fmt: skip
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        unk = getattr(self._tok.model, "unk_token", None)
        self.unknown_id: int | None = self._tok.token_to_id(unk) if unk else None

    # -- TextCodec -----------------------------------------------------------------------------

    unknowns_are_final = False  # a partial word's unknown token may become a known word

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def known(self, ids: list[int]) -> bool:
        return any(i != self.unknown_id for i in ids)

    def feed(self, held: HeldText, chunk: str, final: bool) -> TextFeed:
        full = held.text + chunk
        if final:
            return TextFeed(self.encode(full), NOTHING_HELD)
        whole = self.encode(full)
        for i in _word_starts(full)[:MAX_TRIES]:
            fed = self.encode(full[:i])
            if whole[: len(fed)] == fed and fed + self.encode(full[i:]) == whole:
                tail = tuple(whole[len(fed) :])
                return TextFeed(fed, HeldText(full[i:], tail=tail, known=held.known))
        if len(full) > MAX_HELD_WORD_CHARS:
            return TextFeed(whole, HeldText(known=held.known))
        return TextFeed([], HeldText(full, tail=tuple(whole), known=held.known))

    # -- what a client is told -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"type": TOKENIZER_FILE, "vocab_size": self.vocab_size,
                "unknown_id": self.unknown_id}  # fmt: skip


def _word_starts(text: str) -> list[int]:
    """Where each whitespace run begins (a split point before it), last first; never 0."""
    return [
        i for i in range(len(text) - 1, 0, -1) if text[i].isspace() and not text[i - 1].isspace()
    ]


def find_tokenizer_file(model_path: Path) -> Path | None:
    """tokenizer.json in the version folder, else in the model folder (all versions)."""
    for folder in (model_path.parent, model_path.parent.parent):
        candidate = folder / TOKENIZER_FILE
        if candidate.is_file():
            return candidate
    return None


def with_tokenizer_file(desc: ModelDescription, model_path: Path) -> ModelDescription:
    """The description with the tokenizer.json beside the model, if there is one (it replaces
    a character tokenizer); ConfigError if the model cannot take its ids."""
    path = find_tokenizer_file(model_path)
    if path is None:
        return desc
    if desc.input_kind != "tokens":
        raise ConfigError(f"{path}: the model takes {desc.input_kind}, not token ids")
    codec = SubwordCodec(path)
    if codec.vocab_size > desc.vocab_size:
        raise ConfigError(
            f"{path}: {codec.vocab_size} tokens, but the model takes ids below {desc.vocab_size}"
        )
    return dataclasses.replace(desc, tokenizer=codec)  # type: ignore[arg-type]
