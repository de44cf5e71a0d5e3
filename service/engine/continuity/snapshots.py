"""Portable session snapshots: a session's whole state as opaque bytes, signed with a key that
every replica shares, so any replica can continue any session.

Layout (all integers big-endian):

    b"LSS1" | key id length (1 byte) | key id (ASCII) | header length (4 bytes) | header (JSON)
            | state (float32, little-endian, S*H values) | HMAC-SHA256 of everything before (32)

The header carries the session id, model name and version, S and H, steps consumed, the last
chunk sequence number applied and that chunk's final probabilities (to answer its resend).
Several keys may be configured (rotation): the first signs, all verify. Verification uses
`hmac.compare_digest`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import struct
import time
from dataclasses import dataclass

import numpy as np

from service.errors import ConfigError, SnapshotInvalid

MAGIC = b"LSS1"
MAC_BYTES = 32
MAX_KEY_ID = 64
MIN_SECRET_BYTES = 16


@dataclass(frozen=True)
class SessionSnapshot:
    """What a snapshot restores: the session as it was after its last applied chunk."""

    session_id: str
    model: str
    version: int
    state: np.ndarray  # (S, H) float32
    total_steps: int
    last_seq: int
    created_at: float = 0.0
    # The last applied chunk's reply: probabilities after its last step (none: no reply yet),
    # its steps, the steps it covered (-1: not recorded, a server whose replies did not run the
    # held text's tail) and the steps it took back.
    last_probs: tuple[float, ...] = ()
    last_steps: int = 0
    # The same outputs as the model computed them, where they are not probabilities (logits).
    last_values: tuple[float, ...] = ()
    last_total_steps: int = -1
    last_rewound: int = 0
    last_decided: bool = False  # the last reply took the session's decision
    # The session's reply options, so a session continued elsewhere answers as it did here.
    every_step: bool = False
    top_k: int = 1
    # Streamed text held back (it may still combine with the next chunk), and whether the text
    # settled before it ended in a cased letter (service/engine/text/textstream.py).
    # `total_steps` counts the settled steps (those in `state`), not the held text's tail.
    held_text: str = ""
    held_cased: bool = False
    held_known: bool = False  # the settled text has a known token (older: any step settled)
    # Its decision rule (DecisionRule's fields; probability and margin 0: none), the rule's run
    # at the settled point and the decision once taken (-1: none).
    decide: tuple[float, float, int, bool] = (0.0, 0.0, 1, False)
    run: tuple[int, int] = (-1, 0)
    decided: tuple[int, float, int] = (-1, 0.0, 0)  # label, probability, step
    # Who owns the session (service/principal.py) and which incarnation this copy is.
    owner: str = "anonymous"
    generation: str = ""


@dataclass(frozen=True)
class SnapshotKeys:
    """Named HMAC keys; `signing` is the key id new snapshots are signed with."""

    keys: dict[str, bytes]
    signing: str

    def __post_init__(self) -> None:
        if self.signing not in self.keys:
            raise ConfigError(f"--snapshot-key: the signing key id {self.signing!r} is not a key")
        for key_id, secret in self.keys.items():
            _check_key_id(key_id)
            if len(secret) < MIN_SECRET_BYTES:
                raise ConfigError(
                    f"--snapshot-key: the secret of key id {key_id!r} is {len(secret)} bytes, "
                    f"it needs {MIN_SECRET_BYTES} or more"
                )

    @classmethod
    def parse(cls, spec: str) -> SnapshotKeys:
        """'id1:BASE64[,id2:BASE64...]': the first key signs, every key verifies."""
        keys: dict[str, bytes] = {}
        for number, item in enumerate(spec.split(","), start=1):
            key_id, secret = _parse_entry(number, item.strip())
            if key_id in keys:
                raise ConfigError(f"--snapshot-key: key id {key_id!r} is given twice")
            keys[key_id] = secret
        return cls(keys=keys, signing=next(iter(keys)))


def _parse_entry(number: int, item: str) -> tuple[str, bytes]:
    """'ID:BASE64' -> (id, secret); errors name the id or the entry's number, never the secret."""
    key_id, sep, encoded = item.partition(":")
    key_id = key_id.strip()
    if not item:
        raise ConfigError(f"--snapshot-key: entry {number} is empty")
    if not sep:  # the entry may be a bare secret: not shown
        raise ConfigError(
            f"--snapshot-key: entry {number} has no ':'; write each key as KEY_ID:BASE64SECRET "
            "(the entry is not shown: it may be a secret)"
        )
    _check_key_id(key_id)
    try:
        return key_id, base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:  # their messages never quote the input
        raise ConfigError(
            f"--snapshot-key: the secret of key id {key_id!r} is not valid base64 ({exc}); "
            "write KEY_ID:BASE64SECRET"
        ) from None


