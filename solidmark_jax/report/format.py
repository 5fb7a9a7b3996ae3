"""How numbers read on the report pages: one percent and one p-value format for every table."""

from __future__ import annotations

import math


def percent(x: float | None, digits: int = 1) -> str:
  """A fraction as a percentage, e.g. 0.1234 -> "12.3%" ("-" for None)."""
  return "-" if x is None else f"{100 * x:.{digits}f}%"


def p_value(p: float | None) -> str:
  """A p-value: three decimals, scientific notation below 1e-3 ("-" for None or NaN)."""
  return "-" if p is None or math.isnan(p) else (f"{p:.2e}" if p < 1e-3 else f"{p:.3f}")
