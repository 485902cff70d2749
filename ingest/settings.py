"""One settings layer for every command: environment variables over a TOML file.

Sources, highest priority first:
1. environment variables `GPULEDGER_<FIELD>`, nested with `__`
   (`GPULEDGER_KAFKA__BOOTSTRAP_SERVERS=broker-1:9093`);
2. the TOML file named by `--config` or `GPULEDGER_CONFIG`, else `./gpuledger.toml`
   when it exists;
3. the defaults below.

Unset Kafka and Prometheus endpoints mean "the local stack" (`gpuledger stack up`);
pointing at a real cluster is a matter of setting them. Settings are read when a
command runs, never at import.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from models.errors import InputError
from models.usage_event import USAGE_TOPIC_V1

CONFIG_ENV_VAR = "GPULEDGER_CONFIG"
DEFAULT_CONFIG_FILE = Path("gpuledger.toml")
_explicit_config: ContextVar[Path | None] = ContextVar("gpuledger_config_file", default=None)


class KafkaSettings(BaseModel):
    """Where usage events travel. kafka-python option names, lower-cased."""

    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: str | None = Field(
        default=None, description="host:port[,host:port]; unset = the local stack's broker"
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    topic: str = Field(default=USAGE_TOPIC_V1, min_length=1)
    topic_partitions: int = Field(default=8, ge=1, le=1024, description="when we create it")
    request_timeout_s: float = Field(default=10.0, gt=0)


class PrometheusSettings(BaseModel):
    """Where DCGM telemetry is read. Unset url = the local stack's Prometheus."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, description="http(s)://host:port[/prefix]")
    bearer_token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    verify_tls: bool = True
    timeout_s: float = Field(default=30.0, gt=0)


class StackSettings(BaseModel):
    """The embedded local stack (Tansu broker and Prometheus on 127.0.0.1)."""

    model_config = ConfigDict(extra="forbid")

    kafka_port: int | None = Field(default=None, ge=1, le=65535, description="unset = free port")
    prometheus_port: int | None = Field(default=None, ge=1, le=65535)
    scrape_interval_s: int = Field(default=15, ge=1, le=3600)
    prometheus_retention: str = Field(
        default="3650d",
        pattern=r"^[0-9]+[smhdwy]$",
        description="long enough to keep a simulated past (the default 15d deletes it)",
    )
    start_timeout_s: float = Field(default=30.0, gt=0)


class IngestSettings(BaseModel):
    """How usage events are consumed into the lake, and what gets quarantined."""

    model_config = ConfigDict(extra="forbid")

    batch_max_records: int = Field(default=50_000, ge=1, le=5_000_000)
    batch_max_s: float = Field(default=2.0, gt=0, description="flush at least this often")
    lateness_watermark_s: float = Field(
        default=900.0, ge=0, description="how long after an hour its events may still arrive"
    )
    max_prompt_tokens: int = Field(
        default=2_000_000, ge=1, description="above any context window: absurd, quarantined"
    )
    max_completion_tokens: int = Field(default=1_000_000, ge=1)
    max_future_s: float = Field(
        default=86_400.0,
        ge=0,
        le=3.2e9,
        description="event time further ahead of ingest is quarantined",
    )
    tenants_file: Path | None = Field(
        default=None,
        description="registry of known tenants; unset = <state_dir>/tenants.yaml when present, "
        "else every tenant is accepted",
    )
    consumer_group: str = Field(
        default="gpuledger-usage", min_length=1, description="offsets committed here (advisory)"
    )
    lock_timeout_s: float = Field(default=600.0, gt=0)


class TelemetrySettings(BaseModel):
    """How DCGM samples are read from Prometheus."""

    model_config = ConfigDict(extra="forbid")

    query_window_s: int = Field(default=3600, ge=60, le=86_400, description="one query per window")
    series_per_query: int = Field(default=512, ge=1, description="GPUs per query, at most")
    scrape_interval_s: float = Field(default=15.0, gt=0, description="expected, for coverage")
    job: str | None = Field(default=None, description="restrict to this Prometheus job")
    retries: int = Field(default=5, ge=0, le=20)
    backoff_s: float = Field(default=1.0, ge=0)


