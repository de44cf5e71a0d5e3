"""Triton sequences across a fleet, all real processes on 127.0.0.1: two lstm-serve replicas
(`python -m service.cli`, the shipped models) sharing one redis-server and one snapshot key,
driven by the stock tritonclient (gRPC ModelInfer, gRPC ModelStreamInfer, HTTP).

docs/COMING_FROM_TRITON.md: "a sequence is a native streaming session: the same limits, metrics,
snapshots, Redis store and drain", so, as a native session, any replica continues it:

- 8 sequences (text, tokens, frames), each request sent to the other replica than the last:
  nothing refused, every last answer equal to onnxruntime on the whole sequence (1e-5).
- START again on the other replica: a later request on the first one continues the new
  sequence, not the stale one.
- SIGKILL (strict store) or SIGTERM (drain) of the replica that answered last: the other one
  continues exactly; a ModelStreamInfer stream open on a draining replica ends UNAVAILABLE.
- After END, a request without START is refused naming the sequence; a new START works anywhere.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import itertools
import queue
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from lstmserve.contract import read_description
from tests.e2e.conftest import ROOT, ServerProcess
from tests.integration.conftest import Reference

MODELS = ROOT / "models"
LANGID, SPEAKER = "langid-chars", "speaker-vowels"  # text or tokens; 12 features per frame
KEY = "fleet:" + base64.b64encode(b"the-whole-fleet-shares-this-key!").decode()
FLAGS = (
    "--model-control", "explicit", "--load-models", f"{LANGID},{SPEAKER}",
    "--snapshot-key", KEY, "--session-store-mode", "strict", "--drain-grace-s", "2",
)  # fmt: skip
TIMEOUT_S = 20.0  # one request, one reply, one stream's end
WORDS = ("Schmetterling", "Cafe\u0301 au lait", "mariposa", "vlinder")  # an accent to combine
ATOL = 1e-5
HEX_ID = re.compile(r"[0-9a-f]{16,}")  # an internal session id (token_hex) leaking out


@dataclass(frozen=True)
class Sequence:
    """One Triton sequence: its id, model, input tensor and chunks (one request each)."""

    sid: int | str
    model: str
    tensor: str  # "text" (str chunks), "tokens" ((T,) int64) or "features" ((T, 12) float32)
    chunks: tuple[Any, ...]

    @property
    def last(self) -> int:
        return len(self.chunks) - 1

    def __str__(self) -> str:
        return f"sequence {self.sid!r} ({self.model}, {self.tensor})"


class Oracle:
    """Offline onnxruntime on a whole sequence, straight from the shipped model files; text is
    tokenized by the model's own tokenizer (lstmserve.contract)."""

    def __init__(self) -> None:
        self.reference = Reference(MODELS)
        description = read_description(str(MODELS / LANGID / "1" / "model.onnx"))
        assert description.tokenizer is not None
        self.tokenizer = description.tokenizer
        self.vocab = description.vocab_size

    def probs(self, seq: Sequence, chunks: tuple[Any, ...] | None = None) -> np.ndarray:
        """(C,) after the whole of `chunks` (default: all of the sequence's)."""
        chunks = seq.chunks if chunks is None else chunks
        if seq.tensor == "text":
            steps = np.array(self.tokenizer.encode("".join(chunks)), np.int64)
        else:
            steps = np.concatenate(chunks)
        return self.reference.run(seq.model, steps)[0]


def _split(rng: np.random.Generator, text: str, n: int) -> tuple[str, ...]:
    """`text` in n pieces; a combining accent always starts one (its letter is held back)."""
    accent = text.find("\u0301")
    cuts = {accent} if accent > 0 else set()
    spare = [i for i in range(1, len(text)) if i not in cuts]
    cuts |= {int(c) for c in rng.choice(spare, size=n - 1 - len(cuts), replace=False)}
    edges = [0, *sorted(cuts), len(text)]
    return tuple(text[a:b] for a, b in itertools.pairwise(edges))


