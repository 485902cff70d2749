"""Decoding and checking a batch of usage-event payloads, vectorised in DuckDB.

The consumer must keep up with Kafka (100 k events/s here), so payloads are not parsed
one by one in Python: a batch goes through one DuckDB query (C++, off the GIL) that
decodes every field and applies every rule of the v1 contract. `models.usage_event` stays
the single source of truth: a property test checks that this query and the pydantic
model agree on valid/invalid for random and mutated events, and the rows the query
rejects (rare) are parsed again by pydantic to name the field and the rule.

Beyond the contract, policy rules quarantine events the contract admits but billing
must not: token counts above any context window, an event time more than a day
ahead of ingestion, a tenant missing from the registry.

Quarantine reasons (column `quarantine_reason`):
- `invalid_json`        payload not UTF-8, not JSON, or not a JSON object
- `schema_violation`    breaks a contract rule (detail names field and rule)
- `negative_tokens`     a token count below zero
- `end_before_arrival`  end_time earlier than arrival_time
- `absurd_tokens`       a token count above the configured maximum
- `future_event_time`   event time further ahead of ingestion than allowed
- `unknown_tenant`      subject not in the tenant registry
- `conflicting_duplicate` (assigned later, when copies of one id disagree)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from models.usage_event import (
    MAX_TOKENS,
    RFC3339_PATTERN,
    USAGE_EVENT_TYPE_V1,
    InvalidUsageEvent,
    parse_usage_event,
)

QUARANTINE_REASONS = (
    "invalid_json",
    "schema_violation",
    "negative_tokens",
    "end_before_arrival",
    "absurd_tokens",
    "future_event_time",
    "unknown_tenant",
    "conflicting_duplicate",
)

ENVELOPE_KEYS = (
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "subject",
    "datacontenttype",
    "dataschema",
    "data",
)
ENVELOPE_REQUIRED = ("specversion", "id", "source", "type", "time", "subject", "data")
DATA_KEYS = (
    "model",
    "model_version",
    "prompt_tokens",
    "completion_tokens",
    "cached_prompt_tokens",
    "arrival_time",
    "first_token_time",
    "end_time",
    "hostname",
    "gpu_uuids",
    "status",
)
DATA_REQUIRED = tuple(k for k in DATA_KEYS if k != "cached_prompt_tokens")

_TS = pa.timestamp("us", tz="UTC")

#: The input of `validate_batch`: Kafka records as they were consumed.
BATCH_SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("kafka_ts", _TS),
        ("key", pa.binary()),
        ("payload", pa.binary()),
    ]
)

#: One landed Kafka record: where it came from, the payload, what it decoded to, and
#: why it was quarantined (null for a valid event).
LANDING_SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("kafka_ts", _TS),
        ("key", pa.binary()),
        ("payload", pa.binary()),
        ("ingested_at", _TS),
        ("consumer", pa.string()),
        ("quarantine_reason", pa.string()),
        ("quarantine_detail", pa.string()),
        ("event_id", pa.string()),
        ("source", pa.string()),
        ("event_time", _TS),
        ("tenant", pa.string()),
        ("model", pa.string()),
        ("model_version", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cached_prompt_tokens", pa.int64()),
        ("arrival_time", _TS),
        ("first_token_time", _TS),
        ("end_time", _TS),
        ("hostname", pa.string()),
        ("gpu_uuids", pa.list_(pa.string())),
        ("status", pa.string()),
    ]
)


@dataclass(frozen=True)
class Policy:
    max_prompt_tokens: int
    max_completion_tokens: int
    max_future_s: float
    known_tenants: frozenset[str] | None  # None: every tenant is known


def _sql_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


#: The document is parsed by two `json_transform` calls (each JSON function call parses
#: its input again, so per-field extraction costs a parse per field): one keeps every
#: value as JSON text, to check its JSON type by its first character; one converts to
#: the target types, for the values. Both ignore unknown keys, which `json_keys` finds.
_STRING_FIELDS = ("specversion", "id", "source", "type", "time", "subject", "datacontenttype")
_DATA_STRING_FIELDS = ("model", "model_version", "arrival_time", "first_token_time", "end_time",
                       "hostname", "status")  # fmt: skip
_DATA_INT_FIELDS = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens")


def _json_sql(document: dict[str, object]) -> str:
    return json.dumps(document).replace("'", "''")


#: The envelope with every value kept as JSON text (to check JSON types).
_RAW_STRUCTURE = _json_sql(
    {**{n: "JSON" for n in _STRING_FIELDS}, "dataschema": "JSON", "data": "JSON"}
)
#: The data object with every value kept as JSON text.
_DATA_RAW_STRUCTURE = _json_sql(
    {n: "JSON" for n in (*_DATA_STRING_FIELDS, *_DATA_INT_FIELDS, "gpu_uuids")}
)
#: The whole document converted to the target types (for the values).
_TYPED_STRUCTURE = _json_sql(
    {
        **{n: "VARCHAR" for n in _STRING_FIELDS},
        "dataschema": "VARCHAR",
        "data": {
            **{n: "VARCHAR" for n in _DATA_STRING_FIELDS},
            **{n: "BIGINT" for n in _DATA_INT_FIELDS},
            "gpu_uuids": ["VARCHAR"],
        },
    }
)


def _validation_sql() -> str:
    env_keys = _sql_list(ENVELOPE_KEYS)
    data_keys = _sql_list(DATA_KEYS)
    uuid_pattern = r"^(GPU|MIG)-[0-9A-Za-z-]+(/[0-9]+)*$"

    def is_str(path: str) -> str:
        return f"(left({path}, 1) = '\"')"

    def string(name: str, lo: int, hi: int, *, data: bool = False) -> str:
        raw = f"dr.{name}" if data else f"r.{name}"
        value = f"v.data.{name}" if data else f"v.{name}"
        return f"({is_str(raw)} AND length({value}) BETWEEN {lo} AND {hi})"

    def integer(name: str) -> str:
        return (
            f"(regexp_full_match(dr.{name}, '-?(0|[1-9][0-9]*)') "
            f"AND v.data.{name} BETWEEN 0 AND {MAX_TOKENS})"
        )

    def stamp(raw: str, value: str, ts: str) -> str:
        return (
            f"({is_str(raw)} AND regexp_full_match({value}, '{RFC3339_PATTERN}') "
            f"AND {ts} IS NOT NULL)"
        )

    # A JSON null may come back from json_transform as SQL NULL or as 'null'; which
    # keys are present at all is checked on the key lists.
    null_first = "coalesce(dr.first_token_time, 'null') = 'null'"
    contract = " AND ".join(
        [
            f"list_has_all({env_keys}, env_keys)",
            f"list_has_all(env_keys, {_sql_list(ENVELOPE_REQUIRED)})",
            f"{is_str('r.specversion')} AND v.specversion = '1.0'",
            string("id", 1, 128),
            r"regexp_full_match(v.id, '[\x21-\x7e]+')",
            string("source", 1, 512),
            f"{is_str('r.type')} AND v.type = '{USAGE_EVENT_TYPE_V1}'",
            stamp("r.time", "v.time", "ts_time"),
            f"{is_str('r.subject')}",
            "regexp_full_match(v.subject, '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$')",
            "(NOT list_contains(env_keys, 'datacontenttype') OR "
            f"({is_str('r.datacontenttype')} AND v.datacontenttype = 'application/json'))",
            f"(NOT list_contains(env_keys, 'dataschema') OR {is_str('r.dataschema')} "
            "OR coalesce(r.dataschema, 'null') = 'null')",
            "left(r.data, 1) = '{'",
            f"list_has_all({data_keys}, data_keys)",
            f"list_has_all(data_keys, {_sql_list(DATA_REQUIRED)})",
            string("model", 1, 256, data=True),
            string("model_version", 1, 64, data=True),
            integer("prompt_tokens"),
            integer("completion_tokens"),
            "(NOT list_contains(data_keys, 'cached_prompt_tokens') OR "
            f"{integer('cached_prompt_tokens')})",
            stamp("dr.arrival_time", "v.data.arrival_time", "ts_arrival"),
            f"({null_first} OR "
            + stamp("dr.first_token_time", "v.data.first_token_time", "ts_first")
            + ")",
            stamp("dr.end_time", "v.data.end_time", "ts_end"),
            string("hostname", 1, 253, data=True),
            "left(dr.gpu_uuids, 1) = '['",
            "len(v.data.gpu_uuids) BETWEEN 1 AND 64",
            "list_bool_and(list_transform(v.data.gpu_uuids, lambda u: "
            f"regexp_full_match(u, '{uuid_pattern}')))",
            "len(list_distinct(v.data.gpu_uuids)) = len(v.data.gpu_uuids)",
            f"{is_str('dr.status')}",
            "v.data.status IN ('ok', 'error', 'cancelled')",
            "coalesce(v.data.cached_prompt_tokens, 0) <= v.data.prompt_tokens",
            "ts_end >= ts_arrival",
            f"({null_first} OR ts_first BETWEEN ts_arrival AND ts_end)",
            f"(v.data.completion_tokens = 0 OR NOT {null_first})",
        ]
    )
    # DuckDB may evaluate every rule on every row, so none may raise on a row another
    # rule rejects: TRY turns an error into NULL, and COALESCE(…, false) NULL into "no".
    return f"""
