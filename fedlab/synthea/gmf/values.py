"""Time, random numbers, distributions and codes as the Generic Module Framework uses them.

Times are integer milliseconds since 1970-01-01 (UTC, naive), as in Synthea. Time units follow
Synthea's conversion: a year is 365 days and a month 30 days, and the quantity is truncated to
whole units of the next-finer granularity Synthea uses (whole days for days/weeks/months/years).
"""

from __future__ import annotations

import datetime as dt
import math
import random
from dataclasses import dataclass
from typing import Any, NamedTuple

from fedlab.errors import FedlabError

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
WEEK = 7 * DAY
YEAR_AVG = int(365.2425 * DAY)  # for ages only; durations use Synthea's 365-day year
EPOCH = dt.datetime(1970, 1, 1)

# unit -> (milliseconds per unit, whether Synthea truncates the quantity to whole days)
_UNIT_DAYS = {"years": 365, "months": 30, "weeks": 7, "days": 1}
_UNIT_MS = {"hours": HOUR, "minutes": MINUTE, "seconds": SECOND, "milliseconds": 1}
TIME_UNITS = frozenset(_UNIT_DAYS) | frozenset(_UNIT_MS)


class ModuleError(FedlabError):
    """A module file that cannot be run: names the file, the state and the field."""

    def __init__(self, file: str, state: str | None, field: str | None, message: str) -> None:
        self.file, self.state, self.field = file, state, field
        where = file
        if state is not None:
            where += f": state '{state}'"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


class GMFRuntimeError(FedlabError):
    """A module that loaded but cannot continue for this person (e.g. an endless loop)."""


def to_millis(when: dt.datetime | dt.date) -> int:
    if not isinstance(when, dt.datetime):
        when = dt.datetime.combine(when, dt.time())
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return (when - EPOCH) // dt.timedelta(milliseconds=1)


def from_millis(millis: int) -> dt.datetime:
    return EPOCH + dt.timedelta(milliseconds=millis)


def duration_ms(quantity: float, unit: str) -> int:
    """Synthea's Utilities.convertTime: years are 365 days, months 30 days."""
    if unit in _UNIT_DAYS:
        return int(_UNIT_DAYS[unit] * quantity) * DAY
    return int(quantity) * _UNIT_MS[unit]


