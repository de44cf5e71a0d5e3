"""A tokenizer.json beside a model: Classify and streamed text tokenized by it, and streaming
equal to Classify for every chunking (a partial word waits for the next chunk or the end)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.integration.conftest import ServerThread, make_config

tokenizers = pytest.importorskip("tokenizers")

WORDS = ["hello", "world", "stream", "ing", "model", "serve", "the", "a"]
CORPUS = ["hello world", "streaming models serve the world", "a model", "the stream"] * 20


def word_level() -> tokenizers.Tokenizer:
    """Whole words, split on whitespace and punctuation; anything else is [UNK] (id 0)."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}, ".": len(WORDS) + 1}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.Sequence(
        [tokenizers.normalizers.NFC(), tokenizers.normalizers.Lowercase()]
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return tok


def sentencepiece_like() -> tokenizers.Tokenizer:
    """BPE over a Metaspace pre-tokenizer ("▁" marks a word start), trained here, 28 tokens."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tok.decoder = tokenizers.decoders.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=28, special_tokens=["<unk>"], limit_alphabet=20, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= 28
    return tok


KINDS = {"words": word_level, "bpe": sentencepiece_like}


@pytest.fixture(scope="module")
def subword_server(
    tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    """tiny-lstm (28 token ids) twice, each with a tokenizer.json in its version folder."""
    repo = tmp_path_factory.mktemp("subwords")
    for kind, build in KINDS.items():
        folder = repo / f"tiny-{kind}" / "1"
        folder.mkdir(parents=True)
        shutil.copy(tiny_repo / "tiny-lstm" / "1" / "model.onnx", folder / "model.onnx")
        build().save(str(folder / "tokenizer.json"))
    server = ServerThread(make_config(repo)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(subword_server: ServerThread) -> Iterator[pb_grpc.LstmServeStub]:
    with grpc.insecure_channel(subword_server.address) as channel:
        yield pb_grpc.LstmServeStub(channel)


def classify(stub: pb_grpc.LstmServeStub, model: str, text: str) -> pb.SequenceResult:
    request = pb.ClassifyRequest(model=model, sequences=[pb.SequenceInput(text=text)])
    return stub.Classify(request).results[0]


def stream(stub: pb_grpc.LstmServeStub, model: str, chunks: list[str]) -> list[pb.StreamResponse]:
    requests = [pb.StreamRequest(open=pb.OpenSession(model=model))]
    requests += [
        pb.StreamRequest(chunk=pb.Chunk(seq=i, input=pb.SequenceInput(text=c)))
        for i, c in enumerate(chunks, start=1)
    ]
    requests.append(pb.StreamRequest(end=pb.End()))
    return list(stub.Stream(iter(requests), timeout=30))


def test_the_model_says_its_tokenizer_is_a_tokenizer_json(stub: pb_grpc.LstmServeStub) -> None:
    info = stub.GetModel(pb.GetModelRequest(name="tiny-words"))
    assert info.tokenizer.type == "tokenizer.json" and info.input_kind == "tokens"


def test_classify_uses_the_tokenizer_json(stub: pb_grpc.LstmServeStub) -> None:
    """ "hello world." is 3 word tokens, not 12 characters."""
    assert classify(stub, "tiny-words", "Hello world.").length == 3
    assert classify(stub, "tiny-bpe", "hello world").length < len("hello world")


def test_a_partial_word_is_held_answered_and_taken_back(stub: pb_grpc.LstmServeStub) -> None:
    replies = stream(stub, "tiny-words", ["the hel", "lo wor", "ld"])
    first, second, third = (r.chunk for r in replies[1:4])
    # "the" settled, " hel" held and answered as the unknown word it is so far
    assert (first.steps, first.held_characters, first.total_steps) == (2, 4, 2)
    # "hel" became "hello" (taken back), " wor" held
    assert (second.rewound_steps, second.steps, second.held_characters) == (1, 2, 4)
    # " wor" became " world", still held (it may go on)
    assert (third.rewound_steps, third.steps, third.held_characters) == (1, 1, 6)
    for reply, text in zip((first, second, third), ("the hel", "the hello wor", "the hello world"),
                           strict=True):  # fmt: skip
        whole = classify(stub, "tiny-words", text)
        assert reply.total_steps == whole.length
        np.testing.assert_array_equal(
            np.float32(reply.probabilities), np.float32(whole.probabilities)
        )
    ended = replies[-1].ended
    assert ended.flushed_steps == 0 and ended.total_steps == 3


TEXTS = st.lists(
    st.sampled_from([*WORDS, "xyz", "Hello", "."]), min_size=1, max_size=8
).flatmap(lambda words: st.builds(
    lambda seps: "".join(w + s for w, s in zip(words, seps, strict=True)),
    st.lists(st.sampled_from([" ", "  ", "", "\t"]), min_size=len(words), max_size=len(words)),
))  # fmt: skip


@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)  # fmt: skip
@given(text=TEXTS, cuts=st.lists(st.integers(1, 60), max_size=6))
def test_streamed_text_ends_exactly_as_classify(
    stub: pb_grpc.LstmServeStub, kind: str, text: str, cuts: list[int]
) -> None:
    """After every chunk, the reply is Classify of the text so far. A text so far that Classify
    refuses (nothing known yet) is held, not refused: a word or subword tokenizer may map a
    partial word to its unknown token and the whole word to a known one, so a client typing
    one character per chunk must be able to go on; such a reply is not compared."""
    model = f"tiny-{kind}"
    points = sorted({c for c in cuts if 0 < c < len(text)})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    requests = [pb.StreamRequest(open=pb.OpenSession(model=model))]
    expected: list[pb.SequenceResult | None] = []
    sent, seq = "", 1
    for piece in pieces:
        try:
            expected.append(classify(stub, model, sent + piece))
        except grpc.RpcError as exc:  # nothing known, or no token at all ("   ")
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            expected.append(None)
        chunk = pb.Chunk(seq=seq, input=pb.SequenceInput(text=piece))
        requests.append(pb.StreamRequest(chunk=chunk))
        sent, seq = sent + piece, seq + 1
    replies = [r.chunk for r in stub.Stream(iter(requests), timeout=30)][1:]
    for reply, whole in zip(replies, expected, strict=True):
        assert not reply.HasField("error"), reply.error
        if whole is None:
            continue
        assert not reply.HasField("error") and reply.total_steps == whole.length
        np.testing.assert_array_equal(
            np.float32(reply.probabilities), np.float32(whole.probabilities)
        )