WITH decoded AS (
    SELECT *, TRY(decode(payload)) AS txt FROM batch
), parsed AS (
    SELECT *,
        COALESCE(txt IS NOT NULL AND json_valid(txt)
                 AND regexp_matches(txt, '^\\s*\\{{'), false) AS is_object
    FROM decoded
), transformed AS (
    SELECT *,
        CASE WHEN is_object THEN TRY(json_keys(txt)) END AS env_keys,
        CASE WHEN is_object THEN TRY(json_transform(txt, '{_RAW_STRUCTURE}')) END AS r,
        CASE WHEN is_object THEN TRY(json_transform(txt, '{_TYPED_STRUCTURE}')) END AS v
    FROM parsed
), data AS (
    SELECT *,
        CASE WHEN left(r.data, 1) = '{{' THEN TRY(json_keys(r.data)) ELSE []::VARCHAR[] END
            AS data_keys,
        CASE WHEN left(r.data, 1) = '{{' THEN TRY(json_transform(r.data, '{_DATA_RAW_STRUCTURE}'))
            END AS dr,
        TRY_CAST(v.time AS TIMESTAMPTZ) AS ts_time,
        TRY_CAST(v.data.arrival_time AS TIMESTAMPTZ) AS ts_arrival,
        TRY_CAST(v.data.first_token_time AS TIMESTAMPTZ) AS ts_first,
        TRY_CAST(v.data.end_time AS TIMESTAMPTZ) AS ts_end
    FROM transformed
), verdict AS (
    SELECT *, CASE WHEN is_object THEN COALESCE(TRY({contract}), false) ELSE false END
        AS is_valid
    FROM data
)
SELECT
    topic, partition, "offset", kafka_ts, key, payload,
    is_object, is_valid,
    v.id AS event_id,
    v.source AS source,
    ts_time AS event_time,
    v.subject AS tenant,
    v.data.model AS model,
    v.data.model_version AS model_version,
    v.data.prompt_tokens AS prompt_tokens,
    v.data.completion_tokens AS completion_tokens,
    CASE WHEN is_valid THEN coalesce(v.data.cached_prompt_tokens, 0)
         ELSE v.data.cached_prompt_tokens END AS cached_prompt_tokens,
    ts_arrival AS arrival_time,
    ts_first AS first_token_time,
    ts_end AS end_time,
    v.data.hostname AS hostname,
    v.data.gpu_uuids AS gpu_uuids,
    v.data.status AS status
