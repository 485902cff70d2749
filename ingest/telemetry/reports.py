"""What a pull reports: per hour written, and for the whole window."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class HourReport:
    """One hour pulled and written."""

    hour_start: datetime
    path: Path
    gpus: int
    rows: int
    samples: int  # metric samples in the hour, placeholders included
    placeholder_samples: int
    counter_resets: int
    gaps: int
    repeated: int
    max_gap_s: float | None
    queries: int
    fetch_s: float
    complete: bool  # False when the hour had not ended (plus a scrape) at pull time
    warnings: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self.rows == 0


@dataclass(frozen=True)
class TelemetryPullReport:
    prometheus_url: str
    start: datetime
    end: datetime
    hours: tuple[HourReport, ...]
    gpus: int  # distinct GPU keys over the window
    elapsed_s: float
    warnings: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return sum(h.rows for h in self.hours)

    @property
    def samples(self) -> int:
        return sum(h.samples for h in self.hours)

    @property
    def placeholder_samples(self) -> int:
        return sum(h.placeholder_samples for h in self.hours)

    @property
    def counter_resets(self) -> int:
        return sum(h.counter_resets for h in self.hours)

    @property
    def gaps(self) -> int:
        return sum(h.gaps for h in self.hours)

    @property
    def empty_hours(self) -> tuple[datetime, ...]:
        return tuple(h.hour_start for h in self.hours if h.empty)