class BillingSettings(BaseModel):
    """Invoices: the rate card, the period close, numbering and where documents live."""

    model_config = ConfigDict(extra="forbid")

    rate_card_file: Path | None = Field(
        default=None, description="rate card YAML; unset = <state_dir>/rate_card.yaml"
    )
    invoices_dir: Path | None = Field(
        default=None, description="drafts, final invoices, the ledger; unset = <state_dir>/invoices"
    )
    grace_days: int = Field(
        default=3,
        ge=0,
        le=60,
        description="days after a period ends before it may be finalized (late usage lands)",
    )
    issuer: str = Field(
        default="gpuledger operator", min_length=1, max_length=200, description="on every invoice"
    )
    invoice_prefix: str = Field(default="INV", pattern=r"^[A-Z][A-Z0-9]{0,9}$")
    credit_note_prefix: str = Field(default="CN", pattern=r"^[A-Z][A-Z0-9]{0,9}$")


class TritonServerSettings(BaseModel):
    """One Triton server behind the gateway: where to call it and what serves on it.

    `hostname` and `gpu_uuids` go into every usage event of a request it served (Triton
    does not report them); `name` is the server's identity in usage events (`source`
    is `triton://<name>/v2/models/<model>`) and on its Prometheus metrics scrape
    (label `triton_server`), so reconciliation can match the two.
    """

    model_config = ConfigDict(extra="forbid")

    grpc_url: str = Field(
        pattern=r"^[A-Za-z0-9.\-]+:[0-9]{1,5}$", description="host:port of Triton's gRPC"
    )
    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9.\-:]{1,200}$",
        description="identity in usage events and metrics; unset = grpc_url",
    )
    metrics_url: str | None = Field(
        default=None, description="Triton's metrics endpoint, e.g. http://host:8002/metrics"
    )
    hostname: str = Field(min_length=1, max_length=253, description="serving host")
    gpu_uuids: list[str] = Field(
        min_length=1,
        max_length=64,
        description="GPUs serving the models (a tensor-parallel group lists each)",
    )
    models: list[str] = Field(min_length=1, description="models this server serves")
    model_version: str = Field(default="1", min_length=1, max_length=64)

    @property
    def server_name(self) -> str:
        return self.name or self.grpc_url


class ReconciliationSettings(BaseModel):
    """Revenue assurance: usage events against Triton's own request counters."""

    model_config = ConfigDict(extra="forbid")

    #: |events - Triton's count| / Triton's count above this fails the check. Requests
    #: finishing in the last scrape interval of an hour can be counted by Triton in the
    #: next hour's scrape, so a small tolerance is normal.
    drift_threshold: float = Field(default=0.02, ge=0, le=1)
    #: Absolute differences up to this many requests never fail (quiet hours).
    min_abs_drift: int = Field(default=0, ge=0)
    #: The Prometheus job that scrapes Triton's metrics endpoints.
    triton_job: str = Field(default="triton", min_length=1)