FROM verdict
"""


_FULL_SQL = _validation_sql()


def _fast_sql() -> str:
    """One parse per row for events in the canonical serialisation, which is how
    pydantic (the gateway) and Polars (the simulator) write them: compact, keys in the
    contract's order, every optional key present.

    The document is converted once to typed values, and the canonical text is rebuilt
    from them: when it equals the payload byte for byte, the payload has exactly the
    contract's keys, in order, with the contract's JSON types, so only the values remain
    to be checked. Anything else (other key order, whitespace, escapes, missing optional
    keys, wrong types) takes the full check. The canonical text also serves as the
    content fingerprint: copies of one event with equal content serialise equally.
    """
    uuid_pattern = r"^(GPU|MIG)-[0-9A-Za-z-]+(/[0-9]+)*$"

    # Plain concatenation, no escaping: a value holding a quote, a backslash or a control
    # character was escaped in the payload, so the rebuilt text differs and the row takes
    # the full check; equal texts mean the payload is exactly this.
    def text(expr: str) -> str:
        return f"""concat('"', {expr}, '"')"""

    def nullable(expr: str) -> str:
        return f"CASE WHEN {expr} IS NULL THEN 'null' ELSE {text(expr)} END"

    def number(expr: str) -> str:
        return f"CAST({expr} AS VARCHAR)"

    # One variadic concat: chained || copies the growing string at every step.
    pieces = [
        """'{"specversion":'""", text("v.specversion"),
        """',"id":'""", text("v.id"),
        """',"source":'""", text("v.source"),
        """',"type":'""", text("v.type"),
        """',"time":'""", text("v.time"),
        """',"subject":'""", text("v.subject"),
        """',"datacontenttype":'""", text("v.datacontenttype"),
        """',"dataschema":'""", nullable("v.dataschema"),
        """',"data":{"model":'""", text("v.data.model"),
        """',"model_version":'""", text("v.data.model_version"),
        """',"prompt_tokens":'""", number("v.data.prompt_tokens"),
        """',"completion_tokens":'""", number("v.data.completion_tokens"),
        """',"cached_prompt_tokens":'""", number("v.data.cached_prompt_tokens"),
        """',"arrival_time":'""", text("v.data.arrival_time"),
        """',"first_token_time":'""", nullable("v.data.first_token_time"),
        """',"end_time":'""", text("v.data.end_time"),
        """',"hostname":'""", text("v.data.hostname"),
        """',"gpu_uuids":["'""", "array_to_string(v.data.gpu_uuids, '\",\"')", """'"]'""",
        """',"status":'""", text("v.data.status"), """'}}'""",
    ]  # fmt: skip
    canonical = "concat(" + ", ".join(pieces) + ")"

    def stamp(value: str, ts: str) -> str:
        return f"(regexp_full_match({value}, '{RFC3339_PATTERN}') AND {ts} IS NOT NULL)"

    values_ok = " AND ".join(
        [
            "v.specversion = '1.0'",
            "length(v.id) BETWEEN 1 AND 128",
            r"regexp_full_match(v.id, '[\x21-\x7e]+')",
            "length(v.source) BETWEEN 1 AND 512",
            f"v.type = '{USAGE_EVENT_TYPE_V1}'",
            stamp("v.time", "ts_time"),
            "regexp_full_match(v.subject, '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$')",
            "v.datacontenttype = 'application/json'",
            "length(v.data.model) BETWEEN 1 AND 256",
            "length(v.data.model_version) BETWEEN 1 AND 64",
            f"v.data.prompt_tokens BETWEEN 0 AND {MAX_TOKENS}",
            f"v.data.completion_tokens BETWEEN 0 AND {MAX_TOKENS}",
            f"v.data.cached_prompt_tokens BETWEEN 0 AND {MAX_TOKENS}",
            stamp("v.data.arrival_time", "ts_arrival"),
            f"(v.data.first_token_time IS NULL OR {stamp('v.data.first_token_time', 'ts_first')})",
            stamp("v.data.end_time", "ts_end"),
            "length(v.data.hostname) BETWEEN 1 AND 253",
            "len(v.data.gpu_uuids) BETWEEN 1 AND 64",
            # One regex over the joined list: elements can't contain the separator.
            f"regexp_full_match(array_to_string(v.data.gpu_uuids, ' '), "
            f"'{uuid_pattern[1:-1]}( {uuid_pattern[1:-1]})*')",
            "len(list_distinct(v.data.gpu_uuids)) = len(v.data.gpu_uuids)",
            "v.data.status IN ('ok', 'error', 'cancelled')",
            "v.data.cached_prompt_tokens <= v.data.prompt_tokens",
            "ts_end >= ts_arrival",
            "(v.data.first_token_time IS NULL OR ts_first BETWEEN ts_arrival AND ts_end)",
            "(v.data.completion_tokens = 0 OR v.data.first_token_time IS NOT NULL)",
        ]
    )
    return f"""
