"""docs/COMING_FROM_TRITON.md: its tritonclient program and its REST body run literally against a
real lstm-serve (subprocess, the shipped models, free ports) and answer what the guide prints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.e2e.conftest import ROOT, ServerProcess

GUIDE = ROOT / "docs" / "COMING_FROM_TRITON.md"
NUMBER = re.compile(r"\d+\.\d+")


def blocks(language: str) -> list[str]:
    """The guide's fenced code blocks of one language ("" = no language), in order."""
    found: list[str] = []
    current: list[str] | None = None
    kind = ""
    for line in GUIDE.read_text(encoding="utf-8").splitlines(keepends=True):
        if current is None and line.startswith("```"):
            current, kind = [], line[3:].strip()
        elif current is not None and line.rstrip() == "```":
            if kind == language:
                found.append("".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return found


@pytest.fixture(scope="module")
def shipped_server() -> Iterator[ServerProcess]:
    server = ServerProcess(ROOT / "models")
    server.wait_event("ready", 60)
    yield server
    server.stop()


def same_text_close_numbers(got: str, want: str) -> None:
    """Equal line for line, numbers within 1e-5 (another onnxruntime build may round apart)."""
    assert NUMBER.sub("#", got) == NUMBER.sub("#", want), got
    for a, b in zip(NUMBER.findall(got), NUMBER.findall(want), strict=True):
        assert float(a) == pytest.approx(float(b), abs=1e-5), (a, b)


def test_the_tritonclient_sequence_program_runs_unchanged(
    shipped_server: ServerProcess, tmp_path: Path
) -> None:
    (program,) = blocks("python")
    script = tmp_path / "triton_sequence.py"
    script.write_text(program, encoding="utf-8")
    env = {**os.environ, "TRITON_URL": shipped_server.address}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    printed = blocks("")[0]
    same_text_close_numbers(done.stdout, printed)
    # The sequence's last answer is native Classify's for the whole word.
    with grpc.insecure_channel(shipped_server.address) as channel:
        reply = pb_grpc.LstmServeStub(channel).Classify(
            pb.ClassifyRequest(model="langid-chars", top_k=1,
                               sequences=[pb.SequenceInput(text="schmetterling")]),
            timeout=30,
        )  # fmt: skip
    top = reply.results[0].top[0]
    last = done.stdout.strip().splitlines()[-1]
    score, index, label = re.findall(r"'([^']*)'", last)[1].split(":")
    assert (int(index), label) == (top.index, top.label) == (1, "german")
    assert float(score) == pytest.approx(top.probability, abs=1e-6)


def test_the_rest_body_answers_what_the_guide_shows(shipped_server: ServerProcess) -> None:
    body, answer = blocks("json")
    request = urllib.request.Request(
        f"http://127.0.0.1:{shipped_server.http_port}/v2/models/langid-chars/infer",
        data=body.encode(), headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        got = json.loads(response.read())
    assert got == json.loads(answer)
