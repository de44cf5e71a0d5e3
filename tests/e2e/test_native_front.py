"""The native front (native/) in front of the real lstm-serve process: every Stream reply is the
Python front's, byte for byte, and every other RPC passes through on the same port."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.e2e.conftest import ROOT, ServerProcess, drain_side_by_side, held_open
from tests.integration.conftest import metric, scrape
from tests.native_front import NativeFront, binary

TOKEN = "native-front-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def fronts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, ServerProcess]]:
    """(the Python front's address, the native front's), one lstm-serve process behind both."""
    binary()
    folder = tmp_path_factory.mktemp("native")
    tokens = folder / "tokens"
    tokens.write_text(f"alice:{TOKEN}\n")
    server = ServerProcess(
        ROOT / "models", "--native-front-dir", str(folder / "sockets"),
        "--auth-tokens", str(tokens), "--snapshot-key", "k1:" + "A" * 44,
    )  # fmt: skip
    server.wait_event("ready", 60)
    front = NativeFront(folder / "sockets")
    yield server.address, front.address, server
    front.stop()
    server.stop()


def _text(seq: int, text: str) -> pb.StreamRequest:
    return pb.StreamRequest(chunk=pb.Chunk(seq=seq, input=pb.SequenceInput(text=text)))


def _ids(seq: int, ids: list[int]) -> pb.StreamRequest:
    chunk = pb.Chunk(seq=seq, input=pb.SequenceInput(tokens=pb.TokenIds(ids=ids)))
    return pb.StreamRequest(chunk=chunk)


def _frames(seq: int, values: np.ndarray) -> pb.StreamRequest:
    frames = pb.Frames(values=values.ravel().tolist())
    return pb.StreamRequest(chunk=pb.Chunk(seq=seq, input=pb.SequenceInput(frames=frames)))


def text_conversation() -> list[pb.StreamRequest]:
    """Text, token ids, held characters, duplicates, gaps, bad ids, a reset, a snapshot, end."""
    opened = pb.OpenSession(model="langid-chars", options=pb.StreamOptions(top_k=3))
    return [
        pb.StreamRequest(open=opened), _text(1, "hello wor"), _text(2, "ld, cafe\u0301 e"),
        _text(2, "again"), _text(5, "gap"), _ids(3, [1, 2, 3]), _ids(4, [1, 10**9]),
        _ids(4, []), _text(4, ""), pb.StreamRequest(reset=pb.Reset(seq=4)), _text(5, "bonjour"),
        pb.StreamRequest(snapshot=pb.TakeSnapshot()), pb.StreamRequest(end=pb.End()),
    ]  # fmt: skip


def frames_conversation(seed: int, every_step: bool = True) -> list[pb.StreamRequest]:
    """Frames, every_step (per-step replies: not packed by the front) or not (packed), a
    non-finite value, a width that does not divide, end."""
    rng = np.random.default_rng(seed)
    options = pb.StreamOptions(every_step=every_step, top_k=2)
    requests = [pb.StreamRequest(open=pb.OpenSession(model="speaker-vowels", options=options))]
    for seq in range(1, 6):
        requests.append(_frames(seq, rng.normal(size=(seq, 12)).astype(np.float32)))
    bad = rng.normal(size=(2, 12)).astype(np.float32)
    bad[1, 3] = np.nan
    requests += [_frames(6, bad), _frames(6, np.zeros(13, np.float32)), _frames(6, bad[:1])]
    return [*requests, pb.StreamRequest(end=pb.End())]


async def converse(address: str, requests: list[pb.StreamRequest],
                   metadata: tuple = AUTH) -> list[object]:  # fmt: skip
    """Every reply (ids and snapshot bytes blanked: random per session), then the status."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.LstmServeStub(channel).Stream(iter(requests), metadata=metadata)
        replies: list[object] = []
        try:
            async for reply in call:
                replies.append(_blanked(reply))
        except grpc.aio.AioRpcError as exc:
            replies.append((exc.code(), exc.details()))
        else:
            replies.append(await call.code())
    return replies


