"""The gateway's API key file: YAML records of `models.api_keys.ApiKeyRecord`, digests
only, written atomically and readable by its owner alone (mode 0600).

    keys:
      - key_id: 3f9a0c1d2e4b
        sha256: 5e88...
        tenant: acme
        rate_per_s: 20
        burst: 40
        created_at: 2026-12-02T13:00:00+00:00
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import yaml
from pydantic import ValidationError

from ingest.lake import atomic_path
from models.api_keys import ApiKeyRecord, KeyRing, generate_key
from models.errors import InputError

__all__ = ["add_key", "load_keys", "revoke_key", "save_keys"]


def load_keys(path: Path) -> list[ApiKeyRecord]:
    """The file's records (none when it does not exist); errors name the field."""
    if not path.exists():
        return []
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(
            f"API key file {path}: not valid YAML: {str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(document, dict) or not isinstance(document.get("keys", []), list):
        raise InputError(f"API key file {path}: expected a mapping with a list `keys`")
    records = []
    for i, item in enumerate(document.get("keys", [])):
        try:
            records.append(ApiKeyRecord.model_validate(item))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(record)"
            raise InputError(f"API key file {path}: keys.{i}.{where}: {first['msg']}") from None
    try:
        KeyRing(records)
    except ValueError as exc:
        raise InputError(f"API key file {path}: {exc}") from None
    return records


def save_keys(path: Path, records: list[ApiKeyRecord]) -> None:
    document = {"keys": [r.model_dump(mode="json", exclude_defaults=False) for r in records]}
    with atomic_path(path) as tmp:
        tmp.touch(mode=0o600)  # owner-only before any byte is written
        tmp.write_text(yaml.safe_dump(document, sort_keys=False))


def add_key(
    path: Path,
    tenant: str,
    now: datetime,
    *,
    rate_per_s: float | None = None,
    burst: int = 20,
    note: str = "",
) -> tuple[str, ApiKeyRecord]:
    """Create a key for `tenant`, store its record; the key is returned once."""
    records = load_keys(path)
    try:
        key, record = generate_key(
            tenant,
            now,
            rate_per_s=rate_per_s,
            burst=burst,
            note=note,
            taken=[r.key_id for r in records],
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        option = str(first["loc"][0]).replace("_per_s", "").replace("_", "-")
        raise InputError(f"--{option}: {first['msg']}") from None
    save_keys(path, [*records, record])
    return key, record


def revoke_key(path: Path, key_id: str, now: datetime) -> ApiKeyRecord:
    records = load_keys(path)
    for i, record in enumerate(records):
        if record.key_id == key_id:
            if not record.active:
                raise InputError(f"key {key_id}: already revoked at {record.revoked_at}")
            records[i] = record.model_copy(update={"revoked_at": now})
            save_keys(path, records)
            return records[i]
    raise InputError(f"key {key_id}: no such key in {path}")
