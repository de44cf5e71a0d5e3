"""Without a network: what a KServe v2 request declares is judged before the work it would
cost (service/triton/tensors.py, http_codec.py, http_body.py), and the new flags validate."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from service.config import ServerConfig
from service.errors import ConfigError
from service.triton import http_codec, tensors
from service.triton.http_body import _inflater
from service.triton.types import TritonError, http_status


def refused(call: object, *args: object) -> TritonError:
    with pytest.raises(TritonError) as info:
        call(*args)  # type: ignore[operator]
    return info.value


@pytest.mark.parametrize(
    ("shape", "words"),
    [([1] * 17, "17 dimensions"), ([0, 10**30], "too large"), ([2**40], "too large"),
     ([-1, 2], "negative"), ([0, 10**4000], "(huge)")],
)  # fmt: skip
def test_shapes_are_bounded_in_rank_and_size_even_beside_a_zero(
    shape: list[int], words: str
) -> None:
    error = refused(tensors.check_shape, "t", shape)
    assert words in str(error) and len(str(error)) < 200


def test_a_bytes_tensor_is_refused_from_its_shape_before_any_element_is_read() -> None:
    raw = bytes(4 * (1 << 20))  # 1 M empty elements
    started = time.perf_counter()
    error = refused(tensors.from_raw, "text", "BYTES", [1 << 20], raw, 1000)
    assert time.perf_counter() - started < 0.01
    assert "at most 1000 per request (--max-bytes-elements)" in str(error)
    assert "each needs a 4-byte length" in str(refused(tensors.check_raw_size, "t", "BYTES",
                                                      (3,), 11))  # fmt: skip
    values = [1] * 10
    assert "10 values, expected 2" in str(refused(tensors.from_values, "t", "INT64", [2], values))


def test_typed_values_convert_in_slices_with_their_errors() -> None:
    values = list(range(3 * tensors.VALUES_SLICE + 5))
    array = tensors.from_values("t", "INT64", [1, len(values)], values)
    np.testing.assert_array_equal(array[0], values)
    assert "not INT8" in str(refused(tensors.from_values, "t", "INT8", [1], [300]))
    assert "not valid Unicode" in str(refused(tensors.from_values, "t", "BYTES", [1], ["\ud800"]))


@pytest.mark.parametrize(
    ("body", "words"),
    [(b'{"a": ' + b"9" * 5000 + b"}", "not valid JSON here"),
     (b'{"a": "\\ud800"}', "lone surrogate"),
     (b'{"a": ["x", "\\udc00y"]}', "lone surrogate"),
     (b"[" + b"[]," * http_codec.MAX_JSON_CONTAINERS + b"[]]", "JSON arrays and objects")],
    ids=["5000-digits", "lone-high", "lone-low", "containers"],
)  # fmt: skip
def test_json_a_decoder_cannot_take_is_invalid_argument(body: bytes, words: str) -> None:
    error = refused(http_codec.parse_json, body, "the body")
    assert error.code == "INVALID_ARGUMENT" and words in str(error)


def test_a_surrogate_pair_is_one_character_and_fine() -> None:
    assert http_codec.parse_json(b'{"a": "\\ud83d\\ude00"}', "x") == {"a": "\U0001f600"}


def test_an_infer_header_is_judged_before_its_binary_part() -> None:
    doc = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [10, 10],
                       "parameters": {"binary_data_size": 400}},
                      {"name": "x", "datatype": "FP32", "shape": [2],
                       "parameters": {"binary_data_size": 8}}]}  # fmt: skip
    plan = http_codec.parse_infer_header("m", "", doc, None, max_bytes_elements=100)
    assert plan.binary_bytes == 408
    error = refused(http_codec.parse_infer_header, "m", "", doc, None, 99)
    assert "--max-bytes-elements" in str(error)
    doc["inputs"][1]["parameters"]["binary_data_size"] = 12  # type: ignore[index]
    assert "expected 8" in str(refused(http_codec.parse_infer_header, "m", "", doc, None, 100))
    assert json.loads(json.dumps(doc))  # untouched


def test_encodings_and_statuses() -> None:
    assert _inflater("") is None and _inflater("identity") is None
    assert _inflater("GZIP") is not None and _inflater("deflate") is not None
    error = refused(_inflater, "br")
    assert http_status(error) == 415 and error.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    "bad",
    [{"http_body_timeout_s": 0.0}, {"http_idle_timeout_s": -1.0}, {"max_bytes_elements": 0},
     {"http_max_body_bytes": 0}, {"http_max_inflate_ratio": 0}],
)  # fmt: skip
def test_the_new_flags_must_be_positive(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        ServerConfig(**bad)  # type: ignore[arg-type]
