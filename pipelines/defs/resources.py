"""Resources shared by the domains: where settings come from, and the Kafka and
Prometheus endpoints as Dagster resource config.

Resolution is the CLI's: `GpuledgerSettings` reads `load_settings` (GPULEDGER_*
environment over the TOML file) when a run, schedule tick or sensor evaluation uses
it, never at import. `KafkaResource` and `PrometheusResource` then lay the fields
that are set on top of those settings; fields left unset change nothing, so an
unconfigured deployment reaches whatever the settings name, else the local stack.

Pointing a deployment at a real cluster is resource config, e.g. in a run's config

    resources:
      kafka:
        config:
          bootstrap_servers: {env: KAFKA_BOOTSTRAP_SERVERS}
          security_protocol: SASL_SSL
          sasl_password: {env: KAFKA_PASSWORD}

or `KafkaResource(bootstrap_servers=dg.EnvVar("KAFKA_BOOTSTRAP_SERVERS"))` in code;
`dg.EnvVar` values are read when the run starts, not when the code loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import BaseModel, Field, SecretStr, ValidationError

from ingest.settings import KafkaSettings, PrometheusSettings, Settings, load_settings
from models.errors import InputError

__all__ = [
    "GpuledgerSettings",
    "KafkaResource",
    "PrometheusResource",
    "default_resources",
    "definitions",
    "resolve_settings",
]


class GpuledgerSettings(dg.ConfigurableResource):  # type: ignore[type-arg]
    """gpuledger's settings, loaded when used: GPULEDGER_* environment over a TOML file."""

    config_file: str | None = Field(
        default=None,
        description="TOML settings file; unset = $GPULEDGER_CONFIG, else ./gpuledger.toml",
    )
    state_dir: str | None = Field(
        default=None, description="overrides `state_dir` (local stack, lake, warehouse)"
    )

    def settings(self) -> Settings:
        overrides: dict[str, Any] = {}
        if self.state_dir:
            overrides["state_dir"] = Path(self.state_dir)
        return load_settings(Path(self.config_file) if self.config_file else None, **overrides)

    @classmethod
    def pinned(cls, settings: Settings) -> GpuledgerSettings:
        """A resource that answers exactly `settings` (for in-process runs and tests).

        The Settings object cannot travel as resource config (its secrets would be
        shown in the run's config), so it is held by a subclass made for this call;
        Dagster rebuilds resources from their class, which keeps it.
        """
        held = settings

        class PinnedGpuledgerSettings(cls):  # type: ignore[valid-type, misc]
            def settings(self) -> Settings:
                return held

        return PinnedGpuledgerSettings()


def _overlay(model: BaseModel, updates: dict[str, Any], resource: str) -> Any:
    """`model` with `updates` applied and validated; errors name the resource field."""
    if not updates:
        return model
    try:
        return type(model).model_validate({**model.model_dump(), **updates})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise InputError(f"resource {resource}: {field}: {first['msg']}") from None


class KafkaResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Kafka endpoint and security; unset fields keep the settings' values."""

    bootstrap_servers: str | None = Field(default=None, description="host:port[,host:port]")
    topic: str | None = Field(default=None, description="the usage topic")
    security_protocol: str | None = Field(
        default=None, description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    sasl_mechanism: str | None = Field(
        default=None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
    )
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def apply(self, settings: Settings) -> Settings:
        updates: dict[str, Any] = {
            name: getattr(self, name)
            for name in (
                "bootstrap_servers",
                "topic",
                "security_protocol",
                "sasl_mechanism",
                "sasl_username",
            )
            if getattr(self, name)
        }
        if self.sasl_password:
            updates["sasl_password"] = SecretStr(self.sasl_password)
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value:
                updates[name] = Path(value)
        kafka: KafkaSettings = _overlay(settings.kafka, updates, "kafka")
        return settings if kafka is settings.kafka else settings.model_copy(update={"kafka": kafka})


class PrometheusResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Prometheus endpoint and credentials; unset fields keep the settings' values."""

    url: str | None = Field(default=None, description="http(s)://host:port[/prefix]")
    bearer_token: str | None = None
    username: str | None = None
    password: str | None = None

    def apply(self, settings: Settings) -> Settings:
        updates: dict[str, Any] = {}
        if self.url:
            updates["url"] = self.url
        if self.username:
            updates["username"] = self.username
        for name in ("bearer_token", "password"):
            value = getattr(self, name)
            if value:
                updates[name] = SecretStr(value)
        prometheus: PrometheusSettings = _overlay(settings.prometheus, updates, "prometheus")
        if prometheus is settings.prometheus:
            return settings
        return settings.model_copy(update={"prometheus": prometheus})


def resolve_settings(
    gpuledger: GpuledgerSettings,
    kafka: KafkaResource | None = None,
    prometheus: PrometheusResource | None = None,
) -> Settings:
    """The settings a run uses: loaded now, with the endpoint resources laid on top."""
    settings = gpuledger.settings()
    if kafka is not None:
        settings = kafka.apply(settings)
    if prometheus is not None:
        settings = prometheus.apply(settings)
    return settings


def default_resources() -> dict[str, Any]:
    """Resource key -> resource, as deployed: nothing set, everything from settings."""
    return {
        "gpuledger": GpuledgerSettings(),
        "kafka": KafkaResource(),
        "prometheus": PrometheusResource(),
    }


def definitions() -> dg.Definitions:
    return dg.Definitions(resources=default_resources())
