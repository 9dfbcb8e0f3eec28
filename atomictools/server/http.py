"""Serving over streamable HTTP: DNS-rebinding protection always on, an optional bearer token."""

from __future__ import annotations

import hmac
import ipaddress
import socket
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from atomictools.engine import Limits, MiB

LOOPBACK_HOSTS = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
LOOPBACK_ORIGINS = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
MAX_REQUEST_BYTES = 2 * Limits().max_write_bytes + 4 * MiB
"""Largest HTTP request body (a larger one gets 413): the largest content the tools take in one
call, JSON-escaped (a newline or a quote takes two bytes), with room for the rest. The SDK's
default, 4 MiB, refused over HTTP every write that stdio accepts between 4 and 64 MiB."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BearerTokenGate:
    """Refuses every HTTP request that lacks ``Authorization: Bearer <token>`` (401)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"text/plain"),
                            (b"www-authenticate", b"Bearer"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": b"missing or wrong bearer token"})
                return
        await self.app(scope, receive, send)


def http_app(
    server: MCPServer[Any],
    *,
    host: str,
    allowed_hosts: list[str] | None = None,
    auth_token: str | None = None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
) -> ASGIApp:
    """The streamable-HTTP ASGI app at ``/mcp``, with Host/Origin checks and maybe a token."""
    names = [*([] if is_loopback(host) else [host]), *(allowed_hosts or [])]
    # A Host header carries a port only when it is not the scheme's default: allow both.
    hosts = [form for name in names for form in ((name,) if ":" in name else (name, f"{name}:*"))]
    origins = [f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")]
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[*LOOPBACK_HOSTS, *hosts],
        allowed_origins=[*LOOPBACK_ORIGINS, *origins],
    )
    app: ASGIApp = server.streamable_http_app(
        host=host, transport_security=security, max_request_body_size=max_request_bytes
    )
    return BearerTokenGate(app, auth_token) if auth_token else app


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before serving: a port in use is a clear error at start,
    and ``--port 0`` gets a free port the start-up line can name."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    listener.set_inheritable(True)
    return listener


async def serve_http(app: ASGIApp, *, listener: socket.socket, log_level: str) -> None:
    config = uvicorn.Config(app, log_level=log_level.lower(), lifespan="on")
    await uvicorn.Server(config).serve(sockets=[listener])
