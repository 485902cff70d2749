"""API keys of the metering gateway: how they look, how they are stored, how they are checked.

A key is shown to its owner once, at creation, and never stored: the key file keeps
its id (public, used to find the record and in logs) and the SHA-256 of the whole key.
Keys are 190 bits of randomness, so a plain SHA-256 is the right hash (as GitHub and
others store tokens); a slow password hash would only slow every request down.

    glk_<key id: 12 hex>_<secret: 32 url-safe characters>

The `glk_` prefix lets secret scanners recognise a leaked key. `authenticate` compares
digests in constant time; a malformed, unknown, revoked or wrong key are the same
answer to the caller (None), so a client cannot probe which ids exist. `redact` is the
only form of a key that may appear in a log line.

`TokenBucket` is the per-key rate limit: `rate_per_s` sustained, `burst` at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

__all__ = [
    "KEY_PATTERN",
    "ApiKeyRecord",
    "KeyRing",
    "TokenBucket",
    "digest",
    "generate_key",
    "key_id_of",
    "redact",
]

KEY_PREFIX = "glk_"
KEY_PATTERN = re.compile(r"^glk_(?P<key_id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{32})$")
#: The usage event's `subject` rule (models/usage_event.py).
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ApiKeyRecord(BaseModel):
    """What the key file keeps of one key: never the key itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str = Field(pattern=r"^[0-9a-f]{12}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the whole key")
    tenant: str = Field(pattern=TENANT_PATTERN, description="billed for every request")
    rate_per_s: float | None = Field(default=None, gt=0, description="unset = no limit")
    burst: int = Field(default=20, ge=1, le=100_000)
    created_at: AwareDatetime
    revoked_at: AwareDatetime | None = None
    note: str = Field(default="", max_length=200)

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed key, else None."""
    match = KEY_PATTERN.match(key)
    return match.group("key_id") if match else None


def redact(key: str) -> str:
    """`glk_<id>_…`: the id only, or `<malformed key>`: safe to log."""
    key_id = key_id_of(key)
    return f"{KEY_PREFIX}{key_id}_…" if key_id else "<malformed key>"


def generate_key(
    tenant: str,
    created_at: datetime,
    *,
    rate_per_s: float | None = None,
    burst: int = 20,
    note: str = "",
    taken: Iterable[str] = (),
) -> tuple[str, ApiKeyRecord]:
    """A new key (show it once) and the record to store."""
    used = set(taken)
    while True:
        key_id = secrets.token_hex(6)
        if key_id not in used:
            break
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(24)}"
    record = ApiKeyRecord(
        key_id=key_id,
        sha256=digest(key),
        tenant=tenant,
        rate_per_s=rate_per_s,
        burst=burst,
        created_at=created_at,
        note=note,
    )
    return key, record


class KeyRing:
    """The active keys, by id."""

    def __init__(self, records: Iterable[ApiKeyRecord]) -> None:
        self._by_id: dict[str, ApiKeyRecord] = {}
        for record in records:
            if record.key_id in self._by_id:
                raise ValueError(f"key id {record.key_id} appears twice")
            self._by_id[record.key_id] = record

    @property
    def records(self) -> Mapping[str, ApiKeyRecord]:
        return self._by_id

    def authenticate(self, presented: str | None) -> ApiKeyRecord | None:
        """The record of an active key that matches `presented` exactly, else None."""
        if not presented:
            return None
        key_id = key_id_of(presented)
        record = self._by_id.get(key_id) if key_id else None
        # Compare against a digest either way, so an unknown id costs the same time.
        expected = record.sha256 if record is not None else "0" * 64
        matches = hmac.compare_digest(digest(presented), expected)
        return record if matches and record is not None and record.active else None


@dataclass
class TokenBucket:
    """`rate_per_s` tokens per second, at most `burst` saved up; one token a request."""

    rate_per_s: float
    burst: int
    _tokens: float = field(init=False)
    _at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._tokens = float(self.burst)

    def take(self, now: float) -> float:
        """0.0 when the request may go now (a token is taken), else the seconds until a
        token is there (nothing is taken)."""
        if self._at is not None and now > self._at:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now if self._at is None else max(self._at, now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate_per_s
