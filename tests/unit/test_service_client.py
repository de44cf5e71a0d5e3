"""Client helpers that need no server: input conversion and the live terminal line."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from lstmserve.client import LstmClient, to_input
from lstmserve.client_cli import LiveLine, load_frames, parse_tokens, shown_text


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_line_rewrites_in_place_on_a_tty() -> None:
    out = FakeTty()
    line = LiveLine(out)
    line.update("'h'  class1 0.500")
    line.update("'he' class2 0.700")
    line.done()
    assert out.getvalue() == "\r'h'  class1 0.500\r'he' class2 0.700\n"


def test_live_line_prints_plain_lines_otherwise() -> None:
    out = io.StringIO()
    line = LiveLine(out)
    line.update("a")
    line.update("b")
    line.done()
    assert out.getvalue() == "a\nb\n"


def test_to_input_kinds() -> None:
    assert to_input("hi").text == "hi"
    assert list(to_input([1, 2]).tokens.ids) == [1, 2]
    frames = to_input(np.ones((2, 3), np.float32)).frames
    assert frames.frame_count == 2 and len(frames.values) == 6
    with pytest.raises(ValueError, match="frames must be"):
        to_input(np.ones(3, np.float32))


def test_load_frames_csv_and_npy(tmp_path: Path) -> None:
    frames = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "f.npy", frames)
    np.savetxt(tmp_path / "f.csv", frames, delimiter=",")
    for name in ("f.npy", "f.csv"):
        np.testing.assert_array_equal(load_frames(tmp_path / name), frames)


def test_token_ids_are_parsed_from_spaces_commas_and_lines() -> None:
    ids = parse_tokens("3 17,5\n 5,29 ", "--tokens")
    assert ids.dtype == np.int64 and ids.tolist() == [3, 17, 5, 5, 29]
    for bad, says in (("", "no token ids"), ("1 -2", "token 2 is '-2'"), ("1 ²", "token 2"),
                      ("9" * 19, "not a token id")):  # fmt: skip
        with pytest.raises(ValueError, match=says):
            parse_tokens(bad, "--tokens")


def test_a_resumed_run_shows_its_text_after_what_was_sent_before() -> None:
    assert shown_text("terling", 0, resumed=True) == "…"  # the held letter from before, fed
    assert shown_text("terling", 2, resumed=True) == "…te"
    assert shown_text("terling", -1, resumed=True) == "…"  # more held than this run sent
    assert shown_text("Schmet", 3, resumed=False) == "Sch"


def test_a_server_name_needs_tls_and_overrides_the_target_name() -> None:
    with pytest.raises(ValueError, match="it needs TLS"):
        LstmClient("localhost:8001", server_name="lstm-serve.svc")
    client = LstmClient("localhost:8001", tls=True, server_name="lstm-serve.svc")
    assert ("grpc.ssl_target_name_override", "lstm-serve.svc") in client._options
