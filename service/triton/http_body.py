"""An HTTP request body read within bounds of size, time and memory, inflated in slices.

- Size: a body is at most `max_bytes` once decompressed; a Content-Length beyond it is refused
  (413) before a byte is read, a compressed body as soon as it inflates past it, or past
  `max_inflate_ratio` times the compressed bytes read (plus INFLATE_SLACK): a gzip bomb costs
  the few slices it took to tell.
- Time: the whole body must arrive within `timeout_s` of its headers (408 after that, the
  partial body dropped), so slow senders cannot keep a request, or its bytes, forever.
- Memory: what is read is held in the session layer's one ReadAhead (`ReadAhead.hold`) as it
  arrives, in doubling steps: a sender holds at most about twice what it has sent, so slow
  uploads that declare 64 MiB hold almost nothing against everyone else. A body's first bytes
  wait their turn; a body that has started and needs more waits at most GROW_WAIT_S (429 then:
  bodies that each hold part of the budget must not wait on each other for good).
- gzip and deflate (Content-Encoding) are inflated here with zlib's `max_length`, INFLATE_SLICE
  bytes at a time with a turn of the event loop between slices; aiohttp's own whole-body
  decompression is off (`auto_decompress=False`, service/triton/http_front.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from dataclasses import dataclass
from types import TracebackType

from aiohttp import web

from service.engine.text.inputs import quoted
from service.protocol.inbox import ReadAhead
from service.triton.types import TritonError, invalid, too_large, too_slow

INFLATE_SLICE = 256 << 10  # inflated bytes per zlib call (~0.3 ms) between loop turns
INFLATE_SLACK = 1 << 20  # a compressed body may always inflate to this much
FIRST_HOLD = 64 << 10  # the first step held for a body (doubling after it)
GROW_WAIT_S = 5.0  # longest wait of a started body for more of the budget
ENCODINGS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}
CLIENT_GONE = (ConnectionError, web.RequestPayloadError)


@dataclass(frozen=True)
class BodyLimits:
    """The bounds of one request body (flags --http-max-body-bytes, --http-max-inflate-ratio,
    --http-body-timeout-s)."""

    max_bytes: int = 64 << 20
    max_inflate_ratio: int = 200
    timeout_s: float = 60.0


class ClientGone(TritonError):
    """The client closed the connection (or broke its framing) before its body was read."""

    def __init__(self, message: str) -> None:
        super().__init__("CANCELLED", message, http=499)


class BodyReader:
    """One request's body: `read_exactly(n)` then `read_rest(expected)`, or `read_all()`.
    Use as `async with`: what it holds of the budget is given back at the end."""

    def __init__(self, request: web.Request, limits: BodyLimits, budget: ReadAhead) -> None:
        self._content = request.content
        self.limits = limits
        self._budget = budget
        self._holds = contextlib.AsyncExitStack()
        self._held = 0
        self._buffer = bytearray()  # read (and inflated), not yet taken
        self._taken = 0  # bytes of the body handed out
        self._raw = 0  # bytes received (compressed)
        self._compressed_tail = b""  # received, not inflated yet
        self._eof = False
        self._deadline = asyncio.get_running_loop().time() + limits.timeout_s
        self.length = request.content_length  # declared (None: chunked)
        self._inflater = _inflater(request.headers.get("Content-Encoding", ""))
        self.compressed = self._inflater is not None
        if self.length is not None and self.length > limits.max_bytes:
            raise self._too_large(f"the request body is {self.length} bytes")

    async def __aenter__(self) -> BodyReader:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._buffer = bytearray()
        await self._holds.aclose()

    @property
    def declared(self) -> int | None:
        """The decompressed body's size, when the headers say it (uncompressed, with a length)."""
        return None if self.compressed else self.length

    async def read_exactly(self, size: int, what: str) -> bytes:
        """The body's next `size` bytes; fewer in the whole body is a client error."""
        await self._fill(size)
        if len(self._buffer) < size:
            raise invalid(
                f"{what} is {size} bytes but the body has only {self._taken + len(self._buffer)}"
            )
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._taken += size
        return data

    async def read_rest(self, expected: int, what: str) -> bytearray:
        """The rest of the body, which must be exactly `expected` bytes: refused as soon as it
        is known to differ (at once when the headers declare the body's length)."""
        if self._taken + expected > self.limits.max_bytes:
            raise self._too_large(f"{what} add up to {expected}")
        if self.declared is not None and self.declared - self._taken != expected:
            raise invalid(f"the body has {self.declared - self._taken} bytes after the JSON "
                          f"header but {what} add up to {expected}")  # fmt: skip
        await self._fill(expected + 1)
        if len(self._buffer) != expected:
            shown = f"more than {expected}" if len(self._buffer) > expected else len(self._buffer)
            raise invalid(f"the body has {shown} bytes after the JSON header but {what} add up "
                          f"to {expected}")  # fmt: skip
        rest, self._buffer = self._buffer, bytearray()
        self._taken += len(rest)
        return rest

    async def read_all(self, at_most: int, what: str) -> bytes:
        """The whole (rest of the) body, refused (413) past `at_most` bytes."""
        if self.declared is not None and self.declared - self._taken > at_most:
            raise too_large(f"{what} is {self.declared} bytes, more than the server's limit of "
                            f"{at_most}")  # fmt: skip
        await self._fill(at_most + 1)
        if len(self._buffer) > at_most:
            raise too_large(f"{what} is more than the server's limit of {at_most} bytes")
        data = bytes(self._buffer)
        self._taken += len(data)
        self._buffer = bytearray()
        return data

    # -- reading ----------------------------------------------------------------------------

    async def _fill(self, size: int) -> None:
        """Read (and inflate, a slice at a time) until `size` bytes are buffered or the body
        ends: what is not needed yet stays compressed."""
        while len(self._buffer) < size and not self._eof:
            if self._compressed_tail:
                await self._inflate_slice()
                continue
            chunk = await self._receive()
            if not chunk:
                self._finish()
                break
            self._raw += len(chunk)
            if self._inflater is None:
                await self._hold(self._retained() + len(chunk))
                self._buffer += chunk
            else:
                self._compressed_tail = chunk

    async def _receive(self) -> bytes:
        """The next bytes the client sent (b"" at the end), within the body's deadline."""
        content = self._content
        try:
            if content.at_eof():
                return b""
            arrived = content.read_nowait()  # already here (a small body): no timer to arm
            if arrived:
                return arrived
            async with asyncio.timeout_at(self._deadline):
                return await content.readany()
        except TimeoutError:
            raise too_slow(
                f"the request body did not arrive within {self.limits.timeout_s:g} s "
                f"({self._raw} bytes received; --http-body-timeout-s)"
            ) from None
        except CLIENT_GONE as exc:
            raise ClientGone(f"the client went away while sending its body: {exc}") from None

    async def _inflate_slice(self) -> None:
        """Inflate at most INFLATE_SLICE bytes of the compressed tail, checking the bounds,
        with a turn of the event loop before the next slice."""
        inflater = self._inflater
        assert inflater is not None
        if inflater.eof:
            raise invalid("the request body has data after the end of its compressed stream")
        await self._hold(self._retained() + min(INFLATE_SLICE, self.limits.max_bytes))
        try:
            out = inflater.decompress(self._compressed_tail, INFLATE_SLICE)
        except zlib.error as exc:
            raise invalid(f"the request body is not valid compressed data: {exc}") from None
        self._buffer += out
        self._check_inflated()
        self._compressed_tail = inflater.unconsumed_tail
        if inflater.eof and inflater.unused_data:
            raise invalid("the request body has data after the end of its compressed stream")
        if self._compressed_tail:
            await asyncio.sleep(0)

    def _finish(self) -> None:
        self._eof = True
        inflater = self._inflater
        if inflater is not None and not inflater.eof:
            raise invalid("the request body's compressed stream is cut short")

    def _check_inflated(self) -> None:
        inflated = self._taken + len(self._buffer)
        if inflated > self.limits.max_bytes:
            raise self._too_large("the request body inflates past it")
        if inflated > self.limits.max_inflate_ratio * self._raw + INFLATE_SLACK:
            raise too_large(
                f"the request body inflates past the server's limit of "
                f"{self.limits.max_inflate_ratio} times its {self._raw} compressed bytes "
                "(--http-max-inflate-ratio)"
            )

    def _too_large(self, what: str) -> TritonError:
        return too_large(f"{what}: the request body is larger than the server's limit of "
                         f"{self.limits.max_bytes} bytes (--http-max-body-bytes)")  # fmt: skip

    # -- the budget -------------------------------------------------------------------------

    def _retained(self) -> int:
        return len(self._buffer)

    async def _hold(self, needed: int) -> None:
        """Hold at least `needed` bytes of the budget: doubling steps, never more than the
        body can hold (its declared length or the limit) or the whole budget."""
        if needed <= self._held:
            return
        ceiling = min(
            self._budget.total, self.limits.max_bytes, self.declared or self.limits.max_bytes
        )
        if self._held >= ceiling:
            return  # it holds all it ever may: one body alone always fits
        step = min(max(needed - self._held, self._held, FIRST_HOLD), ceiling - self._held)
        hold = self._budget.hold(step)
        if self._held == 0:
            await self._holds.enter_async_context(hold)  # its turn, as any request's
        else:
            try:
                async with asyncio.timeout(GROW_WAIT_S):
                    await self._holds.enter_async_context(hold)
            except TimeoutError:
                raise TritonError(
                    "RESOURCE_EXHAUSTED",
                    f"the server holds all the request bytes it may ({self._budget.total}, "
                    "--read-ahead-total-bytes): send the request again later",
                ) from None
        self._held += step


