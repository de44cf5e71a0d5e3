"""StreamColumns over a real server: many sessions' chunks as packed arrays == offline
onnxruntime, per-entry errors in-band, exactly-once resends, end, drain, malformed messages."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

from lstmserve.client import ColumnsRefused, ColumnStream, LstmClient, MultiStream, columns_request
from lstmserve.v1 import lstm_serve_pb2 as pb
from tests.integration.conftest import Reference, ServerThread, make_config, metric, scrape

T = TypeVar("T")
OK, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ABORTED, UNAVAILABLE = 0, 3, 5, 9, 10, 14
KEY = "k1:" + base64.b64encode(b"columns-test-snapshot-key-32b!!!").decode()
VOCAB = 28  # the tiny token models' vocabulary


def run(server: ServerThread, scenario: Callable[[LstmClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with LstmClient(server.address) as client:
            return await scenario(client)

    return asyncio.run(main())


def test_many_sessions_over_columns_match_offline_onnxruntime(
    server: ServerThread, reference: Reference
) -> None:
    rng = np.random.default_rng(3)
    n = 48
    words = [rng.integers(0, VOCAB, size=int(rng.integers(8, 30))) for _ in range(n)]

    async def scenario(client: LstmClient) -> tuple[list[np.ndarray], list[int], list[str]]:
        columns = ColumnStream(client)
        handles = await columns.open("tiny-lstm", n, version=1)
        assert len(set(handles)) == n and all(handles)
        assert columns.model == "tiny-lstm" and columns.version == 1 and len(columns.labels) == 3
        done, last = [0] * n, [np.zeros(0)] * n
        while any(d < len(w) for d, w in zip(done, words, strict=True)):
            who = [i for i in range(n) if done[i] < len(words[i])]
            parts = []
            for i in who:  # ragged: 1..6 steps each
                k = int(rng.integers(1, 7))
                parts.append(words[i][done[i] : done[i] + k])
                done[i] = min(len(words[i]), done[i] + k)
            result = await columns.step([handles[i] for i in who], parts)
            assert result.errors == {} and not result.duplicate.any()
            assert result.probs.shape == (len(who), 3)
            for row, i in enumerate(who):
                last[i] = result.probs[row].copy()
                assert int(result.total_steps[row]) == done[i]
        ids = [columns.session_ids[h] for h in handles]
        totals = (await columns.end(handles)).tolist()
        await columns.close()
        return last, totals, ids

    last, totals, ids = run(server, scenario)
    assert totals == [len(w) for w in words] and len(set(ids)) == n
    for word, probs in zip(words, last, strict=True):
        np.testing.assert_allclose(probs, reference.run("tiny-lstm", word)[0], atol=1e-5)


def test_frames_as_one_3d_array_match_offline_and_a_non_finite_frame_fails_alone(
    server: ServerThread, reference: Reference
) -> None:
    rng = np.random.default_rng(4)
    frames = rng.normal(size=(6, 10, 5)).astype(np.float32)  # 6 sessions x 10 steps x F=5
    poisoned = frames[:, 5:].copy()
    poisoned[2, 3, 1] = np.nan

    async def scenario(client: LstmClient) -> tuple[Any, Any]:
        columns = ColumnStream(client)
        handles = await columns.open("tiny-rnn-frames", 6, version=1)
        await columns.step(handles, frames[:, :5])
        second = await columns.step(handles, poisoned)  # session 2's chunk is refused
        again = await columns.step(handles[2:3], frames[2:3, 5:])  # resent clean: applies
        await columns.close()
        return second, again

    second, again = run(server, scenario)
    assert second.status.tolist() == [OK, OK, INVALID_ARGUMENT, OK, OK, OK]
    code, message = second.errors[2]
    assert code == INVALID_ARGUMENT and "frames" in message and "nan" in message
    assert np.isnan(second.probs[2]).all() and int(second.total_steps[2]) == 5
    for i in (0, 1, 3, 4, 5):
        expected = reference.run("tiny-rnn-frames", frames[i])[0]
        np.testing.assert_allclose(second.probs[i], expected, atol=1e-5)
    np.testing.assert_allclose(
        again.probs[0], reference.run("tiny-rnn-frames", frames[2])[0], atol=1e-5
    )


def test_one_message_s_chunks_share_batched_model_runs(server: ServerThread) -> None:
    frames = np.random.default_rng(5).normal(size=(64, 3, 5)).astype(np.float32)

    def counts() -> tuple[float, float]:
        samples = scrape(server.metrics_url)
        runs = metric(samples, "lstm_serve_batch_size_count", model="tiny-cifg-frames")
        return runs, metric(samples, "lstm_serve_batch_size_sum", model="tiny-cifg-frames")

    async def scenario(client: LstmClient) -> Any:
        columns = ColumnStream(client)
        handles = await columns.open("tiny-cifg-frames", 64, version=1)
        before = counts()
        result = await columns.step(handles, frames)
        after = counts()
        await columns.close()
        return result, before, after

    result, (runs0, chunks0), (runs1, chunks1) = run(server, scenario)
    assert result.errors == {} and result.probs.shape == (64, 4)
    assert chunks1 - chunks0 == 64
    assert runs1 - runs0 <= 4, f"64 chunks of one message took {runs1 - runs0} model runs"


def test_bytes_that_are_no_columns_request_end_the_stream_invalid_argument(
    server: ServerThread,
) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(server.address) as channel:
            method = channel.stream_stream("/lstmserve.v1.LstmServe/StreamColumns")
            call = method()
            await call.write(b"\xff\xff\xff\xff")
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call.read()
            return failed.value

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lstmserve.v1.ColumnsRequest" in (error.details() or "")


def test_bad_entries_get_their_own_status_and_do_not_disturb_the_others(
    server: ServerThread, reference: Reference
) -> None:
    word = np.array([8, 5, 12, 12, 15], dtype=np.int64)

    async def scenario(client: LstmClient) -> pb.ColumnsResponse:
        columns = ColumnStream(client)
        h = await columns.open("tiny-gru", 6, version=1)
        await columns.step(h, np.tile(word[:2], (6, 1)))  # every session at seq 1, 2 steps
        chunk = [word[2:]] * 7
        chunk[1] = np.array([3, VOCAB + 5, 4])  # a token id out of range
        handles = [h[0], h[1], h[2], h[3], 9999, h[4], h[0]]
        seqs = [2, 2, 5, 0, 2, 2, 2]  # h[2]: a gap; h[3]: seq 0; h[0] named twice
        reply = await columns.exchange(columns_request(handles, seqs, chunk))
        await columns.close()
        return reply

    reply = run(server, scenario)
    status = np.frombuffer(reply.status, dtype="<u4").tolist()
    assert status == [
        OK, INVALID_ARGUMENT, FAILED_PRECONDITION, INVALID_ARGUMENT, NOT_FOUND, OK,
        INVALID_ARGUMENT,
    ]  # fmt: skip
    errors = {e.index: e for e in reply.errors}
    assert sorted(errors) == [1, 2, 3, 4, 6]
    assert f"tokens[4] = {VOCAB + 5}" in errors[1].message and "[0, 28)" in errors[1].message
    assert "takes seq 2 next" in errors[2].message
    assert "seqs[3] = 0" in errors[3].message
    assert "handles[4] = 9999" in errors[4].message
    assert "named earlier" in errors[6].message
    probs = np.frombuffer(reply.probabilities, dtype="<f4").reshape(7, 3)
    expected = reference.run("tiny-gru", word)[0]
    np.testing.assert_allclose(probs[0], expected, atol=1e-5)
    np.testing.assert_allclose(probs[5], expected, atol=1e-5)
    assert np.isnan(probs[[1, 2, 3, 4, 6]]).all()
    totals = np.frombuffer(reply.total_steps, dtype="<u8").tolist()
    assert totals == [5, 2, 2, 2, 0, 5, 5]


def test_resends_are_applied_exactly_once(server: ServerThread, reference: Reference) -> None:
    word = np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=np.int64)

    async def scenario(client: LstmClient) -> list[pb.ColumnsResponse]:
        columns = ColumnStream(client)
        h = await columns.open("tiny-lstm", 2, version=1)
        replies = []
        for handles, seqs, parts in [
            (h, [1, 1], [word[:3], word[:3]]),
            (h, [2, 2], [word[3:5], word[3:5]]),
            (h, [2, 1], [word[3:5], word[:3]]),  # resends: the last applied one, an older one
            (h, [3, 3], [word[5:], word[5:]]),
        ]:
            replies.append(await columns.exchange(columns_request(handles, seqs, parts)))
        await columns.close()
        return replies

    _, second, resent, last = run(server, scenario)

    def arrays(reply: pb.ColumnsResponse) -> tuple[np.ndarray, list[int], list[int]]:
        probs = np.frombuffer(reply.probabilities, dtype="<f4").reshape(2, 3)
        total = np.frombuffer(reply.total_steps, dtype="<u8").tolist()
        return probs, total, list(reply.duplicate)

    probs2, _, _ = arrays(second)
    probs_r, total_r, dup_r = arrays(resent)
    assert np.frombuffer(resent.status, dtype="<u4").tolist() == [OK, OK]
    assert dup_r == [1, 1] and total_r == [5, 5]
    np.testing.assert_array_equal(probs_r[0], probs2[0])  # its original probabilities
    assert np.isnan(probs_r[1]).all()  # an older resend has none
    probs_l, total_l, dup_l = arrays(last)
    assert dup_l == [0, 0] and total_l == [8, 8]
    for row in probs_l:  # nothing was applied twice
        np.testing.assert_allclose(row, reference.run("tiny-lstm", word)[0], atol=1e-5)


def test_end_frees_the_sessions_and_their_handles(server: ServerThread) -> None:
    async def scenario(client: LstmClient) -> tuple[Any, ...]:
        columns = ColumnStream(client)
        h = await columns.open("tiny-lstm", 3, version=1)
        ids = [columns.session_ids[x] for x in h]
        await columns.step(h, np.ones((3, 4), dtype=np.int64))
        totals = (await columns.end(h[:2])).tolist()
        after = await columns.step(h, np.ones((3, 1), dtype=np.int64))
        with pytest.raises(ColumnsRefused) as twice:
            await columns.end(h[:1])
        await columns.close()
        other = ColumnStream(client)
        with pytest.raises(ColumnsRefused) as resumed:
            await other.resume(ids)
        await other.close()
        return totals, after, twice.value, resumed.value

    totals, after, twice, resumed = run(server, scenario)
    assert totals == [4, 4]
    assert after.status.tolist() == [NOT_FOUND, NOT_FOUND, OK]
    assert int(after.total_steps[2]) == 5
    assert twice.errors[0][0] == NOT_FOUND
    assert sorted(resumed.errors) == [0, 1] and resumed.errors[0][0] == NOT_FOUND
    assert resumed.handles[2] != 0  # the live one was resumed


def test_one_model_version_per_stream_and_a_resume_elsewhere_takes_a_session_over(
    server: ServerThread,
) -> None:
    async def scenario(client: LstmClient) -> tuple[Any, ...]:
        a = ColumnStream(client)
        h = await a.open("tiny-lstm", 2, version=1)
        with pytest.raises(ColumnsRefused) as other_model:
            await a.open("tiny-gru", 1, version=1)
        b = ColumnStream(client)
        taken = await b.resume([a.session_ids[h[0]]])
        on_a = await a.step(h, np.ones((2, 2), dtype=np.int64))
        on_b = await b.step(taken, np.ones((1, 2), dtype=np.int64))
        await a.close()
        await b.close()
        return other_model.value, on_a, on_b

    other_model, on_a, on_b = run(server, scenario)
    code, message = other_model.errors[0]
    assert code == FAILED_PRECONDITION and "this stream serves tiny-lstm v1" in message
    assert on_a.status.tolist() == [ABORTED, OK] and "another stream" in on_a.errors[0][1]
    assert on_b.status.tolist() == [OK] and int(on_b.total_steps[0]) == 2


MALFORMED = [
    ({"handles": b"\x01\x00\x00"}, "handles has 3 bytes"),
    ({"offsets": np.array([0, 2, 3], "<u4").tobytes()[:8]}, "offsets has 2 values"),
    ({"offsets": np.array([0, 3, 2, 4], "<u4").tobytes()}, "offsets never decrease"),
    ({"offsets": np.array([1, 2, 3, 4], "<u4").tobytes()}, "offsets[0] = 1"),
    ({"seqs": b"\x01" * 16}, "seqs has 2 values"),
    ({"tokens": np.ones(3, "<i8").tobytes()}, "tokens has 3 ids, offsets[3] says 4"),
    ({"frames": np.ones(4, "<f4").tobytes()}, "frames is set"),
    ({"handles": b""}, "handles is empty but seqs"),
]


@pytest.mark.parametrize(("change", "named"), MALFORMED)
def test_a_malformed_message_ends_the_stream_invalid_argument(
    server: ServerThread, change: dict[str, bytes], named: str
) -> None:
    async def scenario(client: LstmClient) -> grpc.aio.AioRpcError:
        columns = ColumnStream(client)
        h = await columns.open("tiny-lstm", 3, version=1)
        request = columns_request(h, [1, 1, 1], [np.ones(2, np.int64), [1], [2]])
        for name, value in change.items():
            setattr(request, name, value)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await columns.exchange(request)
        await columns.close()
        return failed.value

    error = run(server, scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (error.details() or "")


def test_chunks_before_any_session_are_malformed(server: ServerThread) -> None:
    async def scenario(client: LstmClient) -> grpc.aio.AioRpcError:
        columns = ColumnStream(client)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await columns.step([1], [[1, 2]])
        await columns.close()
        return failed.value

    error = run(server, scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "open or resume a session first" in (error.details() or "")


@pytest.fixture
def doomed(tiny_repo: Path) -> Iterator[tuple[ServerThread, ServerThread]]:
    a = ServerThread(make_config(tiny_repo, snapshot_key=KEY)).start()
    b = ServerThread(make_config(tiny_repo, snapshot_key=KEY)).start()
    yield a, b
    a.stop()
    b.stop()


def test_a_draining_server_sends_final_snapshots_then_unavailable(
    doomed: tuple[ServerThread, ServerThread], reference: Reference
) -> None:
    a, b = doomed
    word = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.int64)

    async def scenario() -> tuple[Any, ...]:
        async with LstmClient(a.address) as ca, LstmClient(b.address) as cb:
            columns = ColumnStream(ca)
            h = await columns.open("tiny-gru", 3, version=1)
            await columns.step(h, np.tile(word[:4], (3, 1)))
            loop = asyncio.get_running_loop()
            stopping = loop.run_in_executor(None, a.call, a.app.shutdown(5.0))  # type: ignore[union-attr]
            with pytest.raises(grpc.aio.AioRpcError) as drained:
                await columns.receive()
            await stopping
            snapshots = [columns.final_snapshots.get(x) for x in h]
            multi = cb.multi_stream()
            await multi.exchange([MultiStream.restore(s) for s in snapshots if s])
            ids = [columns.session_ids[x] for x in h]
            done = await multi.exchange([MultiStream.chunk(i, 2, word[4:]) for i in ids])
            await multi.close()
            return drained.value, snapshots, done

    drained, snapshots, done = asyncio.run(scenario())
    assert drained.code() == grpc.StatusCode.UNAVAILABLE
    assert all(snapshots)
    for r in done:
        expected = reference.run("tiny-gru", word)[0]
        np.testing.assert_allclose(np.array(r.chunk.probabilities), expected, atol=1e-5)


def test_a_refused_first_message_leaves_no_session_behind(server: ServerThread) -> None:
    assert server.app is not None
    store = server.app.engine.store
    before = len(store)

    async def scenario(client: LstmClient) -> grpc.aio.AioRpcError:
        columns = ColumnStream(client)
        options = pb.StreamOptions(top_k=1)
        request = columns_request([1, 2], [1, 1], [[1, 2], [3]])
        request.open.extend([pb.OpenSession(model="tiny-lstm", version=1, options=options)] * 20)
        request.tokens = request.tokens[:8]  # the arrays do not fit: offsets say 3 ids
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await columns.exchange(request)
        await columns.close()
        return failed.value

    error = run(server, scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokens" in (error.details() or "")
    assert len(store) == before  # the 20 opens of the refused message were undone


def test_one_message_opens_at_most_the_entry_limit_and_a_bigger_one_opens_nothing(
    tiny_repo: Path,
) -> None:
    small = ServerThread(make_config(tiny_repo, max_multi_entries=8)).start()
    try:
        assert small.app is not None
        store = small.app.engine.store

        async def scenario(client: LstmClient) -> tuple[int, grpc.aio.AioRpcError]:
            columns = ColumnStream(client)
            opened = len(await columns.open("tiny-lstm", 8, version=1))
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await columns.open("tiny-lstm", 9, version=1)
            await columns.close()
            return opened, failed.value

        opened, error = run(small, scenario)
        assert opened == 8
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "more than the maximum 8" in (error.details() or "")
        assert len(store) == 8  # only the first message's sessions (until they idle out)
    finally:
        small.stop()


def test_token_ids_after_held_text_run_after_it(server: ServerThread) -> None:
    """A text session holding a letter (a combining mark may still follow it) resumed on
    StreamColumns: the ids sent settle the held letter first, so the reply is Classify of the
    text and the ids together (before: the ids ran ahead of the held letter)."""

    async def scenario(client: LstmClient) -> tuple[Any, Any, Any]:
        session = await client.open_session("tiny-lstm")
        typed = await session.step("cafe")
        await session.close()
        columns = ColumnStream(client)
        handles = await columns.resume([session.session_id])
        columns.next_seq[handles[0]] = 2
        result = await columns.step(handles, [[1]])  # "a"
        await columns.close()
        whole = await client.stub().Classify(pb.ClassifyRequest(
            model="tiny-lstm", sequences=[pb.SequenceInput(tokens=pb.TokenIds(ids=[3, 1, 6, 5, 1]))]
        ))  # fmt: skip
        return typed, result, whole.results[0]

    typed, result, whole = run(server, scenario)
    assert typed.total_steps == 4
    assert result.status.tolist() == [OK], result.errors
    assert int(result.total_steps[0]) == 5 == whole.length
    np.testing.assert_allclose(result.probs[0], whole.probabilities, rtol=0, atol=1e-6)
