"""One way to check a config: a table of field rules, applied in `__post_init__` by one call, with one error style.

A `Rule` says what a field accepts and how to fix a bad value. `check_fields(config, rules)` tests every ruled field,
stores what passes in one form (Python int, float and bool, so NumPy scalars work wherever Python's do and reach JSON
as plain values; lists as tuples) and raises one `ConfigError` naming every refused field as
`<Class>.<field>: got <value!r>; <what is expected> (<how to fix>)`. A bool is never taken for a number.
Checks between fields stay in the config's `__post_init__`, after the call; `Validated` makes the call.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


class ConfigError(ValueError, TypeError):
    """A setting of the wrong type or value. Both a ValueError and a TypeError, so that code catching either for a
    bad setting (the CLI's user errors, a caller's `except ValueError`) catches it."""


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Rule:
    """What one field accepts (`accepts`), in words for the error (`expected`), how to fix a refused value (`fix`:
    words, or a function of the value giving them), and the one form an accepted value is stored in (`normalise`)."""

    accepts: Callable[[Any], bool]
    expected: str
    fix: str | Callable[[Any], str] = ""
    normalise: Callable[[Any], Any] = _same

    def message(self, where: str, value: Any) -> str:
        """`<where>: got <value!r>; <expected> (<fix>)`: what is wrong, where, and how to fix it."""
        fix = self.fix(value) if callable(self.fix) else self.fix
        return f"{where}: got {value!r}; {self.expected}" + (f" ({fix})" if fix else "")


def is_number(value: Any) -> bool:
    """A finite real number, Python's or NumPy's, not a bool (an integer of any size is finite)."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and (isinstance(value, numbers.Integral) or math.isfinite(value))
    )


def is_integer(value: Any) -> bool:
    """An integer, Python's or NumPy's, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def plain_number(value: Any) -> int | float:
    """A Python int for an integer, a Python float for any other real number (np.float32 → float)."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _show(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def _range(above: float | None, at_least: float | None, below: float | None, at_most: float | None) -> str:
    """' in (0, 1]', ' > 0', ' ≥ 1' or '': the bounds in words, open ends in round brackets."""
    low = ("(", ">", above) if above is not None else ("[", "≥", at_least) if at_least is not None else None
    high = (")", "<", below) if below is not None else ("]", "≤", at_most) if at_most is not None else None
    if low and high:
        return f" in {low[0]}{_show(low[2])}, {_show(high[2])}{high[0]}"
    end = low or high
    return f" {end[1]} {_show(end[2])}" if end else ""


def number(
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    fix: str = "",
) -> Rule:
    """A finite number (int or float, NumPy's too, never a bool) within the given bounds: `above`/`below` are open,
    `at_least`/`at_most` closed."""

    def accepts(value: Any) -> bool:
        return (
            is_number(value)
            and (above is None or value > above)
            and (at_least is None or value >= at_least)
            and (below is None or value < below)
            and (at_most is None or value <= at_most)
        )

    return Rule(accepts, "a finite number" + _range(above, at_least, below, at_most), fix, plain_number)


def integer(*, at_least: int | None = None, at_most: int | None = None, fix: str = "") -> Rule:
    """An integer (NumPy's too, never a bool or a float such as 2.0) within the closed bounds given."""

    def accepts(value: Any) -> bool:
        return is_integer(value) and (at_least is None or value >= at_least) and (at_most is None or value <= at_most)

    if at_least is not None and at_most is not None:
        expected = f"an integer in {at_least}..{at_most}"
    else:
        expected = "an integer" + _range(None, at_least, None, at_most)
    return Rule(accepts, expected, fix, plain_number)


def count(fix: str = "") -> Rule:
    """An integer ≥ 1: sample counts, ranks, sizes, epochs."""
    return integer(at_least=1, fix=fix)


def flag(fix: str = "") -> Rule:
    """True or False, Python's or NumPy's (not 0/1, not a string), stored as Python's."""
    return Rule(lambda value: isinstance(value, bool | np.bool_), "True or False", fix, bool)


def choice(options: Sequence[str], fix: str = "") -> Rule:
    """One of the strings `options`."""
    return Rule(lambda value: isinstance(value, str) and value in options, f"one of {tuple(options)}", fix)


def text(fix: str = "") -> Rule:
    """A non-empty string."""
    return Rule(lambda value: isinstance(value, str) and bool(value), "a non-empty string", fix)


def optional(rule: Rule, none: str = "") -> Rule:
    """None, or what `rule` accepts; `none` says what None means ('for no clipping')."""
    return Rule(
        lambda value: value is None or rule.accepts(value),
        f"{rule.expected}, or None" + (f" {none}" if none else ""),
        rule.fix,
        lambda value: None if value is None else rule.normalise(value),
    )


def entries(
    item: Rule | None = None,
    *,
    non_empty: bool = False,
    length: int | None = None,
    expected: str | None = None,
    fix: str = "",
) -> Rule:
    """A list or tuple (stored as a tuple) whose entries each pass `item` (anything without one); a single value or
    string is refused with the advice to write it as a one-entry list."""

    def accepts(value: Any) -> bool:
        return (
            isinstance(value, list | tuple)
            and (not non_empty or len(value) > 0)
            and (length is None or len(value) == length)
            and (item is None or all(item.accepts(entry) for entry in value))
        )

    def advice(value: Any) -> str:
        return f"write [{value!r}] for one entry" if not isinstance(value, list | tuple) else fix

    words = f"a list of {length} entries" if length is not None else "a non-empty list" if non_empty else "a list"
    if item is not None:
        words += f", each {item.expected}"
    normalise = _same if item is None else item.normalise
    return Rule(accepts, expected or words, advice, lambda value: tuple(normalise(entry) for entry in value))


def patterns(non_empty: bool = False) -> Rule:
    """A list of module-name patterns or class names (strings), stored as a tuple."""
    words = "a non-empty list" if non_empty else "a list"
    return entries(
        Rule(lambda value: isinstance(value, str), "a string"),
        non_empty=non_empty,
        expected=f"{words} of strings (module-name globs, names matched against the end of a module name, or "
        "class names)",
    )


def checked(prefix: str, values: Mapping[str, Any], rules: Mapping[str, Rule]) -> dict[str, Any]:
    """`values` with every entry a rule covers in its stored form; a ConfigError naming each entry a rule refuses,
    one line each, as `<prefix><key>: got ...`. Entries without a rule, and rules without an entry, are skipped."""
    result, errors = dict(values), []
    for key, rule in rules.items():
        if key not in values:
            continue
        if rule.accepts(values[key]):
            result[key] = rule.normalise(values[key])
        else:
            errors.append(rule.message(f"{prefix}{key}", values[key]))
    if errors:
        raise ConfigError("\n".join(errors))
    return result


def check_fields(config: Any, rules: Mapping[str, Rule]) -> None:
    """Check the fields of a (frozen) dataclass `config` against `rules`, every field in one pass, and store each one
    in its normal form; a ConfigError naming every refused field as `<Class>.<field>: got ...`."""
    values = checked(f"{type(config).__name__}.", {name: getattr(config, name) for name in rules}, rules)
    for name, value in values.items():
        object.__setattr__(config, name, value)


class Validated:
    """Base of a config dataclass checked by its table `RULES` (field → Rule): its `__post_init__` is
    `check_fields(self, self.RULES)`. A subclass extends the table ({**Base.RULES, ...}); a config with checks
    between fields overrides `__post_init__`, calling `super().__post_init__()` first."""

    RULES: ClassVar[Mapping[str, Rule]] = {}

    def __post_init__(self) -> None:
        check_fields(self, self.RULES)
