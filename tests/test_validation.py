"""ness.validation alone (each kind of rule, NumPy scalars, bools, the message), then every config that uses it: each
numeric field takes NumPy's numbers as it takes Python's and refuses a bool, a string and NaN, naming the field."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest

from ness.methods import METHODS
from ness.runs import RunSpec
from ness.trainer import TrainConfig
from ness.validation import (
    ConfigError,
    Rule,
    Validated,
    check_fields,
    checked,
    choice,
    count,
    entries,
    flag,
    integer,
    number,
    optional,
    patterns,
    text,
)

# -- the rules alone ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "good", "bad", "expected"),
    [
        (
            number(above=0, below=1),
            [0.5, 1e-9, np.float64(0.5), np.float32(0.5), np.int64(0) + 0.5],
            [0, 1, -1.0],
            "a finite number in (0, 1)",
        ),
        (number(above=0, at_most=1), [1, 1.0, np.int64(1), 0.3], [0.0, 1.01], "a finite number in (0, 1]"),
        (number(at_least=0, below=1), [0, 0.0, np.int32(0), 0.99], [1, -1e-9], "a finite number in [0, 1)"),
        (number(at_least=0), [0, 3, 1e30, 10**400, np.float16(2)], [-1, -1e-30], "a finite number ≥ 0"),
        (number(above=1), [1.5, np.uint8(2)], [1, 0.5], "a finite number > 1"),
        (number(), [-3, 0, 2.5e-300, np.float64(-1)], [], "a finite number"),
        (integer(at_least=0), [0, 7, np.int64(3), np.uint16(3)], [-1, 2.0, np.float64(3)], "an integer ≥ 0"),
        (integer(at_least=0, at_most=9), [0, 9, np.int8(5)], [10, -1], "an integer in 0..9"),
        (count(), [1, 10**12, np.int64(1)], [0, -5, 1.0, "1"], "an integer ≥ 1"),
        (flag(), [True, False, np.bool_(True)], [1, 0, "true", None], "True or False"),
        (choice(("a", "b")), ["a", "b"], ["c", "A", None, 1, ["a"]], "one of ('a', 'b')"),
        (text(), ["x"], ["", None, 3], "a non-empty string"),
        (optional(count(), "for all"), [None, 3, np.int64(3)], [0, "3"], "an integer ≥ 1, or None for all"),
        (entries(count()), [[], (1, 2), [np.int64(2)]], [3, "12", [0], [1.0], {1: 2}], "a list, each an integer ≥ 1"),
        (entries(count(), non_empty=True), [[1]], [[], ()], "a non-empty list, each an integer ≥ 1"),
        (entries(count(), length=2), [(1, 2), [3, 4]], [(1,), (1, 2, 3)], "a list of 2 entries, each an integer ≥ 1"),
        (patterns(), [[], ["fc", "Conv2d"], ("a.*",)], ["fc", [1], None], "a list of strings (module-name globs"),
        (patterns(non_empty=True), [["fc"]], [[]], "a non-empty list of strings"),
    ],
)
def test_each_rule_accepts_and_refuses_and_says_what_it_expects(rule, good, bad, expected):
    for value in good:
        assert rule.accepts(value), value
    for value in bad:
        assert not rule.accepts(value), value
    assert rule.expected.startswith(expected), rule.expected


@pytest.mark.parametrize("rule", [number(), number(at_least=0), integer(), count(), optional(number())])
@pytest.mark.parametrize("value", [True, False, math.nan, math.inf, -math.inf, "1", None, [1], np.nan])
def test_numbers_refuse_bools_strings_and_non_finite_values(rule, value):
    if value is None and rule.expected.endswith("or None"):
        return  # optional: None is its own answer
    assert not rule.accepts(value)


def test_numbers_are_stored_as_python_numbers_and_lists_as_tuples():
    assert type(number().normalise(np.float32(0.5))) is float and number().normalise(np.float32(0.5)) == 0.5
    assert type(number().normalise(np.int64(3))) is int  # an int stays an int in a float field, as Python's does
    assert type(count().normalise(np.int64(3))) is int
    assert number().normalise(2) == 2 and type(number().normalise(2)) is int
    assert entries(count()).normalise([np.int64(1), 2]) == (1, 2)
    assert all(type(v) is int for v in entries(count()).normalise([np.int64(1), np.int32(2)]))
    assert optional(count()).normalise(None) is None
    assert type(flag().normalise(np.bool_(True))) is bool
    assert entries(optional(entries(count(), length=2))).normalise([[1, 2], None]) == ((1, 2), None)


def test_the_message_says_where_what_was_given_what_is_expected_and_how_to_fix():
    rule = number(above=0, fix="the paper uses 5000")
    assert rule.message("EWCConfig.lam", -1.0) == "EWCConfig.lam: got -1.0; a finite number > 0 (the paper uses 5000)"
    assert count().message("X.n", 0) == "X.n: got 0; an integer ≥ 1"  # no fix: no parentheses
    # a single value where a list belongs: the fix is to write it as a list
    assert patterns().message("X.exclude", "fc").endswith("(write ['fc'] for one entry)")
    assert entries(count(), fix="one per layer").message("X.sizes", [0]).endswith("(one per layer)")


@dataclass(frozen=True)
class Example(Validated):
    rate: float = 0.1
    steps: int = 3
    names: tuple[str, ...] = ()
    mode: str = "a"

    RULES: ClassVar[dict[str, Rule]] = {
        "rate": number(above=0),
        "steps": count(),
        "names": patterns(),
        "mode": choice(("a", "b")),
    }


def test_a_validated_config_checks_every_field_at_once_and_stores_the_normal_forms():
    config = Example(rate=np.float32(0.25), steps=np.int64(4), names=["fc"])
    assert (config.rate, config.steps, config.names) == (0.25, 4, ("fc",))
    assert (type(config.rate), type(config.steps)) == (float, int)
    json.dumps(dataclasses.asdict(config))  # plain numbers: JSON takes them
    with pytest.raises(ConfigError) as refused:
        Example(rate=True, steps=0, mode="c")
    assert str(refused.value).splitlines() == [
        "Example.rate: got True; a finite number > 0",
        "Example.steps: got 0; an integer ≥ 1",
        "Example.mode: got 'c'; one of ('a', 'b')",
    ]


def test_config_error_is_both_a_value_error_and_a_type_error():
    # Callers catch bad settings as either (the CLI's user errors, build_runner's SettingsError); one class serves.
    for caught in (ValueError, TypeError):
        with pytest.raises(caught):
            Example(steps="3")


def test_checked_covers_a_dict_of_options_and_skips_what_it_has_no_rule_for():
    rules = {"pc_valid": number(at_least=0, below=1), "download": flag()}
    assert checked("d option ", {"pc_valid": np.float64(0.1), "fashion": "real"}, rules) == {
        "pc_valid": 0.1,
        "fashion": "real",
    }
    with pytest.raises(ConfigError, match=r"^d option pc_valid: got 2; a finite number in \[0, 1\)$"):
        checked("d option ", {"pc_valid": 2}, rules)


def test_check_fields_works_on_any_object_with_the_fields():
    class Plain:
        size = np.int64(2)

    thing = Plain()
    check_fields(thing, {"size": count()})
    assert type(thing.size) is int


# -- every config --------------------------------------------------------------------------------------------------

CONFIGS = sorted({cls.config_class for cls in METHODS.values()} | {TrainConfig, RunSpec}, key=lambda c: c.__name__)
REQUIRED: dict[type, dict[str, Any]] = {RunSpec: {"benchmark": "split_digits", "method": "ness", "seed": 1}}
"""Fields a config cannot be built without."""
EXAMPLES: dict[tuple[str, str], float] = {
    ("NESSConfig", "eps1"): 1e-3,
    ("NESSConfig", "rank"): 4,
    ("NESSConfig", "output_budget"): 0.1,
    ("NESSConfig", "max_output_shift"): 0.01,
    ("NESSConfig", "statistics_positions"): 64,
}
"""A valid value of each numeric field whose default is None."""


def numeric_fields() -> list[tuple[type, str, float]]:
    """(config, field, a valid value) for every field annotated int or float (or either or None)."""
    found = []
    for config in CONFIGS:
        for f in dataclasses.fields(config):
            if str(f.type).removesuffix(" | None") not in ("int", "float"):
                continue
            default = REQUIRED.get(config, {}).get(f.name, f.default)
            value = EXAMPLES.get((config.__name__, f.name), default)
            assert value is not None, f"give {config.__name__}.{f.name} a valid value in EXAMPLES"
            found.append((config, f.name, value))
    return found


def build(config: type, **fields: Any) -> Any:
    return config(**{**REQUIRED.get(config, {}), **fields})


def test_every_field_of_every_config_has_a_rule():
    for config in CONFIGS:
        assert issubclass(config, Validated), config
        assert set(config.RULES) == {f.name for f in dataclasses.fields(config)}, config


@pytest.mark.parametrize(("config", "name", "value"), numeric_fields(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_numpy_numbers_are_taken_where_python_numbers_are_and_stored_as_python_numbers(config, name, value):
    numpy_values = [np.float64(value), np.float32(value)] if isinstance(value, float) else [np.int64(value)]
    if isinstance(value, float) and value.is_integer():  # a float field takes an int, Python's or NumPy's
        numpy_values.append(np.int64(int(value)))
    for numpy_value in numpy_values:
        stored = getattr(build(config, **{name: numpy_value}), name)
        assert stored == numpy_value and type(stored) in (int, float), (numpy_value, stored)


@pytest.mark.parametrize(("config", "name", "value"), numeric_fields(), ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("bad", [True, False, "1", math.nan])
def test_a_bool_a_string_or_nan_is_refused_naming_the_field(config, name, value, bad):
    with pytest.raises(ConfigError, match=rf"^{config.__name__}\.{name}: got {re.escape(repr(bad))}; "):
        build(config, **{name: bad})
