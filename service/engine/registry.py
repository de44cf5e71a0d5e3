"""The model repository: NAME/VERSION/model.onnx -> loaded, described, warmed model versions."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lstmserve.contract import ModelDescription
from service.engine.runtime import ModelRuntime
from service.errors import ConfigError, ModelNotFound

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class RuntimeOptions:
    """How every model's onnxruntime session is built."""

    providers: tuple[str, ...]
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    debug_compute_delay_s: float = 0.0


@dataclass
class LoadedModel:
    """One served model version."""

    description: ModelDescription
    runtime: ModelRuntime
    path: Path
    load_seconds: float
    latest: bool = False

    @property
    def name(self) -> str:
        return self.description.name

    @property
    def version(self) -> int:
        return self.description.version

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


def discover(repository: Path) -> list[Path]:
    """Every NAME/VERSION/model.onnx under the repository (VERSION a positive integer), sorted."""
    if not repository.is_dir():
        raise ConfigError(f"model repository {str(repository)!r} is not a directory")
    found = []
    for path in sorted(repository.glob(f"*/*/{MODEL_FILE}")):
        version_dir = path.parent.name
        if not version_dir.isdigit() or int(version_dir) < 1:
            log.warning(
                "skipping %s: version folder %r is not a positive integer", path, version_dir
            )
            continue
        found.append(path)
    return found


def load_model(path: Path, options: RuntimeOptions) -> LoadedModel:
    """Load, check and warm one model version."""
    started = time.perf_counter()
    runtime = ModelRuntime(
        path, options.providers, options.intra_op_threads, options.inter_op_threads
    )
    runtime.debug_delay_s = options.debug_compute_delay_s
    runtime.warm_up()
    desc = runtime.description
    if desc.name != path.parent.parent.name or str(desc.version) != path.parent.name:
        raise ConfigError(f"{path}: describes {desc.name} v{desc.version}, not its folder")
    return LoadedModel(desc, runtime, path, time.perf_counter() - started)


class ModelRegistry:
    """The loaded model versions, by name and version; version 0 means the latest."""

    def __init__(self, models: list[LoadedModel]) -> None:
        self._models: dict[str, dict[int, LoadedModel]] = {}
        for model in models:
            self._models.setdefault(model.name, {})[model.version] = model
        for versions in self._models.values():
            versions[max(versions)].latest = True

    @classmethod
    def load(cls, repository: Path, options: RuntimeOptions) -> ModelRegistry:
        """Load and warm every model version in the repository."""
        return cls([load_model(path, options) for path in discover(repository)])

    def get(self, name: str, version: int = 0) -> LoadedModel:
        """The model version, or the latest one for version 0; ModelNotFound if absent."""
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} is not served (have {sorted(self._models)})")
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            raise ModelNotFound(
                f"model {name!r} has no version {version} (have {sorted(versions)})"
            )
        return versions[version]

    def all(self) -> list[LoadedModel]:
        """Every loaded model version, sorted by name then version."""
        return [self._models[n][v] for n in sorted(self._models) for v in sorted(self._models[n])]

    def names(self) -> list[str]:
        return sorted(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models
