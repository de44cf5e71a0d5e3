"""Model control: the repository on disk -> the registry (Triton's none / poll / explicit).

`NAME/VERSION/model.onnx` is the truth. A scan loads and warms versions that are new (or whose
file changed since a failed attempt), drains versions whose folder is gone (no new sessions;
its sessions go on until they end or idle out, then it is retired and its memory freed), and
keeps each failure with its reason. A version that fails never takes the served ones down.
Scans run one at a time (poll timer, SIGHUP, the LoadModel / UnloadModel RPCs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.engine.byo.tritonconfig import CONFIG_FILE, ConfigReader
from service.engine.model.registry import ModelRegistry
from service.engine.model.worker import ModelWorker, WorkerFactory
from service.engine.session.sessions import SessionStore
from service.engine.types import NO_METRICS, EngineMetrics, ModelState, VersionStatus
from service.errors import (
    ConfigError,
    ModelLoadFailed,
    ModelNotFound,
    Unavailable,
    VersionRetired,
)

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
MODES = ("none", "poll", "explicit")


def discover(
    repository: Path, only: str | None = None, configs: ConfigReader | None = None
) -> dict[tuple[str, int], Path]:
    """Every NAME/VERSION/model.onnx (VERSION a positive integer), or only NAME's."""
    if not repository.is_dir():
        raise ConfigError(f"model repository {str(repository)!r} is not a directory")
    found: dict[tuple[str, int], Path] = {}
    pattern = f"{glob_escape(only) if only else '*'}/*/{MODEL_FILE}"
    for path in sorted(repository.glob(pattern)):
        version_dir = path.parent.name
        if not version_dir.isdigit() or int(version_dir) < 1:
            log.warning("skipping %s: version folder %r is not a positive integer", path,
                        version_dir)  # fmt: skip
            continue
        found[(path.parent.parent.name, int(version_dir))] = path
    return found if configs is None else _by_version_policy(repository, found, configs)


def _by_version_policy(repository: Path, found: dict[tuple[str, int], Path],
                       configs: ConfigReader) -> dict[tuple[str, int], Path]:  # fmt: skip
    """Only the versions each model's config.pbtxt version_policy serves (if it has one)."""
    names = sorted({name for name, _ in found})
    kept: set[tuple[str, int]] = set()
    for name in names:
        versions = [v for n, v in found if n == name]
        kept.update((name, v) for v in configs.served_versions(repository / name, versions))
    return {key: path for key, path in found.items() if key in kept}


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _fingerprint(path: Path) -> tuple[int, ...]:
    """The model file's mtime and size, and those of the files beside a config.pbtxt (the
    config and its label files), so a fixed config is tried again."""
    stat = path.stat()
    marks = [stat.st_mtime_ns, stat.st_size]
    model_dir = path.parent.parent
    if (model_dir / CONFIG_FILE).is_file():
        for item in sorted(p for p in model_dir.iterdir() if p.is_file()):
            item_stat = item.stat()
            marks += [item_stat.st_mtime_ns, item_stat.st_size]
    return tuple(marks)


@dataclass
class ScanReport:
    """What one scan changed."""

    loaded: list[str] = field(default_factory=list)
    draining: list[str] = field(default_factory=list)
    failed: list[VersionStatus] = field(default_factory=list)
    serving_again: list[str] = field(default_factory=list)  # draining versions found again


