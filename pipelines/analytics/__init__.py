"""Analysts' access: consistent, read-only snapshots of the marts (`publish`)."""

from pipelines.analytics.publish import (
    PUBLISHED_TABLES,
    PublishReport,
    publish,
    snapshot_info,
)

__all__ = ["PUBLISHED_TABLES", "PublishReport", "publish", "snapshot_info"]
