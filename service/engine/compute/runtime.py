"""One onnxruntime InferenceSession per model version: the only place that calls run()."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import onnxruntime as ort

from lstmserve.contract import (
    INPUT_LENGTHS,
    INPUT_STATE,
    OUTPUT_PROBS,
    OUTPUT_STATE,
    OUTPUT_STEP_PROBS,
    DescriptionError,
    ModelDescription,
)
from service.errors import ConfigError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class RunOutput:
    """What one run returns, for a batch of B rows padded to T steps. `probs` and `step_probs`
    are the class outputs as the model computed them: probabilities for our models, what the
    description's `output_kind` says for a config.pbtxt model (StepResult.probs converts)."""

    step_probs: np.ndarray | None  # (B, T, C); None when the run was asked not to fetch them
    probs: np.ndarray  # (B, C)
    state_out: np.ndarray  # (B, S, H)


def default_providers() -> tuple[str, ...]:
    """CUDA then CPU when onnxruntime can use CUDA here, else CPU alone."""
    available = ort.get_available_providers()
    return (CUDA, CPU) if CUDA in available else (CPU,)


def resolve_providers(
    requested: tuple[str, ...], aliases: Mapping[str, str] = MappingProxyType({})
) -> tuple[str, ...]:
    """The requested providers this onnxruntime has, in order (the default if none is asked); if
    none of them is here, a ConfigError listing the accepted short names (`aliases`: short name
    -> onnxruntime name, as --providers takes them) and those available."""
    if not requested:
        return default_providers()
    available = ort.get_available_providers()
    usable = tuple(p for p in requested if p in available)
    if not usable:
        short = {full: alias for alias, full in aliases.items()}
        here = ", ".join(f"{p} ({short[p]})" if p in short else p for p in available)
        accepted = f"accepted short names: {', '.join(aliases)} (or full onnxruntime names); "
        raise ConfigError(
            f"--providers {','.join(requested)}: none of these providers is available here; "
            f"{accepted if aliases else ''}available here: {here}"
        )
    for missing in (p for p in requested if p not in available):
        log.warning("execution provider %s is not available here (have %s)", missing, available)
    return usable


ALL_OUTPUTS = [OUTPUT_STEP_PROBS, OUTPUT_PROBS, OUTPUT_STATE]
FINAL_OUTPUTS = [OUTPUT_PROBS, OUTPUT_STATE]

# Run option: shrink the CPU memory arena back after the run (large runs only).
SHRINK = ort.RunOptions()
SHRINK.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


def open_session(path: Path, providers: tuple[str, ...], intra_op_threads: int = 0,
                 inter_op_threads: int = 0) -> ort.InferenceSession:  # fmt: skip
    """The onnxruntime session of one model file, with the server's thread settings."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    # Idle intra-op workers sleep instead of spinning: the server shares its cores with the
    # gRPC event loop, and spinning workers burned ~1.5 cores for one idle-ish session.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=list(providers))


class ModelRuntime:
    """An onnxruntime session for one model version, plus the provider it actually runs on."""

    # Whether a batch must hold chunks of one length only (a model without a lengths input,
    # whose state padding would corrupt): the batcher groups by exact length then.
    equal_lengths = False

    def __init__(
        self,
        path: Path,
        providers: tuple[str, ...],
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
    ) -> None:
        self.session = open_session(path, providers, intra_op_threads, inter_op_threads)
        metadata = self.session.get_modelmeta().custom_metadata_map
        try:
            self.description = ModelDescription.from_metadata(metadata)
        except DescriptionError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        self.providers: tuple[str, ...] = tuple(self.session.get_providers())
        self.provider: str = self.providers[0]

    @property
    def cpu_fallback(self) -> tuple[str, ...]:
        """Nodes that run on the CPU although the model runs on CUDA (none on a CPU session)."""
        if self.provider != CUDA:
            return ()
        return tuple(str(x) for x in self.description.cuda.get("cpu_fallback", []))

    def run(
        self,
        inputs: np.ndarray,
        lengths: np.ndarray,
        state: np.ndarray,
        shrink: bool = False,
        ids: Sequence[str] | None = None,
        steps: bool = True,
    ) -> RunOutput:
        """One model call: inputs (B, T) int64 or (B, T, F) float32; state (B, S, H). With
        `shrink`, the CPU arena gives back what the run grew it by (large runs). `ids`, the
        rows' session ids, matter only to a model with a CORRID control input (generic.py).
        Without `steps`, the per-step probabilities are not fetched (no row asked for them)."""
        feeds = {
            self.description.input_name: inputs,
            INPUT_LENGTHS: lengths,
            INPUT_STATE: state,
        }
        options = SHRINK if shrink else None
        if not steps:
            probs, state_out = self.session.run(FINAL_OUTPUTS, feeds, options)
            return RunOutput(step_probs=None, probs=probs, state_out=state_out)
        step_probs, probs, state_out = self.session.run(ALL_OUTPUTS, feeds, options)
        return RunOutput(step_probs=step_probs, probs=probs, state_out=state_out)

    def warm_up(self) -> None:
        """One run on a one-step input, so the first real request does not pay for set-up."""
        desc = self.description
        if desc.input_kind == "tokens":
            inputs = np.zeros((1, 1), dtype=np.int64)  # (B, T)
        else:
            inputs = np.zeros((1, 1, desc.feature_dim), dtype=np.float32)  # (B, T, F)
        state = np.zeros((1, desc.state_rows, desc.hidden_size), dtype=np.float32)  # (B, S, H)
        self.run(inputs, np.ones(1, dtype=np.int64), state)
