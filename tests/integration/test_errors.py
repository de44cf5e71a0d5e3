"""Every bad input and every error over a real server: the status, the message, no side effects."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstmserve.client import LstmClient
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.integration.conftest import Reference, ServerThread, make_config, metric, scrape

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def frames(values: list[float], count: int = 0) -> pb.SequenceInput:
    return pb.SequenceInput(frames=pb.Frames(values=values, frame_count=count))


def rows(*widths: int) -> pb.SequenceInput:
    return pb.SequenceInput(frames=pb.Frames(frames=[pb.Frame(values=[0.0] * w) for w in widths]))


def tokens(*ids: int) -> pb.SequenceInput:
    return pb.SequenceInput(tokens=pb.TokenIds(ids=ids))


def text(value: str) -> pb.SequenceInput:
    return pb.SequenceInput(text=value)


def open_(model: str, version: int = 0) -> pb.StreamRequest:
    return pb.StreamRequest(open=pb.OpenSession(model=model, version=version))


def classify(model: str, *inputs: pb.SequenceInput) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model=model, sequences=inputs)


BAD_CHUNKS = {
    "token id out of range": ("tiny-lstm", tokens(1, 28), "tokens.ids[1] = 28"),
    "negative token id": ("tiny-lstm", tokens(-1), "tokens.ids[0] = -1"),
    "empty token chunk": ("tiny-lstm", tokens(), "is empty"),
    "empty text": ("tiny-lstm", text(""), "is empty"),
    "no input at all": ("tiny-lstm", pb.SequenceInput(), "is empty"),
    "text over the chunk maximum": ("tiny-lstm", text("a" * 5000), "more than the maximum"),
    "frames for a token model": ("tiny-lstm", frames([0.0] * 5), "takes tokens, not features"),
    "text for a feature model": ("tiny-rnn-frames", text("abc"), "takes features"),
    "wrong feature width (flat)": (
        "tiny-rnn-frames",
        frames([0.0] * 7),
        "multiple of feature_dim 5",
    ),
    "wrong frame count": ("tiny-rnn-frames", frames([0.0] * 10, 3), "not frame_count 3"),
    "wrong feature width (rows)": ("tiny-rnn-frames", rows(5, 4), "frames[1] has 4 values"),
    "nan frame": (
        "tiny-rnn-frames",
        frames([0.0] * 7 + [math.nan] + [0.0] * 2),
        "frame 1 value 2 is nan",
    ),
    "inf frame": ("tiny-rnn-frames", frames([math.inf] + [0.0] * 4), "frame 0 value 0 is inf"),
    "empty frames": ("tiny-rnn-frames", frames([]), "is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHUNKS))
def test_bad_chunk_is_answered_in_band_and_leaves_the_session_unchanged(
    case: str, stream_server: ServerThread, reference: Reference
) -> None:
    server = stream_server
    model, bad, expected_text = BAD_CHUNKS[case]
    good = (
        pb.SequenceInput(tokens=pb.TokenIds(ids=[1, 2]))  # "ab"
        if model == "tiny-lstm"
        else frames(np.ones(10, dtype=np.float32).tolist())
    )

    async def main() -> tuple[pb.ChunkResult, pb.ChunkResult, pb.ChunkResult]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = pb_grpc.LstmServeStub(channel).Stream()
            await call.write(pb.StreamRequest(open=pb.OpenSession(model=model, version=1)))
            await call.read()
            for seq, steps in ((1, good), (2, bad), (2, good)):  # seq 2 retried after rejection
                await call.write(pb.StreamRequest(chunk=pb.Chunk(seq=seq, input=steps)))
            replies = [(await call.read()).chunk for _ in range(3)]
            await call.write(pb.StreamRequest(end=pb.End()))
            await call.read()
            return replies[0], replies[1], replies[2]

    first, rejected, retried = asyncio.run(main())
    assert rejected.HasField("error") and rejected.seq == 2
    assert rejected.error.code == "INVALID_ARGUMENT" and rejected.error.numeric_code == 3
    assert expected_text in rejected.error.message
    assert rejected.total_steps == first.total_steps and not rejected.probabilities
    assert not retried.HasField("error") and retried.total_steps == 2 * first.total_steps
    # The state after good + (rejected) + good is the state after good + good.
    if model == "tiny-lstm":
        whole = np.array([1, 2, 1, 2], dtype=np.int64)
    else:
        whole = np.ones((4, 5), dtype=np.float32)
    np.testing.assert_allclose(retried.probabilities, reference.run(model, whole)[0], atol=1e-5)


def test_chunk_longer_than_the_maximum_is_rejected(small_server: ServerThread) -> None:
    async def main() -> pb.ChunkResult:
        async with LstmClient(small_server.address) as client:
            session = await client.open_session("tiny-gru")
            reply = await session.step(list(range(1, 18)))  # 17 steps > 16
            await session.end()
            return reply

    reply = asyncio.run(main())
    assert reply.error.code == "INVALID_ARGUMENT"
    assert "17 steps, more than the maximum 16" in reply.error.message


def test_seq_zero_is_rejected_in_band(stream_server: ServerThread) -> None:
    server = stream_server

    async def main() -> pb.ChunkResult:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = pb_grpc.LstmServeStub(channel).Stream()
            await call.write(pb.StreamRequest(open=pb.OpenSession(model="tiny-gru")))
            await call.read()
            chunk = pb.Chunk(seq=0, input=pb.SequenceInput(text="a"))
            await call.write(pb.StreamRequest(chunk=chunk))
            reply = (await call.read()).chunk
            call.cancel()
            return reply

    reply = asyncio.run(main())
    assert reply.error.code == "INVALID_ARGUMENT" and "chunk.seq = 0" in reply.error.message


def test_one_clients_bad_input_never_changes_another_session(
    server: ServerThread, reference: Reference
) -> None:
    async def main() -> pb.ChunkResult:
        async with LstmClient(server.address) as client:
            victim = await client.open_session("tiny-lstm", version=1)
            attacker = await client.open_session("tiny-lstm", version=1)
            await victim.step([1, 2, 3])  # "abc"
            for bad in ([99], "", "a" * 5000, [-5]):
                assert (await attacker.step(bad)).HasField("error")
            reply = await victim.step([4, 5])  # "de"
            await victim.end()
            await attacker.end()
            return reply

    reply = asyncio.run(main())
    ids = np.array([1, 2, 3, 4, 5], dtype=np.int64)
    np.testing.assert_allclose(reply.probabilities, reference.run("tiny-lstm", ids)[0], atol=1e-5)


async def stream_status(address: str, first: pb.StreamRequest) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.LstmServeStub(channel).Stream()
        await call.write(first)
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        return info.value.code(), info.value.details() or ""


NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
STREAM_ERRORS = {
    "unknown model": (open_("nope"), NOT_FOUND, "'nope'"),
    "unknown version": (open_("tiny-gru", 7), NOT_FOUND, "no version 7"),
    "not streamable": (open_("tiny-bilstm"), PRECONDITION, "streamable=false"),
    "unknown session": (
        pb.StreamRequest(resume=pb.ResumeSession(session_id="ab" * 16)),
        NOT_FOUND,
        "does not exist",
    ),
    "chunk before open": (
        pb.StreamRequest(chunk=pb.Chunk(seq=1)),
        PRECONDITION,
        "must be open, resume or restore",
    ),
}


@pytest.mark.parametrize("case", sorted(STREAM_ERRORS))
def test_stream_level_errors_end_the_stream_with_a_status(
    case: str, stream_server: ServerThread
) -> None:
    server = stream_server
    first, code, wanted = STREAM_ERRORS[case]
    got_code, details = asyncio.run(stream_status(server.address, first))
    assert got_code == code and wanted in details


def test_classify_errors(small_server: ServerThread) -> None:
    cases = [
        (classify("nope", text("a")), NOT_FOUND, "'nope'"),
        (classify("tiny-gru"), INVALID, "sequences is empty"),
        (classify("tiny-gru", *[text("a")] * 5), INVALID, "5 entries"),
        (classify("tiny-gru", text("a" * 33)), INVALID, "sequences[0].text has 33 steps"),
        (classify("tiny-gru", text("a"), tokens(30)), INVALID, "sequences[1].tokens.ids[0] = 30"),
    ]

    async def main() -> list[tuple[grpc.StatusCode, str]]:
        out = []
        async with grpc.aio.insecure_channel(small_server.address) as channel:
            stub = pb_grpc.LstmServeStub(channel)
            for request, _, _ in cases:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Classify(request)
                out.append((info.value.code(), info.value.details() or ""))
        return out

    for (_, code, wanted), (got_code, details) in zip(cases, asyncio.run(main()), strict=True):
        assert got_code == code and wanted in details, details


def test_get_model_unknown_is_not_found(server: ServerThread) -> None:
    async def main() -> grpc.StatusCode:
        async with LstmClient(server.address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.get_model("tiny-gru", version=9)
            return info.value.code()

    assert asyncio.run(main()) == grpc.StatusCode.NOT_FOUND


# -- malformed protobuf and oversized client input ------------------------------------------------

SERVICE = pb.DESCRIPTOR.services_by_name["LstmServe"]
UNARY_METHODS = [m.name for m in SERVICE.methods if not m.client_streaming]
STREAM_METHODS = [m.name for m in SERVICE.methods if m.client_streaming]
GARBAGE = b"\xff\xff\xff\xff"  # a varint that runs past the end: no message type parses it
EMOJI = "\U0001f600"
METADATA_16K = [("grpc.max_metadata_size", 16 * 1024)]  # a client's usual metadata limit


def method_path(method: str) -> str:
    return f"/{SERVICE.full_name}/{method}"


async def raw_unary(address: str, method: str, data: bytes) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(method_path(method))(data)
        return info.value


async def raw_stream(address: str, method: str, messages: list[bytes]) -> grpc.aio.AioRpcError:
    """Send raw messages on a stream and read to its end; the status it ends with."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(method_path(method))()
        for data in messages:
            await call.write(data)
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while True:
                await call.read()
        return info.value


