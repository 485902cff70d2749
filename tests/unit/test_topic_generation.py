"""`check_topic_generation` (ingest/usage_consumer.py): landed offsets are only read on
from in the topic they came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.lake import Lake
from ingest.usage_consumer import TOPIC_ID_FILE, check_topic_generation
from models.errors import ServiceError


def test_the_first_ingest_records_the_id_and_a_new_topic_is_refused(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    check_topic_generation(lake, "usage.v1", None)  # a broker without ids: nothing to check
    assert not (lake.usage_landing / "topic=usage.v1" / TOPIC_ID_FILE).exists()
    check_topic_generation(lake, "usage.v1", "id-1")
    check_topic_generation(lake, "usage.v1", "id-1")
    assert (lake.usage_landing / "topic=usage.v1" / TOPIC_ID_FILE).read_text() == "id-1\n"
    with pytest.raises(ServiceError, match=r"'usage.v1' is not the one.*now id-2.*belong to id-1"):
        check_topic_generation(lake, "usage.v1", "id-2")
    check_topic_generation(lake, "other.topic", "id-2")  # each topic on its own
