"""The HTTP/REST front of the Open Inference Protocol (KServe v2) with Triton's extensions.

aiohttp.web on the server's one asyncio loop (beside grpc.aio): each route parses its request
(service/triton/http_codec.py), asks the Triton core, and encodes the answer. Errors are
`{"error": "..."}` with the HTTP status of the error's code (service/triton/types.py); a
client's mistake is one WARNING line, never a traceback.

Nothing unbounded on the loop: a body is read within its limits of size, time and memory and
inflated in slices (service/triton/http_body.py); an infer request's JSON header is read first
and judged by what it declares (shapes, binary sizes, BYTES elements) before the binary part is
read; parsing and decoding whose cost grows with the request run on a small thread pool.
Connections without a complete request's headers for `--http-idle-timeout-s` are closed.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from service import metrics
from service.engine.text.inputs import quoted
from service.errors import ConfigError, LstmServeError
from service.tracing import NO_REQUEST_SPAN, UNTRACED
from service.triton import http_codec
from service.triton.http_body import BodyLimits, ClientGone
from service.triton.http_requests import RequestReader
from service.triton.types import ModelMetadata, ModelStats, TritonError, http_status, invalid

if TYPE_CHECKING:
    from service.triton.core import TritonCore

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20  # as Triton's default --http-max-input-size (--http-max-body-bytes)
MAX_ERROR_CHARS = 1024  # as the gRPC fronts cap status messages
LINGER_S = 2.0  # after a reply to a request whose body was not read whole: discard, then close
# Replies smaller than this go uncompressed whatever Accept-Encoding says (aiohttp clients, such
# as tritonclient.http.aio, always send one): compressing a few hundred bytes costs more than
# it saves.
COMPRESS_FROM_BYTES = 16 << 10
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
INT64_TYPES = (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64,
               FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED64,
               FieldDescriptor.TYPE_SFIXED64)  # fmt: skip


def error_response(status: int, message: str) -> web.Response:
    """The protocol's error body: {"error": "..."} (capped)."""
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 3] + "..."
    return web.json_response({"error": message}, status=status)


def config_json(config: Message) -> dict[str, Any]:
    """A ModelConfig as Triton's REST API shows it: proto field names, fields at their default
    values included, 64-bit integers as JSON numbers (protobuf's JSON mapping quotes them)."""
    doc = json_format.MessageToDict(
        config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _int64_as_numbers(config, doc)


def _int64_as_numbers(message: Message, doc: dict[str, Any]) -> dict[str, Any]:
    for field in message.DESCRIPTOR.fields:
        key = field.name
        if key not in doc:
            continue
        value = getattr(message, key)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            doc[key] = _map_values(field, value, doc[key])
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                doc[key] = [_int64_as_numbers(m, d) for m, d in zip(value, doc[key], strict=True)]
            else:
                doc[key] = _int64_as_numbers(value, doc[key])
        elif field.type in INT64_TYPES:
            doc[key] = [int(v) for v in doc[key]] if field.is_repeated else int(doc[key])
    return doc


def _map_values(field: FieldDescriptor, value: Any, doc: dict[str, Any]) -> dict[str, Any]:
    """A map field's JSON object (keys stay strings, as JSON needs), its values fixed."""
    key_field = field.message_type.fields_by_name["key"]
    value_field = field.message_type.fields_by_name["value"]
    numeric_key = key_field.type != FieldDescriptor.TYPE_STRING
    out = {}
    for k, v in doc.items():
        item = value[int(k) if numeric_key else k]
        if value_field.type == FieldDescriptor.TYPE_MESSAGE:
            out[k] = _int64_as_numbers(item, v)
        elif value_field.type in INT64_TYPES:
            out[k] = int(v)
        else:
            out[k] = v
    return out


def metadata_json(meta: ModelMetadata) -> dict[str, Any]:
    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
            "inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs)}  # fmt: skip


def stats_json(stats: ModelStats) -> dict[str, Any]:
    """One version's statistics in the statistics extension's JSON form."""

    def duration(count: int = 0, ns: int = 0) -> dict[str, int]:
        return {"count": count, "ns": ns}

    return {
        "name": stats.name, "version": stats.version, "last_inference": stats.last_inference,
        "inference_count": stats.inference_count, "execution_count": stats.execution_count,
        "inference_stats": {
            "success": duration(stats.success.count, stats.success.ns),
            "fail": duration(stats.fail.count, stats.fail.ns),
            "queue": duration(), "compute_input": duration(), "compute_infer": duration(),
            "compute_output": duration(), "cache_hit": duration(), "cache_miss": duration(),
        },
        "batch_stats": [],
    }  # fmt: skip


class ConnectionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's connection logger, where a malformed HTTP message (request line, headers, chunk
    framing) is a client's mistake: one WARNING line, no traceback; anything else as before."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if not isinstance(exc, HttpProcessingError):
            super().exception(msg, *args, exc_info=exc_info, **kwargs)
            return
        peer = args[0] if args else None
        reason = " ".join(str(exc.message).split())[:200]
        self.logger.warning("bad request", extra={"fields": {
            "status": exc.code, "error": f"malformed HTTP: {reason}", "peer": peer,
        }})  # fmt: skip


