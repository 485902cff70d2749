"""A live metered fleet on this machine: Triton + gateway + DCGM simulator + Prometheus.

`live_fleet` starts, in order:
1. a real Triton server (`ingest.triton.TritonServer`, CPU, the demo LLM model);
2. API keys for the given tenants (digests in the key file; the tenants registered so
   the usage consumer accepts them);
3. the metering gateway (`ingest.gateway.server.GatewayThread`) with that server in
   its `[gateway] servers`, publishing to the settings' Kafka through its spool;
4. an `ActivityExporter` for the server's GPUs, whose power follows the requests the
   gateway has in flight on them;
5. with `register`, Prometheus scrape targets for the exporter (job dcgm-exporter) and
   for Triton's metrics (job triton, label `triton_server`), on the local stack.

and stops them in reverse order. The live demo, the gateway's integration tests and
`bench/gateway.py` all use it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from ingest.endpoints import prometheus_url
from ingest.gateway.keys_file import add_key
from ingest.gateway.server import GatewayThread
from ingest.settings import Settings, TritonServerSettings
from ingest.simulator.activity_exporter import ActivityExporter, ActivityGpu, MeanConcurrency
from ingest.stack import LocalStack
from ingest.stack.process import wait_until
from ingest.triton.server import TritonServer
from ingest.triton_counters import register_triton_targets
from ingest.usage_consumer import register_tenants
from models.errors import ServiceError

#: The demo model's name on Triton and in the gateway.
DEMO_MODEL = "demo-llm"
DEFAULT_TENANTS = ("acme", "globex", "initech")


@dataclass
class LiveFleet:
    settings: Settings  # with the gateway's server filled in
    triton: TritonServer
    gateway: GatewayThread
    exporter: ActivityExporter
    keys: dict[str, str]  # tenant → API key (in memory only)
    server: TritonServerSettings
    registered: tuple[Path, ...]

    @property
    def gateway_url(self) -> str:
        return self.gateway.url

    def drain(self, timeout_s: float = 60.0) -> None:
        """Wait until the gateway's forwarder has delivered every spooled event."""
        forwarder = self.gateway.forwarder
        if not wait_until(lambda: forwarder.counters()["pending"] == 0, timeout_s=timeout_s):
            counters = forwarder.counters()
            raise ServiceError(
                f"gateway: {counters['pending']} usage events still spooled after "
                f"{timeout_s:g} s (Kafka up: {counters['kafka_up']}, "
                f"last error: {counters['last_error']})"
            )

    def wait_scraped(self, after_s: float | None = None, timeout_s: float = 60.0) -> None:
        """Wait until Prometheus holds a sample newer than `after_s` (default: now) of
        every GPU's energy counter and of the Triton server's request counter, so the
        telemetry and the counters cover everything served before `after_s`."""
        after_s = time.time() if after_s is None else after_s
        url = prometheus_url(self.settings)
        queries = [
            f'timestamp(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{UUID="{uuid}"}})'
            for uuid in self.server.gpu_uuids
        ]
        queries.append(
            f'timestamp(nv_inference_request_success{{triton_server="{self.server.server_name}"}})'
        )

        def newest(query: str) -> float:
            try:
                response = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=5)
                result = response.json()["data"]["result"]
            except (httpx.HTTPError, KeyError, ValueError):
                return 0.0
            return min((float(r["value"][1]) for r in result), default=0.0)

        if not wait_until(
            lambda: all(newest(q) > after_s for q in queries), timeout_s=timeout_s, interval_s=0.5
        ):
            raise ServiceError(
                f"Prometheus at {url} has not scraped the live fleet after "
                f"{datetime.fromtimestamp(after_s, UTC).isoformat()} within {timeout_s:g} s "
                f"(queries: {'; '.join(queries)})"
            )


def gpu_uuid(hostname: str, index: int) -> str:
    """A stable, well-formed UUID for a simulated GPU of `hostname`."""
    import uuid

    return f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{hostname}/{index}')}"


@contextlib.contextmanager
def live_fleet(
    settings: Settings,
    work_dir: Path,
    *,
    tenants: Sequence[str] = DEFAULT_TENANTS,
    hostname: str = "live-node-0",
    gpus: int = 1,
    prefill_s_per_token: float | None = None,
    decode_s_per_token: float | None = None,
    register: bool = True,
    stack: LocalStack | None = None,
    rate_per_s: float | None = None,
) -> Iterator[LiveFleet]:
    """Start the live fleet; `stack` is the local stack whose Prometheus scrapes it
    (default: the settings' own)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        triton = TritonServer(
            work_dir / "triton",
            prefill_s_per_token=prefill_s_per_token,
            decode_s_per_token=decode_s_per_token,
        ).start()
        cleanup.callback(triton.stop)
        server = TritonServerSettings(
            grpc_url=triton.grpc_url,
            metrics_url=triton.metrics_url,
            hostname=hostname,
            gpu_uuids=[gpu_uuid(hostname, i) for i in range(gpus)],
            models=[DEMO_MODEL],
        )
        gateway_settings = settings.gateway.model_copy(update={"servers": [server]})
        settings = settings.model_copy(update={"gateway": gateway_settings})
        now = datetime.now(UTC)
        keys: dict[str, str] = {}
        for tenant in tenants:
            key, _record = add_key(
                settings.api_keys_path, tenant, now, rate_per_s=rate_per_s, note="live fleet"
            )
            keys[tenant] = key
        register_tenants(settings, list(tenants))
        gateway = GatewayThread(settings, host="127.0.0.1", port=0).start()
        cleanup.callback(gateway.stop)
        exporter = ActivityExporter(
            [
                ActivityGpu(hostname=hostname, uuid=u, local_index=i)
                for i, u in enumerate(server.gpu_uuids)
            ],
            MeanConcurrency(gateway.app.state.activity.busy_seconds_by_gpu),
        ).start()
        cleanup.callback(exporter.stop)
        registered: list[Path] = []
        if register:
            local = stack or LocalStack(settings)
            targets = local.prometheus_targets_dir
            registered.append(exporter.register_with_local_prometheus(targets))
            registered.extend(register_triton_targets(settings, [server], stack=local))
            for path in registered:
                cleanup.callback(path.unlink, missing_ok=True)
        yield LiveFleet(settings, triton, gateway, exporter, keys, server, tuple(registered))


def live_rate_card_text() -> str:
    """The example rate card with the demo model priced as the 8B model it imitates, in
    every plan, so live traffic is billed under whichever plan a tenant is on."""
    from importlib import resources

    import yaml

    card = yaml.safe_load(resources.files("models").joinpath("rate_cards/example.yaml").read_text())
    for versions in card["plans"].values():
        for version in versions:
            models = version["models"]
            models.setdefault(DEMO_MODEL, models["llama-3.1-8b"])
    header = "# The example rate card, with the live demo's model priced as llama-3.1-8b.\n"
    return header + yaml.safe_dump(card, sort_keys=False)