def malformed_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "service.servicer"]


def requests_counted(server: ServerThread, rpc: str, code: str) -> float:
    samples = scrape(server.metrics_url)
    return metric(samples, "lstm_serve_requests_total", rpc=rpc, code=code)


@pytest.mark.parametrize("method", UNARY_METHODS)
def test_malformed_bytes_to_a_unary_rpc_are_invalid_argument_with_one_warning(
    method: str, server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    before = requests_counted(server, method, "INVALID_ARGUMENT")
    error = asyncio.run(raw_unary(server.address, method, GARBAGE))
    assert error.code() == INVALID
    message_type = SERVICE.methods_by_name[method].input_type.full_name
    assert error.details() == f"the request is not a valid {message_type} (4 bytes)"
    assert requests_counted(server, method, "INVALID_ARGUMENT") == before + 1
    records = malformed_records(caplog)
    assert [(r.levelno, r.getMessage(), r.exc_info) for r in records] == [
        (logging.WARNING, "malformed request", None)
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("method", STREAM_METHODS)
def test_malformed_bytes_end_a_stream_with_invalid_argument_and_one_warning(
    method: str, server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    before = requests_counted(server, method, "INVALID_ARGUMENT")
    error = asyncio.run(raw_stream(server.address, method, [GARBAGE]))
    assert error.code() == INVALID and "is not a valid lstmserve.v1." in (error.details() or "")
    assert requests_counted(server, method, "INVALID_ARGUMENT") == before + 1
    records = malformed_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert records[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_malformed_message_mid_stream_ends_it_and_the_session_goes_on(
    stream_server: ServerThread, reference: Reference
) -> None:
    server = stream_server

    async def main() -> tuple[grpc.aio.AioRpcError, pb.ChunkResult, pb.ChunkResult]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = channel.stream_stream(method_path("Stream"))()
            await call.write(open_("tiny-lstm", 1).SerializeToString())
            opened = pb.StreamResponse.FromString(await call.read()).opened
            chunk = pb.StreamRequest(chunk=pb.Chunk(seq=1, input=text("ab ")))  # all fed
            await call.write(chunk.SerializeToString())
            first = pb.StreamResponse.FromString(await call.read()).chunk
            await call.write(GARBAGE)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            async with LstmClient(server.address) as client:
                session = await client.resume_session(opened.session_id)
                second = await session.step("cd ")
                await session.end()
            return info.value, first, second

    error, first, second = asyncio.run(main())
    assert error.code() == INVALID
    assert not first.HasField("error") and not second.HasField("error")
    whole = np.array([1, 2, 27, 3, 4, 27], dtype=np.int64)  # "ab cd "
    np.testing.assert_allclose(
        second.probabilities, reference.run("tiny-lstm", whole)[0], atol=1e-5
    )


def test_a_2000_emoji_classify_is_invalid_argument_with_a_short_message(
    server: ServerThread,
) -> None:
    async def main() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(server.address, options=METADATA_16K) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.LstmServeStub(channel).Classify(
                    classify("tiny-lstm", text(EMOJI * 2000))
                )
            return info.value

    error = asyncio.run(main())
    details = error.details() or ""
    assert error.code() == INVALID, details
    assert len(details.encode()) < 2048 and "no character" in details
    assert details.count(EMOJI) <= 64 and "(2000 characters)" in details


def test_an_emoji_chunk_is_answered_in_band_with_a_short_message(server: ServerThread) -> None:
    async def main() -> pb.ChunkResult:
        async with LstmClient(server.address) as client:
            session = await client.open_session("tiny-lstm")
            reply = await session.step(EMOJI * 40_000)  # over the chunk maximum
            await session.end()
            return reply

    reply = asyncio.run(main())
    assert reply.error.code == "INVALID_ARGUMENT" and len(reply.error.message.encode()) < 2048


HUGE_NAMES = {"100 KB ascii": "m" * 100_000, "100 KB emoji": EMOJI * 25_000}


@pytest.mark.parametrize("case", sorted(HUGE_NAMES))
def test_a_huge_model_name_gets_not_found_with_a_short_message(
    case: str, server: ServerThread
) -> None:
    name = HUGE_NAMES[case]

    async def main() -> list[grpc.aio.AioRpcError]:
        errors = []
        async with grpc.aio.insecure_channel(server.address, options=METADATA_16K) as channel:
            stub = pb_grpc.LstmServeStub(channel)
            for call in (
                stub.Classify(classify(name, text("a"))),
                stub.GetModel(pb.GetModelRequest(name=name)),
                stub.UnloadModel(pb.UnloadModelRequest(name=name)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                errors.append(info.value)
        return errors

    classify_error, get_error, unload_error = asyncio.run(main())
    assert classify_error.code() == NOT_FOUND and get_error.code() == NOT_FOUND
    assert unload_error.code() == PRECONDITION  # not --model-control explicit
    for error in (classify_error, get_error, unload_error):
        assert len((error.details() or "").encode()) <= 1024
    code, details = asyncio.run(stream_status(server.address, open_(name)))
    assert code == NOT_FOUND and len(details.encode()) <= 1024


SECRET = b"never-print-this-secret-32bytes!"
SECRET_KEY = "k1:" + base64.b64encode(SECRET).decode()


@pytest.fixture(scope="module")
def keyed_server(tiny_repo: Path) -> Iterator[ServerThread]:
    """A server that signs snapshots with SECRET."""
    srv = ServerThread(make_config(tiny_repo, snapshot_key=SECRET_KEY)).start()
    yield srv
    srv.stop()


def test_snapshot_errors_never_print_the_secret(
    keyed_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def main() -> list[tuple[grpc.StatusCode, str]]:
        async with grpc.aio.insecure_channel(keyed_server.address) as channel:
            call = pb_grpc.LstmServeStub(channel).Stream()
            await call.write(open_("tiny-gru"))
            await call.read()
            await call.write(pb.StreamRequest(snapshot=pb.TakeSnapshot()))
            blob = (await call.read()).snapshot.data
            await call.write(pb.StreamRequest(end=pb.End()))
            await call.read()
        tampered = blob[:-1] + bytes([blob[-1] ^ 1])
        out = []
        for data in (tampered, blob[: len(blob) // 2], b"\x00" * 40, blob + GARBAGE):
            restore = pb.StreamRequest(restore=pb.RestoreSession(snapshot=data))
            out.append(await stream_status(keyed_server.address, restore))
        return out

    statuses = asyncio.run(main())
    assert [code for code, _ in statuses] == [INVALID] * len(statuses)
    secrets = (SECRET.decode(), SECRET_KEY.split(":", 1)[1])
    printed = [details for _, details in statuses] + [r.getMessage() for r in caplog.records]
    printed += [str(getattr(r, "fields", "")) for r in caplog.records]
    assert not [text for text in printed for secret in secrets if secret in text]


@pytest.mark.parametrize(
    ("path", "streaming"),
    [("/grpc.health.v1.Health/Check", False), ("/grpc.health.v1.Health/Watch", None),
     ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True)],
)  # fmt: skip
def test_malformed_bytes_to_health_and_reflection_are_invalid_argument_with_one_warning(
    path: str, streaming: bool | None, server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def call() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                if streaming is None:  # unary request, streamed replies
                    async for _ in channel.unary_stream(path)(GARBAGE):
                        pass
                elif streaming:
                    stream = channel.stream_stream(path)()
                    await stream.write(GARBAGE)
                    await stream.done_writing()
                    while True:
                        await stream.read()
                else:
                    await channel.unary_unary(path)(GARBAGE)
            return info.value

    error = asyncio.run(call())
    assert error.code() == INVALID and "is not a valid grpc." in (error.details() or "")
    records = [r for r in caplog.records if r.name == "service.lenient"]
    assert [(r.levelno, r.getMessage(), r.exc_info) for r in records] == [
        (logging.WARNING, "malformed request", None)
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
