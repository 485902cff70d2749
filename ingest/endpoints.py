"""Where every command finds Kafka and Prometheus.

Resolution, for each of the two: the configured endpoint
(`GPULEDGER_KAFKA__BOOTSTRAP_SERVERS`, `GPULEDGER_PROMETHEUS__URL`, or the TOML file)
wins; otherwise the local stack of `settings.state_dir`, found through its state
files; otherwise a one-line ServiceError saying how to get one.

The `check_*` functions make a real request with a short timeout (seconds, where the
client libraries default to 30 s or more) so a wrong address fails fast with an
error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from ingest.settings import Settings
from ingest.stack import LocalStack
from ingest.stack.kafka import metadata_round_trip
from ingest.stack.process import exception_reason, os_error_reason, tcp_connect_error
from models.errors import InputError, ServiceError

__all__ = [
    "DEFAULT_CHECK_TIMEOUT_S",
    "PrometheusAuth",
    "check_kafka",
    "check_prometheus",
    "is_local_stack_prometheus",
    "kafka_bootstrap_servers",
    "kafka_client_options",
    "parse_bootstrap_servers",
    "prometheus_auth",
    "prometheus_url",
]

DEFAULT_CHECK_TIMEOUT_S = 5.0
KAFKA_DEFAULT_PORT = 9092


def kafka_bootstrap_servers(settings: Settings) -> str:
    """Configured bootstrap servers, else the local stack's broker, else a ServiceError."""
    configured = settings.kafka.bootstrap_servers
    if configured and configured.strip():
        return configured.strip()
    local = LocalStack(settings).kafka_bootstrap()
    if local is not None:
        return local
    raise ServiceError(
        "no Kafka configured: run `gpuledger stack up` or set GPULEDGER_KAFKA__BOOTSTRAP_SERVERS"
    )


