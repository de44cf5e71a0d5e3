"""HTTP request bodies -> what the routes need, within bounds and off the loop when large.

An infer body's JSON header is read first and judged by what it declares (shapes, rank,
binary sizes, BYTES elements: service/triton/http_codec.py) before its binary part is read,
which must then be exactly the size the header declares; the body itself is read within its
limits of size, time and memory (service/triton/http_body.py). Parsing and decoding whose cost
grows with the request (JSON, tensors) run on the Triton fronts' decode pool when large
(service/triton/offload.py), so the loop only waits for them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from service.protocol.inbox import ReadAhead
from service.triton import http_codec
from service.triton.http_body import BodyLimits, BodyReader
from service.triton.offload import DecodePool
from service.triton.tensors import MAX_BYTES_ELEMENTS, element_count
from service.triton.types import InferRequest, invalid

MAX_SMALL_JSON_BYTES = 1 << 20  # the body of a repository request (load, unload, index)
R = TypeVar("R")


class RequestReader:
    """Reads and decodes the bodies of one HTTP front's requests."""

    def __init__(self, limits: BodyLimits, budget: ReadAhead, decode: DecodePool,
                 max_bytes_elements: int = MAX_BYTES_ELEMENTS) -> None:  # fmt: skip
        self.limits = limits
        self.budget = budget  # the session layer's one ReadAhead
        self.offload = decode.run  # the Triton fronts' one decode pool
        self.max_bytes_elements = max_bytes_elements

    def body(self, request: web.Request) -> BodyReader:
        return BodyReader(request, self.limits, self.budget)

    async def json(self, request: web.Request, what: str) -> Any:
        """An optional small JSON body (empty: None)."""
        async with self.body(request) as body:
            data = await body.read_all(MAX_SMALL_JSON_BYTES, what)
        if not data.strip():
            return None
        return await self.offload(len(data), http_codec.parse_json, data, what)

    async def infer(
        self, request: web.Request, model: str, version: str,
        run: Callable[[InferRequest], Awaitable[R]],
    ) -> tuple[R, http_codec.OutputChoice]:  # fmt: skip
        """`run` on the body's infer request, and how its outputs go back; the body's bytes
        stay held in the budget until `run` has answered."""
        async with self.body(request) as body:
            plan, binary = await self._read(request, body, model, version)
            cost = len(binary) + _json_values(plan)
            parsed = await self.offload(cost, plan.decode, memoryview(binary))
            del binary
            return await run(parsed), plan.choice

    async def _read(
        self, request: web.Request, body: BodyReader, model: str, version: str
    ) -> tuple[http_codec.InferHeader, bytes | bytearray]:
        """The JSON header, judged by what it declares; then the binary part, exactly the size
        the header says."""
        what = "the inference request"
        header_length = http_codec.header_length_of(request.headers.get(http_codec.HEADER_LENGTH))
        if header_length is None:
            header = await body.read_all(http_codec.MAX_JSON_BYTES, f"{what} (JSON: send large "
                                         "tensors as binary data)")  # fmt: skip
        elif header_length > http_codec.MAX_JSON_BYTES:
            raise invalid(f"{http_codec.HEADER_LENGTH} {header_length} is more than the JSON "
                          f"limit of {http_codec.MAX_JSON_BYTES} bytes")  # fmt: skip
        else:
            header = await body.read_exactly(header_length, http_codec.HEADER_LENGTH)
        doc = await self.offload(len(header), http_codec.parse_json, header, what)
        del header
        plan = http_codec.parse_infer_header(model, version, doc, None, self.max_bytes_elements)
        if header_length is None:
            return plan, b""
        return plan, await body.read_rest(plan.binary_bytes, "the inputs' binary_data_size")


def _json_values(plan: http_codec.InferHeader) -> int:
    """What decoding a request's JSON data costs, roughly: its inputs' element counts."""
    return sum(element_count(p.shape) for p in plan.inputs if p.binary_size is None)
