"""The gateway's API key file (ingest/gateway/keys_file.py): digests only, owner-only
permissions, errors that name the file and the field."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ingest.gateway.keys_file import add_key, load_keys, revoke_key
from models.api_keys import KeyRing
from models.errors import InputError

NOW = datetime(2026, 12, 2, tzinfo=UTC)


def test_added_keys_authenticate_and_the_file_holds_no_key(tmp_path: Path) -> None:
    path = tmp_path / "api_keys.yaml"
    key_a, record_a = add_key(path, "acme", NOW, rate_per_s=5, burst=10)
    key_b, _ = add_key(path, "globex", NOW)
    text = path.read_text()
    assert key_a not in text and key_b not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = KeyRing(load_keys(path))
    assert ring.authenticate(key_a) == record_a
    assert ring.authenticate(key_b).tenant == "globex"  # type: ignore[union-attr]


def test_a_revoked_key_stops_authenticating(tmp_path: Path) -> None:
    path = tmp_path / "api_keys.yaml"
    key, record = add_key(path, "acme", NOW)
    revoke_key(path, record.key_id, NOW)
    assert KeyRing(load_keys(path)).authenticate(key) is None
    with pytest.raises(InputError, match="already revoked"):
        revoke_key(path, record.key_id, NOW)
    with pytest.raises(InputError, match=r"key 000000000000: no such key in .*api_keys.yaml"):
        revoke_key(path, "000000000000", NOW)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("keys: [", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping with a list `keys`"),
        ("keys:\n  - key_id: xyz\n", "keys.0.key_id"),
        (
            "keys:\n  - {key_id: 0123456789ab, sha256: " + "a" * 64 + ", tenant: 'no spaces',"
            " created_at: '2026-12-02T00:00:00+00:00'}\n",
            "keys.0.tenant",
        ),
    ],
)
def test_a_bad_key_file_names_the_field(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "api_keys.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=r"API key file .*api_keys.yaml") as caught:
        load_keys(path)
    assert needle in str(caught.value)


def test_a_bad_tenant_is_refused_naming_the_option(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--tenant"):
        add_key(tmp_path / "api_keys.yaml", "no spaces", NOW)
    assert not (tmp_path / "api_keys.yaml").exists()
