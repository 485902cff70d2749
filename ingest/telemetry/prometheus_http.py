"""Prometheus' HTTP query API: session, auth, retries with backoff, error messages.

prometheus-api-client provides the HTTP session (auth, headers, TLS verification);
the requests go through that session raw, POST-ed (a batch's matcher is long), with
retries and error classification of our own (its `custom_query` would parse with
`requests`' `.json()` and retry inside urllib3 regardless of our settings).

Errors: Prometheus unreachable or answering 5xx/429 is retried with exponential
backoff (`telemetry.retries`, `telemetry.backoff_s`), then a one-line ServiceError
names the URL and the reason; a 4xx (bad query) fails at once; a malformed answer is a
one-line ServiceError naming the query.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import urlsplit, urlunsplit

import orjson
import requests
from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

from ingest.endpoints import prometheus_auth, prometheus_url
from ingest.settings import Settings
from ingest.stack.process import os_error_reason
from ingest.telemetry.parsing import first_line
from models.errors import ServiceError


def _display_url(url: str) -> str:
    """The URL without credentials, for messages and manifests."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def _connection_reason(exc: BaseException) -> str:
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return os_error_reason(current)
        for nested in (current.__cause__, current.__context__, getattr(current, "reason", None)):
            if isinstance(nested, BaseException):
                stack.append(nested)
        stack.extend(a for a in current.args if isinstance(a, BaseException))
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        message = errno.group(1).strip()
        return message[:1].lower() + message[1:]
    return first_line(text) or type(exc).__name__


def _error_text(response: requests.Response) -> str:
    """`: <Prometheus' error>` from an error answer, or an excerpt of its body."""
    try:
        document = orjson.loads(response.content)
        if isinstance(document, dict) and document.get("error"):
            return f": {first_line(str(document['error']))}"
    except orjson.JSONDecodeError:
        pass
    text = response.content[:200].decode("utf-8", "replace")
    return f": {first_line(text)}" if text.strip() else ""


class _Cancelled(Exception):
    """The pull is being abandoned (another hour failed); nothing to report."""


class PrometheusClient:
    """Prometheus' HTTP API through prometheus-api-client's session."""

    def __init__(self, settings: Settings) -> None:
        self.url = prometheus_url(settings)
        self.display_url = _display_url(self.url)
        auth = prometheus_auth(settings)
        session = requests.Session()
        session.verify = auth.verify
        # Retries are ours (backoff from settings, 5xx/429 only): urllib3's are off.
        self.client = PrometheusConnect(
            url=self.url,
            headers=dict(auth.headers),
            disable_ssl=not auth.verify,
            retry=Retry(total=0, raise_on_status=False),
            auth=auth.basic_auth,
            session=session,
            timeout=settings.prometheus.timeout_s,
            method="POST",
        )
        self.session = session
        self.headers = dict(auth.headers)
        if _is_loopback(self.url):
            self.headers["Accept-Encoding"] = "identity"  # gzip only costs CPU here
        self.timeout_s = settings.prometheus.timeout_s
        self.retries = settings.telemetry.retries
        self.backoff_s = settings.telemetry.backoff_s
        self.cancelled = threading.Event()

    def close(self) -> None:
        self.client.close()

    def post(self, path: str, data: dict[str, str], what: str) -> bytes:
        """POST a form to the API; the body of a 200 answer, else a ServiceError."""
        attempts = self.retries + 1
        reason = ""
        failing = False
        for attempt in range(attempts):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                if self.cancelled.wait(delay):
                    raise _Cancelled
            if self.cancelled.is_set():
                raise _Cancelled
            try:
                response = self.session.post(
                    f"{self.url}{path}",
                    data=data,
                    headers=self.headers,
                    auth=self.client.auth,
                    timeout=self.timeout_s,
                )
            except requests.Timeout:
                reason, failing = f"no answer within {self.timeout_s:g} s", False
                continue
            except requests.ConnectionError as exc:
                reason, failing = _connection_reason(exc), False
                continue
            except requests.RequestException as exc:
                raise ServiceError(
                    f"Prometheus at {self.display_url}: {what}: {_connection_reason(exc)}"
                ) from None
            status = response.status_code
            if status == 200:
                return response.content
            if status == 429 or status >= 500:
                reason, failing = f"HTTP {status}{_error_text(response)}", True
                continue
            if status in (401, 403):
                raise ServiceError(
                    f"Prometheus at {self.display_url} refused the credentials (HTTP {status}); "
                    "check GPULEDGER_PROMETHEUS__BEARER_TOKEN or __USERNAME/__PASSWORD"
                )
            hint = ""
            if status == 422:
                hint = " (lower telemetry.series_per_query or telemetry.query_window_s)"
            raise ServiceError(
                f"Prometheus at {self.display_url} rejected {what}: "
                f"HTTP {status}{_error_text(response)}{hint}"
            )
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        if failing:
            raise ServiceError(
                f"Prometheus at {self.display_url} is failing: {reason} (after {tries})"
            )
        raise ServiceError(
            f"Prometheus at {self.display_url} is unreachable: {reason} (after {tries})"
        )

    def query(self, query: str, eval_ms: int, what: str) -> bytes:
        return self.post("/api/v1/query", {"query": query, "time": f"{eval_ms / 1000:.3f}"}, what)

    def malformed(self, what: str, why: str) -> ServiceError:
        return ServiceError(
            f"Prometheus at {self.display_url} answered {what} with a malformed response: {why}"
        )
