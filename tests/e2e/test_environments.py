"""Each documented environment alone, built by .ci/environments.sh (LSTM_SERVE_ENVIRONMENTS names
the folder), runs the commands the docs name for it; a command whose extra is missing says in
one line which extra to install, never a traceback. The all-extras test venv cannot see these
faults: here each environment has only what its install line gives it.
  serve       `pip install -e .` (.venv): lstm-serve, lstm-client, lstm-export describe, the
              tritonclient program of docs/COMING_FROM_TRITON.md and its install line
  export      `pip install -e '.[export]'`: docs/own-model-from-torch.md, docs/own-model-onnx.md,
              lstm-export config / verify / describe / tiny / inspect / trace (with its PNG)
  train       `pip install -e '.[train]'`: the README's recipe path, train, crossval, trace
  tokenizers  `pip install -e '.[tokenizers]'`: a model with a tokenizer.json, served
  tracing     `pip install -e '.[tracing]'`: docs/OPERATIONS.md's `lstm-serve
              --trace-otlp-endpoint ...`, its spans received"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e import docs_runner
from tests.e2e.command_server import PORT_FLAGS, CommandServer
from tests.e2e.test_docs_triton import blocks, same_text_close_numbers

ROOT = Path(__file__).resolve().parents[2]
BUILT = os.environ.get("LSTM_SERVE_ENVIRONMENTS", "")
pytestmark = pytest.mark.skipif(
    not BUILT,
    reason="LSTM_SERVE_ENVIRONMENTS names the folder .ci/environments.sh built "
    "(`make test-environments`; .ci/run does)",
)
EXPORT_COMMANDS = [
    "inspect models/langid-chars",
    "trace models/langid-chars --text Schmetterling --out trace",
    "tiny --out tiny",
    "config models/langid-chars/1/model.onnx",
    "verify models/langid-chars/1",
    "quantize models/langid-chars/1 --out int8/langid-chars/1",
    "from-torch --module m.py:M --weights w.pt --labels labels.txt --out repo/m/1",
]
TRAIN_COMMANDS = ["train speaker-vowels --out trained --epochs 1", "crossval speaker-vowels"]
PNG = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Environment:
    """One built environment: its venv and its own copy of the checkout (NAME/venv, NAME/src)."""

    name: str
    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "venv" / "bin"

    @property
    def src(self) -> Path:
        return self.root / "src"

    def variables(self) -> dict[str, str]:
        """The shell of a user who activated this venv."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        return env | {"PATH": f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
                      "VIRTUAL_ENV": str(self.root / "venv")}  # fmt: skip

    def run(self, script: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """`script` in bash, in this environment, in the checkout unless `cwd` says otherwise."""
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=cwd or self.src,
            env=self.variables(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    def ok(self, script: str, cwd: Path | None = None) -> str:
        done = self.run(script, cwd)
        assert done.returncode == 0, (
            f"{self.name}: {script}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
        return done.stdout

    def serve(self, *args: str) -> CommandServer:
        argv = [str(self.bin / "lstm-serve"), *PORT_FLAGS, *args]
        return CommandServer(argv, cwd=self.src, env=self.variables())

    def has(self, *modules: str) -> list[str]:
        """Which of `modules` this environment can import."""
        found = f"[m for m in {modules!r} if u.find_spec(m)]"
        code = f"import importlib.util as u, json; print(json.dumps({found}))"
        return json.loads(self.ok(f"python -c {shlex.quote(code)}"))


def environment(name: str) -> Environment:
    root = Path(BUILT).resolve() / name
    assert (root / "venv" / "bin" / "python").exists(), f"{root}: run .ci/environments.sh first"
    return Environment(name, root)


def one_line_naming(done: subprocess.CompletedProcess[str], extra: str) -> None:
    """Exit 2 and one line on stderr that names the extra's install line, no traceback."""
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"pip install -e '.[{extra}]'" in done.stderr, done.stderr


def docs_in(env: Environment, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs_runner runs a doc's blocks with `env`'s bin/ first on PATH."""
    monkeypatch.setattr(docs_runner, "doc_env", env.variables)


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


# ---- serve: .venv ----------------------------------------------------------------------------


def test_serve_has_no_export_training_or_tokenizer_package() -> None:
    env = environment("serve")
    assert env.has("onnxruntime", "grpc", "tritonclient") == ["onnxruntime", "grpc", "tritonclient"]
    assert env.has("torch", "onnx", "matplotlib", "aeon", "tokenizers") == []


def test_serve_runs_the_server_and_the_clients_the_guides_show() -> None:
    env = environment("serve")
    assert "--model-repository" in env.ok("lstm-serve --help")
    assert '"name": "langid-chars"' in env.ok("lstm-export describe models/langid-chars/1")
    server = env.serve()  # models/ of the checkout, as `make serve`
    try:
        server.wait_event("ready", 90)
        address = f"--address 127.0.0.1:{server.port}"
        assert "langid-chars v1" in env.ok(f"lstm-client {address} list")
        assert "french" in env.ok(f"lstm-client {address} classify langid-chars --text bonjour")
        streamed = env.ok(f'lstm-client {address} stream langid-chars --text "guten morgen"')
        assert "ended after 12 steps" in streamed, streamed
        metrics = http_get(f"http://127.0.0.1:{server.metrics_port}/metrics")
        assert "lstm_serve_model_info{" in metrics
        program = Path(env.root / "triton_sequence.py")
        program.write_text(blocks("python")[0], encoding="utf-8")
        printed = env.ok(f"TRITON_URL=127.0.0.1:{server.port} python {program}")
        same_text_close_numbers(printed, blocks("")[0])
        # COMING_FROM_TRITON's install line, then tritonclient.http against the same server
        (install,) = [b for b in blocks("bash") if "tritonclient" in b]
        env.ok(install.strip())
        check = (
            "import tritonclient.http as h; "
            f"c = h.InferenceServerClient('127.0.0.1:{server.http_port}'); "
            "assert c.is_server_ready() and c.is_model_ready('langid-chars')"
        )
        env.ok(f"python -c {shlex.quote(check)}")
    finally:
        server.stop()


def test_the_triton_guides_install_line_pins_what_lstm_serve_pins() -> None:
    (install,) = [b for b in blocks("bash") if "tritonclient" in b]
    pinned = re.search(r"tritonclient\[[\w,]+\]==([\d.]+)", install)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert pinned is not None and f"tritonclient[grpc]=={pinned[1]}" in deps


@pytest.mark.parametrize("command", EXPORT_COMMANDS + TRAIN_COMMANDS)
def test_serve_names_the_extra_an_export_command_needs(command: str, tmp_path: Path) -> None:
    env = environment("serve")
    models = tmp_path / "models"
    shutil.copytree(env.src / "models" / "langid-chars", models / "langid-chars")
    done = env.run(f"lstm-export {command}", cwd=tmp_path)
    one_line_naming(done, "train" if command in TRAIN_COMMANDS else "export")


def test_serve_names_the_tokenizers_extra_for_a_tokenizer_json(tokenizer_repo: Path) -> None:
    env = environment("serve")
    done = env.run(f"lstm-serve --model-repository {tokenizer_repo} --grpc-port 0 "
                   "--http-port -1 --metrics-port -1")  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "pip install 'lstm-serve[tokenizers]'" in done.stderr


def test_serve_names_the_tracing_extra_for_the_flag() -> None:
    env = environment("serve")
    assert env.has("opentelemetry") == []
    done = env.run("lstm-serve --model-repository models --grpc-port 0 --http-port -1 "
                   "--metrics-port -1 --trace-otlp-endpoint http://127.0.0.1:4317")  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "pip install 'lstm-serve[tracing]'" in done.stderr


# ---- export ----------------------------------------------------------------------------------


def test_export_has_no_training_stack() -> None:
    env = environment("export")
    assert env.has("torch", "onnx", "onnxscript", "matplotlib") == [
        "torch", "onnx", "onnxscript", "matplotlib"
    ]  # fmt: skip
    assert env.has("aeon", "tqdm", "tokenizers") == []


def test_export_runs_the_from_torch_tutorial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = environment("export")
    docs_in(env, monkeypatch)
    outputs = docs_runner.run_doc(ROOT / "docs" / "own-model-from-torch.md", tmp_path)
    assert '"status": "PASS"' in outputs[0]
    assert outputs[1].startswith("word-ending v1"), outputs[1]


def test_export_runs_the_own_onnx_tutorial_and_traces_its_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = environment("export")
    docs_in(env, monkeypatch)
    verify, client = docs_runner.run_doc(ROOT / "docs" / "own-model-onnx.md", tmp_path)
    assert '"status": "PASS"' in verify and "digit-seen v1" in client
    traced = env.ok("lstm-export trace repo/digit-seen --text abc1de --out trace", cwd=tmp_path)
    assert '"status": "PASS"' in traced
    assert (tmp_path / "trace" / "trace.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("name", ["export", "train"])
def test_inspect_and_trace_with_its_png(name: str, tmp_path: Path) -> None:
    env = environment(name)
    assert "forget" in env.ok("lstm-export inspect models/langid-chars", cwd=env.src)
    assert '"layers"' in env.ok("lstm-export inspect models/langid-chars --json", cwd=env.src)
    models = env.src / "models" / "langid-chars"
    traced = env.ok(f"lstm-export trace {models} --text Schmetterling --out trace", cwd=tmp_path)
    assert '"status": "PASS"' in traced and '"predicted": "german"' in traced
    assert (tmp_path / "trace" / "trace.json").is_file()
    assert (tmp_path / "trace" / "trace.png").read_bytes().startswith(PNG)


FINAL_ONLY = """
import sys, warnings
import torch
from torch import nn

class FinalOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding, self.lstm = nn.Embedding(10, 6), nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens, h0, c0):
        out, (h, c) = self.lstm(self.embedding(tokens), (h0, c0))
        return self.head(out[:, -1]), h, c  # the answer for the whole sequence only: (B, C)

torch.manual_seed(0)
state = torch.zeros(1, 2, 8)
axes = {"tokens": {0: "B", 1: "T"}, "logits": {0: "B"}}
axes |= {n: {1: "B"} for n in ("h0", "c0", "hn", "cn")}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(FinalOnly().eval(), (torch.zeros(2, 5, dtype=torch.long), state, state),
        sys.argv[1], input_names=["tokens", "h0", "c0"], output_names=["logits", "hn", "cn"],
        dynamic_axes=axes, dynamo=False)
"""


def test_export_traces_a_config_model_with_a_final_output_only(tmp_path: Path) -> None:
    env = environment("export")
    (tmp_path / "final_only.py").write_text(FINAL_ONLY)
    (tmp_path / "repo" / "final" / "1").mkdir(parents=True)
    env.ok(
        "python final_only.py repo/final/1/model.onnx\n"
        "lstm-export config repo/final/1/model.onnx > repo/final/config.pbtxt\n"
        "printf 'a\\nb\\nc\\nd\\n' > repo/final/labels.txt",
        cwd=tmp_path,
    )
    traced = env.ok("lstm-export trace repo/final --tokens 1,2,3,4,5,6 --out t", cwd=tmp_path)
    assert '"status": "PASS"' in traced and '"steps": 6' in traced
    assert (tmp_path / "t" / "trace.png").read_bytes().startswith(PNG)


def test_export_runs_the_commands_it_is_documented_for(tmp_path: Path) -> None:
    env = environment("export")
    src = env.src
    assert '"status": "PASS"' in env.ok(f"lstm-export verify {src}/models/langid-chars/1")
    assert '"name": "langid-chars"' in env.ok(f"lstm-export describe {src}/models/langid-chars/1")
    model = f"{src}/models/langid-chars/1/model.onnx"
    assert 'backend: "onnxruntime"' in env.ok(f"lstm-export config {model}", cwd=tmp_path)
    assert "tiny-lstm" in env.ok("lstm-export tiny --out tiny", cwd=tmp_path)
    for command in TRAIN_COMMANDS:
        one_line_naming(env.run(f"lstm-export {command}", cwd=tmp_path), "train")


# ---- train -----------------------------------------------------------------------------------


def test_train_runs_the_readme_recipe_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = environment("train")
    docs_in(env, monkeypatch)
    verify, listed = docs_runner.run_doc(ROOT / "README.md", tmp_path, only="own-recipe")
    assert '"status": "PASS"' in verify and listed.startswith("speaker-vowels v1"), listed


# The documented commands, shortened where they would take minutes (the code path is the same):
# crossval with one candidate, one epoch, two folds; langid-chars on 200 words per language.
SHORT_CROSSVAL = """
import dataclasses, sys
import export.crossval as crossval
from export.cli import main
from export.recipes import RECIPES
crossval.SPEAKER_CANDIDATES = crossval.SPEAKER_CANDIDATES[:1]
recipe = RECIPES["speaker-vowels"]
one_epoch = dataclasses.replace(recipe.train, epochs=1)
RECIPES["speaker-vowels"] = dataclasses.replace(recipe, train=one_epoch)
sys.exit(main(["crossval", "speaker-vowels", "--folds", "2", "--seeds", "1"]))
"""
SHORT_LANGID = """
import sys
import export.recipes as recipes
from export.cli import main
load = recipes.load_word_languages
recipes.load_word_languages = lambda per_language: load(per_language=200)
sys.exit(main(["train", "langid-chars", "--out", "trained", "--epochs", "1"]))
"""


def test_train_runs_crossval_and_the_langid_recipe(tmp_path: Path) -> None:
    env = environment("train")
    (tmp_path / "crossval.py").write_text(SHORT_CROSSVAL)
    (tmp_path / "langid.py").write_text(SHORT_LANGID)
    assert '"cv_accuracy"' in env.ok("python crossval.py", cwd=tmp_path)
    assert '"passed": true' in env.ok("python langid.py", cwd=tmp_path)
    assert (tmp_path / "trained" / "langid-chars" / "1" / "model.onnx").is_file()


# ---- tokenizers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-lstm with a word-level tokenizer.json in its version folder."""
    from tests.integration.test_subword_tokenizer import word_level

    repo = tmp_path_factory.mktemp("tokenizer-repo")
    folder = repo / "tiny-words" / "1"
    folder.mkdir(parents=True)
    shutil.copy(tiny_repo / "tiny-lstm" / "1" / "model.onnx", folder / "model.onnx")
    word_level().save(str(folder / "tokenizer.json"))
    return repo


def test_tokenizers_serves_a_model_with_a_tokenizer_json(tokenizer_repo: Path) -> None:
    env = environment("tokenizers")
    assert env.has("tokenizers") == ["tokenizers"] and env.has("torch", "onnx") == []
    server = env.serve("--model-repository", str(tokenizer_repo))
    try:
        server.wait_event("ready", 90)
        address = f"--address 127.0.0.1:{server.port}"
        classified = env.ok(f'lstm-client {address} classify tiny-words --text "hello world"')
        assert classified.startswith("tiny-words v1  2 steps"), classified
        streamed = env.ok(f'lstm-client {address} stream tiny-words --text "hello world"')
        assert "ended after 2 steps" in streamed, streamed
    finally:
        server.stop()


# ---- tracing -------------------------------------------------------------------------------


def test_tracing_serves_the_documented_command_and_exports_its_spans() -> None:
    """docs/OPERATIONS.md's install line and `lstm-serve --trace-otlp-endpoint ...`, alone."""
    from tests.e2e.test_tracing import Receiver, Traceparent

    env = environment("tracing")
    assert env.has("opentelemetry", "grpc") == ["opentelemetry", "grpc"]
    assert env.has("torch", "tokenizers") == []
    receiver = Receiver()
    client = Traceparent()
    server = env.serve("--trace-otlp-endpoint", receiver.endpoint, "--trace-sample-ratio", "0.01")
    try:
        server.wait_event("ready", 90)
        check = (
            "import grpc; from lstmserve.v1 import lstm_serve_pb2 as pb, lstm_serve_pb2_grpc as g; "
            f"c = grpc.insecure_channel('127.0.0.1:{server.port}'); "
            "r = g.LstmServeStub(c).Classify(pb.ClassifyRequest(model='langid-chars', "
            "sequences=[pb.SequenceInput(text='bonjour')]), "
            f"metadata=(('traceparent', '{client.header}'),)); print(r.results[0].top[0].label)"
        )
        assert env.ok(f"python -c {shlex.quote(check)}").strip() == "french"
    finally:
        assert server.stop() == 0  # the stop exports what is buffered
        receiver.server.stop(0)
    names = {span.name for span in receiver.of_trace(client.trace_id)}
    assert {"lstmserve.v1.LstmServe/Classify", "admission", "batch", "reply"} <= names, names