def make_sequences(oracle: Oracle, seed: int, count: int, chunks: int = 0) -> list[Sequence]:
    """`count` sequences, in turn text, tokens and frames; ids in turn a uint64 and a string
    (unique per seed: every fleet shares the one Redis); `chunks` requests each (0: 3 to 5)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        sid: int | str = seed * 1000 + i if i % 2 == 0 else f"fleet-{seed}-{i}"
        n = chunks or int(rng.integers(3, 6))
        sizes = rng.integers(1, 5, size=n)
        if i % 3 == 0:
            text = _split(rng, WORDS[(i // 3) % len(WORDS)], n)
            out.append(Sequence(sid, LANGID, "text", text))
        elif i % 3 == 1:
            tokens = tuple(rng.integers(1, oracle.vocab, size=k).astype(np.int64) for k in sizes)
            out.append(Sequence(sid, LANGID, "tokens", tokens))
        else:
            frames = tuple(rng.normal(size=(k, 12)).astype(np.float32) for k in sizes)
            out.append(Sequence(sid, SPEAKER, "features", frames))
    return out


def tokens_sequence(oracle: Oracle, sid: int | str, seed: int, n: int) -> Sequence:
    """A langid-chars sequence of n random token chunks (1 to 4 tokens each)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, size=n)
    return Sequence(
        sid, LANGID, "tokens", tuple(rng.integers(1, oracle.vocab, size=k) for k in sizes)
    )


def tensor(module: Any, seq: Sequence, chunk: Any) -> Any:
    """A chunk as the request's one input: text [1, 1] BYTES, tokens [1, T], frames [1, T, F]."""
    if seq.tensor == "text":
        data, datatype = np.array([[chunk.encode()]], dtype=np.object_), "BYTES"
    else:
        data, datatype = chunk[None], "INT64" if seq.tensor == "tokens" else "FP32"
    inp = module.InferInput(seq.tensor, list(data.shape), datatype)
    inp.set_data_from_numpy(data)
    return inp


def infer(client: Any, seq: Sequence, r: int) -> np.ndarray:
    """Request r of `seq` by ModelInfer (a tritonclient.grpc client) or POST .../infer (an
    http one), START on the first and END on the last: its `probs` (C,)."""
    module = tc if isinstance(client, tc.InferenceServerClient) else th
    extra = {"client_timeout": TIMEOUT_S} if module is tc else {}
    result = client.infer(
        seq.model, [tensor(module, seq, seq.chunks[r])], sequence_id=seq.sid,
        sequence_start=r == 0, sequence_end=r == seq.last,
        outputs=[module.InferRequestedOutput("probs")], **extra,
    )  # fmt: skip
    return result.as_numpy("probs")[0]


def _said(error: InferenceServerException) -> str:
    """`[status] message`; an in-band stream error (no status): `in-band: message`."""
    status = error.status()
    return f"[{status}] {error.message()}" if status else f"in-band: {error.message()}"


Reply = tuple[int | None, np.ndarray | None, str | None]  # (sequence index, probs, refusal)


class Unary:
    """ModelInfer (gRPC) or HTTP infer, one client per replica, one request at a time."""

    def __init__(self, servers: tuple[ServerProcess, ...], http: bool) -> None:
        if http:
            urls = [f"127.0.0.1:{s.http_port}" for s in servers]
            self.clients: list[Any] = [th.InferenceServerClient(u, network_timeout=TIMEOUT_S,
                                                                connection_timeout=TIMEOUT_S)
                                       for u in urls]  # fmt: skip
        else:
            self.clients = [tc.InferenceServerClient(s.address) for s in servers]
        self.done: list[Reply] = []

    def submit(self, replica: int, index: int, seq: Sequence, r: int) -> None:
        try:
            self.done.append((index, infer(self.clients[replica], seq, r), None))
        except InferenceServerException as error:
            self.done.append((index, None, _said(error)))

    def collect(self) -> list[Reply]:
        done, self.done = self.done, []
        return done

    def close(self) -> None:
        for client in self.clients:
            client.close()


