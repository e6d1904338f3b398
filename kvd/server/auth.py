"""Who may call Admin: anyone who can open the unix socket (its mode 0660 and group are the
access control), and over TCP only a caller with the daemon's bearer token.

Without a token configured, Admin over TCP is refused outright (PERMISSION_DENIED): an
operator who opened TCP for engines and routers did not thereby open eviction, pinning,
policy switches and drain to the network. A missing or wrong token is UNAUTHENTICATED.
"""

from __future__ import annotations

import hmac
import logging

import grpc

log = logging.getLogger("kvd.auth")

ADMIN_PREFIX = "/kvd.v1.Admin/"


def is_local(peer: str) -> bool:
    """A unix-socket peer (gRPC names them ``unix:...``)."""
    return peer.startswith("unix:")


def bearer(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


class AdminAuth(grpc.aio.ServerInterceptor):
    """Checks every Admin call arriving over TCP against ``token`` (None: refuse them all)."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(ADMIN_PREFIX):
            return handler
        if handler.unary_unary is None:
            raise TypeError(f"{handler_call_details.method}: Admin calls must be unary")
        inner = handler.unary_unary

        async def checked(request, context):
            denied = self._deny(context)
            if denied is not None:
                log.warning("refused %s from %s: %s", handler_call_details.method, context.peer(), denied[1])
                await context.abort(*denied)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _deny(self, context) -> tuple[grpc.StatusCode, str] | None:
        if is_local(context.peer()):
            return None
        if self._token is None:
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                "Admin over TCP is off: start kvd with --admin-token-file, or use the unix socket",
            )
        given = bearer(context.invocation_metadata())
        if given is None:
            return grpc.StatusCode.UNAUTHENTICATED, "Admin over TCP needs 'authorization: Bearer <token>'"
        if not hmac.compare_digest(given.encode(), self._token):
            return grpc.StatusCode.UNAUTHENTICATED, "wrong admin token"
        return None
