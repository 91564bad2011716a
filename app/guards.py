"""The API's edge guards: request body size (ASGI middleware), API keys and per-key rate limit
(a FastAPI dependency), prompt length.

Open without a key: /healthz, /readyz, /metrics (for probes and Prometheus), the web page and its
assets, /docs and /openapi.json, and GET /images (unguessable, optionally signed URLs that
browsers and CDNs fetch without headers). Everything else needs `Authorization: Bearer <key>`
when keys are configured (app.auth); the per-key rate is counted in Redis (app.jobs.admission).
"""
from __future__ import annotations

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import auth
from app.jobs.admission import count_request
from app.errors import InvalidRequest, PayloadTooLarge, RateLimited, Unauthorized, error_response, status_for
from app.schemas import GenerateRequest

BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")
bearer = HTTPBearer(auto_error=False, description="An API key (STAR_API_KEYS / STAR_API_KEYS_FILE), "
                    "when the server has keys configured.")


class BodySizeLimit:
    """Refuse bodies over `max_bytes` with 413, from Content-Length at once, else while reading
    (the body is read up to the limit before the app sees it, then replayed)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send)
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLarge(f"the request body is larger than {self.max_bytes} bytes (STAR_MAX_BODY_BYTES)")
        await error_response(status_for(error), error.code, error.message)(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """Hand out `messages`, then the real channel (e.g. a later http.disconnect)."""
    async def replayed() -> Message:
        return messages.pop(0) if messages else await receive()
    return replayed


async def require_key(request: Request,
                      credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
    """The API key's name ('anonymous' when no keys are configured); 401 without a valid key,
    429 past the key's requests per minute."""
    ctx = request.app.state.ctx
    name = auth.ANONYMOUS
    if ctx.keys.enabled:
        known = ctx.keys.name_of(credentials.credentials) if credentials else None
        if known is None:
            challenge = 'Bearer realm="star"' + (', error="invalid_token"' if credentials else "")
            raise Unauthorized("a valid API key is required: send `Authorization: Bearer <key>`",
                               headers={"WWW-Authenticate": challenge})
        name = known
        limit = ctx.settings.rate_limit_per_min
        wait = limit and await run_in_threadpool(count_request, ctx.redis, name, limit)
        if wait:
            raise RateLimited(f"more than {limit} requests in this minute for this API key; retry later",
                              headers={"Retry-After": str(wait)})
    auth.current_key.set(name)
    return name


def check_prompt_length(body: GenerateRequest, max_chars: int) -> None:
    for field in ("prompt", "negative_prompt"):
        text = getattr(body, field)
        if len(text) > max_chars:
            raise InvalidRequest(f"`{field}` has {len(text)} characters; allowed: at most {max_chars} "
                                 "(STAR_MAX_PROMPT_CHARS)", field=field)
