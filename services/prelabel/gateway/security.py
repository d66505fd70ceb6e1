"""Who may call the gateway: TLS or mutual TLS from certificate files, and bearer tokens.

Tokens live in a file of ``TOKEN SCOPE`` lines (``read`` or ``write``; ``#`` starts a comment),
typically a mounted Kubernetes Secret; it is re-read when it changes, so tokens rotate without a
restart. Every RPC except ``grpc.health.v1`` (probes carry no credentials) needs
``authorization: Bearer TOKEN``; a ``read`` token may not change data.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from prelabel.errors import InvalidArgument, PermissionDenied, PrelabelError, Unauthenticated
from prelabel.gateway.interceptors import same_shape
from prelabel.settings import Settings

log = logging.getLogger("prelabel.gateway")

SCOPES = ("read", "write")
WRITE_METHODS = frozenset({"UploadExamples", "CreateFineTuneJob", "CancelJob"})
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' files (re-read when they change), or None for plaintext."""
    if settings.tls_cert_file is None and settings.tls_key_file is None:
        if settings.tls_client_ca_file is not None:
            raise InvalidArgument("PRELABEL_TLS_CLIENT_CA_FILE needs PRELABEL_TLS_CERT_FILE and PRELABEL_TLS_KEY_FILE")
        return None
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise InvalidArgument("set both PRELABEL_TLS_CERT_FILE and PRELABEL_TLS_KEY_FILE to serve TLS")
    files = Certificates(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, files.fetch, require_client_authentication=settings.tls_client_ca_file is not None
    )


class Certificates:
    """The gateway's certificate, key and client CA files, re-read when they change.

    cert-manager renews a certificate (by default a third of its life before it expires) by rewriting
    its Secret, which the kubelet swaps into the mounted files: a gateway that read them once served
    the old certificate until it expired. gRPC calls :meth:`fetch` before each new connection's
    handshake (``grpc.dynamic_ssl_server_credentials``); files that do not make a usable pair (a
    half-written rotation) are logged and the previous certificate is kept.
    """

    def __init__(self, cert: Path, key: Path, ca: Path | None) -> None:
        self.cert, self.key, self.ca = cert, key, ca
        self.files = [p for p in (cert, key, ca) if p is not None]
        self._lock = threading.Lock()
        try:
            self.initial = self._load()
            self._stamp = stamp(*self.files)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise InvalidArgument(f"the TLS files cannot be used: {_why(exc)}; fix them and start again") from None

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:  # handshakes may ask from several threads at once
            try:
                now = stamp(*self.files)
                if now == self._stamp:
                    return None
                self._stamp = now  # tried once per change: a bad rotation is logged once, not per connection
                config = self._load()
            except (OSError, ValueError, PrelabelError) as exc:
                log.error("TLS files changed but cannot be used (%s); serving the previous certificate", _why(exc))
                return None
        log.info("TLS files changed: serving the new certificate from %s", self.cert)
        return config

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert, key = _read(self.cert, "TLS_CERT_FILE"), _read(self.key, "TLS_KEY_FILE")
        roots = _read(self.ca, "TLS_CLIENT_CA_FILE") if self.ca else None
        if roots is not None and b"-----BEGIN CERTIFICATE-----" not in roots:
            raise ValueError(f"PRELABEL_TLS_CLIENT_CA_FILE={self.ca} holds no PEM certificate")
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)  # a matching pair
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)


def stamp(*paths: Path) -> tuple[tuple[int, int], ...]:
    """What tells that files changed (a rewrite or a Kubernetes Secret's swap): modification time and size."""
    return tuple((s.st_mtime_ns, s.st_size) for s in map(os.stat, paths))


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"the key does not match the certificate, or one of them is not PEM ({exc.reason or exc})"
    return exc.message if isinstance(exc, PrelabelError) else str(exc)


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"PRELABEL_{setting}={path} cannot be read ({exc.strerror}); fix the path") from None


class Tokens:
    """The token file, re-read when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[int, int], ...] | None = None
        self._scopes: dict[str, str] = {}
        self._load(strict=True)

    def scope(self, token: str) -> str | None:
        self._load(strict=False)
        found = None
        for known, scope in self._scopes.items():  # compare with every token, in constant time each
            if hmac.compare_digest(known.encode(), token.encode()):
                found = scope
        return found

    def _load(self, strict: bool) -> None:
        try:
            now = stamp(self.path)
            if now == self._stamp:
                return
            scopes = _parse(self.path.read_text())
        except (OSError, InvalidArgument) as exc:
            message = exc.message if isinstance(exc, PrelabelError) else f"cannot be read ({exc})"
            if strict:
                raise InvalidArgument(f"PRELABEL_AUTH_TOKENS_FILE={self.path}: {message}") from None
            log.error("token file %s: %s; keeping the previous tokens", self.path, message)
            return
        with self._lock:
            self._stamp, self._scopes = now, scopes
        log.info("loaded %d bearer token(s) from %s", len(scopes), self.path)


def _parse(text: str) -> dict[str, str]:
    scopes: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        token, _, scope = line.partition(" ")
        scope = scope.strip() or "read"
        if scope not in SCOPES or len(token) < 16:
            raise InvalidArgument(f"line {number}: expected 'TOKEN SCOPE' with a token of 16+ characters and a scope "
                                  f"of {' or '.join(SCOPES)}")  # fmt: skip
        scopes[token] = scope
    if not scopes:
        raise InvalidArgument("no tokens in the file; add 'TOKEN SCOPE' lines")
    return scopes


class BearerTokens(aio.ServerInterceptor):  # type: ignore[misc]
    """Rejects calls without a known token (UNAUTHENTICATED) or with too small a scope (PERMISSION_DENIED)."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    def check(self, method: str, metadata: dict[str, str]) -> PrelabelError | None:
        header = metadata.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return Unauthenticated(
                "this gateway needs a bearer token: send the metadata 'authorization: Bearer TOKEN' "
                "(the prelabel CLI: --token or PRELABEL_TOKEN)"
            )
        scope = self.tokens.scope(token.strip())
        if scope is None:
            return Unauthenticated("the bearer token is not recognised; ask the operator for a valid token")
        name = method.rsplit("/", 1)[-1]
        if name in WRITE_METHODS and scope != "write":
            return PermissionDenied(
                f"{name} changes data and needs a token with the 'write' scope; this one is '{scope}'"
            )
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        problem = self.check(details.method, {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)})
        return handler if problem is None else _rejecting(handler, problem)


def _rejecting(handler: grpc.RpcMethodHandler, problem: PrelabelError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers ``problem``'s status and does nothing else."""

    async def unary(request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(problem.code, problem.message)

    async def streaming(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(problem.code, problem.message)
        yield  # pragma: no cover - makes this an async generator

    return same_shape(handler, unary, streaming)