class ModelControl:
    """Loads, drains and retires model versions; the only writer of the registry."""

    def __init__(self, repository: Path, registry: ModelRegistry, factory: WorkerFactory,
                 store: SessionStore, mode: str = "none",
                 metrics: EngineMetrics = NO_METRICS) -> None:  # fmt: skip
        if mode not in MODES:
            raise ConfigError(f"model_control {mode!r} is not one of {MODES}")
        self.repository = repository
        self.registry = registry
        self.factory = factory
        self._configs = factory.options.model_configs
        self.store = store
        self.mode = mode
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self._attempts: dict[tuple[str, int], tuple[int, ...]] = {}  # failed file fingerprints
        self._loaded: dict[tuple[str, int], tuple[int, ...]] = {}  # what held versions run
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every change of the served versions (health follows them)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    async def scan(self, only: str | None = None, strict: bool = False) -> ScanReport:
        """Bring the registry in line with the repository (or NAME's folder only). `strict`:
        the first failure raises ConfigError (start-up with --model-control none)."""
        async with self._lock:
            found = await asyncio.to_thread(discover, self.repository, only, self._configs)
            report = ScanReport()
            held = {(w.name, w.version) for w in self.registry.all()}
            for key, path in found.items():
                if key in held:
                    self._serve_again(key, path, report)
                elif self._retry_due(key, path):
                    await self._load(key, path, report, strict)
            for worker in self.registry.all():
                gone = (worker.name, worker.version) not in found
                if gone and (only is None or worker.name == only):
                    self._drain(worker, report)
            for status in self.registry.failures():
                if (status.name, status.version) not in found and only in (None, status.name):
                    self.registry.record_failure(status.name, status.version, None)
                    self._attempts.pop((status.name, status.version), None)
            if report.loaded or report.draining or report.serving_again:
                self._changed()
            return report

    async def load(self, name: str) -> ScanReport:
        """Explicit mode's LoadModel: load (or re-scan) every version of NAME."""
        if "/" in name or name in ("", ".", "..") or not (self.repository / name).is_dir():
            raise ModelNotFound(f"model {name[:128]!r} is not in the repository")
        report = await self.scan(only=name)
        if report.failed:
            reasons = "; ".join(f"v{s.version}: {s.reason}" for s in report.failed)
            raise ModelLoadFailed(f"model {name!r} failed to load: {reasons}"[:1000])
        if not any(w.name == name for w in self.registry.ready()):
            waiting = [w for w in self.registry.all() if w.name == name]
            if waiting:  # draining, and its file changed since: it loads once they end
                raise Unavailable(
                    f"model {name!r} is draining ({', '.join(w.key for w in waiting)}, "
                    f"{sum(w.sessions for w in waiting)} sessions left) and its {MODEL_FILE} "
                    "changed since it was loaded: the new file loads once those sessions end "
                    "(LoadModel again then)"
                )
            raise ModelNotFound(f"model {name!r} has no version folder with a {MODEL_FILE}")
        return report

    async def unload(self, name: str) -> list[str]:
        """Explicit mode's UnloadModel: drain every version of NAME."""
        async with self._lock:
            workers = [w for w in self.registry.all() if w.name == name]
            if not workers:
                raise ModelNotFound(f"model {name[:128]!r} is not loaded")
            report = ScanReport()
            for worker in workers:
                self._drain(worker, report)
            self._changed()
            return report.draining

    def index(self) -> list[VersionStatus]:
        """Every version in the repository or still held, with its state (RepositoryIndex)."""
        rows: dict[tuple[str, int], VersionStatus] = {}
        try:
            found = discover(self.repository, configs=self._configs)
        except ConfigError:
            found = {}
        for (name, version), path in found.items():
            rows[(name, version)] = VersionStatus(name, version, ModelState.UNAVAILABLE,
                                                  "not loaded", path)  # fmt: skip
        for status in self.registry.failures():
            rows[(status.name, status.version)] = status
        for w in self.registry.all():
            rows[(w.name, w.version)] = VersionStatus(w.name, w.version, w.lifecycle, "", w.path)
        return [rows[k] for k in sorted(rows)]

    async def run_poll(self, interval_s: float) -> None:
        """Re-scan every `interval_s` seconds, forever (cancel to stop)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.scan()
            except ConfigError as exc:  # the repository itself went away: keep serving
                log.error("repository scan failed", extra={"fields": {"error": str(exc)}})

    def retire_all(self) -> None:
        """Shutting down: retire every version (their sessions closed)."""
        for worker in self.registry.all():
            self._retire(worker)

    # -- one version ---------------------------------------------------------------------------

    def _retry_due(self, key: tuple[str, int], path: Path) -> bool:
        """Never tried, or its file changed since it failed."""
        attempted = self._attempts.get(key)
        return attempted is None or attempted != _fingerprint(path)

    async def _load(self, key: tuple[str, int], path: Path, report: ScanReport,
                    strict: bool) -> None:  # fmt: skip
        name, version = key
        try:
            fingerprint = _fingerprint(path)
            worker = await asyncio.to_thread(self.factory.load, path)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ConfigError) else f"{path}: {exc!r}"
            if strict:
                raise ConfigError(reason) from exc
            self._attempts[key] = fingerprint
            status = VersionStatus(name, version, ModelState.UNAVAILABLE, reason, path)
            self.registry.record_failure(name, version, status)
            report.failed.append(status)
            self.metrics.model_load_failures.labels(name).inc()
            log.error(
                "model version failed to load",
                extra={"fields": {"model": name, "version": version, "error": reason}},
            )
            return
        self._attempts.pop(key, None)
        self._loaded[key] = fingerprint
        worker.on_drained = self._retire
        self.registry.install(worker)
        report.loaded.append(worker.key)
        _record_loaded(self.metrics, worker, self.registry.is_latest(worker))

    def _serve_again(self, key: tuple[str, int], path: Path, report: ScanReport) -> None:
        """A draining version found again serves again, if its file is still the one it runs
        (a changed file loads as usual once the version has retired)."""
        worker = self.registry.find(*key)
        if worker.lifecycle is not ModelState.DRAINING:
            return
        try:
            if self._loaded.get(key) != _fingerprint(path):
                return
        except OSError:  # gone again since it was found
            return
        worker.serve_again()
        report.serving_again.append(worker.key)
        _record_state(self.metrics, worker, "model version serving again", sessions=worker.sessions)

    def _drain(self, worker: ModelWorker, report: ScanReport) -> None:
        if worker.lifecycle is not ModelState.READY:
            return
        worker.drain()
        report.draining.append(worker.key)
        _record_state(self.metrics, worker, "model version draining", sessions=worker.sessions)
        if worker.sessions == 0:
            self._retire(worker)

    def _retire(self, worker: ModelWorker) -> None:
        """The version has no sessions left (or the server stops): free it."""
        if worker.lifecycle is ModelState.RETIRED:
            return
        worker.on_drained = None  # its sessions are closed below: no second call from them
        reason = VersionRetired(
            f"model {worker.key} was unloaded: open a new session on a served version"
        )
        closed = self.store.close_all(worker, reason)
        worker.retire()
        self.registry.remove(worker)
        self._loaded.pop((worker.name, worker.version), None)
        _record_state(self.metrics, worker, "model version retired", sessions_closed=closed)


# lstm_serve_model_state's values: one gauge per version, its lifecycle as a number.
_STATE_CODE = {"LOADING": 0, "READY": 1, "DRAINING": 2, "RETIRED": 3, "UNAVAILABLE": 4}


def _record_state(metrics: EngineMetrics, worker: ModelWorker, event: str,
                  **fields: object) -> None:  # fmt: skip
    """The version's state gauge and a log line saying what happened to it."""
    code = _STATE_CODE[worker.lifecycle.value]
    metrics.model_state.labels(worker.name, str(worker.version)).set(code)
    log.info(event, extra={"fields": {"model": worker.name, "version": worker.version, **fields}})


def _record_loaded(metrics: EngineMetrics, worker: ModelWorker, latest: bool) -> None:
    version = str(worker.version)
    runtime = worker.runtime
    fallback = "true" if runtime.cpu_fallback else "false"
    metrics.model_load_seconds.labels(worker.name, version).set(worker.load_seconds)
    metrics.model_info.labels(worker.name, version, runtime.provider, fallback).set(1)
    metrics.model_state.labels(worker.name, version).set(_STATE_CODE["READY"])
    log.info("model loaded", extra={"fields": {
        "model": worker.name, "version": worker.version, "provider": runtime.provider,
        "providers": list(runtime.providers), "cpu_fallback": list(runtime.cpu_fallback),
        "load_seconds": round(worker.load_seconds, 4), "latest": latest,
    }})  # fmt: skip
