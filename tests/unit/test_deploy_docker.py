"""The Dockerfile read as text: any builder resolves its stages (BuildKit and buildah), they copy
only what the build context holds and run lstm-serve non-root on the default ports (linted, its
scripts run and its install done in a fresh venv: tests/e2e/test_deploy_docker_scripts.py; the
image built with buildah and run: tests/e2e/test_image.py)."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

from service.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKER = ROOT / "deploy" / "docker"
GPU_BASE_DOCKERFILE = DOCKER / "gpu-base.Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
NON_ROOT_UID = 10001  # the image's USER; deploy/k8s/base/deployment.yaml runs as the same


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


def test_image_copies_only_what_the_context_holds() -> None:
    for name in ("build", "native", "runtime"):
        for source in copy_sources(name):
            assert (ROOT / source).exists(), f"stage {name}: COPY {source} does not exist"
            assert not dockerignored(source), f"stage {name}: .dockerignore drops {source}"
    assert dockerignored(".venv-test/") and dockerignored("export/model.py")
    assert not dockerignored("models/speaker-vowels/1/model.onnx")
    assert any("deploy/docker/install.sh" in ln for ln in stage("build") if ln.startswith("RUN"))
    assert dockerignored("native/build/lstm-serve-front")  # built in the image, not copied
    assert not dockerignored("native/src/main.cc") and not dockerignored("proto/lstmserve/v1")


def test_image_runs_lstm_serve_non_root_on_the_default_ports() -> None:
    runtime = stage("runtime")
    defaults = ServerConfig()
    assert f"EXPOSE {defaults.http_port} {defaults.grpc_port} {defaults.metrics_port}" in runtime
    assert 'ENTRYPOINT ["lstm-serve"]' in runtime
    assert f"USER {NON_ROOT_UID}:{NON_ROOT_UID}" in runtime
    assert any(ln.startswith("COPY models/ /app/models") for ln in runtime)


def test_image_ships_the_native_front_off_by_default() -> None:
    """The front's binary from its own stage, its runtime libraries only (no compiler), and
    the Python front unless LSTM_SERVE_NATIVE_FRONT=true."""
    runtime = stage("runtime")
    assert "COPY --from=native /out/lstm-serve-front /usr/local/bin/lstm-serve-front" in runtime
    installs = " ".join(ln for ln in runtime if ln.startswith("RUN"))
    assert "/tmp/native-front-packages" in installs and "g++" not in installs
    assert "-dev" not in installs
    assert any("LSTM_SERVE_NATIVE_FRONT=false" in ln for ln in runtime if ln.startswith("ENV"))
    assert ServerConfig().native_front is False
    native = " ".join(stage("native"))
    assert "cmake --build native/build" in native and "ldd /out/lstm-serve-front" in native


def from_lines(dockerfile: Path) -> list[tuple[str, str | None]]:
    """(image, stage name or None) of every FROM."""
    found = []
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?\s*$", line, re.I):
            found.append((match[1], match[2]))
    return found


def test_every_builder_resolves_the_stages() -> None:
    """No FROM names a stage built from an argument (`FROM base-${TARGET}`): BuildKit resolves
    that, buildah 1.28 does not. Each stage starts FROM the BASE_IMAGE argument or a stage."""
    for dockerfile in (DOCKERFILE, GPU_BASE_DOCKERFILE):
        stages: set[str] = set()
        for image, name in from_lines(dockerfile):
            if "$" in image:
                assert re.fullmatch(r"\$\{?[A-Z_]+\}?", image), f"{dockerfile.name}: FROM {image}"
            else:
                assert image in stages or ":" in image, f"{dockerfile.name}: FROM {image}"
            if name:
                stages.add(name)
    assert [image for image, _ in from_lines(DOCKERFILE)] == ["${BASE_IMAGE}"] * 3
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text, "the official image by default"
