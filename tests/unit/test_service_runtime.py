"""Execution providers: default, ordered request, unavailable ones, the CPU-fallback report."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from service.config import PROVIDER_ALIASES, ServerConfig
from service.engine.compute.runtime import CPU, CUDA, default_providers, resolve_providers
from service.engine.types import RuntimeOptions
from service.errors import ConfigError
from tests.unit.engines import load_worker

HAS_CUDA = CUDA in ort.get_available_providers()


def test_default_is_cuda_only_when_onnxruntime_can_use_it() -> None:
    assert default_providers() == ((CUDA, CPU) if HAS_CUDA else (CPU,))
    assert resolve_providers(()) == default_providers()


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only fallback")
def test_unavailable_providers_are_dropped_in_order() -> None:
    assert resolve_providers((CUDA, CPU)) == (CPU,)
    with pytest.raises(ConfigError, match="none of these providers is available"):
        resolve_providers((CUDA,))


def test_no_usable_provider_lists_the_accepted_short_names_and_those_here() -> None:
    with pytest.raises(ConfigError) as raised:
        resolve_providers(ServerConfig(providers=("gpu",)).providers, PROVIDER_ALIASES)
    message = str(raised.value)
    assert message.startswith("--providers gpu: none of these providers is available here")
    assert "accepted short names: cuda, cpu, tensorrt, rocm, coreml" in message
    here = message[message.index("available here:") :]
    assert all(p in here for p in ort.get_available_providers())
    assert "CPUExecutionProvider (cpu)" in here


def test_model_reports_the_provider_it_runs_on(tiny_repo: Path) -> None:
    model = load_worker(
        tiny_repo / "tiny-peephole-frames" / "1" / "model.onnx",
        RuntimeOptions(providers=resolve_providers(())),
    )
    assert model.runtime.provider == model.runtime.providers[0]
    if model.runtime.provider == CPU:
        assert model.runtime.cpu_fallback == ()
    else:  # peepholes are not implemented by the CUDA LSTM kernel
        assert any("peephole" in reason for reason in model.runtime.cpu_fallback)
