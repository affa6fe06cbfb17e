"""How a bench cell's values and failure reasons are written in its tables and its gallery page."""

from __future__ import annotations

import math
from typing import Any


def format_value(value: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits, "-" for a missing or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def short_reason(row: dict[str, Any]) -> str:
    """The last line of a cell's reason (an error's message, a divergence rule), for tables and pages."""
    lines = row["reason"].strip().splitlines()
    return lines[-1] if lines else ""
