"""Request dependencies: the app context, the caller's API key, the per-key rate limit."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from imagegenx.api.app import AppContext, RateLimited, Unauthorized
from imagegenx.engine.service import ANONYMOUS, Service
from imagegenx.types import ApiKey


def context(request: Request) -> AppContext:
    return request.app.state.ctx


ContextDep = Annotated[AppContext, Depends(context)]


def service(ctx: ContextDep) -> Service:
    return ctx.service


ServiceDep = Annotated[Service, Depends(service)]


bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key (alternative header)")


def api_key(
    ctx: ContextDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    header: Annotated[str | None, Depends(key_header)],
) -> ApiKey:
    """The caller's key, checked on every request (a revoked key is refused at once)."""
    secret = header or (bearer.credentials if bearer else None) or None
    if secret is None:
        if not ctx.settings.service.require_keys:
            return ANONYMOUS
        raise Unauthorized("an API key is required (Authorization: Bearer <key> or X-API-Key)")
    key = ctx.service.store.verify_key(secret)
    if key is None:
        raise Unauthorized("unknown or revoked API key")
    return key


def limited_key(ctx: ContextDep, key: Annotated[ApiKey, Depends(api_key)]) -> ApiKey:
    """The key, after charging one request to its rate limit."""
    if key.rate_limit_per_s <= 0:  # 0 means unlimited (internal keys)
        return key
    wait = ctx.limiter.hit(key.key_id, key.rate_limit_per_s)
    if wait is not None:
        raise RateLimited(wait)
    return key


KeyDep = Annotated[ApiKey, Depends(limited_key)]
