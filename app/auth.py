"""API keys (Bearer tokens) and the per-key limits kept in Redis.

Keys come from STAR_API_KEYS (comma-separated) and/or STAR_API_KEYS_FILE (one per line, `#`
comments). An entry is either `NAME:SHA256HEX` (the key's SHA-256, so the plaintext never sits in
the deployment) or a plaintext key, hashed on load and named `key-<first 8 hex of its hash>`.
Only hashes are kept in memory; a presented token is hashed and compared with every stored hash
with `hmac.compare_digest`. No keys configured: authentication is off (every request is allowed,
and per-key limits do not apply). The per-key limits (requests per minute, concurrent jobs) are
kept in Redis by the job protocol (app.jobs.admission).

Jobs belong to the key that created them (its name is recorded on the job): `may_see` decides who
else may read, follow or cancel one. Admin keys (STAR_ADMIN_API_KEYS, same entry format) are keys
like the others that may also see every key's jobs. Two entries with one name and different keys
are refused at load (they would share jobs and limits).
"""
from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

HASHED_ENTRY = re.compile(r"^([A-Za-z0-9._@-]{1,64}):([0-9a-fA-F]{64})$")
ANONYMOUS = "anonymous"

# The key name of the request being served (set by the auth dependency; read where the request
# is not at hand, e.g. when the OpenAI route submits through the POST /generate endpoint).
current_key: contextvars.ContextVar[str] = contextvars.ContextVar("star_api_key", default=ANONYMOUS)



def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_entry(entry: str) -> tuple[str, str] | None:
    """(name, sha256 hex) of one configured entry; None for blanks and comments."""
    entry = entry.strip()
    if not entry or entry.startswith("#"):
        return None
    match = HASHED_ENTRY.match(entry)
    if match:
        return match.group(1), match.group(2).lower()
    digest = hash_key(entry)
    return f"key-{digest[:8]}", digest


def _parse_all(entries: list[str]) -> list[tuple[str, str]]:
    return [p for p in map(parse_entry, entries) if p]


@dataclass
class ApiKeys:
    hashes: list[tuple[str, bytes]]   # (name, sha256 digest)
    admins: frozenset[str] = frozenset()   # names of the admin keys (also in hashes)
    named: frozenset[str] = frozenset()   # names given by `NAME:SHA256HEX` entries (not derived from a key)

    @classmethod
    def load(cls, inline: str | None, file: Path | None, admin_inline: str | None = None) -> "ApiKeys":
        entries = (inline or "").split(",")
        if file is not None:
            entries += Path(file).read_text().splitlines()
        parsed, admins = _parse_all(entries), _parse_all((admin_inline or "").split(","))
        by_name: dict[str, str] = {}
        for name, digest in parsed + admins:
            if by_name.setdefault(name, digest) != digest:
                raise ValueError(f"API key name {name!r} is configured with two different keys; "
                                 "give each key its own name (jobs and limits are per name)")
        named = frozenset(m.group(1) for m in (HASHED_ENTRY.match(e.strip()) for e in
                                                entries + (admin_inline or "").split(",")) if m)
        return cls([(name, bytes.fromhex(digest)) for name, digest in by_name.items()],
                   frozenset(name for name, _ in admins), named)

    def usage_label(self, name: str) -> str:
        """The `key` label of a key's usage metrics: its name when the operator named it, `unnamed`
        for plaintext keys (their derived names would spread a hash prefix of the key), `anonymous`
        without keys. Bounded by the configured names."""
        return name if name in self.named or name == ANONYMOUS else "unnamed"

    @property
    def enabled(self) -> bool:
        return bool(self.hashes)

    def may_see(self, caller: str, owner: str | None) -> bool:
        """Whether key `caller` may read, follow or cancel a job created by key `owner` (None: a job
        created while keys were off). Keys off: everyone sees everything."""
        if not self.enabled or caller in self.admins:
            return True
        return owner is not None and caller == owner

    def name_of(self, token: str) -> str | None:
        """The name of the key `token` is, or None; every stored hash is compared (constant time)."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for name, stored in self.hashes:
            if hmac.compare_digest(digest, stored):
                found = name
        return found

