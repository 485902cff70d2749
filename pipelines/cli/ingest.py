"""`gpuledger ingest …`: usage from Kafka and telemetry from Prometheus into the lake."""

from __future__ import annotations

import signal
import threading
from datetime import datetime, timedelta
from types import FrameType
from typing import Annotated

import typer
from rich.table import Table

from ingest.catalog import ensure_catalog
from ingest.telemetry import pull_telemetry
from ingest.usage_consumer import ConsumeStats, StopWhen, consume
from ingest.usage_hours import late_events, materialize_usage_hours
from models.errors import InputError
from pipelines.cli.app import app, state
from pipelines.cli.progress import StepProgress
from pipelines.cli.simulate import console, parse_start

ingest_app = typer.Typer(
    help="Consume usage events and pull telemetry into the lake.", no_args_is_help=True
)
app.add_typer(ingest_app, name="ingest")


def parse_partitions(text: str | None) -> list[int] | None:
    """`0,1,4-7` -> [0, 1, 4, 5, 6, 7]."""
    if text is None:
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise InputError(
                f"--partitions: {part!r} is not a partition number or range (e.g. 0,1,4-7)"
            ) from None
    return sorted(set(out))


def window(start: str | None, end: str | None, hours: float | None) -> tuple[datetime, datetime]:
    """[start, end) from options; default: the last full UTC day."""
    begin = parse_start(start)
    if end is not None:
        finish = parse_start(end)
    else:
        finish = begin + timedelta(hours=hours if hours is not None else 24.0)
    if finish <= begin:
        raise InputError("--end must be after --start")
    return begin, finish


@ingest_app.command("usage")
def usage_command(
    ctx: typer.Context,
    partitions: Annotated[
        str | None, typer.Option(help="Kafka partitions to own, e.g. 0-3 (default: all).")
    ] = None,
    follow: Annotated[
        bool, typer.Option(help="Keep consuming until stopped (Ctrl-C / SIGTERM).")
    ] = False,
    idle_s: Annotated[
        float, typer.Option(min=0.1, help="Without --follow: stop when idle this long.")
    ] = 2.0,
    max_records: Annotated[int | None, typer.Option(min=1, help="Stop after this many.")] = None,
    topic: Annotated[str | None, typer.Option(help="Topic (default: settings).")] = None,
) -> None:
    """Consume usage events into the lake, exactly once per Kafka record."""
    settings = state(ctx).settings()
    stop_event = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop_event.set()

    previous = signal.signal(signal.SIGTERM, request_stop)
    previous_int = signal.signal(signal.SIGINT, request_stop)
    try:
        with StepProgress(console) as progress:
            advance = progress.counter("records landed", None)
            seen = [0]

            def on_progress(stats: ConsumeStats) -> None:
                advance(stats.records - seen[0])
                seen[0] = stats.records

            report = consume(
                settings,
                partitions=parse_partitions(partitions),
                topic=topic,
                stop=StopWhen(
                    idle_s=None if follow else idle_s,
                    max_records=max_records,
                    stop_event=stop_event,
                ),
                on_progress=on_progress,
                on_wait=lambda p: console.print(
                    f"  partition {p} is being consumed by another process: waiting for its "
                    f"lock (up to {settings.ingest.lock_timeout_s:g} s)"
                ),
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    console.print(
        f"{report.records:,} records from {report.topic} partitions "
        f"{','.join(map(str, report.partitions))} in {report.seconds:.1f} s "
        f"({report.records_per_s:,.0f}/s): {report.valid:,} valid, "
        f"{report.quarantined:,} quarantined, {report.files} files; {report.stopped_because}"
    )


@ingest_app.command("hours")
def hours_command(
    ctx: typer.Context,
    start: Annotated[
        str | None, typer.Option(help="First hour (UTC). [default: yesterday]")
    ] = None,
    end: Annotated[str | None, typer.Option(help="End (exclusive).")] = None,
    hours: Annotated[float | None, typer.Option(min=1, help="Hours from --start.")] = None,
    topic: Annotated[str | None, typer.Option(help="Topic (default: settings).")] = None,
) -> None:
    """Build the hourly usage events (dedup, quarantine) from what has landed."""
    settings = state(ctx).settings()
    begin, finish = window(start, end, hours)
    reports = materialize_usage_hours(settings, begin, finish, topic=topic)
    ensure_catalog(settings)
    table = Table(title="Usage hours", title_justify="left")
    for column in ("hour", "events", "duplicates", "conflicts", "quarantined", "late"):
        table.add_column(column, justify="left" if column == "hour" else "right")
    for r in reports:
        table.add_row(
            f"{r.hour:%Y-%m-%d %H:00}",
            f"{r.events:,}",
            f"{r.duplicates:,}",
            f"{r.conflicts:,}",
            f"{r.quarantined:,}",
            f"{r.late_incorporated:,}",
        )
    console.print(table)


@ingest_app.command("telemetry")
def telemetry_command(
    ctx: typer.Context,
    start: Annotated[
        str | None, typer.Option(help="First hour (UTC). [default: yesterday]")
    ] = None,
    end: Annotated[str | None, typer.Option(help="End (exclusive).")] = None,
    hours: Annotated[float | None, typer.Option(min=1, help="Hours from --start.")] = None,
) -> None:
    """Pull DCGM samples from Prometheus into the lake, one file per hour."""
    settings = state(ctx).settings()
    begin, finish = window(start, end, hours)
    with StepProgress(console) as progress:
        total = int((finish - begin).total_seconds() // 3600) + 1
        advance = progress.counter("hours pulled", total)
        report = pull_telemetry(settings, begin, finish, on_hour=lambda _h: advance(1))
    ensure_catalog(settings)
    console.print(
        f"{report.samples:,} samples ({report.rows:,} rows) of {report.gpus} GPUs over "
        f"{len(report.hours)} hours in {report.elapsed_s:.1f} s; {report.placeholder_samples:,} "
        f"placeholders, {report.counter_resets} counter resets, {report.gaps} gaps"
    )
    for warning in report.warnings:
        console.print(f"  warning: {warning}")


@ingest_app.command("late")
def late_command(
    ctx: typer.Context,
    topic: Annotated[str | None, typer.Option(help="Topic (default: settings).")] = None,
) -> None:
    """Hours already built that have events which landed after they were built."""
    settings = state(ctx).settings()
    late = late_events(settings, topic=topic)
    if late.height == 0:
        console.print("No late events: every built hour is up to date.")
        return
    for hour, count in late.iter_rows():
        console.print(
            f"  {hour:%Y-%m-%d %H:00} UTC: {count:,} late events (rebuild with ingest hours)"
        )