def age_in(unit: str, birth_ms: int, time_ms: int) -> float:
    """Whole completed years/months/weeks/days/hours/... as Synthea's Person.ageIn*()."""
    elapsed = time_ms - birth_ms
    if unit == "years":
        return float(_completed_years(birth_ms, time_ms))
    if unit == "months":
        born, now = from_millis(birth_ms), from_millis(time_ms)
        months = (now.year - born.year) * 12 + now.month - born.month
        if (now.day, now.time()) < (born.day, born.time()):
            months -= 1
        return float(months)
    per_unit = {"weeks": WEEK, "days": DAY, "hours": HOUR, "minutes": MINUTE, "seconds": SECOND}[unit]
    return float(elapsed // per_unit)


def _completed_years(birth_ms: int, time_ms: int) -> int:
    # Fast path: far from a birthday the average-year estimate is exact.
    estimate = (time_ms - birth_ms) // YEAR_AVG
    remainder = (time_ms - birth_ms) - estimate * YEAR_AVG
    if 2 * DAY < remainder < YEAR_AVG - 2 * DAY:
        return int(estimate)
    born, now = from_millis(birth_ms), from_millis(time_ms)
    years = now.year - born.year
    if (now.month, now.day, now.time()) < (born.month, born.day, born.time()):
        years -= 1
    return years


class RandomSource:
    """The one source of randomness: wraps `random.Random` or `numpy.random.Generator`."""

    def __init__(self, rng: Any) -> None:
        if isinstance(rng, RandomSource):
            rng = rng.raw
        self.raw = rng
        if isinstance(rng, random.Random):
            self.random = rng.random
            self.gauss = lambda: rng.gauss(0.0, 1.0)
        elif hasattr(rng, "standard_normal") and hasattr(rng, "random"):
            self.random = lambda: float(rng.random())
            self.gauss = lambda: float(rng.standard_normal())
        else:
            raise TypeError(f"rng must be random.Random or numpy.random.Generator, not {type(rng).__name__}")

    def uniform(self, low: float, high: float) -> float:
        return low + self.random() * (high - low)

    def bits(self) -> int:
        return int(self.random() * 2**53)


class Code(NamedTuple):
    system: str
    code: str
    display: str

    @staticmethod
    def parse(raw: dict[str, Any]) -> Code:
        return Code(str(raw.get("system", "")), str(raw.get("code", "")), str(raw.get("display", "")))


def parse_codes(raw: list[dict[str, Any]] | None) -> tuple[Code, ...]:
    return tuple(Code.parse(c) for c in raw or ())


# ---------------------------------------------------------------- distributions

_REQUIRED_PARAMETERS = {
    "EXACT": ("value",),
    "UNIFORM": ("low", "high"),
    "GAUSSIAN": ("mean", "standardDeviation"),
    "EXPONENTIAL": ("mean",),
    "TRIANGULAR": ("min", "mode", "max"),
}
DISTRIBUTION_KINDS = frozenset(_REQUIRED_PARAMETERS)


@dataclass(frozen=True)
class Distribution:
    """A random variable: one of the GMF kinds, or an older `exact`/`range` form (as EXACT/UNIFORM)."""

    kind: str
    params: dict[str, float]
    round: bool = False
    decimals: int | None = None

    def sample(self, rng: RandomSource) -> float:
        p, kind = self.params, self.kind
        if kind == "EXACT":
            value = p["value"]
        elif kind == "UNIFORM":
            value = rng.uniform(p["low"], p["high"])
        elif kind == "GAUSSIAN":
            value = p["mean"] + p["standardDeviation"] * rng.gauss()
            value = max(value, p.get("min", -math.inf))
            value = min(value, p.get("max", math.inf))
        elif kind == "EXPONENTIAL":
            value = -p["mean"] * math.log(1.0 - rng.random())
        else:  # TRIANGULAR
            low, mode, high = p["min"], p["mode"], p["max"]
            u = rng.random()
            split = (mode - low) / (high - low) if high > low else 0.0
            if u < split:
                value = low + math.sqrt(u * (high - low) * (mode - low))
            else:
                value = high - math.sqrt((1.0 - u) * (high - low) * (high - mode))
        if self.round:
            value = float(math.floor(value + 0.5))
        elif self.decimals is not None:
            value = round(value, self.decimals)
        return value


def _number(raw: Any, fail: Any, what: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        fail(f"{what} must be a finite number, got {raw!r}")
    return float(raw)


def parse_distribution(raw: Any, fail: Any, non_negative: bool = False) -> Distribution:
    """A `{kind, parameters, round}` object. `fail(message)` raises the caller's ModuleError."""
    if not isinstance(raw, dict):
        fail(f"must be an object with 'kind' and 'parameters', got {raw!r}")
    kind = raw.get("kind")
    if kind not in _REQUIRED_PARAMETERS:
        fail(f"unknown distribution kind {kind!r} (known: {', '.join(sorted(_REQUIRED_PARAMETERS))})")
    params_raw = raw.get("parameters")
    if not isinstance(params_raw, dict):
        fail(f"{kind} distribution needs a 'parameters' object")
    missing = [k for k in _REQUIRED_PARAMETERS[kind] if k not in params_raw]
    if missing:
        fail(f"{kind} distribution is missing parameter(s) {', '.join(missing)}")
    params = {k: _number(v, fail, f"parameter '{k}'") for k, v in params_raw.items()}
    _check_parameters(kind, params, fail, non_negative)
    return Distribution(kind, params, round=bool(raw.get("round", False)))


def _check_parameters(kind: str, p: dict[str, float], fail: Any, non_negative: bool) -> None:
    if kind == "UNIFORM" and p["low"] > p["high"]:
        fail(f"UNIFORM low {p['low']} is greater than high {p['high']}")
    if kind == "GAUSSIAN":
        if p["standardDeviation"] < 0:
            fail(f"GAUSSIAN standardDeviation {p['standardDeviation']} is negative")
        if "min" in p and "max" in p and p["min"] > p["max"]:
            fail(f"GAUSSIAN min {p['min']} is greater than max {p['max']}")
    if kind == "EXPONENTIAL" and p["mean"] <= 0:
        fail(f"EXPONENTIAL mean {p['mean']} must be positive")
    if kind == "TRIANGULAR" and not p["min"] <= p["mode"] <= p["max"]:
        fail(f"TRIANGULAR needs min <= mode <= max, got {p['min']}, {p['mode']}, {p['max']}")
    if non_negative:
        lowest = {"EXACT": "value", "UNIFORM": "low", "TRIANGULAR": "min", "EXPONENTIAL": "mean"}.get(kind)
        if lowest is not None and p[lowest] < 0:
            fail(f"{kind} parameter '{lowest}' {p[lowest]} is negative (a duration cannot be)")
        # A Gaussian duration may still draw a negative value; it is then taken as zero.


def parse_exact(raw: Any, fail: Any, non_negative: bool = False) -> Distribution:
    """The older `{"quantity": q}` form."""
    if not isinstance(raw, dict) or "quantity" not in raw:
        fail(f"'exact' needs a 'quantity', got {raw!r}")
    value = _number(raw["quantity"], fail, "exact quantity")
    if non_negative and value < 0:
        fail(f"exact quantity {value} is negative")
    return Distribution("EXACT", {"value": value})


def parse_range(raw: Any, fail: Any, non_negative: bool = False, allow_reversed: bool = False) -> Distribution:
    """The older `{"low": a, "high": b}` form (uniform). `allow_reversed`: Synthea's rand(low, high)
    draws between the two bounds whatever their order, and some published modules rely on that."""
    if not isinstance(raw, dict) or "low" not in raw or "high" not in raw:
        fail(f"'range' needs 'low' and 'high', got {raw!r}")
    low, high = _number(raw["low"], fail, "range low"), _number(raw["high"], fail, "range high")
    if low > high and not allow_reversed:
        fail(f"range low {low} is greater than high {high}")
    if non_negative and min(low, high) < 0:
        fail(f"range {low}..{high} has a negative bound")
    decimals = raw.get("decimals")
    if decimals is not None and (isinstance(decimals, bool) or not isinstance(decimals, int) or decimals < 0):
        fail(f"range decimals must be a non-negative integer, got {decimals!r}")
    return Distribution("UNIFORM", {"low": low, "high": high}, decimals=decimals)


def parse_unit(raw: Any, fail: Any) -> str:
    if raw not in TIME_UNITS:
        fail(f"unknown time unit {raw!r} (known: {', '.join(sorted(TIME_UNITS))})")
    return raw
