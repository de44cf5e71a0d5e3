"""service/triton/http_codec.py both ways, against tritonclient.http's own request builder and
response parser (no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.http._utils import _get_inference_request

from service.triton import http_codec
from service.triton.types import InferOutput, InferResponse, TritonError


def client_body(
    inputs: list[httpclient.InferInput], outputs: list[httpclient.InferRequestedOutput] | None,
    **params: object,
) -> tuple[bytes, str | None]:  # fmt: skip
    """What tritonclient.http sends for infer(): (body, Inference-Header-Content-Length)."""
    body, json_size = _get_inference_request(
        inputs=inputs, request_id="r1", outputs=outputs, sequence_id=params.get("sequence_id", 0),
        sequence_start=bool(params.get("sequence_start")), sequence_end=False, priority=0,
        timeout=None, custom_parameters=None,
    )  # fmt: skip
    data = body if isinstance(body, bytes) else body.encode()
    return data, None if json_size is None else str(json_size)


def test_tritonclient_binary_and_json_inputs_decode_to_the_same_arrays() -> None:
    tokens = np.array([[3, 1, 4, 1]], dtype=np.int64)
    text = np.array([[b"hola"]], dtype=np.object_)
    decoded = []
    for binary in (True, False):
        a = httpclient.InferInput("tokens", [1, 4], "INT64")
        a.set_data_from_numpy(tokens, binary_data=binary)
        b = httpclient.InferInput("text", [1, 1], "BYTES")
        b.set_data_from_numpy(text, binary_data=binary)
        body, header = client_body([a, b], None, sequence_id=7, sequence_start=True)
        request, choice = http_codec.parse_infer_request("m", "2", body, header)
        decoded.append(request)
        assert choice.binary("probs")  # no outputs named: tritonclient asks for binary ones
    for request in decoded:
        assert (request.model, request.version, request.id) == ("m", "2", "r1")
        assert request.parameters["sequence_id"] == 7 and request.parameters["sequence_start"]
        np.testing.assert_array_equal(request.inputs[0].data, tokens)
        assert request.inputs[1].data.tolist() == [[b"hola"]]


def test_nested_json_data_is_row_major() -> None:
    doc = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2, 2],
                       "data": [[[1, 2], [3.5, 4]]]}]}  # fmt: skip
    request, _ = http_codec.parse_infer_request("m", "", json.dumps(doc).encode(), None)
    np.testing.assert_array_equal(request.inputs[0].data, [[[1, 2], [3.5, 4]]])
    assert request.inputs[0].data.dtype == np.float32


BINARY_HEAD = (b'{"inputs": [{"name": "t", "datatype": "INT64", "shape": [1], '
               b'"parameters": {"binary_data_size": %d}}]}')  # fmt: skip
PAIR_HEAD = (b'{"inputs": [{"name": "t", "datatype": "INT64", "shape": [2], '
             b'"parameters": {"binary_data_size": 16}}]}')  # fmt: skip


@pytest.mark.parametrize(
    ("body", "header", "needle"),
    [
        (b'{"inputs": []}', None, "non-empty list"),
        (b'{"inputs": [{"name": "t", "datatype": "INT64", "shape": [1]}]}', None,
         "neither 'data' nor"),
        (b'{"inputs": [{"name": "t", "datatype": "INT64", "shape": [1], "data": [true, 2]}]}',
         None, "cannot take"),
        (b'{"inputs": [{"name": "t", "datatype": "INT8", "shape": [1], "data": [300]}]}', None,
         "INT8"),
        (b'{"inputs": [{"name": "t", "datatype": "INT64", "shape": [-1], "data": [1]}]}', None,
         "non-negative"),
        (BINARY_HEAD % 8 + b"\x00" * 9, str(len(BINARY_HEAD % 8)), "binary_data_size"),
        (PAIR_HEAD + b"\x00" * 8, str(len(PAIR_HEAD)), "past the end"),
        (BINARY_HEAD % 4 + b"\x00" * 4, str(len(BINARY_HEAD % 4)), "4 bytes of raw data"),
        (b"{}", "x", "not an integer"),
        (b"{}", "99", "not within"),
        (b'{"inputs": "x"' + b"]" * 10, None, "not valid JSON"),
    ],
    ids=["no-inputs", "no-data", "bool-in-int", "overflow", "negative-dim", "bytes-left",
         "past-end", "byte-size", "header-nan", "header-long", "broken"],
)  # fmt: skip
def test_bad_requests_are_invalid_argument_with_the_reason(
    body: bytes, header: str | None, needle: str
) -> None:
    with pytest.raises(TritonError) as info:
        http_codec.parse_infer_request("m", "", body, header)
    assert info.value.code == "INVALID_ARGUMENT" and needle in str(info.value)


def test_a_deeply_nested_body_is_refused_briefly() -> None:
    with pytest.raises(TritonError) as info:
        http_codec.parse_json(b"[" * 200_000 + b"]" * 200_000, "the body")
    assert len(str(info.value)) < 100


def test_responses_parse_with_tritonclients_own_reader_binary_or_json() -> None:
    probs = np.array([[0.25, 0.75]], dtype=np.float32)
    top = np.array([[b"0.750000:1:b"]], dtype=np.object_)
    response = InferResponse("m", "1", "r1", (
        InferOutput("probs", "FP32", (1, 2), probs), InferOutput("top", "BYTES", (1, 1), top),
    ), {"lstm_serve_seq": 3})  # fmt: skip
    for per_output in ({}, {"probs": True}, {"top": True}, {"probs": True, "top": True}):
        choice = http_codec.OutputChoice(False, per_output)
        body, content_type, length = http_codec.encode_infer_response(response, choice)
        assert (length >= 0) == bool(per_output)
        assert content_type == (http_codec.BINARY_TYPE if per_output else http_codec.JSON_TYPE)
        result = httpclient.InferResult.from_response_body(
            body, header_length=length if length >= 0 else None
        )
        np.testing.assert_array_equal(result.as_numpy("probs"), probs)
        (item,) = result.as_numpy("top").reshape(-1)  # bytes when binary, str from JSON
        assert (item if isinstance(item, str) else item.decode()) == "0.750000:1:b"
        assert result.get_response()["parameters"] == {"lstm_serve_seq": 3}