class HttpServer:
    """The aiohttp application and its listening site on the running loop."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None = None,
                 idle_timeout_s: float = 15.0) -> None:  # fmt: skip
        self.app = app
        self.ssl_context = ssl_context  # TLS (service/security/http.py), None = plaintext
        self.idle_timeout_s = idle_timeout_s
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port); a busy port is a ConfigError naming it."""
        # aiohttp's keep-alive timer runs from a connection's opening and from each reply until
        # a request's headers are complete: the idle limit and the header timeout in one.
        # Bodies are inflated by the front in slices, not by aiohttp whole on the loop.
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, auto_decompress=False,
            keepalive_timeout=self.idle_timeout_s, lingering_time=LINGER_S,
            logger=ConnectionLog(logging.getLogger("aiohttp.server"), {}),
        )  # fmt: skip
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_port=False, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError(f"cannot serve HTTP on {address} (--http-port): {reason}") from exc
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop listening and close the connections (after the server's drain)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def json_response(doc: Any) -> web.Response:
    return web.Response(
        body=json.dumps(doc, separators=(",", ":")).encode(), content_type=http_codec.JSON_TYPE
    )


# Triton endpoints lstm-serve does not serve: 501 naming what is missing, not a bare 404.
UNSUPPORTED = {
    "/v2/systemsharedmemory{tail:.*}": "system shared memory: send tensors in the body",
    "/v2/cudasharedmemory{tail:.*}": "CUDA shared memory: send tensors in the body",
    "/v2/trace/setting": "trace settings: lstm-serve logs and exports Prometheus metrics",
    "/v2/models/{name}/trace/setting": "trace settings: lstm-serve logs and exports metrics",
    "/v2/logging": "log settings: use --log-level and --log-json",
    "/v2/models/{name}/generate{tail:.*}": "the generate extension: use .../infer",
    "/v2/models/{name}/versions/{version}/generate{tail:.*}": "the generate extension",
}


def unsupported(what: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        raise TritonError("UNIMPLEMENTED", f"{request.path[:64]} is not supported by "
                          f"lstm-serve (no {what})")  # fmt: skip

    return handler


def version_of(request: web.Request) -> str:
    """The {version} of a .../versions/{version}/... route ("" = the latest)."""
    version = request.match_info.get("version", "")
    if version and not version.isdigit():
        raise invalid(f"model version {quoted(version)} is not a number")
    return version


class HttpFront:
    """The KServe v2 REST routes over one Triton core."""

    def __init__(
        self, core: TritonCore, max_body_bytes: int | None = None, *,
        middlewares: Sequence[Any] = (), ssl_context: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        """`middlewares` run before the front's own (authentication: service/security/http.py).
        The bounds are the core's config's (--http-* flags, --max-bytes-elements)."""
        self.core = core
        self.tracing = core.tracing
        config = core.config
        self.max_body_bytes = max_body_bytes or config.http_max_body_bytes
        limits = BodyLimits(self.max_body_bytes, config.http_max_inflate_ratio,
                            config.http_body_timeout_s)  # fmt: skip
        self.reader = RequestReader(limits, core.read_ahead, core.decode,
                                    config.max_bytes_elements)  # fmt: skip
        self.app = web.Application(
            client_max_size=self.max_body_bytes, middlewares=[*middlewares, self._answer]
        )
        self._rpc: dict[str, str] = {}
        self._routes()
        self.server = HttpServer(self.app, ssl_context, config.http_idle_timeout_s)

    def _routes(self) -> None:
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        table: list[tuple[str, str, str, Handler]] = [
            ("GET", "/v2", "ServerMetadata", self.server_metadata),
            ("GET", "/v2/health/live", "ServerLive", self.live),
            ("GET", "/v2/health/ready", "ServerReady", self.ready),
            ("GET", "/v2/models/stats", "ModelStatistics", self.stats),
            ("POST", "/v2/repository/index", "RepositoryIndex", self.index),
            ("POST", "/v2/repository/models/{name}/load", "RepositoryModelLoad", self.load),
            ("POST", "/v2/repository/models/{name}/unload", "RepositoryModelUnload", self.unload),
        ]
        for base in (model, versioned):
            table += [
                ("GET", base, "ModelMetadata", self.model_metadata),
                ("GET", base + "/ready", "ModelReady", self.model_ready),
                ("GET", base + "/config", "ModelConfig", self.model_config),
                ("GET", base + "/stats", "ModelStatistics", self.stats),
                ("POST", base + "/infer", "ModelInfer", self.infer),
            ]
        for path, what in UNSUPPORTED.items():
            table.append(("*", path, "Unsupported", unsupported(what)))
        for i, (method, path, rpc, handler) in enumerate(table):
            route = self.app.router.add_route(method, path, handler, name=f"r{i}")
            self._rpc[route.name or ""] = rpc

    # -- errors and metrics, in one place ------------------------------------------------------

    @web.middleware
    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name
        rpc = self._rpc.get(route or "", "unrouted")
        span = NO_REQUEST_SPAN
        if self.tracing.enabled and rpc not in UNTRACED:  # under the caller's traceparent
            template = request.match_info.route.resource
            span = self.tracing.http(
                request.method, template.canonical if template else "unrouted", request.path,
                self.tracing.extract(request.headers.items()),
            )  # fmt: skip
        try:
            with span.active():
                response = await handler(request)
            code = "OK"
        except web.HTTPException as exc:  # no such route or method, body too large
            response, code = self._http_error(request, exc)
        except LstmServeError as exc:
            response, code = error_response(http_status(exc), str(exc)), exc.code
            _log_refusal(request, rpc, exc, response.status)
        except Exception as exc:
            log.exception("HTTP request failed", extra={"fields": {"rpc": rpc}})
            response = error_response(500, f"internal error: {type(exc).__name__}")
            code = "INTERNAL"
        except BaseException as exc:  # cancelled: the client went away
            span.fail(exc)
            raise
        span.finish_http(response.status)
        name = request.match_info.get("name")
        metrics.requests(rpc, self._label(name), code, metrics.PROTOCOL_KSERVE_HTTP).inc()
        if response.status in UNREAD_BODY:
            response.force_close()  # the body was not read whole: close after the reply
        return response

    def _label(self, name: str | None) -> str:
        if name is None:
            return ""
        return self.core.model_label(name)

    def _http_error(self, request: web.Request, exc: web.HTTPException) -> tuple[web.Response, str]:
        if isinstance(exc, web.HTTPRequestEntityTooLarge):
            message = (
                f"the request body is larger than the server's limit of {self.max_body_bytes} bytes"
            )
            return error_response(413, message), "RESOURCE_EXHAUSTED"
        if isinstance(exc, web.HTTPMethodNotAllowed):
            message = f"{request.method} is not allowed on {quoted(request.path)}"
            return error_response(405, message), "UNIMPLEMENTED"
        if isinstance(exc, web.HTTPNotFound):
            message = f"no such endpoint: {request.method} {quoted(request.path)}"
            return error_response(404, message), "NOT_FOUND"
        return error_response(exc.status, exc.reason), "UNKNOWN"

    # -- server and models -----------------------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        meta = self.core.server_metadata()
        return json_response({"name": meta.name, "version": meta.version,
                              "extensions": list(meta.extensions)})  # fmt: skip

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.core.live() else 503)

    async def ready(self, request: web.Request) -> web.Response:
        why = self.core.not_ready()
        return error_response(503, why) if why else web.Response(status=200)

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], version_of(request)
        if self.core.model_ready(name, version):
            return web.Response(status=200)
        self.core.model_metadata(name, version)  # an unknown model or version: 404 naming it
        return web.Response(status=503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        meta = self.core.model_metadata(request.match_info["name"], version_of(request))
        return json_response(metadata_json(meta))

    async def model_config(self, request: web.Request) -> web.Response:
        config = self.core.model_config(request.match_info["name"], version_of(request))
        return json_response(config_json(config))

    async def stats(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "")
        found = self.core.statistics(name, version_of(request))
        return json_response({"model_stats": [stats_json(s) for s in found]})

    # -- repository ------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        doc = await self.reader.json(request, "the repository index request")
        ready = False
        if doc is not None:
            if not isinstance(doc, dict) or not isinstance(doc.get("ready", False), bool):
                raise invalid('the repository index request must be {"ready": true|false}')
            ready = doc.get("ready", False)
        rows = []
        for entry in self.core.repository_index(ready):
            row = {"name": entry.name}
            if entry.version:
                row["version"] = entry.version
            if entry.state:
                row["state"] = entry.state
            if entry.reason:
                row["reason"] = entry.reason
            rows.append(row)
        return json_response(rows)

    async def load(self, request: web.Request) -> web.Response:
        doc = await self.reader.json(request, "the load request")
        params = http_codec.parameters(doc.get("parameters") if isinstance(doc, dict) else None,
                                       "parameters")  # fmt: skip
        if params:
            shown = ", ".join(quoted(k) for k in list(params)[:4])
            raise TritonError("UNIMPLEMENTED", (
                f"load parameters ({shown}) are not supported: lstm-serve loads a model from "
                "its repository folder only (no config or file overrides)"
            ))  # fmt: skip
        await self.core.load(request.match_info["name"])
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        await self.reader.json(request, "the unload request")  # unload_dependents: none
        await self.core.unload(request.match_info["name"])
        return web.Response(status=200)

    # -- inference -------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        # Bounded bytes in flight: one budget with every stream's read-ahead (the layer's),
        # held as the body arrives (service/triton/http_body.py).
        name, version = request.match_info["name"], version_of(request)
        reply, choice = await self.reader.infer(request, name, version, self.core.infer)
        with self.tracing.span("reply"):
            data, content_type, header_length = http_codec.encode_infer_response(reply, choice)
        headers = {http_codec.HEADER_LENGTH: str(header_length)} if header_length >= 0 else None
        response = web.Response(body=data, content_type=content_type, headers=headers)
        if len(data) >= COMPRESS_FROM_BYTES and "Accept-Encoding" in request.headers:
            response.enable_compression()  # gzip or deflate, as the client accepts
        return response

    # -- life ------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        return await self.server.start(host, port)

    async def stop(self) -> None:
        await self.server.stop()


UNREAD_BODY = (408, 413, 415, 499)  # refused before the body was read whole


def _log_refusal(request: web.Request, rpc: str, exc: LstmServeError, status: int) -> None:
    """One line, no traceback, for a client's mistake (a malformed, too large or too slow
    request) or a client gone; other refusals (unknown model, ...) are not logged."""
    if isinstance(exc, ClientGone):
        log.info("client went away", extra={"fields": {"rpc": rpc, "peer": request.remote}})
    elif status in (400, 408, 413, 415):
        log.warning("bad request", extra={"fields": {
            "rpc": rpc, "status": status, "error": str(exc)[:200], "peer": request.remote,
        }})  # fmt: skip
