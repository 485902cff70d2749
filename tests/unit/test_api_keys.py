"""API keys (models/api_keys.py): only digests are stored, every bad key is the same
answer, and the rate limit never lets more through than rate x time + burst."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from models.api_keys import KEY_PATTERN, KeyRing, TokenBucket, digest, generate_key, redact

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def test_a_generated_key_authenticates_and_its_record_never_holds_it() -> None:
    key, record = generate_key("acme", NOW, rate_per_s=5.0)
    assert KEY_PATTERN.match(key)
    assert key not in record.model_dump_json()
    assert record.sha256 == digest(key) and record.tenant == "acme"
    ring = KeyRing([record])
    assert ring.authenticate(key) == record


def test_wrong_unknown_malformed_and_revoked_keys_are_all_refused() -> None:
    key, record = generate_key("acme", NOW)
    other, other_record = generate_key("globex", NOW)
    revoked = other_record.model_copy(update={"revoked_at": NOW})
    ring = KeyRing([record, revoked])
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    unknown, _ = generate_key("acme", NOW)
    for presented in (tampered, unknown, "", None, "Bearer " + key, key + " ", other):
        assert ring.authenticate(presented) is None, presented


def test_redact_keeps_only_the_id() -> None:
    key, record = generate_key("acme", NOW)
    assert redact(key) == f"glk_{record.key_id}_…"
    # The secret may itself hold underscores: it is everything after the id.
    assert key.split("_", 2)[2] not in redact(key)
    assert redact("not-a-key") == "<malformed key>"


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=200),
    burst=st.integers(min_value=1, max_value=50),
    gaps=st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=300),
)
def test_token_bucket_never_admits_more_than_rate_times_time_plus_burst(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst)
    now, admitted = 0.0, 0
    for gap in gaps:
        now += gap
        wait = bucket.take(now)
        if wait == 0.0:
            admitted += 1
        else:
            assert wait > 0
    assert admitted <= burst + rate * now + 1e-9


def test_token_bucket_says_how_long_to_wait() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=1)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(10.0) == 0.5
    assert bucket.take(10.5) == 0.0