class Streams:
    """One ModelStreamInfer stream per replica (tritonclient.grpc start_stream); the replies
    and the stream's own end (an error with a gRPC status) arrive on the replica's queue."""

    def __init__(self, servers: tuple[ServerProcess, ...]) -> None:
        self.clients = [tc.InferenceServerClient(s.address) for s in servers]
        self.queues: list[queue.Queue[tuple[Any, Any]]] = [queue.Queue() for _ in servers]
        self.pending = [0 for _ in servers]
        for client, replies in zip(self.clients, self.queues, strict=True):
            client.start_stream(callback=functools.partial(self._put, replies))

    @staticmethod
    def _put(replies: queue.Queue[tuple[Any, Any]], result: Any, error: Any) -> None:
        replies.put((result, error))

    def submit(self, replica: int, index: int, seq: Sequence, r: int) -> None:
        self.clients[replica].async_stream_infer(
            seq.model, [tensor(tc, seq, seq.chunks[r])], request_id=str(index),
            sequence_id=seq.sid, sequence_start=r == 0, sequence_end=r == seq.last,
            outputs=[tc.InferRequestedOutput("probs")],
        )  # fmt: skip
        self.pending[replica] += 1

    def collect(self) -> list[Reply]:
        out: list[Reply] = []
        for replica, replies in enumerate(self.queues):
            while self.pending[replica]:
                try:
                    result, error = replies.get(timeout=TIMEOUT_S)
                except queue.Empty:
                    raise AssertionError(f"no reply from replica {'AB'[replica]}") from None
                self.pending[replica] -= 1
                if error is not None:  # in-band: the request is not named, its sequence is
                    out.append((None, None, _said(error)))
                    if error.status() is not None:  # the stream itself ended
                        self.pending[replica] = 0
                else:
                    index = int(result.get_response().id)
                    out.append((index, result.as_numpy("probs")[0], None))
        return out

    def end_of(self, replica: int, timeout: float = TIMEOUT_S) -> InferenceServerException:
        """The error that ends `replica`'s stream, once no reply is pending there."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result, error = self.queues[replica].get(
                    timeout=max(0.0, deadline - time.monotonic())
                )
            except queue.Empty:
                raise AssertionError(
                    f"replica {'AB'[replica]}'s stream did not end with a status in {timeout} s"
                ) from None
            assert result is None, "a reply nobody asked for"
            if error.status() is not None:
                return error

    def close(self) -> None:
        for client in self.clients:
            client.stop_stream(cancel_requests=True)
            client.close()


Front = Unary | Streams
Route = Callable[[int, int], int]  # (sequence index, request index) -> replica 0 (A) or 1 (B)


def alternate(i: int, r: int) -> int:
    return (i + r) % 2


def drive(
    front: Front, seqs: list[Sequence], route: Route, after: Callable[[int], None] | None = None
) -> list[np.ndarray]:
    """Round r sends request r of every sequence still going to replica route(i, r), then waits
    for the round's replies; a refused request fails the test, named. `after(r)` runs after
    round r. Returns every sequence's last answer."""
    last: list[np.ndarray | None] = [None] * len(seqs)
    for r in range(max(len(s.chunks) for s in seqs)):
        going = [i for i, s in enumerate(seqs) if r < len(s.chunks)]
        for i in going:
            front.submit(route(i, r), i, seqs[i], r)
        refused = []
        for index, probs, error in front.collect():
            if error is not None:
                where = "" if index is None else f" of {seqs[index]}"
                refused.append(f"request {r}{where}: {error}")
            else:
                assert index is not None
                last[index] = probs
        if refused:
            routes = ", ".join(f"{seqs[i].sid!r}: {'AB'[route(i, r)]}" for i in going)
            raise AssertionError(f"round {r} ({routes}) refused:\n" + "\n".join(refused))
        if after is not None:
            after(r)
    assert all(p is not None for p in last)
    return [p for p in last if p is not None]


def check(oracle: Oracle, seqs: list[Sequence], answers: list[np.ndarray]) -> None:
    for seq, got in zip(seqs, answers, strict=True):
        np.testing.assert_allclose(got, oracle.probs(seq), rtol=0, atol=ATOL, err_msg=str(seq))