def _check_key_id(key_id: str) -> None:
    """1-64 ASCII characters; a longer one is not shown (it may be a misplaced secret)."""
    if len(key_id) > MAX_KEY_ID:
        raise ConfigError(f"--snapshot-key: a key id is longer than {MAX_KEY_ID} characters")
    if not key_id or not key_id.isascii():
        raise ConfigError(
            f"--snapshot-key: key id {key_id!r} must be 1-{MAX_KEY_ID} ASCII characters"
        )


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def encode_snapshot(snap: SessionSnapshot, keys: SnapshotKeys) -> bytes:
    """Serialise and sign a snapshot with the signing key."""
    state = np.ascontiguousarray(snap.state, dtype="<f4")  # (S, H)
    header = json.dumps(
        {
            "session_id": snap.session_id,
            "model": snap.model,
            "version": snap.version,
            "rows": int(state.shape[0]),
            "hidden": int(state.shape[1]),
            "total_steps": snap.total_steps,
            "last_seq": snap.last_seq,
            "created_at": snap.created_at or time.time(),
            "last_probs": list(snap.last_probs),
            "last_steps": snap.last_steps,
            **({"last_values": list(snap.last_values)} if snap.last_values else {}),
            "last_total_steps": snap.last_total_steps,
            "last_rewound": snap.last_rewound,
            "last_decided": snap.last_decided,
            "every_step": snap.every_step,
            "top_k": snap.top_k,
            "held_text": snap.held_text,
            "held_cased": snap.held_cased,
            "held_known": snap.held_known,
            "decide": list(snap.decide),
            "run": list(snap.run),
            "decided": list(snap.decided),
            "owner": snap.owner,
            "generation": snap.generation,
        },
        separators=(",", ":"),
    ).encode()
    key_id = keys.signing.encode("ascii")
    body = MAGIC + bytes([len(key_id)]) + key_id + struct.pack(">I", len(header)) + header
    body += state.tobytes()
    return body + _mac(keys.keys[keys.signing], body)


def _split(blob: bytes) -> tuple[str, bytes, bytes, bytes]:
    """-> key id, header, state bytes, body (everything the MAC covers)."""
    if len(blob) < len(MAGIC) + 1 + 4 + MAC_BYTES or not blob.startswith(MAGIC):
        raise SnapshotInvalid("snapshot: not an lstm-serve snapshot (bad magic or too short)")
    body, mac = blob[:-MAC_BYTES], blob[-MAC_BYTES:]
    pos = len(MAGIC)
    key_len = body[pos]
    key_id = body[pos + 1 : pos + 1 + key_len].decode("ascii", errors="replace")
    pos += 1 + key_len
    if pos + 4 > len(body):
        raise SnapshotInvalid("snapshot: truncated header")
    (header_len,) = struct.unpack(">I", body[pos : pos + 4])
    header = body[pos + 4 : pos + 4 + header_len]
    if len(header) != header_len:
        raise SnapshotInvalid("snapshot: truncated header")
    return key_id, header, body[pos + 4 + header_len :], body + mac


def _decide(value: list) -> tuple[float, float, int, bool]:
    probability, margin, steps, end = value
    return float(probability), float(margin), int(steps), bool(end)


def _decided(value: list) -> tuple[int, float, int]:
    label, probability, step = value
    return int(label), float(probability), int(step)


def decode_snapshot(blob: bytes, keys: SnapshotKeys) -> SessionSnapshot:
    """Verify and deserialise; SnapshotInvalid for an unknown key, a bad MAC or bad contents."""
    key_id, header, state_bytes, signed = _split(blob)
    key = keys.keys.get(key_id)
    if key is None:
        raise SnapshotInvalid(
            f"snapshot: signed with key id {key_id[:MAX_KEY_ID]!r}, which this replica does "
            f"not have (it has {sorted(keys.keys)})"
        )
    body, mac = signed[:-MAC_BYTES], signed[-MAC_BYTES:]
    if not hmac.compare_digest(_mac(key, body), mac):
        raise SnapshotInvalid(
            f"snapshot: signature check failed with key {key_id!r} (tampered or corrupted)"
        )
    try:
        meta = json.loads(header)
        rows, hidden = int(meta["rows"]), int(meta["hidden"])
        state = np.frombuffer(state_bytes, dtype="<f4").reshape(rows, hidden)
        return SessionSnapshot(
            session_id=str(meta["session_id"]),
            model=str(meta["model"]),
            version=int(meta["version"]),
            state=state.astype(np.float32),
            total_steps=int(meta["total_steps"]),
            last_seq=int(meta["last_seq"]),
            created_at=float(meta["created_at"]),
            last_probs=tuple(float(p) for p in meta.get("last_probs", ())),
            last_steps=int(meta.get("last_steps", 0)),
            last_values=tuple(float(v) for v in meta.get("last_values", ())),
            last_total_steps=int(meta.get("last_total_steps", -1)),
            last_rewound=int(meta.get("last_rewound", 0)),
            last_decided=bool(meta.get("last_decided", False)),
            every_step=bool(meta.get("every_step", False)),
            top_k=max(1, int(meta.get("top_k", 1))),
            held_text=str(meta.get("held_text", "")),
            held_cased=bool(meta.get("held_cased", False)),
            held_known=bool(meta.get("held_known", int(meta["total_steps"]) > 0)),
            decide=_decide(meta.get("decide", (0.0, 0.0, 1, False))),
            run=(int(meta.get("run", (-1, 0))[0]), int(meta.get("run", (-1, 0))[1])),
            decided=_decided(meta.get("decided", (-1, 0.0, 0))),
            owner=str(meta.get("owner", "anonymous")),
            generation=str(meta.get("generation", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:  # signed but malformed: a bug, not an attack
        raise SnapshotInvalid(f"snapshot: malformed contents ({exc})") from exc
