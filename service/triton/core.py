"""TritonCore: the Open Inference Protocol (KServe v2) and Triton's extensions, protocol-neutral.

The gRPC front (service/triton/grpc_front.py) and the HTTP/REST front (http_front.py) call
exactly this API, on the server's event loop; neither holds state of its own:

    core = TritonCore(sequences, config)      # built once in service/server.py
    core.live() -> bool                       # GET /v2/health/live
    core.ready() -> bool                      # GET /v2/health/ready
    core.server_metadata() -> ServerMetadata  # GET /v2
    core.model_ready(name, version="") -> bool                    # .../ready
    core.model_metadata(name, version="") -> ModelMetadata        # GET /v2/models/{name}
    core.model_config(name, version="") -> model_config_pb2.ModelConfig   # .../config
        (HTTP: google.protobuf.json_format.MessageToDict(config, preserving_proto_field_name=True))
    core.statistics(name="", version="") -> list[ModelStats]      # .../stats
    core.repository_index(ready_only=False) -> list[IndexEntry]   # POST /v2/repository/index
    await core.load(name) / await core.unload(name)               # .../load, .../unload
    await core.infer(InferRequest) -> InferResponse               # POST .../infer
        (sequences are the caller's: call it in the request's context, after authentication
        set service/principal.py; unload of a model not loaded succeeds, as Triton's)

Requests and replies are the dataclasses of service/triton/types.py; input tensors hold numpy
arrays built with service/triton/tensors.py (`from_raw` for binary data, `from_values` for
JSON / typed contents: both raise INVALID_ARGUMENT naming the tensor), outputs are encoded
with `tensors.to_raw` (binary) or `.data.tolist()` (JSON; BYTES items are bytes). `version`
strings: "" is the latest ready version.

Errors: every error raised is an `LstmServeError` (service/errors.py) whose `code` is a gRPC
status name (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, FAILED_PRECONDITION, ALREADY_EXISTS,
RESOURCE_EXHAUSTED, ...); gRPC maps it with service/status.py, HTTP with
`types.http_status(exc)` and answers {"error": str(exc)}. Anything else is an internal error.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from tritonclient.grpc import model_config_pb2 as mc

from service import metrics
from service.config import ServerConfig
from service.engine.model.worker import ModelWorker
from service.engine.types import ModelState, VersionStatus
from service.errors import LstmServeError, ProtocolError
from service.protocol.concurrent import ConcurrentStream
from service.protocol.inbox import ReadAhead
from service.protocol.sequences import Sequences
from service.triton.infer import Inference, InferLimits, parse_version
from service.triton.modelconfig import ConfigLimits, model_config, model_metadata
from service.triton.offload import DecodePool
from service.triton.sequences import sequence_params
from service.triton.stats import InferStatistics
from service.triton.types import (
    IndexEntry,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelStats,
    ServerMetadata,
)

R = TypeVar("R")
T = TypeVar("T")
SERVER_NAME = "lstm-serve"
EXTENSIONS = (
    "classification", "sequence", "model_repository", "model_configuration", "statistics",
    "binary_tensor_data",
)  # fmt: skip
_INDEX_STATE = {
    ModelState.READY: "READY", ModelState.LOADING: "LOADING", ModelState.DRAINING: "UNLOADING",
    ModelState.RETIRED: "UNAVAILABLE", ModelState.UNAVAILABLE: "UNAVAILABLE",
}  # fmt: skip


def _server_version() -> str:
    try:
        return importlib.metadata.version("lstm-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0"


class TritonCore:
    """The KServe v2 / Triton operations over the session layer and its engine."""

    def __init__(self, sequences: Sequences, config: ServerConfig) -> None:
        self.sequences = sequences
        self.engine = sequences.engine
        self.config = config
        self.tracing = sequences.layer.tracing
        self.limits = ConfigLimits(
            max_batch_size=config.max_classify_sequences,
            idle_timeout_s=config.session_idle_timeout_s,
        )
        self.inference = Inference(self.engine, sequences, InferLimits(
            config.max_classify_sequences, config.max_sequence_steps, config.max_chunk_steps,
        ))  # fmt: skip
        self.stats = InferStatistics()
        self.version = _server_version()
        self.decode = DecodePool()  # large requests' decodes, off the loop (both fronts)
        # More conditions of readiness, each "" when met, else why not (server.py adds them).
        self.readiness_gates: list[Callable[[], str]] = []

    # -- health and metadata -----------------------------------------------------------------

    def live(self) -> bool:
        """The process answers (it is live until it stops, draining included)."""
        return True

    def ready(self) -> bool:
        """Models loaded, some version READY, not draining, and every readiness gate open."""
        return not self.not_ready()

    def not_ready(self) -> str:
        """Why the server is not ready, in a line ("" when it is): the models, the drain, or a
        readiness gate's reason (lstm-serve --native-front: its front down)."""
        engine = self.engine
        if not engine.loaded:
            return "not ready: the models are loading"
        if engine.draining:
            return "not ready: draining"
        if not engine.registry.ready():
            return "not ready: no model version is ready"
        for gate in self.readiness_gates:
            if why := gate():
                return f"not ready: {why}"
        return ""

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, self.version, EXTENSIONS)

    def _worker(self, name: str, version: str) -> ModelWorker:
        """A loaded version (READY or DRAINING); "" is the latest READY one."""
        return self.engine.models().find(name, parse_version(version))

    def model_ready(self, name: str, version: str = "") -> bool:
        if self.engine.draining:
            return False
        try:
            worker = self._worker(name, version)
        except LstmServeError:
            return False
        return worker.lifecycle is ModelState.READY

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        worker = self._worker(name, version)
        if version:
            versions = [worker.version]
        else:
            versions = [w.version for w in self.engine.registry.ready() if w.name == name]
        return model_metadata(worker, versions, self.limits)

    def model_config(self, name: str, version: str = "") -> mc.ModelConfig:
        return model_config(self._worker(name, version), self.limits)

    def statistics(self, name: str = "", version: str = "") -> list[ModelStats]:
        """Per loaded version (all of them, or one model's, or one version)."""
        if name:
            if version:
                workers = [self._worker(name, version)]
            else:
                workers = [w for w in self.engine.models().all() if w.name == name]
                if not workers:
                    self._worker(name, "")  # raises the not-served error
        elif version:
            raise ProtocolError("statistics for a version need the model's name")
        else:
            workers = self.engine.models().all()
        return [self.stats.get(w.name, w.version) for w in workers]

    # -- the repository ----------------------------------------------------------------------

    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        rows = [_index_entry(s) for s in self.engine.control.index()]
        return [r for r in rows if r.state == "READY"] if ready_only else rows

    async def load(self, name: str) -> None:
        self._check_explicit("load")
        await self.engine.control.load(name)

    async def unload(self, name: str) -> None:
        """Drain every version of NAME; a model not loaded is already unloaded (as Triton)."""
        self._check_explicit("unload")
        if any(w.name == name for w in self.engine.registry.all()):
            await self.engine.control.unload(name)

    def _check_explicit(self, what: str) -> None:
        mode = self.engine.control.mode
        if mode != "explicit":
            raise ProtocolError(f"model {what} needs --model-control explicit (this server runs "
                                f"--model-control {mode})")  # fmt: skip

    # -- inference ---------------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        """One inference: a whole batch, or one request of a sequence (in its order)."""
        started = time.perf_counter_ns()
        params = sequence_params(request.parameters)
        version = parse_version(request.version)
        worker: ModelWorker | None = None
        try:
            if params.key is None:
                worker = self.engine.classify_model(request.model, version)
                reply = await self.inference.run_batch(request, worker)
                batch = request.inputs[0].shape[0] if request.inputs else 1
            else:
                reply, worker = await self.inference.run_sequence(request, params, version)
                batch = 1
        except Exception:
            self._failed(request.model, version, worker, started)
            raise
        self.stats.success(worker.name, worker.version, batch, started)
        return reply

    def _failed(self, name: str, version: int, worker: ModelWorker | None, started: int) -> None:
        if worker is None:
            try:
                worker = self.engine.registry.find(name, version)
            except LstmServeError:
                return  # not a served model: nothing to count it under
        self.stats.failure(worker.name, worker.version, started)

    def stream(
        self, requests: AsyncIterator[R], size: Callable[[R], int],
        handle: Callable[[R], Awaitable[T]], max_running: int,
    ) -> ConcurrentStream[R, T]:  # fmt: skip
        """A stream of infer requests run concurrently (ModelStreamInfer), read through the
        session layer: one byte budget with every stream and HTTP body, ended on drain."""
        return ConcurrentStream(self.sequences.layer, requests, size, handle, max_running)

    @property
    def read_ahead(self) -> ReadAhead:
        """The server's one budget of request bytes held (HTTP bodies hold theirs in it)."""
        return self.sequences.layer.read_ahead

    def model_label(self, name: str) -> str:
        """The metric label for a model name (served, or the fixed placeholder)."""
        return name if name in self.engine.registry else metrics.UNKNOWN_MODEL


def _index_entry(status: VersionStatus) -> IndexEntry:
    return IndexEntry(status.name, str(status.version), _INDEX_STATE[status.state], status.reason)


__all__ = ["TritonCore"]