@contextlib.contextmanager
def fleet(redis_url: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Replicas A and B, ready, one Redis store and key; killed afterwards, whatever happened."""
    replicas: list[ServerProcess] = []
    try:
        for _ in range(2):
            replicas.append(ServerProcess(MODELS, *FLAGS, "--session-store", redis_url))
        for replica in replicas:
            replica.wait_event("ready", 60)
        yield replicas[0], replicas[1]
    finally:
        for replica in replicas:
            if replica.proc.poll() is None:
                replica.proc.kill()
            replica.proc.wait(10)


@contextlib.contextmanager
def front(kind: str, servers: tuple[ServerProcess, ...]) -> Iterator[Front]:
    made: Front = Streams(servers) if kind == "stream" else Unary(servers, http=kind == "http")
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def pair(redis_url: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with fleet(redis_url) as replicas:
        yield replicas


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle()


@pytest.mark.parametrize(("kind", "seed"), [("grpc", 11), ("stream", 12), ("http", 13)])
def test_every_request_on_the_other_replica_answers_the_whole_sequence(
    kind: str, seed: int, pair: tuple[ServerProcess, ServerProcess], oracle: Oracle
) -> None:
    seqs = make_sequences(oracle, seed, 8)
    with front(kind, pair) as f:
        answers = drive(f, seqs, alternate)
    check(oracle, seqs, answers)


def test_a_start_on_the_other_replica_wins_over_the_stale_sequence(
    pair: tuple[ServerProcess, ServerProcess], oracle: Oracle
) -> None:
    first = tokens_sequence(oracle, 20_000, 20, 3)  # its END (request 2) is never sent
    second = tokens_sequence(oracle, first.sid, 21, 3)  # the same id, other tokens
    a, b = (tc.InferenceServerClient(s.address) for s in pair)
    try:
        infer(a, first, 0)  # START on A
        infer(a, first, 1)
        infer(b, second, 0)  # START again, on B, with other tokens
        got = infer(a, second, 1)  # continued on A
        stale = oracle.probs(first, (*first.chunks[:2], second.chunks[1]))
        off_stale = float(np.abs(got - stale).max())
        assert off_stale > ATOL, "replica A answered from the sequence before the second START"
        want = oracle.probs(second, second.chunks[:2])
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
        np.testing.assert_allclose(infer(b, second, 2), oracle.probs(second), rtol=0, atol=ATOL)
    finally:
        a.close()
        b.close()


def test_sigkill_of_the_replica_that_answered_last_the_other_continues_exactly(
    redis_url: str, oracle: Oracle
) -> None:
    seqs = make_sequences(oracle, 30, 3, chunks=5)
    with fleet(redis_url) as (a, b), front("grpc", (a, b)) as f:

        def kill_a(r: int) -> None:
            if r == 2:  # A answered request 2 of every sequence; strict: each is in the store
                a.proc.kill()
                assert a.proc.wait(10) != 0

        answers = drive(f, seqs, lambda i, r: r % 2 if r <= 2 else 1, kill_a)
    check(oracle, seqs, answers)


def test_sigterm_of_the_replica_that_answered_last_the_other_continues_exactly(
    redis_url: str, oracle: Oracle
) -> None:
    seqs = make_sequences(oracle, 40, 3, chunks=5)
    with fleet(redis_url) as (a, b), front("stream", (a, b)) as f:

        def drain_a(r: int) -> None:
            if r == 2:  # after A's replies to request 2; the next ones go to B at once
                a.terminate()

        answers = drive(f, seqs, lambda i, r: r % 2 if r <= 2 else 1, drain_a)
        assert a.proc.wait(20) == 0, "the drained replica exits cleanly"
    check(oracle, seqs, answers)


def test_a_stream_open_on_a_draining_replica_ends_unavailable(
    redis_url: str, oracle: Oracle
) -> None:
    seq = tokens_sequence(oracle, 41_000, 41, 3)
    with fleet(redis_url) as (a, b), front("stream", (a, b)) as f:
        assert isinstance(f, Streams)
        for r in range(2):  # START and one more: the sequence is open, the stream idle
            f.submit(0, 0, seq, r)
            ((_, _, error),) = f.collect()
            assert error is None, error
        a.terminate()
        end = f.end_of(0)
        assert end.status() == "StatusCode.UNAVAILABLE", _said(end)
        assert a.proc.wait(20) == 0, "the drained replica exits cleanly"


@pytest.mark.parametrize(("kind", "seed"), [("grpc", 50), ("http", 51)])
def test_after_end_a_request_without_start_is_refused_and_a_new_start_works(
    kind: str, seed: int, pair: tuple[ServerProcess, ServerProcess], oracle: Oracle
) -> None:
    sid = seed * 1000 if kind == "grpc" else f"fleet-{seed}"  # a uint64 id, a string id
    seq = tokens_sequence(oracle, sid, seed, 3)
    with front(kind, pair) as f:
        assert isinstance(f, Unary)
        a, b = f.clients
        infer(a, seq, 0)
        infer(b, seq, 1)
        infer(a, seq, 2)  # END on A
        with pytest.raises(InferenceServerException) as info:
            infer(b, seq, 1)  # no START, on B
        said = info.value.message()
        assert info.value.status() == ("400" if kind == "http" else "StatusCode.INVALID_ARGUMENT")
        shown = repr(seq.sid) if isinstance(seq.sid, str) else str(seq.sid)
        assert f"sequence {shown} of model '{LANGID}'" in said, said
        assert not HEX_ID.search(said), f"an internal id in {said!r}"
        infer(b, seq, 0)  # START again, on B
        infer(a, seq, 1)
        np.testing.assert_allclose(infer(b, seq, 2), oracle.probs(seq), rtol=0, atol=ATOL)
