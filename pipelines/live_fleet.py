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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ingest.gateway.keys_file import add_key
from ingest.gateway.server import GatewayThread
from ingest.settings import Settings, TritonServerSettings
from ingest.simulator.activity_exporter import ActivityExporter, ActivityGpu
from ingest.stack import LocalStack
from ingest.triton.server import TritonServer
from ingest.triton_counters import register_triton_targets
from ingest.usage_consumer import register_tenants

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
    rate_per_s: float | None = None,
) -> Iterator[LiveFleet]:
    work_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        triton = TritonServer(
            work_dir / "triton",
            prefill_s_per_token=prefill_s_per_token,
            decode_s_per_token=decode_s_per_token,
        ).start()
        stack.callback(triton.stop)
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
        stack.callback(gateway.stop)
        exporter = ActivityExporter(
            [
                ActivityGpu(hostname=hostname, uuid=u, local_index=i)
                for i, u in enumerate(server.gpu_uuids)
            ],
            gateway.app.state.activity.inflight_by_gpu,
        ).start()
        stack.callback(exporter.stop)
        registered: list[Path] = []
        if register:
            local = LocalStack(settings)
            targets = local.prometheus_targets_dir
            registered.append(exporter.register_with_local_prometheus(targets))
            registered.extend(register_triton_targets(settings, [server]))
            for path in registered:
                stack.callback(path.unlink, missing_ok=True)
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
