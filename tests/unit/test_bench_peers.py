"""bench.peers' pure parts: the peers' configurations, the shared per-sequence model code (on a
real exported LSTM and onnxruntime), and the summary with its ratios. Nothing here is timed and
no peer server is started (the bench itself is `python -m bench.peers`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from bench import peers
from export.arch import ArchConfig
from export.onnx_export import describe, export_model
from export.tiny import random_model


def _shipped(name: str) -> Any:
    """A file of bench/peers/ (shipped into the peers' model directories, not a package)."""
    spec = importlib.util.spec_from_file_location(name, peers.PEERS_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SequenceStates = _shipped("lstm_states").SequenceStates
ARCH = ArchConfig(cell="lstm", hidden_size=8, num_classes=4, input_kind="tokens", num_layers=2,
                  vocab_size=50, embedding_dim=6)  # fmt: skip


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = random_model(ARCH, seed=3, scale=0.5)
    path = tmp_path_factory.mktemp("peers") / "model.onnx"
    export_model(model, describe(model, "m", 1, ["a", "b", "c", "d"]), str(path))
    return path


def test_triton_config_is_a_valid_sequence_batcher_config_with_direct_strategy() -> None:
    config = text_format.Parse(peers.triton_config("bench-lstm", 64, 1000, 2), mc.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == ("bench-lstm", "python", 64)
    batcher = config.sequence_batching
    assert batcher.WhichOneof("strategy_choice") == "direct"
    assert batcher.direct.max_queue_delay_microseconds == 1000
    kinds = {c.name: c.control[0].kind for c in batcher.control_input}
    kind = mc.ModelSequenceBatching.Control
    assert kinds == {"START": kind.CONTROL_SEQUENCE_START, "END": kind.CONTROL_SEQUENCE_END,
                     "READY": kind.CONTROL_SEQUENCE_READY}  # fmt: skip
    assert [i.name for i in config.input] == ["tokens"]
    assert [(o.name, list(o.dims)) for o in config.output] == [("probs", [4])]
    assert config.parameters["intra_op_threads"].string_value == "2"
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, mc.ModelInstanceGroup.KIND_CPU)
    ]


def test_triton_gets_as_many_slots_as_the_largest_s_up_to_256() -> None:
    assert peers.triton_slots([1, 16, 64]) == 64
    assert peers.triton_slots([1024]) == 256
    triton = text_format.Parse(peers.peer_configs(1, 64)["tritonserver"], mc.ModelConfig())
    assert triton.max_batch_size == 64
    assert yaml.safe_load(peers.peer_configs(1, 64)["torchserve"])["batchSize"] == 256


def test_two_peer_workers_share_the_two_threads() -> None:
    configs = peers.peer_configs(2)
    triton = text_format.Parse(configs["tritonserver"], mc.ModelConfig())
    assert triton.instance_group[0].count == 2
    assert triton.parameters["intra_op_threads"].string_value == "1"
    ts = yaml.safe_load(configs["torchserve"])
    assert (ts["minWorkers"], ts["maxWorkers"], ts["handler"]["intra_op_threads"]) == (2, 2, 1)


def test_torchserve_model_config_turns_on_sequence_batching_with_one_worker() -> None:
    config = yaml.safe_load(peers.ts_model_config(256, 1, 2, 1024))
    assert config["sequenceBatching"] is True
    assert (config["minWorkers"], config["maxWorkers"]) == (1, 1)
    assert (config["batchSize"], config["maxBatchDelay"], config["maxNumSequence"]) == (
        256,
        1,
        1024,
    )
    assert config["handler"]["intra_op_threads"] == 2


def test_torchserve_properties_listen_on_loopback_only() -> None:
    ports = {"inference": 1, "management": 2, "metrics": 3, "grpc": 4, "grpc_management": 5}
    props = dict(
        line.split("=", 1) for line in peers.ts_properties(ports, Path("/s")).splitlines() if line
    )
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "true"
    assert props["model_store"] == "/s"


def test_missing_peer_names_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(peers, "PEER_HOME", tmp_path / "none")
    monkeypatch.setattr(peers, "PYTRITON", tmp_path / "none" / "pytriton")
    assert "--setup" in (peers.missing("torchserve") or "")
    assert "--setup" in (peers.missing("tritonserver") or "")
    assert peers.missing("lstm-serve") is None


def test_sequence_states_carry_state_per_sequence_and_batch_like_alone(onnx_path: Path) -> None:
    alone, batched = SequenceStates(str(onnx_path), 1), SequenceStates(str(onnx_path), 1)
    steps = [np.array([5]), np.array([7]), np.array([9])]
    solo = {k: [alone.step([k], [t], [False], [False])[0] for t in steps] for k in ("x", "y")}
    together = [batched.step(["x", "y"], [t, t], [False, False], [False, False]) for t in steps]
    for i in range(3):
        np.testing.assert_allclose(together[i][0], solo["x"][i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(together[i][1], solo["y"][i], rtol=1e-5, atol=1e-6)
    assert not np.allclose(solo["x"][0], solo["x"][2])  # the state moved on
    fresh = alone.step(["x"], [steps[0]], [True], [False])[0]  # a start begins from zeros
    np.testing.assert_allclose(fresh, solo["x"][0], rtol=1e-5, atol=1e-6)
    alone.step(["y"], [steps[0]], [False], [True])
    assert "y" not in alone.states  # an end drops the state


def test_sequence_states_pad_chunks_of_different_lengths(onnx_path: Path) -> None:
    states = SequenceStates(str(onnx_path), 1)
    short, long = np.array([3]), np.array([3, 4, 5])
    both = states.step(["a", "b"], [short, long], [True, True], [True, True])
    one = SequenceStates(str(onnx_path), 1).step(["a"], [short], [True], [True])
    three = SequenceStates(str(onnx_path), 1).step(["b"], [long], [True], [True])
    np.testing.assert_allclose(both, np.concatenate([one, three]), rtol=1e-5, atol=1e-6)


def test_sequence_states_drop_the_least_recently_used_past_the_cap(onnx_path: Path) -> None:
    states = SequenceStates(str(onnx_path), 1, max_sequences=2)
    for key in ("a", "b", "a", "c"):
        states.step([key], [np.array([1])], [False], [False])
    assert list(states.states) == ["a", "c"]


def _row(system: str, s: int, rate: float, round_: int) -> dict[str, Any]:
    return {"system": system, "streams": s, "round": round_, "messages_per_s": rate,
            "p50_ms": 1000 / rate, "p99_ms": 2000 / rate, "server_cpu_pct": 100.0}  # fmt: skip


def test_summary_takes_medians_and_ratios_per_round() -> None:
    rows = [_row("lstm-serve", 64, r, i) for i, r in enumerate((6000, 7000, 5000))]
    rows += [_row("torchserve", 64, r, i) for i, r in enumerate((1000, 1000, 2000))]
    rows += [_row("tritonserver", 64, 3000, 0)]
    summary = {r["system"]: r for r in peers.summarize(rows)}
    ours, ts, tr = summary["lstm-serve"], summary["torchserve"], summary["tritonserver"]
    assert (ours["messages_per_s"], ours["min"], ours["max"], ours["runs"]) == (6000, 5000, 7000, 3)
    assert "x_lstm_serve" not in ours
    assert ts["messages_per_s"] == 1000 and ts["x_lstm_serve"] == pytest.approx(6.0)
    assert ts["x_per_round"] == [6.0, 7.0, 2.5]
    assert tr["x_per_round"] == [2.0] and tr["x_lstm_serve"] == pytest.approx(2.0)
    text = peers.table(peers.summarize(rows))
    assert "| 64 | torchserve | 1,000 | 1,000 - 2,000 | 6.0x | 6.0, 7.0, 2.5 |" in text


def test_summary_gives_the_native_fronts_ratio_and_the_issues_targets() -> None:
    rows = [_row("lstm-serve-native", 64, r, i) for i, r in enumerate((9000, 12000, 10000))]
    rows += [_row("lstm-serve", 64, r, i) for i, r in enumerate((6000, 6000, 5000))]
    rows += [_row("torchserve-grpc", 64, r, i) for i, r in enumerate((2000, 2000, 2500))]
    rows += [_row("tritonserver", 64, 3000, 1)]  # died in rounds 0 and 2
    summary = {r["system"]: r for r in peers.summarize(rows)}
    ts, tr, ours = summary["torchserve-grpc"], summary["tritonserver"], summary["lstm-serve"]
    assert ts["x_native"] == pytest.approx(5.0) and ts["x_native_per_round"] == [4.5, 6.0, 4.0]
    assert ts["x_lstm_serve"] == pytest.approx(3.0)
    # the median over every round the native front ran, the per-round ratio where both ran
    assert tr["x_native"] == pytest.approx(10 / 3) and tr["x_native_per_round"] == [4.0]
    assert ours["x_native"] == pytest.approx(10000 / 6000) and "x_lstm_serve" not in ours
    assert "x_native" not in summary["lstm-serve-native"]
    assert peers.targets(list(summary.values())) == [
        "target S=64: native front >= 3x tritonserver: 3.33x (rounds 4.0): met",
        "target S=64: native front >= 5x torchserve-grpc: 5.00x (rounds 4.5, 6.0, 4.0): met",
    ]
    text = peers.table(peers.summarize(rows))
    assert "| 64 | tritonserver | 3,000 | 3,000 - 3,000 | 2.0x | 2.0 | 3.3x | 4.0 |" in text


def test_targets_at_256_against_echo_and_floor_and_at_1_on_latency() -> None:
    rows = [_row("lstm-serve-native", 256, r, i) for i, r in enumerate((30000, 31000))]
    rows += [_row("lstm-serve", 256, r, i) for i, r in enumerate((14000, 15000))]
    rows += [_row("echo", 256, r, i) for i, r in enumerate((40000, 42000))]
    rows += [_row("floor", 256, r, i) for i, r in enumerate((20000, 30000))]
    rows += [_row("lstm-serve-native", 1, 1250, 0), _row("lstm-serve", 1, 1600, 0)]
    assert peers.targets(peers.summarize(rows)) == [
        "target S=256: native front >= 2x echo: 0.74x (rounds 0.8, 0.7): missed",
        "target S=256: lstm-serve >= 0.6x floor: 0.58x (rounds 0.7, 0.5): missed",
        "target S=1: native front p50 within 0.2 ms of lstm-serve's: 0.80 vs 0.62 ms (+0.18): met",
    ]


def test_a_target_against_a_peer_driven_by_another_client_is_not_judged() -> None:
    rows = [_row("lstm-serve-native", 64, 30000, 0) | {"client": "native"},
            _row("tritonserver", 64, 3000, 0) | {"client": "python"}]  # fmt: skip
    summary = peers.summarize(rows)
    assert peers.targets(summary) == [
        "target S=64: native front >= 3x tritonserver: 10.00x (rounds 10.0): not judged: native "
        "client against python client"
    ]
    assert "| native | - |" in peers.table(summary)


def test_summary_carries_the_native_clients_exactness() -> None:
    exact = [{"mismatched": 0, "max_abs_diff": 0.0}, {"mismatched": 0, "max_abs_diff": 0.0}]
    rows = [_row("lstm-serve-native", 64, r, i) | {"client": "native", "exact": e}
            for i, (r, e) in enumerate(zip((9000, 9500), exact, strict=True))]  # fmt: skip
    (row,) = peers.summarize(rows)
    assert (row["mismatched"], row["max_abs_diff"], row["client"]) == (0, 0.0, "native")


def test_targets_need_the_native_front_measured() -> None:
    rows = [_row("lstm-serve", 64, 6000, 0), _row("tritonserver", 64, 3000, 0)]
    assert peers.targets(peers.summarize(rows)) == []


def test_a_start_whose_port_was_taken_is_started_again_on_fresh_ports(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(peers, "LOGS", tmp_path / "logs")
    tries: list[Path] = []

    def taken_once(work: Path, onnx: Path, args: Any) -> str:
        tries.append(work)
        if len(tries) == 1:
            (work / "torchserve.log").write_text("bind(..) failed: Address already in use\n")
            raise RuntimeError("torchserve exited with 0")
        return "started"

    monkeypatch.setitem(peers.STARTERS, "torchserve", taken_once)
    assert peers.start_server("torchserve", tmp_path, tmp_path / "m.onnx", None) == "started"
    assert len(tries) == 2 and tries[0] != tries[1]  # a fresh folder (and ports) each time
    assert (tmp_path / "logs" / "torchserve-start1-torchserve.log").is_file()


@pytest.mark.parametrize(
    ("system", "error", "starts"),
    [  # another failure is not retried; a port taken every time gives up after MAX_STARTS
        ("tritonserver", "tritonserver exited with 1: failed to load 'bench-lstm'", 1),
        ("lstm-serve", "server exited with 1: cannot listen on 127.0.0.1:1: in use", None),
    ],
)
def test_a_failed_start_is_retried_only_for_a_taken_port(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, system: str, error: str, starts: int | None
) -> None:
    monkeypatch.setattr(peers, "LOGS", tmp_path / "logs")
    tries: list[Path] = []

    def failing(work: Path, onnx: Path, args: Any) -> str:
        tries.append(work)
        raise RuntimeError(error)

    monkeypatch.setitem(peers.STARTERS, system, failing)
    with pytest.raises(RuntimeError, match=error.split(": ")[1][:12]):
        peers.start_server(system, tmp_path, tmp_path / "m.onnx", None)
    assert len(tries) == (starts or peers.MAX_STARTS)
