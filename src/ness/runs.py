"""What identifies a run: one `RunSpec`, built once (by the command line or a caller) and passed down from there."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ness.validation import Rule, Validated, flag, integer, optional, text

SEED_LIMIT = 2**32
"""Seeds are integers in 0..2**32 − 1: NumPy's seeding accepts no others."""


def is_json_dict(value: Any) -> bool:
    """A dict with string keys whose values JSON can hold (numbers, strings, lists, dicts, True/False/None)."""
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        return False
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class RunSpec(Validated):
    """One run: a method or variant on a benchmark, one seed, a preset, and the choices on top of it (another
    network, the official code's behaviour, `--set` overrides). `dataclasses.asdict` of it is what a plan records
    for `--resume` and what a checkpoint is checked against; what a run is given besides (output folder, data root,
    progress bars, checkpoint frequency) says where and how it runs, not which run it is."""

    benchmark: str
    method: str
    """A registered method (`ness`, `gpm`, ...) or one of the preset's variants (`ness_sam`, ...)."""
    seed: int
    preset: str = "quick"
    network: str | None = None
    """Another network than the protocol's (`vit`, ...); None: the protocol's own."""
    faithful: bool = False
    """Apply the official code's behaviour where it changes results (presets.FAITHFUL)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Method, training or data options (`--set key=value`), applied over the preset, variant and --faithful ones.
    Stored as JSON reads them back (tuples as lists), so a spec read from a plan equals the one written."""

    RULES: ClassVar[dict[str, Rule]] = {
        "benchmark": text(),
        "method": text(),
        "seed": integer(at_least=0, at_most=SEED_LIMIT - 1, fix="NumPy's seeding takes no others; e.g. --seeds 1 2 3"),
        "preset": text(),
        "network": optional(text(), "for the protocol's own"),
        "faithful": flag(),
        "overrides": Rule(
            is_json_dict,
            "a dict of option name → value that JSON can hold (numbers, strings, lists, dicts, True/False/None)",
            "e.g. {'epochs': 3, 'exclude': ['features.0']}",
            lambda overrides: json.loads(json.dumps(overrides)),
        ),
    }