WITH decoded AS (
    SELECT *, TRY(decode(payload)) AS txt FROM batch
), typed AS (
    SELECT *, TRY(json_transform(txt, '{_TYPED_STRUCTURE}')) AS v FROM decoded
), timed AS (
    SELECT *,
        TRY_CAST(v.time AS TIMESTAMPTZ) AS ts_time,
        TRY_CAST(v.data.arrival_time AS TIMESTAMPTZ) AS ts_arrival,
        TRY_CAST(v.data.first_token_time AS TIMESTAMPTZ) AS ts_first,
        TRY_CAST(v.data.end_time AS TIMESTAMPTZ) AS ts_end,
        TRY({canonical}) AS canonical
    FROM typed
)
SELECT
    topic, partition, "offset", kafka_ts, key, payload,
    coalesce(txt = canonical, false) AS canonical_ok,
    coalesce(TRY({values_ok}), false) AS values_ok,
    v.id AS event_id,
    v.source AS source,
    ts_time AS event_time,
    v.subject AS tenant,
    v.data.model AS model,
    v.data.model_version AS model_version,
    v.data.prompt_tokens AS prompt_tokens,
    v.data.completion_tokens AS completion_tokens,
    coalesce(v.data.cached_prompt_tokens, 0) AS cached_prompt_tokens,
    ts_arrival AS arrival_time,
    ts_first AS first_token_time,
    ts_end AS end_time,
    v.data.hostname AS hostname,
    v.data.gpu_uuids AS gpu_uuids,
    v.data.status AS status
