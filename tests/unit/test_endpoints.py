"""Endpoint resolution and the one-line errors of ingest/endpoints.py.

No broker or Prometheus runs here: a "running local stack" is a forged state file
naming this test process (which passes the PID, command-line and start-time checks),
and unreachable endpoints are closed ports or tiny in-process servers.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from ingest.endpoints import (
    check_kafka,
    check_prometheus,
    is_local_stack_prometheus,
    kafka_bootstrap_servers,
    kafka_client_options,
    parse_bootstrap_servers,
    prometheus_auth,
    prometheus_url,
)
from ingest.settings import Settings
from ingest.stack import LocalStack
from ingest.stack.process import ProcessRecord, find_free_port, utc_now, write_record
from models.errors import InputError, ServiceError

SettingsFactory = Callable[..., Settings]


def _pretend_stack_runs(settings: Settings, service: str, port: int) -> None:
    """A state file for `service` naming this process: liveness says "ours"."""
    me = psutil.Process()
    stack_dir = LocalStack(settings).stack_dir
    write_record(
        stack_dir / f"{service}.json",
        ProcessRecord(
            service=service,
            pid=os.getpid(),
            port=port,
            binary=me.cmdline()[0],
            argv=tuple(me.cmdline()),
            started_at=utc_now(),
            log_path=stack_dir / f"{service}.log",
            create_time=me.create_time(),
        ),
    )


def _closed_port() -> int:
    return find_free_port()


def _assert_one_line(error: ServiceError, *names: str) -> None:
    assert "\n" not in error.message
    for name in names:
        assert name in error.message, error.message


# -- resolution order ---------------------------------------------------------------------


def test_configured_kafka_wins_over_the_local_stack(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(kafka={"bootstrap_servers": " broker-1:9093,broker-2:9093 "})
    _pretend_stack_runs(settings, "kafka", 40001)
    assert kafka_bootstrap_servers(settings) == "broker-1:9093,broker-2:9093"


def test_local_stack_kafka_when_nothing_is_configured(isolated_settings: Settings) -> None:
    _pretend_stack_runs(isolated_settings, "kafka", 40002)
    assert kafka_bootstrap_servers(isolated_settings) == "127.0.0.1:40002"


def test_no_kafka_anywhere_says_what_to_do(isolated_settings: Settings) -> None:
    with pytest.raises(ServiceError) as caught:
        kafka_bootstrap_servers(isolated_settings)
    assert caught.value.message == (
        "no Kafka configured: run `gpuledger stack up` or set GPULEDGER_KAFKA__BOOTSTRAP_SERVERS"
    )
    assert caught.value.exit_code == 3


def test_a_stale_local_stack_is_not_used(isolated_settings: Settings) -> None:
    stack_dir = LocalStack(isolated_settings).stack_dir
    write_record(
        stack_dir / "kafka.json",
        ProcessRecord(
            service="kafka",
            pid=os.getpid(),
            port=40003,
            binary="/opt/tansu",
            argv=("/opt/tansu", "broker"),  # not this process's command line
            started_at=utc_now(),
            log_path=stack_dir / "kafka.log",
        ),
    )
    with pytest.raises(ServiceError, match="no Kafka configured"):
        kafka_bootstrap_servers(isolated_settings)


def test_configured_prometheus_wins_and_loses_its_trailing_slash(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory(prometheus={"url": "https://prom.example.com/prefix/"})
    _pretend_stack_runs(settings, "prometheus", 40004)
    assert prometheus_url(settings) == "https://prom.example.com/prefix"
    assert not is_local_stack_prometheus(settings)


def test_local_stack_prometheus_when_nothing_is_configured(isolated_settings: Settings) -> None:
    _pretend_stack_runs(isolated_settings, "prometheus", 40005)
    assert prometheus_url(isolated_settings) == "http://127.0.0.1:40005"
    assert is_local_stack_prometheus(isolated_settings)


def test_no_prometheus_anywhere_says_what_to_do(isolated_settings: Settings) -> None:
    with pytest.raises(ServiceError) as caught:
        prometheus_url(isolated_settings)
    assert caught.value.message == (
        "no Prometheus configured: run `gpuledger stack up` or set GPULEDGER_PROMETHEUS__URL"
    )


@pytest.mark.parametrize(
    "configured",
    [
        "http://127.0.0.1:40006",
        "http://127.0.0.1:40006/",
        "http://localhost:40006",
        "HTTP://127.0.0.1:40006",
    ],
)
def test_configured_url_equal_to_the_local_stack_counts_as_local(
    settings_factory: SettingsFactory, configured: str
) -> None:
    settings = settings_factory(prometheus={"url": configured})
    _pretend_stack_runs(settings, "prometheus", 40006)
    assert is_local_stack_prometheus(settings)


def test_unset_url_is_local_even_with_no_stack(isolated_settings: Settings) -> None:
    assert is_local_stack_prometheus(isolated_settings)


def test_configured_url_with_no_stack_is_not_local(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(prometheus={"url": "http://127.0.0.1:40007"})
    assert not is_local_stack_prometheus(settings)


# -- client options -----------------------------------------------------------------------


def test_kafka_options_for_a_secured_cluster(
    settings_factory: SettingsFactory, tmp_path: Path
) -> None:
    settings = settings_factory(
        kafka={
            "bootstrap_servers": "broker:9094",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "ledger",
            "sasl_password": "s3cret",
            "ssl_cafile": str(tmp_path / "ca.pem"),
            "request_timeout_s": 7.5,
        }
    )
    assert kafka_client_options(settings) == {
        "bootstrap_servers": "broker:9094",
        "request_timeout_ms": 7500,
        "bootstrap_timeout_ms": 7500,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "ledger",
        "sasl_plain_password": "s3cret",
        "ssl_cafile": str(tmp_path / "ca.pem"),
    }


def test_kafka_options_leave_out_what_is_unset(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(kafka={"bootstrap_servers": "broker:9092"})
    assert kafka_client_options(settings) == {
        "bootstrap_servers": "broker:9092",
        "request_timeout_ms": 10000,
        "bootstrap_timeout_ms": 10000,
        "security_protocol": "PLAINTEXT",
    }


def test_kafka_options_for_the_local_stack_are_plaintext(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(kafka={"sasl_username": "ignored", "security_protocol": "SASL_SSL"})
    _pretend_stack_runs(settings, "kafka", 40008)
    assert kafka_client_options(settings) == {
        "bootstrap_servers": "127.0.0.1:40008",
        "request_timeout_ms": 10000,
        "bootstrap_timeout_ms": 10000,
    }


def test_prometheus_bearer_token(settings_factory: SettingsFactory) -> None:
    auth = prometheus_auth(
        settings_factory(prometheus={"bearer_token": "tok", "verify_tls": False})
    )
    assert auth.headers == {"Authorization": "Bearer tok"}
    assert auth.basic_auth is None
    assert auth.httpx_kwargs() == {"headers": {"Authorization": "Bearer tok"}, "verify": False}


def test_prometheus_basic_auth(settings_factory: SettingsFactory) -> None:
    auth = prometheus_auth(settings_factory(prometheus={"username": "u", "password": "p"}))
    assert auth.basic_auth == ("u", "p") and auth.headers == {} and auth.verify
    assert auth.httpx_kwargs()["auth"] == ("u", "p")


def test_prometheus_auth_refuses_two_kinds_at_once(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(prometheus={"bearer_token": "t", "username": "u"})
    with pytest.raises(InputError, match="either bearer_token or username/password"):
        prometheus_auth(settings)


def test_prometheus_password_needs_a_username(settings_factory: SettingsFactory) -> None:
    with pytest.raises(InputError, match=r"password is set without prometheus\.username"):
        prometheus_auth(settings_factory(prometheus={"password": "p"}))


@pytest.mark.parametrize(
    ("servers", "expected"),
    [
        ("a:9092", [("a", 9092)]),
        ("a:1, b:2", [("a", 1), ("b", 2)]),
        ("broker", [("broker", 9092)]),
        ("[::1]:9093,", [("::1", 9093)]),
    ],
)
def test_parse_bootstrap_servers(servers: str, expected: list[tuple[str, int]]) -> None:
    assert parse_bootstrap_servers(servers) == expected


@pytest.mark.parametrize("servers", ["a:b", "a:0", ",", ":9092"])
def test_parse_bootstrap_servers_rejects(servers: str) -> None:
    with pytest.raises(InputError, match=r"kafka\.bootstrap_servers"):
        parse_bootstrap_servers(servers)


# -- reachability checks ------------------------------------------------------------------


def test_unreachable_kafka_is_one_line_and_quick(settings_factory: SettingsFactory) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    settings = settings_factory(kafka={"bootstrap_servers": address})
    started = time.monotonic()
    with pytest.raises(ServiceError) as caught:
        check_kafka(settings, timeout_s=2)
    assert time.monotonic() - started < 3
    assert caught.value.message == f"Kafka at {address} is unreachable: connection refused"


@pytest.fixture
def silent_tcp_server() -> Iterator[int]:
    """Accepts connections and never answers: a port that is open but is not Kafka."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_a_port_that_is_not_kafka_fails_within_the_timeout(
    settings_factory: SettingsFactory, silent_tcp_server: int
) -> None:
    address = f"127.0.0.1:{silent_tcp_server}"
    settings = settings_factory(kafka={"bootstrap_servers": address})
    started = time.monotonic()
    with pytest.raises(ServiceError) as caught:
        check_kafka(settings, timeout_s=1)
    assert time.monotonic() - started < 5
    _assert_one_line(caught.value, f"Kafka at {address} is unreachable: ")


