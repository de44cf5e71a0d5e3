"""Signed session snapshots: round trip, tampering, unknown keys, key rotation."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from service.engine.continuity.snapshots import (
    SessionSnapshot,
    SnapshotKeys,
    decode_snapshot,
    encode_snapshot,
)
from service.errors import ConfigError, SnapshotInvalid

SECRET_A = base64.b64encode(b"a" * 32).decode()
SECRET_B = base64.b64encode(b"b" * 32).decode()


def _snap() -> SessionSnapshot:
    state = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    return SessionSnapshot("ab" * 16, "tiny-lstm", 2, state, total_steps=17, last_seq=5)


def test_round_trip_keeps_every_field_and_the_exact_state() -> None:
    keys = SnapshotKeys.parse(f"k1:{SECRET_A}")
    back = decode_snapshot(encode_snapshot(_snap(), keys), keys)
    snap = _snap()
    assert (back.session_id, back.model, back.version) == (snap.session_id, "tiny-lstm", 2)
    assert (back.total_steps, back.last_seq) == (17, 5)
    np.testing.assert_array_equal(back.state, snap.state)
    assert back.state.dtype == np.float32 and back.created_at > 0


def test_a_logits_models_last_outputs_travel_beside_their_probabilities() -> None:
    """A resend answered by another replica gets the model's outputs as computed (the Triton
    API's) and their probabilities (the native API's); a snapshot of a model whose outputs are
    probabilities carries them once, as before."""
    from dataclasses import replace

    keys = SnapshotKeys.parse(f"k1:{SECRET_A}")
    snap = replace(_snap(), last_probs=(0.25, 0.75), last_values=(-1.0, 0.0986), last_steps=3)
    back = decode_snapshot(encode_snapshot(snap, keys), keys)
    assert back.last_values == pytest.approx((-1.0, 0.0986)) and back.last_steps == 3
    assert back.last_probs == (0.25, 0.75)
    plain = encode_snapshot(replace(snap, last_values=()), keys)
    assert b"last_values" not in plain and decode_snapshot(plain, keys).last_values == ()


@pytest.mark.parametrize("offset", [10, 40, -40, -1])
def test_a_flipped_byte_anywhere_is_refused(offset: int) -> None:
    keys = SnapshotKeys.parse(f"k1:{SECRET_A}")
    blob = bytearray(encode_snapshot(_snap(), keys))
    blob[offset] ^= 0x01
    with pytest.raises(SnapshotInvalid, match="snapshot"):
        decode_snapshot(bytes(blob), keys)


def test_a_snapshot_signed_with_an_unknown_key_is_refused_by_name() -> None:
    blob = encode_snapshot(_snap(), SnapshotKeys.parse(f"other:{SECRET_B}"))
    with pytest.raises(SnapshotInvalid, match="key id 'other'"):
        decode_snapshot(blob, SnapshotKeys.parse(f"k1:{SECRET_A}"))


def test_the_same_key_id_with_another_secret_fails_the_signature() -> None:
    blob = encode_snapshot(_snap(), SnapshotKeys.parse(f"k1:{SECRET_B}"))
    with pytest.raises(SnapshotInvalid, match="signature check failed"):
        decode_snapshot(blob, SnapshotKeys.parse(f"k1:{SECRET_A}"))


def test_rotation_new_key_signs_old_key_still_verifies() -> None:
    old = SnapshotKeys.parse(f"k1:{SECRET_A}")
    rotated = SnapshotKeys.parse(f"k2:{SECRET_B},k1:{SECRET_A}")
    assert decode_snapshot(encode_snapshot(_snap(), old), rotated).last_seq == 5
    with pytest.raises(SnapshotInvalid):
        decode_snapshot(encode_snapshot(_snap(), rotated), old)


@pytest.mark.parametrize("blob", [b"", b"LSS1", b"garbage" * 10, b"LSS1\x05k1"])
def test_garbage_is_refused_without_crashing(blob: bytes) -> None:
    with pytest.raises(SnapshotInvalid):
        decode_snapshot(blob, SnapshotKeys.parse(f"k1:{SECRET_A}"))


@pytest.mark.parametrize(
    "spec", ["nokey", "k1:not-base64!!", f"k1:{base64.b64encode(b'short').decode()}"]
)
def test_bad_key_specs_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        SnapshotKeys.parse(spec)


@pytest.mark.parametrize("secret", ["abc", "s3cret-not-base64!!", "ünïcode-secret"])
def test_a_bad_secret_is_named_by_its_key_id_and_never_shown(secret: str) -> None:
    with pytest.raises(ConfigError) as raised:
        SnapshotKeys.parse(f"k1:{secret}")
    message = str(raised.value)
    assert "--snapshot-key: the secret of key id 'k1' is not valid base64" in message
    assert secret not in message
    assert raised.value.__cause__ is None  # no chained error that could quote it either


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (SECRET_A, "entry 1 has no ':'"),  # a bare secret, no key id
        (f"k1:{SECRET_A},{SECRET_B}", "entry 2 has no ':'"),
        (f"{SECRET_A * 2}:{SECRET_B}", "a key id is longer than 64 characters"),
        (f"k1:{SECRET_A},k1:{SECRET_B}", "key id 'k1' is given twice"),
        (f"k1:{base64.b64encode(b'short').decode()}", "key id 'k1' is 5 bytes, it needs 16"),
    ],
)
def test_key_spec_errors_say_what_is_wrong_without_a_secret(spec: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=r"^--snapshot-key: ") as raised:
        SnapshotKeys.parse(spec)
    message = str(raised.value)
    assert expected in message
    assert SECRET_A not in message and SECRET_B not in message
