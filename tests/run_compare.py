"""What a resumed run must reproduce exactly, for the resume tests."""

from __future__ import annotations

import math
from typing import Any


def comparable(run: dict[str, Any]) -> dict[str, Any]:
    """The accuracy matrix, each task's log and the per-layer records of a results dict, without timings."""
    tasks = [{k: v for k, v in task.items() if not k.endswith("seconds")} for task in run["tasks"]]
    records = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in run["diagnostics"]]
    return nan_as_text({"acc_matrix": run["acc_matrix"], "tasks": tasks, "diagnostics": records})


def nan_as_text(value: Any) -> Any:
    """NaN → 'nan' throughout, so that == treats two NaN records (FS-DGPM's λ before any basis) as equal."""
    if isinstance(value, dict):
        return {k: nan_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_as_text(v) for v in value]
    return "nan" if isinstance(value, float) and math.isnan(value) else value
