"""TLS for both ports from PEM files, reloaded when the files change (cert-manager rotation).

`CertificateFiles` watches the server certificate, its key and (for mTLS) the client CA: each new
handshake checks the files' stamps (a few stat calls) and, when they changed, reads and checks
the new pair. gRPC gets it through `grpc.dynamic_ssl_server_credentials` (its fetcher runs per
handshake); aiohttp through an SNI callback that hands the handshake the newest `SSLContext`.
Connections already open keep the certificate they were made with. A half-written or mismatched
pair is not taken: the previous one stays in use and one error is logged per change.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from service.errors import ConfigError

log = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class PemPair:
    """One read of the files: the certificate chain, its key, the client CA (b"" = none)."""

    cert: bytes
    key: bytes = b""
    client_ca: bytes = b""


def _stamp(paths: tuple[Path, ...]) -> Stamp:
    """What changes when a file is replaced or rewritten (Kubernetes swaps a symlink)."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((-1, -1, -1))
            continue
        out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {flag} {str(path)!r}: {exc.strerror or exc}") from exc


def server_context(cert: Path, key: Path, client_ca: bytes = b"") -> ssl.SSLContext:
    """An SSLContext serving cert + key (TLS 1.2+), requiring client certificates signed by
    `client_ca` if given. Files that do not load are a ConfigError naming the flags (the key is
    never shown; an encrypted key is refused, not prompted for)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, ValueError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or "not PEM"
        raise ConfigError(
            f"--tls-cert {str(cert)!r} / --tls-key {str(key)!r} do not load as a PEM certificate "
            f"chain and its (unencrypted) private key: {reason}"
        ) from None
    if client_ca:
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or "not PEM"
            message = f"--tls-client-ca does not load as PEM certificates: {reason}"
            raise ConfigError(message) from None
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])  # aiohttp speaks HTTP/1.1
    return context


class CertificateFiles:
    """The server's certificate files; `current()` re-reads them once they change."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = Path(cert), Path(key), client_ca
        self._paths = (self.cert, self.key) + ((Path(client_ca),) if client_ca else ())
        self._lock = threading.Lock()  # gRPC's fetcher runs on gRPC's own threads
        self._stamp = _stamp(self._paths)
        self._pem = self._load()
        self._context = self._context_of(self._pem)  # also checks that the pair matches
        self._refused: Stamp | None = None
        self.reloads = 0

    @property
    def requires_client_cert(self) -> bool:
        return self.client_ca is not None

    def _load(self) -> PemPair:
        ca = _read(Path(self.client_ca), "--tls-client-ca") if self.client_ca else b""
        return PemPair(_read(self.cert, "--tls-cert"), _read(self.key, "--tls-key"), ca)

    def _context_of(self, pem: PemPair) -> ssl.SSLContext:
        return server_context(self.cert, self.key, pem.client_ca)

    def current(self) -> tuple[PemPair, ssl.SSLContext, bool]:
        """(pair, its SSLContext, whether it changed since the last call that changed it)."""
        stamp = _stamp(self._paths)
        with self._lock:
            if stamp == self._stamp or stamp == self._refused:
                return self._pem, self._context, False
            try:
                pem = self._load()
                context = self._context_of(pem) if pem != self._pem else self._context
            except ConfigError as exc:  # mid-rotation or a bad pair: keep serving the old one
                self._refused = stamp
                log.error("TLS files not reloaded", extra={"fields": {"error": str(exc)}})
                return self._pem, self._context, False
            changed = pem != self._pem
            self._stamp, self._pem, self._context = stamp, pem, context
            if changed:
                self.reloads += 1
                log.info("TLS certificate reloaded", extra={"fields": {"cert": str(self.cert)}})
            return pem, context, changed

    # -- gRPC ----------------------------------------------------------------------------------

    def _grpc_configuration(self, pem: PemPair) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(pem.key, pem.cert)], root_certificates=pem.client_ca or None
        )

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials whose certificate follows the files (checked per handshake)."""

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            pem, _context, changed = self.current()
            return self._grpc_configuration(pem) if changed else None

        return grpc.dynamic_ssl_server_credentials(
            self._grpc_configuration(self._pem), fetch,
            require_client_authentication=self.requires_client_cert,
        )  # fmt: skip

    # -- aiohttp (ssl) -------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """The context to listen with: each handshake is handed the newest context (SNI hook)."""
        listening = self._context_of(self._pem)

        def newest(sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            _pem, context, _changed = self.current()
            if sock.context is not context:
                sock.context = context

        listening.sni_callback = newest
        return listening


def certificate_files(cert: str, key: str, client_ca: str = "") -> CertificateFiles | None:
    """The configured TLS files (None: plaintext); both of --tls-cert and --tls-key, or neither."""
    if not cert and not key:
        if client_ca:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS)")
        return None
    if not cert or not key:
        raise ConfigError("--tls-cert and --tls-key go together: give both PEM files")
    return CertificateFiles(Path(cert), Path(key), Path(client_ca) if client_ca else None)
