"""``SessionFromUser``: an ASGI middleware for vLLM's OpenAI server that takes a request's
session from the OpenAI ``user`` field.

vLLM names a request's session from the body's ``session_id``, the ``X-Session-ID`` header or
``vllm_xargs.session_id``, and drops the OpenAI ``user`` field before the engine. Clients that
say who they are only through ``user`` (one agent program, one ``user``) get their session
named by it with::

    python -m vllm.entrypoints.openai.api_server ... --middleware kvd.connector.middleware.SessionFromUser

A POST whose JSON body has a non-empty string ``user``, no ``session_id`` and no
``X-Session-ID`` header gets that header, set to ``user``; everything else passes unchanged.
Bodies are read whole only when the header is absent (vLLM reads them whole anyway) and
parsed only when they contain ``"user"``. Pure ASGI: nothing here imports vLLM or Starlette.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from kvd.connector.plan import usable_name

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

HEADER = b"x-session-id"


class SessionFromUser:
    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers") or ())
        if any(name.lower() == HEADER for name, _ in headers):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                await self.app(scope, _replay(message, receive), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        user = session_from_body(body)
        if user is not None:
            scope = dict(scope, headers=[*headers, (HEADER, user.encode())])
        await self.app(scope, _replay({"type": "http.request", "body": body, "more_body": False}, receive), send)


def session_from_body(body: bytes) -> str | None:
    """The session a request body names through ``user`` alone: None when it has a
    ``session_id``, no usable ``user`` (a non-empty printable string of at most 256
    characters), or is not a JSON object."""
    if b'"user"' not in body:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # vLLM answers the bad body itself
    if not isinstance(parsed, dict) or parsed.get("session_id"):
        return None
    user = parsed.get("user")
    return user if usable_name(user) else None


def _replay(first: Message, receive: Receive) -> Receive:
    """A receive that yields ``first`` (the body already read, or a disconnect) once, then
    the client's further messages."""
    pending: list[Message] = [first]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay
