"""What an invoice billed per model: the revenue side of the tenant efficiency mart.

An invoice prices tokens per model, GPU-hours per GPU type and energy per time-of-use
window. To set a tenant's billed amount against the cost of serving each model, the
lines are attributed to models:
- token lines name their model;
- a GPU-hour line is split over the models that ran on its GPU type, by their
  GPU-hours (the invoice's usage summary);
- an energy line is split over all the tenant's models by their kWh (a time-of-use
  window's own kWh per model is not on the invoice; the split is by the month's kWh).
Splits use the largest-remainder method at the currency's minor unit, so the parts of
every line add up to it exactly. Commitment true-ups, adjustments of earlier invoices,
credits and tax are not usage of the period's models and are left out.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

from models.invoice import DocumentLine, InvoiceDocument
from models.money import largest_remainder

__all__ = ["ModelRevenue", "billed_by_model"]


@dataclass(frozen=True)
class ModelRevenue:
    model: str
    billed: Decimal


def _split(
    line: DocumentLine, weights: dict[str, Decimal], currency: str, into: dict[str, Decimal]
) -> None:
    models = sorted(m for m, w in weights.items() if w > 0)
    if not models:
        # Usage the summary cannot place (no GPU-hours / kWh recorded): kept whole.
        into["(unattributed)"] += line.amount
        return
    parts = largest_remainder(line.amount, [weights[m] for m in models], currency)
    for model, part in zip(models, parts, strict=True):
        into[model] += part


def billed_by_model(document: InvoiceDocument) -> list[ModelRevenue]:
    """The document's usage lines attributed to models; the parts sum to the usage
    subtotal exactly."""
    gpu_hours: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    kwh: dict[str, Decimal] = defaultdict(Decimal)
    for summary in document.usage:
        gpu_hours[summary.gpu_type][summary.model] += summary.gpu_hours
        kwh[summary.model] += summary.energy_kwh
    billed: dict[str, Decimal] = defaultdict(Decimal)
    for line in document.lines:
        if line.kind == "tokens" and line.model is not None:
            billed[line.model] += line.amount
        elif line.kind == "gpu":
            _split(line, gpu_hours.get(line.gpu_type or "", {}), document.currency, billed)
        elif line.kind == "energy":
            _split(line, kwh, document.currency, billed)
    return [ModelRevenue(model, amount) for model, amount in sorted(billed.items())]
