"""The served model versions: `{name: {version: ModelWorker}}`, swapped whole on every change.

Readers take one consistent view (a lookup never sees a half-applied reload). `latest` is
computed: the highest READY version. Versions that failed to load are kept with their reason,
so ListModels can say why a version is not served.
"""

from __future__ import annotations

from types import MappingProxyType

from service.engine.model.worker import ModelWorker
from service.engine.types import ModelState, VersionStatus
from service.errors import ModelNotFound, Unavailable

Versions = MappingProxyType[int, ModelWorker]


class ModelRegistry:
    """Model versions by name and version; version 0 means the latest READY one."""

    def __init__(self, workers: list[ModelWorker] | None = None) -> None:
        self._view: MappingProxyType[str, Versions] = MappingProxyType({})
        self._failed: MappingProxyType[tuple[str, int], VersionStatus] = MappingProxyType({})
        for worker in workers or []:
            self.install(worker)

    # -- reading -------------------------------------------------------------------------------

    def get(self, name: str, version: int = 0) -> ModelWorker:
        """A READY version (the latest for 0): what new sessions and Classify use."""
        worker = self.find(name, version)
        if worker.lifecycle is not ModelState.READY:
            raise Unavailable(
                f"model {worker.key} is {worker.lifecycle.value.lower()}: it takes no new "
                f"sessions (ready: {self._ready_versions(name) or 'none'})"
            )
        return worker

    def find(self, name: str, version: int = 0) -> ModelWorker:
        """A loaded version, READY or DRAINING (sessions continued on it); 0 = the latest."""
        versions = self._view.get(name)
        if not versions:
            raise ModelNotFound(f"model {name[:128]!r} is not served (have {self.names()})")
        if version == 0:
            ready = self._ready_versions(name)
            if not ready:
                raise Unavailable(f"model {name!r} has no ready version (have {sorted(versions)})")
            return versions[ready[-1]]
        worker = versions.get(version)
        if worker is None:
            raise ModelNotFound(
                f"model {name!r} has no version {version} (have {sorted(versions)})"
            )
        return worker

    def is_latest(self, worker: ModelWorker) -> bool:
        ready = self._ready_versions(worker.name)
        return bool(ready) and ready[-1] == worker.version and worker.lifecycle is ModelState.READY

    def all(self) -> list[ModelWorker]:
        """Every loaded version, sorted by name then version."""
        view = self._view
        return [view[n][v] for n in sorted(view) for v in sorted(view[n])]

    def ready(self) -> list[ModelWorker]:
        return [w for w in self.all() if w.lifecycle is ModelState.READY]

    def failures(self) -> list[VersionStatus]:
        """Versions that failed to load, with their reasons."""
        return [self._failed[k] for k in sorted(self._failed)]

    def failure(self, name: str, version: int) -> VersionStatus | None:
        return self._failed.get((name, version))

    def names(self) -> list[str]:
        return sorted(self._view)

    def __contains__(self, name: object) -> bool:
        return name in self._view

    def _ready_versions(self, name: str) -> list[int]:
        versions = self._view.get(name, {})
        return sorted(v for v, w in versions.items() if w.lifecycle is ModelState.READY)

    # -- changing (model control only) ---------------------------------------------------------

    def install(self, worker: ModelWorker) -> None:
        """Serve `worker` (a version not held yet, or one whose worker was retired)."""
        view = {n: dict(v) for n, v in self._view.items()}
        view.setdefault(worker.name, {})[worker.version] = worker
        self._swap(view)
        self.record_failure(worker.name, worker.version, None)

    def remove(self, worker: ModelWorker) -> None:
        """Stop listing a (retired) worker."""
        view = {n: dict(v) for n, v in self._view.items()}
        versions = view.get(worker.name, {})
        if versions.get(worker.version) is worker:
            del versions[worker.version]
            if not versions:
                del view[worker.name]
            self._swap(view)

    def record_failure(self, name: str, version: int, status: VersionStatus | None) -> None:
        """Remember why a version failed to load (None: forget it)."""
        failed = dict(self._failed)
        if status is None:
            failed.pop((name, version), None)
        else:
            failed[(name, version)] = status
        self._failed = MappingProxyType(failed)

    def _swap(self, view: dict[str, dict[int, ModelWorker]]) -> None:
        self._view = MappingProxyType({n: MappingProxyType(v) for n, v in view.items()})