def kafka_client_options(settings: Settings) -> dict[str, Any]:
    """kafka-python keyword arguments for a producer, consumer or admin client.

    Only options that are set appear. Security options apply to a configured cluster
    only: the local stack's broker speaks PLAINTEXT, so with no bootstrap servers set
    they are left out rather than breaking the connection to it.
    """
    kafka = settings.kafka
    timeout_ms = int(kafka.request_timeout_s * 1000)
    options: dict[str, Any] = {
        "bootstrap_servers": kafka_bootstrap_servers(settings),
        "request_timeout_ms": timeout_ms,
        # kafka-python 3 waits up to 30 s for the first broker by default.
        "bootstrap_timeout_ms": timeout_ms,
    }
    if not (kafka.bootstrap_servers and kafka.bootstrap_servers.strip()):
        return options
    options["security_protocol"] = kafka.security_protocol
    if kafka.sasl_mechanism is not None:
        options["sasl_mechanism"] = kafka.sasl_mechanism
    if kafka.sasl_username is not None:
        options["sasl_plain_username"] = kafka.sasl_username
    if kafka.sasl_password is not None:
        options["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        value = getattr(kafka, name)
        if value is not None:
            options[name] = str(value)
    return options


def prometheus_url(settings: Settings) -> str:
    """Configured Prometheus URL, else the local stack's, else a ServiceError."""
    configured = settings.prometheus.url
    if configured and configured.strip():
        return configured.strip().rstrip("/")
    local = LocalStack(settings).prometheus_url()
    if local is not None:
        return local
    raise ServiceError(
        "no Prometheus configured: run `gpuledger stack up` or set GPULEDGER_PROMETHEUS__URL"
    )


@dataclass(frozen=True)
class PrometheusAuth:
    """Credentials and TLS verification for Prometheus's HTTP API.

    `httpx_kwargs()` suits `httpx.Client(...)`/`httpx.get(...)`; prometheus-api-client
    takes `headers=auth.headers, auth=auth.basic_auth, disable_ssl=not auth.verify`.
    """

    headers: dict[str, str] = field(default_factory=dict)
    basic_auth: tuple[str, str] | None = None
    verify: bool = True

    def httpx_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": dict(self.headers), "verify": self.verify}
        if self.basic_auth is not None:
            kwargs["auth"] = self.basic_auth
        return kwargs


def prometheus_auth(settings: Settings) -> PrometheusAuth:
    """Bearer token or basic auth from settings (not both), and whether to verify TLS."""
    prom = settings.prometheus
    if prom.bearer_token is not None and prom.username is not None:
        raise InputError(
            "settings: prometheus: set either bearer_token or username/password, not both"
        )
    if prom.password is not None and prom.username is None:
        raise InputError("settings: prometheus.password is set without prometheus.username")
    headers: dict[str, str] = {}
    if prom.bearer_token is not None:
        headers["Authorization"] = f"Bearer {prom.bearer_token.get_secret_value()}"
    basic = None
    if prom.username is not None:
        password = prom.password.get_secret_value() if prom.password is not None else ""
        basic = (prom.username, password)
    return PrometheusAuth(headers=headers, basic_auth=basic, verify=prom.verify_tls)


def parse_bootstrap_servers(servers: str) -> list[tuple[str, int]]:
    """`"a:9092,[::1]:9093,b"` → `[("a", 9092), ("::1", 9093), ("b", 9092)]`."""
    parsed: list[tuple[str, int]] = []
    for raw in servers.split(","):
        item = raw.strip()
        if not item:
            continue
        host, port_text = item, ""
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_text = rest.removeprefix(":")
        elif item.count(":") == 1:
            host, port_text = item.split(":")
        try:
            port = int(port_text) if port_text else KAFKA_DEFAULT_PORT
        except ValueError:
            raise InputError(
                f"settings: kafka.bootstrap_servers: {item!r} is not host:port"
            ) from None
        if not host or not 0 < port < 65536:
            raise InputError(f"settings: kafka.bootstrap_servers: {item!r} is not host:port")
        parsed.append((host, port))
    if not parsed:
        raise InputError("settings: kafka.bootstrap_servers is empty")
    return parsed


def check_kafka(settings: Settings, *, timeout_s: float = DEFAULT_CHECK_TIMEOUT_S) -> list[str]:
    """Raise a one-line ServiceError unless Kafka answers a metadata request.

    First a TCP connect to each bootstrap server (so a closed port reads "connection
    refused", at once), then a real metadata round-trip. Returns the topic names.
    """
    options = kafka_client_options(settings)
    servers = options["bootstrap_servers"]
    reasons = [
        tcp_connect_error(host, port, timeout_s) for host, port in parse_bootstrap_servers(servers)
    ]
    if all(reason is not None for reason in reasons):
        raise ServiceError(f"Kafka at {servers} is unreachable: {reasons[0]}")
    try:
        return metadata_round_trip(options, timeout_s)
    except Exception as exc:  # kafka-python's errors share no useful base class
        raise ServiceError(f"Kafka at {servers} is unreachable: {exception_reason(exc)}") from None


def check_prometheus(settings: Settings, *, timeout_s: float = DEFAULT_CHECK_TIMEOUT_S) -> None:
    """Raise a one-line ServiceError unless Prometheus answers a PromQL query.

    Asks `/api/v1/query?query=1`, which Prometheus and the services that speak its
    API behind a path prefix (Thanos, Mimir, VictoriaMetrics) all serve.
    """
    url = prometheus_url(settings)
    auth = prometheus_auth(settings)
    try:
        response = httpx.get(
            f"{url}/api/v1/query", params={"query": "1"}, timeout=timeout_s, **auth.httpx_kwargs()
        )
    except httpx.TimeoutException:
        raise ServiceError(
            f"Prometheus at {url} is unreachable: no answer within {timeout_s:g} s"
        ) from None
    except httpx.HTTPError as exc:
        raise ServiceError(f"Prometheus at {url} is unreachable: {_httpx_reason(exc)}") from None
    if response.status_code in (401, 403):
        raise ServiceError(
            f"Prometheus at {url} refused the credentials (HTTP {response.status_code}); "
            "check GPULEDGER_PROMETHEUS__BEARER_TOKEN or __USERNAME/__PASSWORD"
        )
    if response.status_code != 200:
        raise ServiceError(
            f"Prometheus at {url} answered HTTP {response.status_code} to a PromQL query"
        )
    try:
        ok = response.json().get("status") == "success"
    except ValueError:
        ok = False
    if not ok:
        raise ServiceError(f"Prometheus at {url} answered a PromQL query with something else")


def is_local_stack_prometheus(settings: Settings) -> bool:
    """True when Prometheus is the local stack's: url unset, or equal to its URL.

    Callers use it to decide whether they may backfill blocks and restart it.
    """
    configured = settings.prometheus.url
    if not (configured and configured.strip()):
        return True
    local = LocalStack(settings).prometheus_url()
    return local is not None and _normalise_url(configured) == _normalise_url(local)


def _normalise_url(url: str) -> str:
    parts = urlsplit(url.strip())
    host = parts.hostname or ""
    if host == "localhost":
        host = "127.0.0.1"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))


def _httpx_reason(exc: httpx.HTTPError) -> str:
    cause = exc.__cause__ or exc.__context__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        return os_error_reason(cause)
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    if "Errno" in message:
        message = message.split("]", 1)[-1].strip()
    if message:
        return message[:1].lower() + message[1:]
    return exception_reason(exc)
