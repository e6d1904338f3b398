"""SessionFromUser (kvd.connector.middleware): the OpenAI ``user`` field names a request's
session through vLLM's ``X-Session-ID`` header; driven as ASGI by hand-written receive/send."""

from __future__ import annotations

import asyncio
import json

import pytest

from kvd.connector.middleware import SessionFromUser, session_from_body


def serve(body: bytes, headers=(), method: str = "POST", chunk: int = 0, disconnect: bool = False) -> dict:
    """Run one request through the middleware into an app that records what it got."""
    seen: dict = {}

    async def app(scope, receive, send):
        seen["headers"] = dict(scope["headers"])
        got = b""
        while True:
            m = await receive()
            if m["type"] != "http.request":
                seen["message"] = m["type"]
                break
            got += m.get("body", b"")
            if not m.get("more_body"):
                break
        seen["body"] = got

    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    if disconnect:
        messages = [{"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        pass

    scope = {"type": "http", "method": method, "headers": list(headers)}
    asyncio.run(SessionFromUser(app)(scope, receive, send))
    return seen


def test_user_becomes_the_session_header_and_the_body_is_unchanged():
    body = json.dumps({"model": "m", "user": "agent-7", "messages": []}).encode()
    seen = serve(body, headers=[(b"content-type", b"application/json")], chunk=7)
    assert seen["headers"][b"x-session-id"] == b"agent-7"
    assert seen["body"] == body


@pytest.mark.parametrize(
    "body, headers, method",
    [
        (b'{"user": "a", "session_id": "s"}', (), "POST"),  # the body names its session
        (b'{"user": "a"}', [(b"X-Session-ID", b"h")], "POST"),  # so does the header
        (b'{"user": "a"}', (), "GET"),
        (b'{"messages": []}', (), "POST"),
    ],
)
def test_requests_that_name_their_session_otherwise_pass_unchanged(body, headers, method):
    seen = serve(body, headers=headers, method=method)
    assert seen["body"] == body
    assert seen["headers"].get(b"x-session-id") in (None, b"h")


@pytest.mark.parametrize(
    "body", [b'{"user": ""}', b'{"user": 5}', b'{"user": "a\\u0000b"}', b'["user"]', b'{"user": "x', b"\xff\"user\"",
             json.dumps({"user": "u" * 257}).encode()],
)
def test_unusable_user_fields_are_not_session_ids(body):
    assert session_from_body(body) is None
    assert serve(body)["body"] == body  # vLLM answers a bad body itself


def test_a_client_that_leaves_before_its_body_is_seen_by_the_app():
    assert serve(b"", disconnect=True)["message"] == "http.disconnect"
