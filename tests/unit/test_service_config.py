"""The frozen config: validation, flags, LSTM_SERVE_* environment variables."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from service.config import FLAGS, ServerConfig, config_from_args
from service.errors import ConfigError


def test_defaults_serve_models_on_triton_ports() -> None:
    config = config_from_args([], environ={})
    assert config == ServerConfig()
    assert (config.model_repository, config.grpc_port, config.metrics_port) == (
        Path("models"), 8001, 8002,
    )  # fmt: skip
    assert config.session_idle_timeout_s == 600


def test_flags_override_environment_which_overrides_defaults() -> None:
    env = {
        "LSTM_SERVE_GRPC_PORT": "9000",
        "LSTM_SERVE_MAX_SESSIONS": "5",
        "LSTM_SERVE_LOG_JSON": "1",
    }
    config = config_from_args(["--grpc-port", "0", "--providers", "cuda,cpu"], environ=env)
    assert config.grpc_port == 0 and config.max_sessions == 5 and config.log_json
    assert config.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServerConfig().grpc_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "bad",
    [
        {"grpc_port": 70000},
        {"metrics_port": -2},
        {"max_sessions": 0},
        {"max_chunk_steps": 0},
        {"session_idle_timeout_s": 0},
        {"log_level": "LOUD"},
        {"inline_max_steps": -1},
    ],
)
def test_invalid_values_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        ServerConfig(**bad)  # type: ignore[arg-type]


def test_bad_number_on_the_command_line_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="grpc-port"):
        config_from_args(["--grpc-port", "x"], environ={})


def test_bad_snapshot_key_names_the_flag_and_key_id_never_the_secret() -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_args(["--snapshot-key", "k1:abc"], environ={})
    message = str(raised.value)
    assert "--snapshot-key" in message and "key id 'k1'" in message and "base64" in message
    assert "abc" not in message


def test_a_redis_store_without_a_key_names_both_flags() -> None:
    with pytest.raises(ConfigError, match=r"--session-store redis://\.\.\. needs --snapshot-key"):
        config_from_args(["--session-store", "redis://127.0.0.1:6379/0"], environ={})


def test_every_field_is_a_flag() -> None:
    assert set(FLAGS) == {f.name for f in dataclasses.fields(ServerConfig)}


def test_eviction_interval_follows_the_idle_timeout() -> None:
    assert ServerConfig(session_idle_timeout_s=0.2).eviction_interval_s == 0.05
    assert ServerConfig().eviction_interval_s == 10.0


def test_store_urls_are_printed_without_their_password() -> None:
    from service.config import redacted_url

    assert redacted_url("redis://:s3cret@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert redacted_url("rediss://app:s3cret@r:6380/1") == "rediss://app:***@r:6380/1"
    assert redacted_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
