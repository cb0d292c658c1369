"""The API key: ``Authorization: Bearer KEY`` on every /v1 route when the server has one
(``/health`` and ``/metrics`` stay open, for probes and Prometheus)."""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import APIError


async def require_api_key(request: Request) -> None:
    key = request.app.state.server.config.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken says nothing about how much of the key matched
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "invalid or missing API key: send the header Authorization: Bearer KEY", None, "invalid_api_key",
                       {"WWW-Authenticate": "Bearer"})