class GatewaySettings(BaseModel):
    """The metering gateway: its API keys, its spool, where it listens, what it calls."""

    model_config = ConfigDict(extra="forbid")

    keys_file: Path | None = Field(
        default=None,
        description="API key records (digests only); unset = <state_dir>/api_keys.yaml",
    )
    spool_dir: Path | None = Field(
        default=None, description="durable usage spool; unset = <state_dir>/gateway/spool"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    servers: list[TritonServerSettings] = Field(
        default_factory=list, description="Triton servers; requests go to one serving the model"
    )
    default_max_tokens: int = Field(default=256, ge=1, le=1_000_000)
    max_tokens_limit: int = Field(default=8192, ge=1, le=1_000_000)
    request_timeout_s: float = Field(default=600.0, gt=0)
    #: Events sent to Kafka per batch by the forwarder; the spool keeps the rest.
    forward_batch: int = Field(default=500, ge=1, le=100_000)
    #: Wait between attempts while Kafka is unreachable (events stay in the spool).
    forward_retry_s: float = Field(default=2.0, gt=0, le=300)


class EfficiencySettings(BaseModel):
    """The efficiency marts' economics and carbon, and where analysts read them.

    Defaults are illustrative, with their sources; set your own tariff, hardware cost,
    PUE and grid intensity.
    """

    model_config = ConfigDict(extra="forbid")

    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$", description="of the costs below")
    #: EIA Electric Power Monthly, table 5.6.A: US average industrial price 2024,
    #: about 8.1 cents per kWh.
    energy_tariff_per_kwh: Decimal = Field(default=Decimal("0.081"), ge=0)
    #: GPU amortization (purchase over the depreciation period, plus hosting) per GPU-hour,
    #: by GPU type; other types use `default_gpu_hour_cost`. Illustrative: an H100 SXM at
    #: about 30,000 USD over 4 years is 0.86 per hour before hosting.
    gpu_hour_cost: dict[str, Decimal] = Field(
        default_factory=lambda: {
            "NVIDIA H100 80GB HBM3": Decimal("1.20"),
            "NVIDIA A100-SXM4-80GB": Decimal("0.70"),
        }
    )
    default_gpu_hour_cost: Decimal = Field(default=Decimal("1.00"), ge=0)
    #: Power usage effectiveness: facility energy over IT energy. Uptime Institute
    #: Global Data Center Survey 2024: industry average 1.56.
    pue: float = Field(default=1.56, ge=1.0, le=5.0)
    #: Grid carbon intensity, g CO2e per kWh, by hour of day (UTC), 24 values; a file
    #: of timestamped hours (`grid_intensity_file`) takes precedence where it has the
    #: hour. Default: flat 367 g/kWh, about the US average of 2023, 0.81 lb/kWh (EIA,
    #: "How much carbon dioxide is produced per kilowatthour of U.S. electricity
    #: generation?").
    grid_intensity_by_hour: list[float] = Field(
        default_factory=lambda: [367.0] * 24, min_length=24, max_length=24
    )
    grid_intensity_file: Path | None = Field(
        default=None, description="CSV hour_start,g_co2e_per_kwh (UTC hours)"
    )
    published_dir: Path | None = Field(
        default=None, description="analysts' snapshots; unset = <state_dir>/published"
    )
    keep_snapshots: int = Field(
        default=3, ge=1, le=100, description="published snapshots kept besides the current"
    )


class Settings(BaseSettings):
    """All of gpuledger's settings."""

    model_config = SettingsConfigDict(
        env_prefix="GPULEDGER_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    state_dir: Path = Field(
        default=Path(".gpuledger"), description="local state: stack, simulations, warehouse"
    )
    duckdb_path: Path | None = Field(
        default=None, description="unset = <state_dir>/warehouse.duckdb"
    )
    allocation_file: Path | None = Field(
        default=None,
        description="allocation method YAML; unset = <state_dir>/allocation.yaml when present",
    )
    lake_dir: Path | None = Field(
        default=None, description="the Parquet lake; unset = <state_dir>/lake"
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)
    stack: StackSettings = Field(default_factory=StackSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    billing: BillingSettings = Field(default_factory=BillingSettings)
    efficiency: EfficiencySettings = Field(default_factory=EfficiencySettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    reconciliation: ReconciliationSettings = Field(default_factory=ReconciliationSettings)

    @property
    def rate_card_path(self) -> Path:
        return self.billing.rate_card_file or self.state_dir / "rate_card.yaml"

    @property
    def invoices_path(self) -> Path:
        return self.billing.invoices_dir or self.state_dir / "invoices"

    @property
    def api_keys_path(self) -> Path:
        return self.gateway.keys_file or self.state_dir / "api_keys.yaml"

    @property
    def spool_path(self) -> Path:
        return self.gateway.spool_dir or self.state_dir / "gateway" / "spool"

    @property
    def published_path(self) -> Path:
        return self.efficiency.published_dir or self.state_dir / "published"

    @property
    def analytics_path(self) -> Path:
        """The analysts' DuckDB catalog: the current published snapshot."""
        return self.published_path / "analytics.duckdb"

    @property
    def warehouse_path(self) -> Path:
        return self.duckdb_path or self.state_dir / "warehouse.duckdb"

    @property
    def lake_path(self) -> Path:
        return self.lake_dir or self.state_dir / "lake"

    @property
    def allocation_path(self) -> Path:
        return self.allocation_file or self.state_dir / "allocation.yaml"

    @property
    def tenants_path(self) -> Path:
        return self.ingest.tenants_file or self.state_dir / "tenants.yaml"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = _config_file()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def _config_file() -> Path | None:
    explicit = _explicit_config.get()
    if explicit is not None:
        return explicit
    named = os.environ.get(CONFIG_ENV_VAR)
    if named:
        return Path(named)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read settings now; errors name the field and where settings come from."""
    token = _explicit_config.set(config_file)
    try:
        return _load(**overrides)
    finally:
        _explicit_config.reset(token)


def _load(**overrides: Any) -> Settings:
    source_file = _config_file()
    if source_file is not None and not source_file.is_file():
        raise InputError(f"settings: config file {source_file} does not exist")
    where = (
        f"GPULEDGER_* environment or {source_file}" if source_file else "GPULEDGER_* environment"
    )
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        more = len(exc.errors()) - 1
        tail = f" (and {more} more)" if more else ""
        raise InputError(f"settings: {field}: {first['msg']} (from {where}){tail}") from None
    except ValueError as exc:  # TOML syntax errors surface as ValueError subclasses
        raise InputError(f"settings: cannot read {source_file}: {exc}") from None
