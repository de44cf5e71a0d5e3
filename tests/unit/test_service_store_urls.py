"""Session store URLs and flags: every form parses (or says which part is wrong), passwords are
never printed, the strict / best-effort mode and its defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import (
    config_from_args,
    redacted_url,
    session_store_min_replicas,
    session_store_options,
)
from service.engine.continuity.store_urls import CLUSTER, SENTINEL, SINGLE, parse_store_url
from service.errors import ConfigError

KEY = ("--snapshot-key", "k1:" + "A" * 44)


def test_every_url_form_parses() -> None:
    one = parse_store_url("rediss://app:pw@r.example:6380/2")
    assert (one.kind, one.tls, one.username, one.password) == (SINGLE, True, "app", "pw")
    sentinel = parse_store_url("redis+sentinel://:pw@s1:26379,s2,10.0.0.3:5000/mymaster/3")
    assert sentinel.kind == SENTINEL and not sentinel.tls
    assert sentinel.nodes == (("s1", 26379), ("s2", 26379), ("10.0.0.3", 5000))
    assert (sentinel.master, sentinel.db, sentinel.password) == ("mymaster", 3, "pw")
    cluster = parse_store_url("rediss+cluster://c1:7000,c2:7001")
    assert cluster.kind == CLUSTER and cluster.tls and cluster.nodes == (("c1", 7000), ("c2", 7001))
    assert parse_store_url("unix:///run/redis.sock?db=1").kind == SINGLE
    assert "pw" not in repr(sentinel), "the password is not in the repr"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://r:6379", "scheme 'http'"),
        ("redis+sentinel://s1:26379", "MASTER_NAME"),
        ("redis+sentinel://s1:26379/m/x", "database 'x'"),
        ("redis+sentinel:///m", "names no HOST:PORT"),
        ("redis+cluster://c1:70x0", "port '70x0'"),
        ("redis+cluster://c1:7000/1", "no /DB"),
    ],
)
def test_a_bad_url_says_which_part(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_store_url(url)
    with pytest.raises(ConfigError, match="session_store"):
        config_from_args(["--session-store", url, *KEY], environ={})


def test_passwords_are_redacted_in_every_form() -> None:
    for url in (
        "redis://:s3cret@h:6379/0",
        "rediss://u:s3cret@h:6380/1",
        "redis+sentinel://:s3cret@s1:26379,s2:26379/m/0",
        "rediss+cluster://u:s3cret@c1:7000,c2:7000",
    ):
        shown = redacted_url(url)
        assert "s3cret" not in shown and "***" in shown, shown
    with pytest.raises(ConfigError) as caught:
        config_from_args(["--session-store", "redis+sentinel://:s3cret@s1/m/z", *KEY], environ={})
    assert "s3cret" not in str(caught.value)


def test_mode_defaults_to_strict_and_min_replicas_follow_the_store(tmp_path: Path) -> None:
    sentinel = ["--session-store", "redis+sentinel://s1:26379/m", *KEY]
    config = config_from_args(sentinel, environ={})
    assert config.session_store_mode == "strict" and session_store_min_replicas(config) == 1
    best = config_from_args([*sentinel, "--session-store-mode", "best-effort"], environ={})
    assert session_store_min_replicas(best) == 0
    one = config_from_args(["--session-store", "redis://r:6379/0", *KEY], environ={})
    assert session_store_min_replicas(one) == 0
    with pytest.raises(ConfigError, match="session_store_mode 'sloppy'"):
        config_from_args([*sentinel, "--session-store-mode", "sloppy"], environ={})
    with pytest.raises(ConfigError, match="need a TLS store URL"):
        config_from_args([*sentinel, "--session-store-tls-ca", "ca.pem"], environ={})


def test_the_password_file_beats_the_variable_and_is_never_in_the_repr(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-the-file\n")
    env = {"LSTM_SERVE_SESSION_STORE_PASSWORD": "from-the-env"}
    argv = ["--session-store", "redis://:in-url@r:6379/0", *KEY]
    assert session_store_options(config_from_args(argv, environ=env)).password == "from-the-env"
    config = config_from_args([*argv, "--session-store-password-file", str(secret)], environ=env)
    options = session_store_options(config)
    assert options.password == "from-the-file"
    assert "from-the" not in repr(config) and "from-the" not in repr(options)
    missing = config_from_args([*argv, "--session-store-password-file", "/nope"], environ={})
    with pytest.raises(ConfigError, match="--session-store-password-file '/nope'"):
        session_store_options(missing)
