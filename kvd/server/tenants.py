"""Tenants: who a caller is, and which namespaces it may see.

``kvd serve --tenants FILE`` reads a TOML file (mode 0600: it holds tokens) of
``[tenant.NAME]`` tables, each with ``token = "..."`` and ``namespaces = ["glob", ...]``
(shell-style, case-sensitive: ``"acme-*"``). A caller presenting a tenant's token is that
tenant; the admin token (``--admin-token-file``) is the operator, who sees everything; so is a
caller on the unix socket unless ``--unix-tenants`` is set (the socket's mode 0660 and group
are the node's own trust boundary). The interceptor (:mod:`kvd.server.auth`) puts the caller
of each RPC in :data:`CALLER` for the servicers, which filter what "every namespace" means.
"""

from __future__ import annotations

import contextvars
import fnmatch
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

MIN_TOKEN_LEN = 16  # characters: a tenant token is a secret, not a name


@dataclass(frozen=True)
class Tenant:
    name: str
    token: str
    namespaces: tuple[str, ...]  # globs

    def allows(self, namespace: str) -> bool:
        return any(fnmatch.fnmatchcase(namespace, glob) for glob in self.namespaces)


@dataclass(frozen=True)
class Caller:
    """The operator (``tenant`` None: every namespace, every call), or one tenant."""

    tenant: Tenant | None = None

    @property
    def is_operator(self) -> bool:
        return self.tenant is None

    def allows(self, namespace: str) -> bool:
        return self.tenant is None or self.tenant.allows(namespace)


OPERATOR = Caller()
# The caller of the RPC being served (set by the interceptor for the handler's task).
CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("kvd_caller", default=OPERATOR)


def caller() -> Caller:
    return CALLER.get()


def load_tenants(path: Path) -> dict[str, Tenant]:
    """Token -> tenant from ``path``; ValueError naming the file and what is wrong with it."""
    where = f"--tenants {path}"
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{where}: {exc.strerror}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise ValueError(f"{where}: mode {stat.S_IMODE(mode):04o}; it holds tokens, make it 0600")
    try:
        doc = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{where}: not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"tenant"})
    if unknown:
        raise ValueError(f"{where}: unknown table or key {unknown[0]!r}; tenants are [tenant.NAME] tables")
    tables = doc.get("tenant")
    if not isinstance(tables, dict) or not tables:
        raise ValueError(f"{where}: no [tenant.NAME] table")
    by_token: dict[str, Tenant] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ValueError(f"{where}: tenant.{name} must be a table")
        extra = sorted(set(table) - {"token", "namespaces"})
        if extra:
            raise ValueError(f"{where}: tenant.{name} has unknown key {extra[0]!r} (token, namespaces)")
        token, globs = table.get("token"), table.get("namespaces")
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LEN or not token.isprintable() or " " in token:
            raise ValueError(f"{where}: tenant.{name}.token must be at least {MIN_TOKEN_LEN} printable characters, no spaces")
        if not isinstance(globs, list) or not globs or not all(isinstance(g, str) and g for g in globs):
            raise ValueError(f"{where}: tenant.{name}.namespaces must be a non-empty list of globs")
        if token in by_token:
            raise ValueError(f"{where}: tenants {by_token[token].name} and {name} share a token")
        by_token[token] = Tenant(name, token, tuple(globs))
    return by_token