def _inflater(encoding: str) -> zlib._Decompress | None:  # type: ignore[name-defined]
    """A zlib decompressor for a Content-Encoding (None: identity)."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return None
    wbits = ENCODINGS.get(name)
    if wbits is None:
        raise TritonError(
            "INVALID_ARGUMENT",
            f"Content-Encoding {quoted(encoding)} is not supported (gzip, deflate or identity)",
            http=415,
        )
    if name == "deflate":
        return _Deflate()  # type: ignore[return-value]
    return zlib.decompressobj(wbits)


class _Deflate:
    """HTTP's deflate: zlib-wrapped as RFC 9110 says, or raw deflate as some clients send it
    (told by the first byte, as aiohttp does)."""

    def __init__(self) -> None:
        self._inner: zlib._Decompress | None = None  # type: ignore[name-defined]

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._inner is None:
            wbits = zlib.MAX_WBITS if data[0] & 0x0F == 8 else -zlib.MAX_WBITS
            self._inner = zlib.decompressobj(wbits)
        return self._inner.decompress(data, max_length)

    @property
    def unconsumed_tail(self) -> bytes:
        return self._inner.unconsumed_tail if self._inner is not None else b""

    @property
    def unused_data(self) -> bytes:
        return self._inner.unused_data if self._inner is not None else b""

    @property
    def eof(self) -> bool:
        return self._inner is not None and self._inner.eof
