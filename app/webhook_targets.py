"""Where a webhook may be sent: an http(s) URL without credentials whose host resolves to public
addresses only, every one of them (loopback, private, link-local, cloud metadata, carrier-grade
NAT, multicast, reserved and unspecified addresses are refused), unless STAR_WEBHOOK_ALLOW_PRIVATE.

Checked twice: when the job is submitted (`check_webhook`: 422 naming the field) and before every
delivery attempt (`resolve_target`), which returns the address it checked so that the delivery
connects to that address, not to whatever the name resolves to a moment later (DNS rebinding).
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit, urlunsplit

from app.errors import InvalidRequest
from app.schemas import GenerateRequest
from app.settings import ApiSettings

Resolver = Callable[..., list]


class TargetRefused(ValueError):
    """The URL may not be a webhook target (the message says why)."""


class TargetUnresolved(OSError):
    """The host did not resolve now (may be temporary)."""


@dataclass(frozen=True)
class Target:
    """A checked target: `url` names the checked address; send `headers` and `extensions` with it."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, str] = field(default_factory=dict)


def check_webhook(body: GenerateRequest, settings: ApiSettings, resolver: Resolver = socket.getaddrinfo) -> None:
    """422 (InvalidRequest) unless the request's webhook fields are usable on this server."""
    if body.webhook_url is None:
        if body.webhook_events is not None:
            raise InvalidRequest("`webhook_events` needs a `webhook_url`", field="webhook_events")
        return
    if settings.webhook_secret is None:
        raise InvalidRequest("webhooks are off on this server (its operator has set no STAR_WEBHOOK_SECRET); "
                             "leave out `webhook_url` and poll GET /jobs/{id}?wait=60", field="webhook_url")
    if body.webhook_events is not None and (not body.webhook_events
                                            or len(set(body.webhook_events)) != len(body.webhook_events)):
        raise InvalidRequest('`webhook_events` must list "final" and/or "running", each once, e.g. '
                             '["running", "final"]', field="webhook_events")
    try:
        parts = parse(body.webhook_url)
        if not settings.webhook_allow_private:
            addresses(parts, resolver)
    except TargetRefused as exc:
        raise InvalidRequest(f"`webhook_url` {exc}", field="webhook_url") from None
    except TargetUnresolved as exc:
        raise InvalidRequest(f"`webhook_url`: {exc}; give a host name that resolves, or an IP address",
                             field="webhook_url") from None


def parse(url: str) -> SplitResult:
    """The URL's parts; TargetRefused for another scheme, credentials or no host."""
    try:
        parts = urlsplit(url.strip())
        parts.port   # raises for a port out of range
    except ValueError as exc:
        raise TargetRefused(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise TargetRefused(f"must be an http:// or https:// URL, not {parts.scheme or 'a relative'} one")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("must not carry credentials (user:password@); put a token in the path or query "
                            "and check the signature")
    if not parts.hostname:
        raise TargetRefused("has no host")
    return parts


def forbidden(address: str) -> str | None:
    """Why `address` is not a public address a webhook may reach, or None when it is."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])   # an IPv6 zone index is not part of the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global:
        return "not a public address"
    return None


def addresses(parts: SplitResult, resolver: Resolver = socket.getaddrinfo) -> list[str]:
    """Every address the URL's host resolves to; TargetRefused if any is not public."""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = resolver(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetUnresolved(f"cannot resolve host {parts.hostname!r} ({exc})") from None
    found = list(dict.fromkeys(info[4][0] for info in infos))
    for address in found:
        reason = forbidden(address)
        if reason:
            raise TargetRefused(f"names host {parts.hostname!r}, which resolves to {address} ({reason}); webhooks "
                                "go to public addresses only (STAR_WEBHOOK_ALLOW_PRIVATE allows others)")
    if not found:
        raise TargetUnresolved(f"host {parts.hostname!r} resolves to no address")
    return found


def resolve_target(url: str, allow_private: bool, resolver: Resolver = socket.getaddrinfo) -> Target:
    """At delivery: the target pinned to an address checked now (TargetRefused, TargetUnresolved)."""
    parts = parse(url)
    if allow_private:
        return Target(urlunsplit(parts._replace(fragment="")))
    address = addresses(parts, resolver)[0]
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    extensions = {"sni_hostname": parts.hostname or ""} if parts.scheme == "https" else {}
    host_header = parts.netloc.rpartition("@")[2]
    return Target(urlunsplit(parts._replace(netloc=netloc, fragment="")), {"Host": host_header}, extensions)