def test_unreachable_prometheus_is_one_line_and_quick(settings_factory: SettingsFactory) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    settings = settings_factory(prometheus={"url": url})
    started = time.monotonic()
    with pytest.raises(ServiceError) as caught:
        check_prometheus(settings, timeout_s=2)
    assert time.monotonic() - started < 3
    assert caught.value.message == f"Prometheus at {url} is unreachable: connection refused"


@pytest.fixture
def fake_prometheus() -> Iterator[Callable[[int, object], str]]:
    """`serve(status, body) -> url`: an HTTP server answering every GET the same way."""
    servers: list[http.server.HTTPServer] = []

    def serve(status: int, body: object) -> str:
        payload = json.dumps(body).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_prometheus_answering_a_query_passes(
    settings_factory: SettingsFactory, fake_prometheus: Callable[[int, object], str]
) -> None:
    url = fake_prometheus(200, {"status": "success", "data": {"resultType": "scalar"}})
    check_prometheus(settings_factory(prometheus={"url": url}))


def test_prometheus_refusing_credentials(
    settings_factory: SettingsFactory, fake_prometheus: Callable[[int, object], str]
) -> None:
    url = fake_prometheus(401, {"status": "error"})
    with pytest.raises(ServiceError) as caught:
        check_prometheus(settings_factory(prometheus={"url": url, "bearer_token": "bad"}))
    _assert_one_line(caught.value, f"Prometheus at {url} refused the credentials (HTTP 401)")


def test_something_else_than_prometheus(
    settings_factory: SettingsFactory, fake_prometheus: Callable[[int, object], str]
) -> None:
    url = fake_prometheus(404, {"detail": "not found"})
    with pytest.raises(ServiceError) as caught:
        check_prometheus(settings_factory(prometheus={"url": url}))
    _assert_one_line(caught.value, f"Prometheus at {url} answered HTTP 404")
