"""Who may call what.

Without ``--tenants``: anyone who can open the unix socket (its mode 0660 and group are the
access control) calls everything; over TCP the Engine and View APIs are open (TLS, or a
trusted network with ``--tcp-insecure``) and Admin needs the admin bearer token. Without a
token configured, Admin over TCP is refused outright (PERMISSION_DENIED): an operator who
opened TCP for engines and routers did not thereby open eviction, pinning, policy switches
and drain to the network.

With ``--tenants``: every Engine, View and Admin call over TCP (and on the unix socket with
``--unix-tenants``) carries a bearer token, the admin's or a tenant's; none or an unknown one
is UNAUTHENTICATED. A tenant calls the Engine and View APIs and the Admin calls about its own
namespaces (:data:`TENANT_ADMIN`), each only on namespaces its globs match (else
PERMISSION_DENIED); what it lists (Snapshot, Watch, Status, ListBlocks, ListSessions) is
filtered to them by the servicers, which read the caller from
:data:`kvd.server.tenants.CALLER`. Health checks and reflection need no token.
"""

from __future__ import annotations

import hmac
import logging

import grpc

from kvd.server.tenants import CALLER, OPERATOR, Caller, Tenant

log = logging.getLogger("kvd.auth")

KVD_PREFIX = "/kvd.v1."
ADMIN_PREFIX = "/kvd.v1.Admin/"
# The arena holds every tenant's bytes, and a granted slot may hold another tenant's old
# bytes until it is written: tenants move bytes inline (StoreInline, LoadInline).
ARENA_CALLS = frozenset(
    f"/kvd.v1.Engine/{m}" for m in ("GetArena", "PrepareStore", "CommitStore", "PrepareLoad", "CompleteLoad")
)
# Admin calls a tenant may make, on its own namespaces; the rest are the operator's.
TENANT_ADMIN = frozenset(
    f"{ADMIN_PREFIX}{m}" for m in ("Status", "ListBlocks", "ListSessions", "Evict", "Pin", "Unpin", "GetPolicy")
)


class Denied(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def is_local(peer: str) -> bool:
    """A unix-socket peer (gRPC names them ``unix:...``)."""
    return peer.startswith("unix:")


def bearer(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


class Auth(grpc.aio.ServerInterceptor):
    """Admits each kvd call (see the module's rules) and names its caller for the handler."""

    def __init__(self, admin_token: str | None, tenants: dict[str, Tenant] | None = None,
                 unix_tenants: bool = False) -> None:
        self._admin = admin_token.encode() if admin_token else None
        self._tenants = tenants
        self._unix_tenants = unix_tenants

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(KVD_PREFIX):
            return handler
        if self._tenants is None and not method.startswith(ADMIN_PREFIX):
            return handler  # open to every caller, who is the operator: no wrapper on the data path

        async def enter(context, request) -> Caller:
            """The caller, named for the handler; or the call aborted."""
            try:
                who = self._admit(method, context, request)
            except Denied as denied:
                await _abort(method, context, denied)
            CALLER.set(who)
            return who

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                await enter(context, request)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def streamed(request, context):
                await enter(context, request)
                async for message in inner_stream(request, context):
                    yield message

            return grpc.unary_stream_rpc_method_handler(
                streamed, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            inner_upload = handler.stream_unary

            async def upload(request_iterator, context):
                who = await enter(context, None)

                async def checked():
                    async for part in request_iterator:
                        if part.HasField("header") and not who.allows(part.header.namespace):
                            await _abort(method, context, _outside(who, part.header.namespace))
                        yield part

                return await inner_upload(checked(), context)

            return grpc.stream_unary_rpc_method_handler(
                upload, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        raise TypeError(f"{method}: kvd has no bidirectional streams")

    def _admit(self, method: str, context, request) -> Caller:
        """The caller of ``method``, or Denied."""
        admin = method.startswith(ADMIN_PREFIX)
        if is_local(context.peer()) and not (self._tenants is not None and self._unix_tenants):
            return OPERATOR
        given = bearer(context.invocation_metadata())
        if given is not None and self._admin is not None and hmac.compare_digest(given.encode(), self._admin):
            return OPERATOR
        if self._tenants is None:
            if not admin:
                return OPERATOR  # the Engine and View APIs are open on TCP without tenants
            if self._admin is None:
                raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                             "Admin over TCP is off: start kvd with --admin-token-file, or use the unix socket")
            if given is None:
                raise Denied(grpc.StatusCode.UNAUTHENTICATED, "Admin over TCP needs 'authorization: Bearer <token>'")
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "wrong admin token")
        tenant = self._tenant(given)
        if tenant is None:
            what = "no bearer token" if given is None else "an unknown token"
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, f"{what}: kvd serves tenants ('authorization: Bearer <token>')")
        who = Caller(tenant)
        if method in ARENA_CALLS:
            raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                         "the shared-memory arena is the operator's: tenants store and load inline")
        if admin and method not in TENANT_ADMIN:
            raise Denied(grpc.StatusCode.PERMISSION_DENIED, f"{method.rsplit('/', 1)[1]} is the operator's (admin token)")
        if getattr(request, "all", False):
            raise Denied(grpc.StatusCode.PERMISSION_DENIED, "a tenant evicts its own namespaces, not all")
        namespace = getattr(request, "namespace", "")
        if namespace and not who.allows(namespace):
            raise _outside(who, namespace)
        return who

    def _tenant(self, given: str | None) -> Tenant | None:
        if given is None or not self._tenants:
            return None
        for token, tenant in self._tenants.items():  # constant time per token: no early exit on a prefix
            if hmac.compare_digest(given.encode(), token.encode()):
                return tenant
        return None


async def _abort(method: str, context, denied: Denied) -> None:
    log.warning("refused %s from %s: %s", method, context.peer(), denied.details)
    await context.abort(denied.code, denied.details)


def _outside(who: Caller, namespace: str) -> Denied:
    return Denied(grpc.StatusCode.PERMISSION_DENIED,
                  f"namespace {namespace!r} is not tenant {who.tenant.name}'s")
