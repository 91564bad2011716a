"""GET /usage: what API keys used (the totals app.jobs.usage keeps in Redis).

A key sees its own totals and its usage per UTC day over the last `days` days. An admin key
(STAR_ADMIN_API_KEYS; with authentication off, every caller, as for jobs: app.auth.ApiKeys.may_see)
sees every key that has usage, or one with `?key=NAME`; any other key asking for another key's
usage gets 403.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from app.errors import Forbidden
from app.guards import require_key
from app.jobs import usage
from app.schemas import KeyUsage, Usage, UsageReport

MAX_DAYS = 366


def report(entries: list[usage.KeyUsage], days: int) -> UsageReport:
    def out(t: usage.Totals) -> Usage:
        return Usage(jobs=t.jobs, images=t.images, pixels=t.pixels, model_s=t.model_s)
    return UsageReport(days=days, keys=[KeyUsage(key=e.key, totals=out(e.totals),
                                                 days={day: out(t) for day, t in e.days.items()}) for e in entries])


def keys_to_read(ctx, caller: str, key: str | None) -> list[str]:
    """The key names the caller asked for and may read; Forbidden for another key's usage."""
    admin = ctx.keys.may_see(caller, None)   # True for admin keys, and for everyone with keys off
    if key is not None and key != caller and not admin:
        raise Forbidden("only an admin key (STAR_ADMIN_API_KEYS) may read another key's usage; leave out "
                        "`key` for your own", field="key")
    if key is not None:
        return [key]
    return usage.known_keys(ctx.redis) if admin else [caller]


def create_router() -> APIRouter:
    router = APIRouter(tags=["usage"])

    @router.get("/usage", response_model=UsageReport)
    def usage_report(request: Request, caller: str = Depends(require_key), days: int = Query(
            30, ge=1, le=MAX_DAYS, description="UTC days covered by `days` of the report, today included."),
            key: str | None = Query(None, min_length=1, max_length=64, description="Admin keys only: this "
                                    "key's usage (default: every key with usage).")) -> UsageReport:
        """Usage by API key: succeeded jobs, images, pixels and model seconds, in total and per UTC
        day. A key sees its own; an admin key sees every key (docs/api.md#usage)."""
        ctx = request.app.state.ctx
        return report(usage.read_keys(ctx.redis, keys_to_read(ctx, caller, key), days), days)

    return router
