"""Sequence ids as sessions (service/protocol/sequences.py): the same id on every replica that
shares the signing key, distinct for distinct callers, models and ids."""

from __future__ import annotations

import base64

from service.engine.continuity.snapshots import SnapshotKeys
from service.protocol.sequences import SequenceIds

KEY = "k1:" + base64.b64encode(b"sequence-ids-key-sequence-ids-key").decode()
OTHER = "k2:" + base64.b64encode(b"another-fleet-key-another-fleet-k").decode()


def test_replicas_sharing_the_key_derive_the_same_id() -> None:
    a, b = SequenceIds(SnapshotKeys.parse(KEY)), SequenceIds(SnapshotKeys.parse(KEY))
    assert a.session_id("alice", "m", 42) == b.session_id("alice", "m", 42)
    assert len(a.session_id("alice", "m", 42)) == 32


def test_caller_model_and_the_id_s_type_each_make_another_sequence() -> None:
    ids = SequenceIds(SnapshotKeys.parse(KEY))
    base = ids.session_id("alice", "m", 42)
    others = {ids.session_id("bob", "m", 42), ids.session_id("alice", "n", 42),
              ids.session_id("alice", "m", "42"), ids.session_id("alice", "m", 43)}  # fmt: skip
    assert base not in others and len(others) == 4


def test_another_key_or_no_key_gives_other_ids() -> None:
    keyed = SequenceIds(SnapshotKeys.parse(KEY)).session_id("alice", "m", 42)
    assert SequenceIds(SnapshotKeys.parse(OTHER)).session_id("alice", "m", 42) != keyed
    assert SequenceIds(None).session_id("alice", "m", 42) != SequenceIds(None).session_id(
        "alice", "m", 42
    )  # without a key, a secret of each process: no fleet


def test_the_signing_key_is_the_one_used() -> None:
    rotated = SnapshotKeys.parse(f"{OTHER},{KEY}")  # a new key signs, the old one verifies
    assert SequenceIds(rotated).session_id("a", "m", 1) == SequenceIds(
        SnapshotKeys.parse(OTHER)
    ).session_id("a", "m", 1)
