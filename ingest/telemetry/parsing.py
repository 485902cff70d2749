"""Prometheus' query answers -> labels and flat arrays.

The JSON of a range vector is mostly `[t,"v"]` pairs. Instead of building three Python
objects per sample, the `values` arrays are cut out of the raw body, the rest (labels)
is parsed with orjson, and the numbers are read by Polars' CSV reader (off the GIL).
Any answer that does not fit this shape is parsed in full with orjson. An answer that
is not what the API promises raises `MalformedAnswer` (the caller names the query).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import polars as pl

_VALUES_KEY = re.compile(rb'"values"\s*:\s*\[\s*')
_VALUES_END = re.compile(rb"\]\s*\]")
_WHITESPACE = b" \t\r\n"


class MalformedAnswer(Exception):
    """Why an answer is not what the API promises (turned into a ServiceError)."""


def first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _result_list(document: Any, result_type: str) -> list[Any]:
    if not isinstance(document, dict):
        raise MalformedAnswer("not a JSON object")
    status = document.get("status")
    if status != "success":
        error = document.get("error")
        detail = f": {first_line(str(error))}" if error else ""
        raise MalformedAnswer(f"status {status!r}{detail}")
    data = document.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("result"), list):
        raise MalformedAnswer("no data.result list")
    kind = data.get("resultType")
    if kind is not None and kind != result_type:
        raise MalformedAnswer(f"resultType {kind!r}, expected {result_type!r}")
    result: list[Any] = data["result"]
    for item in result:
        if not isinstance(item, dict) or not isinstance(item.get("metric"), dict):
            raise MalformedAnswer("a result without a metric object")
    return result


def _warnings(document: dict[str, Any]) -> list[str]:
    found = document.get("warnings")
    return [first_line(str(w)) for w in found] if isinstance(found, list) else []


@dataclass
class Matrix:
    labels: list[dict[str, str]]
    counts: np.ndarray
    ts_ms: np.ndarray
    values: np.ndarray
    warnings: list[str] = field(default_factory=list)


def parse_matrix(body: bytes) -> Matrix:
    """A range-vector answer -> labels per series and flat (ts_ms, value) arrays."""
    try:
        return _parse_matrix_fast(body)
    except MalformedAnswer:
        pass  # not the usual shape: parse in full, which names what is wrong
    return _parse_matrix_slow(body)


def _parse_matrix_fast(body: bytes) -> Matrix:
    pieces: list[bytes] = []
    contents: list[bytes] = []
    counts: list[int] = []
    pos = 0
    for match in _VALUES_KEY.finditer(body):
        start = match.end()
        if start < pos:
            raise MalformedAnswer("overlapping values")
        if body[start : start + 1] == b"]":
            content, close_end = b"", start + 1
        else:
            close = _VALUES_END.search(body, start)
            if close is None:
                raise MalformedAnswer("unterminated values")
            content, close_end = body[start : close.start() + 1], close.end()
        pieces.append(body[pos:start])
        pieces.append(b"]")
        pos = close_end
        if content:
            contents.append(content)
        counts.append(content.count(b"["))
    pieces.append(body[pos:])
    try:
        document = orjson.loads(b"".join(pieces))
    except orjson.JSONDecodeError as exc:
        raise MalformedAnswer(f"not JSON ({exc})") from None
    result = _result_list(document, "matrix")
    if len(result) != len(counts) or any(item.get("values") != [] for item in result):
        raise MalformedAnswer("unexpected layout")
    total = sum(counts)
    if total:
        text = (
            b",".join(contents)
            .translate(None, _WHITESPACE)
            .replace(b"],[", b"\n")
            .translate(None, b'[]"')
        )
        try:
            frame = pl.read_csv(
                io.BytesIO(text),
                has_header=False,
                schema={"t": pl.Float64, "v": pl.Float64},
            )
        except Exception as exc:  # polars raises several error types for bad input
            raise MalformedAnswer(f"values not numeric ({type(exc).__name__})") from None
        if frame.height != total or frame.null_count().row(0) != (0, 0):
            raise MalformedAnswer("values not [time, value] pairs")
        t = frame["t"].to_numpy()
        v = frame["v"].to_numpy()
    else:
        t = v = np.empty(0)
    return Matrix(
        labels=[{str(k): str(val) for k, val in item["metric"].items()} for item in result],
        counts=np.asarray(counts, dtype=np.int64),
        ts_ms=np.rint(t * 1000.0).astype(np.int64),
        values=np.ascontiguousarray(v, dtype=np.float64),
        warnings=_warnings(document),
    )


def _parse_matrix_slow(body: bytes) -> Matrix:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedAnswer("not JSON") from None
    result = _result_list(document, "matrix")
    labels: list[dict[str, str]] = []
    counts: list[int] = []
    ts: list[float] = []
    values: list[float] = []
    for item in result:
        pairs = item.get("values", [])
        if not isinstance(pairs, list):
            raise MalformedAnswer("values is not a list")
        try:
            for t, v in pairs:
                ts.append(float(t))
                values.append(float(v))
        except (TypeError, ValueError):
            raise MalformedAnswer("values not numeric [time, value] pairs") from None
        labels.append({str(k): str(v) for k, v in item["metric"].items()})
        counts.append(len(pairs))
    return Matrix(
        labels=labels,
        counts=np.asarray(counts, dtype=np.int64),
        ts_ms=np.rint(np.asarray(ts, dtype=np.float64) * 1000.0).astype(np.int64),
        values=np.asarray(values, dtype=np.float64),
        warnings=_warnings(document),
    )


def parse_vector_labels(body: bytes) -> tuple[list[dict[str, str]], list[str]]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedAnswer("not JSON") from None
    result = _result_list(document, "vector")
    labels = [{str(k): str(v) for k, v in item["metric"].items()} for item in result]
    return labels, _warnings(document)