def _blanked(reply: pb.StreamResponse) -> pb.StreamResponse:
    reply.session_id = "S" if reply.session_id else ""
    if reply.HasField("opened"):
        reply.opened.session_id = "S"
    if reply.HasField("snapshot"):
        reply.snapshot.data = b"D"
    if reply.HasField("chunk") and reply.chunk.HasField("error"):
        reply.chunk.error.message = " ".join(
            "S" if len(w) == 32 else w for w in reply.chunk.error.message.split(" ")
        )
    return reply


def both(fronts: tuple[str, str, ServerProcess], requests: list[pb.StreamRequest],
         metadata: tuple = AUTH) -> tuple[list[object], list[object]]:  # fmt: skip
    python, native, _ = fronts

    async def main() -> tuple[list[object], list[object]]:
        expected = await converse(python, requests, metadata)
        return expected, await converse(native, requests, metadata)

    return asyncio.run(main())


def travelled(server: ServerProcess) -> dict[str, float]:
    """lstm_serve_native_front_messages_total by packing (entry, tokens, features, text)."""
    samples = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")
    name = "lstm_serve_native_front_messages_total"
    return {kind: metric(samples, name, packing=kind) for kind in PACKINGS}


PACKINGS = ("entry", "tokens", "features", "text")


def test_text_and_token_replies_are_the_python_fronts_exactly(fronts) -> None:
    before = travelled(fronts[2])
    expected, got = both(fronts, text_conversation())
    after = travelled(fronts[2])
    assert len(got) == len(text_conversation()) + 1 and got[-1] == grpc.StatusCode.OK
    assert got == expected  # every field, probabilities to the bit (0.0 difference)
    chunks = [r.chunk for r in got[:-1] if r.HasField("chunk")]  # type: ignore[union-attr]
    errors = [c.error.code for c in chunks if c.HasField("error")]
    assert errors == ["FAILED_PRECONDITION", *["INVALID_ARGUMENT"] * 3]
    assert any(c.held_characters for c in chunks)
    # The front packed every chunk (6 of text, 3 of token ids); open, reset, snapshot and end
    # went as entries.
    moved = {kind: after[kind] - before[kind] for kind in PACKINGS}
    assert moved == {"entry": 4, "tokens": 3, "features": 0, "text": 6}


