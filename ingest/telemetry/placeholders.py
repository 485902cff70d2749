"""DCGM's blank values: what a metric reports when DCGM has no value for it.

The hour files keep such a value out of its column (null) and name the metric in
`placeholder_metrics` (int64 0x7ffffffffffffff0..3, int32 0x7ffffff0..3, fp64
140737488355328.0..+3). The int32 family is not applied to the energy counter, an
int64 field whose mJ count legitimately passes 2^31.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ingest.telemetry.schema import ENERGY_METRIC

#: DCGM's blank values (dcgm_structs.h: BLANK, NOT_FOUND, NOT_SUPPORTED,
#: NOT_PERMISSIONED), as the exporter reports them.
DCGM_INT64_BLANKS: tuple[int, ...] = tuple(range(0x7FFFFFFFFFFFFFF0, 0x7FFFFFFFFFFFFFF4))
DCGM_INT32_BLANKS: tuple[int, ...] = tuple(range(0x7FFFFFF0, 0x7FFFFFF4))
DCGM_FP64_BLANKS: tuple[float, ...] = tuple(140737488355328.0 + i for i in range(4))
_BLANKS_ALL = np.array(
    sorted({float(v) for v in DCGM_INT64_BLANKS + DCGM_INT32_BLANKS} | set(DCGM_FP64_BLANKS))
)
_BLANKS_NO_INT32 = np.array(sorted({float(v) for v in DCGM_INT64_BLANKS} | set(DCGM_FP64_BLANKS)))


def placeholder_mask(values: np.ndarray | Sequence[float], metric: str | None = None) -> np.ndarray:
    """True where a value is one of DCGM's blanks.

    The int32 family (2147483632..2147483635) is not checked for the energy counter:
    that field is int64 in DCGM and its mJ count passes 2^31 in normal operation.
    """
    array = np.asarray(values, dtype=np.float64)
    blanks = _BLANKS_NO_INT32 if metric == ENERGY_METRIC else _BLANKS_ALL
    return np.isin(array, blanks)