FROM timed
"""


_FAST_SQL = _fast_sql()


def _reason_for(payload: bytes) -> tuple[str, str]:
    """Name the broken rule of a payload the vectorised check rejected."""
    try:
        parse_usage_event(payload)
    except InvalidUsageEvent as exc:
        if exc.field == "(payload)":
            return "invalid_json", exc.message
        if exc.rule == "greater_than_equal" and exc.field.endswith("_tokens"):
            return "negative_tokens", exc.message
        if exc.rule == "time_order" and "end_time is before arrival_time" in exc.detail:
            return "end_before_arrival", exc.message
        return "schema_violation", exc.message
    # pydantic accepts what the query rejected: a disagreement the property tests are
    # there to prevent. Quarantine rather than guess, and say so.
    return "schema_violation", "usage event: rejected by the vectorised validator only"


class BatchValidator:
    """Validates batches in one private DuckDB connection (one per thread)."""

    def __init__(self, policy: Policy, *, threads: int = 1) -> None:
        self.policy = policy
        self._con = duckdb.connect()
        self._con.execute("SET TimeZone = 'UTC'")
        self._con.execute(f"SET threads = {threads}")

    def close(self) -> None:
        self._con.close()

    def _contract_valid(self, checked: pa.Table) -> list[bool]:
        """Valid per the v1 contract: the fast verdict where the payload is canonical,
        else the full check (only on those rows)."""
        canonical = checked.column("canonical_ok").to_pylist()
        valid = checked.column("values_ok").to_pylist()
        others = [i for i, ok in enumerate(canonical) if not ok]
        if others:
            subset = checked.select(BATCH_SCHEMA.names).take(pa.array(others, pa.int64()))
            self._con.register("batch", subset)
            try:
                full = self._con.sql(_FULL_SQL).select("is_valid").to_arrow_table()
            finally:
                self._con.unregister("batch")
            for i, ok in zip(others, full.column(0).to_pylist(), strict=True):
                valid[i] = bool(ok)
        return [bool(v) for v in valid]

    def validate(self, batch: pa.Table, *, ingested_at: datetime, consumer: str) -> pa.Table:
        """Landing rows (LANDING_SCHEMA) for a batch of records (BATCH_SCHEMA)."""
        self._con.register("batch", batch)
        try:
            checked = self._con.sql(_FAST_SQL).to_arrow_table()
        finally:
            self._con.unregister("batch")
        n = checked.num_rows
        valid = self._contract_valid(checked)
        reasons: list[str | None] = [None] * n
        details: list[str | None] = [None] * n
        payloads = checked.column("payload")
        for i, ok in enumerate(valid):
            if not ok:
                reasons[i], details[i] = _reason_for(payloads[i].as_py())
        self._apply_policy(checked, valid, reasons, details, ingested_at)
        columns = {
            "topic": checked.column("topic"),
            "partition": checked.column("partition"),
            "offset": checked.column("offset"),
            "kafka_ts": checked.column("kafka_ts"),
            "key": checked.column("key"),
            "payload": payloads,
            "ingested_at": pa.repeat(pa.scalar(ingested_at, _TS), n),
            "consumer": pa.repeat(pa.scalar(consumer, pa.string()), n),
            "quarantine_reason": pa.array(reasons, pa.string()),
            "quarantine_detail": pa.array(details, pa.string()),
        }
        for name in LANDING_SCHEMA.names:
            if name not in columns:
                columns[name] = checked.column(name)
        table = pa.table({name: columns[name] for name in LANDING_SCHEMA.names})
        return table.cast(LANDING_SCHEMA)

    def _apply_policy(
        self,
        checked: pa.Table,
        valid: list[bool],
        reasons: list[str | None],
        details: list[str | None],
        ingested_at: datetime,
    ) -> None:
        """Quarantine contract-valid events billing must not take (vectorised tests,
        a Python loop only over the rows they catch)."""
        policy = self.policy
        too_many = pc.or_(
            pc.greater(checked.column("prompt_tokens"), policy.max_prompt_tokens),
            pc.greater(checked.column("completion_tokens"), policy.max_completion_tokens),
        )
        limit = ingested_at + timedelta(seconds=policy.max_future_s)
        future = pc.greater(checked.column("event_time"), pa.scalar(limit, _TS))
        suspects = pc.or_(pc.fill_null(too_many, False), pc.fill_null(future, False))
        if policy.known_tenants is not None:
            known = pa.array(sorted(policy.known_tenants), pa.string())
            unknown = pc.invert(pc.is_in(checked.column("tenant"), value_set=known))
            suspects = pc.or_(suspects, pc.fill_null(unknown, True))
        for i in pc.indices_nonzero(suspects).to_pylist():
            if not valid[i]:
                continue
            row = {
                name: checked.column(name)[i].as_py()
                for name in ("prompt_tokens", "completion_tokens", "event_time", "tenant")
            }
            if (
                row["prompt_tokens"] > policy.max_prompt_tokens
                or row["completion_tokens"] > policy.max_completion_tokens
            ):
                reasons[i] = "absurd_tokens"
                details[i] = (
                    f"usage event: data.prompt_tokens {row['prompt_tokens']} / completion_tokens "
                    f"{row['completion_tokens']} above the maximum {policy.max_prompt_tokens} / "
                    f"{policy.max_completion_tokens}"
                )
            elif row["event_time"] > limit:
                reasons[i] = "future_event_time"
                details[i] = (
                    f"usage event: time {row['event_time'].isoformat()} is more than "
                    f"{policy.max_future_s:g} s after ingestion at {ingested_at.isoformat()}"
                )
            elif policy.known_tenants is not None and row["tenant"] not in policy.known_tenants:
                reasons[i] = "unknown_tenant"
                details[i] = f"usage event: subject {row['tenant']} is not in the tenant registry"