async def converse_raw(address: str, messages: list[bytes]) -> list[object]:
    """converse() with the messages' bytes as given (not necessarily a valid StreamRequest)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stream = channel.stream_stream(
            "/lstmserve.v1.LstmServe/Stream",
            request_serializer=lambda b: b, response_deserializer=pb.StreamResponse.FromString,
        )  # fmt: skip
        call = stream(iter(messages), metadata=AUTH)
        replies: list[object] = []
        try:
            async for reply in call:
                replies.append(_blanked(reply))
        except grpc.aio.AioRpcError as exc:
            replies.append((exc.code(), exc.details()))
    return replies


def test_text_that_is_not_utf8_is_malformed_as_on_the_python_front(fronts) -> None:
    """Invalid UTF-8 in `text` (a proto3 string) does not parse, on either front: it never
    reaches the packed columns, and the stream ends as the Python front ends it."""
    python, native, server = fronts
    opened = pb.StreamRequest(open=pb.OpenSession(model="langid-chars"))
    good = _text(1, "hi ZZ").SerializeToString()
    bad = good.replace(b"ZZ", b"\xc3\x28")  # a 2-byte sequence with a bad continuation
    messages = [opened.SerializeToString(), good, bad]
    before = travelled(server)

    async def main() -> tuple[list[object], list[object]]:
        return await converse_raw(python, messages), await converse_raw(native, messages)

    expected, got = asyncio.run(main())
    assert got == expected and len(got) == 3  # opened, the good chunk's reply, the status
    assert got[-1][0] == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[index]
    assert "lstmserve.v1.StreamRequest" in got[-1][1]  # type: ignore[index]
    assert travelled(server)["text"] == before["text"] + 1  # the good one only


@pytest.mark.parametrize("every_step", [True, False])
def test_frame_replies_are_the_python_fronts_exactly(fronts, every_step: bool) -> None:
    expected, got = both(fronts, frames_conversation(7, every_step))
    assert got == expected
    assert len(got[2].chunk.step_probabilities) == (2 if every_step else 0)


@pytest.mark.parametrize("case", ["first-not-open", "unknown-model", "open-twice", "no-token"])
def test_stream_statuses_are_the_python_fronts(fronts, case: str) -> None:
    open_ = pb.StreamRequest(open=pb.OpenSession(model="langid-chars"))
    requests, metadata = {
        "first-not-open": ([_text(1, "hi")], AUTH),
        "unknown-model": ([pb.StreamRequest(open=pb.OpenSession(model="nope"))], AUTH),
        "open-twice": ([open_, _text(1, "hi"), open_], AUTH),
        "no-token": ([open_], ()),
    }[case]
    expected, got = both(fronts, requests, metadata)
    assert got == expected
    assert got[-1] != grpc.StatusCode.OK


def test_many_concurrent_streams_get_the_python_fronts_replies(fronts) -> None:
    python, native, _ = fronts

    async def main() -> tuple[list[list[object]], list[list[object]]]:
        work = [frames_conversation(s) if s % 2 else text_conversation() for s in range(48)]
        native_replies = await asyncio.gather(*(converse(native, w) for w in work))
        python_replies = [await converse(python, w) for w in work[:4]]
        return python_replies, native_replies[:4]

    expected, got = asyncio.run(main())
    assert got == expected


def test_other_rpcs_pass_through_on_the_same_port(fronts) -> None:
    python, native, _ = fronts

    def calls(address: str) -> tuple[object, ...]:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.LstmServeStub(channel)
            models = stub.ListModels(pb.ListModelsRequest(), metadata=AUTH)
            sequence = pb.SequenceInput(text="guten tag")
            classify = stub.Classify(
                pb.ClassifyRequest(model="langid-chars", sequences=[sequence], top_k=2),
                metadata=AUTH,
            )
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            try:
                stub.GetModel(pb.GetModelRequest(name="nope"), metadata=AUTH)
                missing: object = None
            except grpc.RpcError as exc:
                missing = (exc.code(), exc.details())
            try:
                stub.ListModels(pb.ListModelsRequest())
                refused: object = None
            except grpc.RpcError as exc:
                refused = (exc.code(), exc.details())
        return [m.name for m in models.models], classify, health.status, missing, refused

    expected, got = calls(python), calls(native)
    assert got == expected
    assert got[3][0] == grpc.StatusCode.NOT_FOUND and got[4][0] == grpc.StatusCode.UNAUTHENTICATED


def test_the_ticks_socket_is_private(fronts) -> None:
    _, _, server = fronts
    folder = Path(server.proc.args[server.proc.args.index("--native-front-dir") + 1])
    assert folder.stat().st_mode & 0o077 == 0
    assert (folder / "ticks.sock").exists() and (folder / "grpc.sock").exists()


def test_tls_on_the_native_fronts_port(fronts, tmp_path: Path) -> None:
    """--tls-cert / --tls-key: the front terminates TLS; the replies are the same."""
    from tests.integration.tls_certs import Authority

    python, _, server = fronts
    ca = Authority()
    cert, key = ca.issue("lstm-serve", server=True).write(tmp_path, "server")
    folder = server.proc.args[server.proc.args.index("--native-front-dir") + 1]
    front = NativeFront(Path(folder), "--tls-cert", str(cert), "--tls-key", str(key))
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.pem)

    async def secure(requests: list[pb.StreamRequest]) -> list[object]:
        async with grpc.aio.secure_channel(front.address, credentials) as channel:
            call = pb_grpc.LstmServeStub(channel).Stream(iter(requests), metadata=AUTH)
            return [_blanked(r) async for r in call] + [await call.code()]

    async def plain() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(front.address) as channel:
            try:
                await pb_grpc.LstmServeStub(channel).ListModels(
                    pb.ListModelsRequest(), metadata=AUTH, timeout=5
                )
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    try:
        got = asyncio.run(secure(text_conversation()))
        refused = asyncio.run(plain())
    finally:
        front.stop()
    assert got == asyncio.run(converse(python, text_conversation()))
    assert refused == grpc.StatusCode.UNAVAILABLE


def test_a_rotated_certificate_reaches_the_native_fronts_new_connections(
    fronts, tmp_path: Path
) -> None:
    """The front reads --tls-cert / --tls-key again (every --tls-reload-s): a new handshake
    is shown the new certificate, as on the Python front, with no restart."""
    from tests.integration.conftest import wait_for
    from tests.integration.test_tls import _presented_serial
    from tests.integration.tls_certs import Authority

    python, _, server = fronts
    ca = Authority()
    first = ca.issue("lstm-serve", server=True)
    cert, key = first.write(tmp_path, "server")
    ca_file = ca.write(tmp_path)
    folder = server.proc.args[server.proc.args.index("--native-front-dir") + 1]
    front = NativeFront(
        Path(folder), "--tls-cert", str(cert), "--tls-key", str(key), "--tls-reload-s", "1"
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.pem)

    async def secure(requests: list[pb.StreamRequest]) -> list[object]:
        async with grpc.aio.secure_channel(front.address, credentials) as channel:
            call = pb_grpc.LstmServeStub(channel).Stream(iter(requests), metadata=AUTH)
            return [_blanked(r) async for r in call] + [await call.code()]

    try:
        assert _presented_serial(front.port, ca_file, "h2") == first.serial
        second = ca.issue("lstm-serve", server=True)
        second.write(tmp_path, "rotating")
        (tmp_path / "rotating.key").replace(key)  # as the kubelet swaps a secret's files
        (tmp_path / "rotating.crt").replace(cert)
        wait_for(lambda: _presented_serial(front.port, ca_file, "h2") == second.serial,
                 timeout=15, what="the front to present the new certificate")  # fmt: skip
        got = asyncio.run(secure(text_conversation()))
    finally:
        front.stop()
    assert got == asyncio.run(converse(python, text_conversation()))


async def held_stream(address: str, requests: list[pb.StreamRequest], count: int,
                      then: Callable[[], object]) -> list[object]:  # fmt: skip
    """A Stream call held open until the server ends it, `then()` on its `count`th reply: its
    replies (blanked), then its status."""
    _, stream = held_open(requests)
    replies: list[object] = []
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.LstmServeStub(channel).Stream(stream)
        try:
            async for reply in call:
                replies.append(_blanked(reply))
                if len(replies) == count:
                    then()
        except grpc.aio.AioRpcError as exc:
            replies.append(exc.code())
    return replies


def test_drain_hands_over_as_the_python_front_does(tmp_path: Path) -> None:
    """SIGTERM: every stream, through either front, gets its session's final snapshot after
    the replies to what it sent, then UNAVAILABLE."""

    async def hold(address: str, opened: asyncio.Event, replies: list[object]) -> None:
        replies.extend(await held_stream(address, text_conversation()[:3], 3, opened.set))

    calls = [(front, hold) for front in ("python", "native", "native", "python")]
    python, native, native2, python2 = drain_side_by_side(tmp_path, calls)
    assert native == python == native2 == python2
    assert python[3].snapshot.final and python[3].snapshot.last_applied_seq == 2
    assert python[-1] == grpc.StatusCode.UNAVAILABLE


def test_the_front_outlives_a_restart_of_the_server_behind_it(tmp_path: Path) -> None:
    """A stream open when lstm-serve stops ends UNAVAILABLE; the next server on the same
    sockets serves new streams through the same front (it reconnects on the next message)."""
    binary()
    flags = ("--native-front-dir", str(tmp_path / "sockets"))
    first = ServerProcess(ROOT / "models", *flags)
    first.wait_event("ready", 60)
    front = NativeFront(tmp_path / "sockets")
    try:
        until_it_stops = held_stream(front.address, text_conversation()[:2], 2, first.terminate)
        before = asyncio.run(until_it_stops)
        first.stop()
        second = ServerProcess(ROOT / "models", *flags)
        try:
            second.wait_event("ready", 60)
            after = asyncio.run(converse(front.address, text_conversation(), ()))
            expected = asyncio.run(converse(second.address, text_conversation(), ()))
        finally:
            second.stop()
    finally:
        front.stop()
        first.stop()
    assert before[-1] == grpc.StatusCode.UNAVAILABLE and len(before) == 3
    assert after == expected and len(after) == 12  # up to the snapshot (no --snapshot-key)


def test_mtls_names_the_caller_by_its_certificate_as_the_python_front_does(
    tmp_path: Path,
) -> None:
    """--tls-client-ca on the front and --principal-from-cert on lstm-serve: a stream's caller,
    and a passed-through call's, is its certificate's CN; another caller cannot resume its
    session (NOT_FOUND), even naming the CN in the front's own metadata key."""
    from tests.integration.tls_certs import Authority

    binary()
    ca = Authority()
    cert, key = ca.issue("lstm-serve", server=True).write(tmp_path, "server")
    ca_file = ca.write(tmp_path)
    tls = ("--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca_file))
    server = ServerProcess(ROOT / "models", "--native-front-dir", str(tmp_path / "sockets"),
                           *tls, "--principal-from-cert")  # fmt: skip
    server.wait_event("ready", 60)
    front = NativeFront(tmp_path / "sockets", *tls)
    people = {name: ca.issue(name, server=False) for name in ("alice", "bob")}

    def credentials(name: str) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(ca.pem, people[name].key, people[name].cert)

    async def open_then_resume(address: str) -> tuple[object, object]:
        async with grpc.aio.secure_channel(address, credentials("alice")) as channel:
            call = pb_grpc.LstmServeStub(channel).Stream(iter(text_conversation()[:2]))
            replies = [r async for r in call]
        session_id = replies[0].opened.session_id
        resume = [pb.StreamRequest(resume=pb.ResumeSession(session_id=session_id))]
        outcomes = []
        for name in ("bob", "alice"):
            async with grpc.aio.secure_channel(address, credentials(name)) as channel:
                call = pb_grpc.LstmServeStub(channel).Stream(iter(resume))
                try:
                    got = [r async for r in call]
                    outcomes.append(got[0].opened.resumed)
                except grpc.aio.AioRpcError as exc:
                    outcomes.append(exc.code())
        return outcomes[0], outcomes[1], await passed_through(address, session_id)

    async def passed_through(address: str, session_id: str) -> list[object]:
        """StreamMulti (terminated by the front, its CN sent with the first message): bob, even
        claiming to be alice with the front's own key, cannot resume alice's session; alice
        can."""
        got: list[object] = []
        spoof = (("lstm-serve-native-cert-cn-bin", b"alice"),)
        for name, metadata in (("bob", spoof), ("alice", ())):
            async with grpc.aio.secure_channel(address, credentials(name)) as channel:
                entry = pb.SessionRequest(resume=pb.ResumeSession(session_id=session_id))
                request = pb.StreamMultiRequest(entries=[entry])
                call = pb_grpc.LstmServeStub(channel).StreamMulti(iter([request]),
                                                                  metadata=metadata)  # fmt: skip
                try:
                    replies = [r async for r in call]
                    result = replies[0].results[0]
                    got.append(result.error.code if result.HasField("error") else "resumed")
                except grpc.aio.AioRpcError as exc:
                    got.append(exc.code())
        return got

    try:
        native = asyncio.run(open_then_resume(front.address))
        python = asyncio.run(open_then_resume(server.address))
    finally:
        front.stop()
        server.stop()
    assert native[:2] == python[:2] == (grpc.StatusCode.NOT_FOUND, True)
    assert native[2] == python[2] and native[2][1] == "resumed" and native[2][0] != "resumed"


def test_reflection_and_the_triton_grpc_api_pass_through(fronts) -> None:
    """Reflection (a bidi stream) and Triton's KServe v2 gRPC API answer through the front as
    on lstm-serve's own port."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    python, native, _ = fronts

    def calls(address: str) -> tuple[object, ...]:
        with grpc.insecure_channel(address) as channel:
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            listed = next(
                iter(
                    reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                        iter([ask]), metadata=AUTH
                    )
                )
            )
            services = sorted(s.name for s in listed.list_services_response.service)
            triton = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            ready = triton.ServerReady(service_pb2.ServerReadyRequest(), metadata=AUTH).ready
            meta = triton.ModelMetadata(
                service_pb2.ModelMetadataRequest(name="langid-chars"), metadata=AUTH
            )
        return services, ready, meta

    expected, got = calls(python), calls(native)
    assert got == expected and got[1] and "lstmserve.v1.LstmServe" in got[0]
