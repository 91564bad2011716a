"""Signed image URLs with an expiry, for deployments that put a CDN in front of GET /images.

Off by default: image URLs are unguessable already (128 random bits). With STAR_URL_SIGNING_KEY
set, every image URL the API hands out carries `?expires=<unix time>&sig=<HMAC-SHA256>`, over
`<image id>.png` and the expiry, and GET /images answers 403 to a URL whose signature is missing,
wrong or expired. Only the form the API issues is accepted: `expires` in canonical decimal (ASCII
digits, no sign, no leading zero), so the string checked is the string signed, and any other
input (non-ASCII, too long) is a 403, never an error. The expiry is rounded up to a step (a tenth of STAR_URL_TTL_S, at least a
minute), so polling clients get the same URL for a while and a CDN keeps one cache entry; a URL
stays valid between STAR_URL_TTL_S and STAR_URL_TTL_S + step.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable

SIG_BYTES = 32
CANONICAL_EXPIRES = re.compile(r"[1-9][0-9]{0,11}")   # what query() writes: str() of a positive int


class UrlSigner:
    def __init__(self, key: str, ttl_s: int, clock: Callable[[], float] = time.time):
        self.key = key.encode()
        self.ttl_s = ttl_s
        self.step_s = max(60, ttl_s // 10)
        self.clock = clock

    def signature(self, image_id: str, expires: int) -> str:
        mac = hmac.new(self.key, f"{image_id}.png\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:SIG_BYTES]).rstrip(b"=").decode()

    def query(self, image_id: str) -> str:
        expires = math.ceil((self.clock() + self.ttl_s) / self.step_s) * self.step_s
        return f"expires={expires}&sig={self.signature(image_id, expires)}"

    def check(self, image_id: str, expires: str | None, sig: str | None) -> str | None:
        """None if the URL is valid, else why not."""
        if not expires or not sig:
            return "this image URL needs a signature (`expires` and `sig`); get it from GET /jobs/{id}"
        if not CANONICAL_EXPIRES.fullmatch(expires):
            return "invalid `expires`"
        expected = self.signature(image_id, int(expires)).encode()
        if not hmac.compare_digest(expected, sig.encode("utf-8", "replace")):   # bytes: any sig compares
            return "invalid signature"
        if int(expires) < self.clock():
            return "this image URL has expired; get a fresh one from GET /jobs/{id}"
        return None

    def seconds_left(self, expires: str) -> int:
        return max(0, int(expires) - int(self.clock()))


class SignedStorage:
    """A storage whose `url()` is signed; everything else goes to the wrapped storage."""

    def __init__(self, storage, signer: UrlSigner):
        self.storage = storage
        self.signer = signer

    def url(self, image_id: str) -> str:
        return f"{self.storage.url(image_id)}?{self.signer.query(image_id)}"

    def __getattr__(self, name: str):
        return getattr(self.storage, name)
