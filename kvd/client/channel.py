"""How a client reaches a daemon: the gRPC channel, TLS, and the admin bearer token.

The unix socket is plain (its file mode and group are the access control). TCP is TLS
when ``tls`` is given (mutual TLS when it names a client certificate too); a bearer token,
when given, travels with every call as ``authorization: Bearer <token>`` metadata — the
daemon demands it of Admin calls over TCP.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc

CLIENT_ENV = {"ca": "KVD_TLS_CA", "cert": "KVD_TLS_CLIENT_CERT", "key": "KVD_TLS_CLIENT_KEY"}


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: ``ca`` verifies the daemon; ``cert`` and ``key`` (both or neither) are
    this client's own, for a daemon that demands client certificates (mutual TLS)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "TLS CA") if self.ca else None,
            private_key=_read(self.key, "TLS key") if self.key else None,
            certificate_chain=_read(self.cert, "TLS certificate") if self.cert else None,
        )

    @classmethod
    def from_env(cls, environ=os.environ) -> TlsFiles | None:
        """``KVD_TLS_CA``, ``KVD_TLS_CLIENT_CERT``, ``KVD_TLS_CLIENT_KEY``; None when none is set."""
        paths = {k: environ.get(v) for k, v in CLIENT_ENV.items()}
        if not any(paths.values()):
            return None
        return cls(**{k: Path(v) if v else None for k, v in paths.items()})


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from None


def grpc_target(address: str) -> str:
    """``unix:///abs/path``, ``unix:rel/path``, a bare path, or ``host:port`` -> a gRPC target."""
    if address.startswith("unix:"):
        return address
    if address.startswith(("/", "./", "../")):
        return f"unix://{os.path.abspath(address)}"
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is neither unix:///path nor host:port")
    return address


def listening(address: str, timeout: float = 1.0) -> bool:
    """Whether something accepts connections at ``address`` (a plain socket connect, no gRPC):
    False at once for a missing unix socket or a refused connection, and after ``timeout``
    seconds for an address that does not answer. A daemon too busy to answer gRPC quickly
    still accepts connections, so this tells "nobody there" from "slow"."""
    target = grpc_target(address)
    if target.startswith("unix:"):
        path = target.removeprefix("unix://") if target.startswith("unix://") else target.removeprefix("unix:")
        family, where = socket.AF_UNIX, path
    else:
        host, _, port = target.rpartition(":")
        family, where = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET, (host.strip("[]"), int(port))
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(where)
        except OSError:
            return False
    return True


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call (TLS or not: over plain TCP
    the daemon's operator chose a trusted network)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        metadata = list(details.metadata or ()) + [self._header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(
    address: str, *, token: str | None = None, tls: TlsFiles | None = None, options=()
) -> tuple[grpc.Channel, grpc.Channel]:
    """(raw channel, channel to make calls on): the raw one is for readiness and close."""
    target = grpc_target(address)
    if tls is not None:
        if target.startswith("unix:"):
            raise ValueError("TLS is for TCP addresses; the unix socket is plain")
        raw = grpc.secure_channel(target, tls.credentials(), options=list(options))
    else:
        raw = grpc.insecure_channel(target, options=list(options))
    if not token:
        return raw, raw
    return raw, grpc.intercept_channel(raw, _BearerToken(token))
