"""The ledger: every input line accounted for, the quarantine, and the counts of `harmonization.json`.

One accounting model for every runner:

- a line is a resource or quarantined, never lost: per file, `lines == resources + quarantined`;
- ids are unique per resource type: the first occurrence in file and line order wins, a later one
  is quarantined as a duplicate;
- a resource of a type no table holds is counted as read (`ignored_types`), not tabled;
- a table's counts are its rows, its flags (condition, observation; medication requests: `ok` when
  a drug class was found, else `unknown_code`) and, for observations, the units seen per concept.

`Ledger.admit` applies the line rules one line at a time, in file order (the local and Spark
runners); `Ledger.settle` records a whole file at once from counts made elsewhere (the
spark-distributed runner, which applies the duplicate rule as a shuffle). `table_counts` counts a
table or any part of it; `merge_counts` adds parts up, so counts made per chunk on executors equal
counts made over the whole table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fedlab import harmonization as hz
from fedlab.flatten.contract import TABLE_OF_TYPE

if TYPE_CHECKING:
    from fedlab.flatten.readers import Source


class Ledger:
    """Line accounting and quarantine for one site's inputs."""

    def __init__(self) -> None:
        self.quarantine: list[dict[str, Any]] = []
        self.files: list[dict[str, Any]] = []
        self.seen_ids: dict[str, set[str]] = {t: set() for t in TABLE_OF_TYPE}

    def open(self, source: Source) -> dict[str, Any]:
        """The account of one more input file (in reading order)."""
        stats = {"file": source.path.name, "type": source.expected_type, "lines": 0, "resources": 0,
                 "quarantined": 0, "ignored_types": 0}
        self.files.append(stats)
        return stats

    def admit(self, stats: dict[str, Any], lineno: int, reason: str | None, rtype: str | None,
              rid: Any) -> bool:
        """Count one line (`reason`: why its checks failed, or None); True when its resource belongs
        in a table."""
        stats["lines"] += 1
        seen = self.seen_ids.get(rtype)  # type: ignore[arg-type]
        if reason is None and seen is not None and rid in seen:
            reason = duplicate_reason(rtype, rid)  # type: ignore[arg-type]
        if reason:
            self.quarantine.append({"file": stats["file"], "line": lineno, "reason": reason})
            stats["quarantined"] += 1
            return False
        stats["resources"] += 1
        if seen is None:
            stats["ignored_types"] += 1  # counted as read; not part of the tidy tables
            return False
        seen.add(rid)
        return True

    def settle(self, stats: dict[str, Any], lines: int, rejected: Iterable[tuple[int, str]], ignored: int) -> None:
        """Record a whole file: its count of non-blank lines, its quarantined lines (line number,
        reason: failed checks and duplicates alike) in line order, and its lines of other types."""
        for lineno, reason in rejected:
            self.quarantine.append({"file": stats["file"], "line": lineno, "reason": reason})
            stats["quarantined"] += 1
        stats["lines"] += lines
        stats["resources"] += lines - stats["quarantined"]
        stats["ignored_types"] += ignored


def duplicate_reason(rtype: str, rid: Any) -> str:
    return f"duplicate {rtype} id {rid}"


# ---- table counts ----------------------------------------------------------------------------

def table_counts(table: str, frame: pd.DataFrame) -> dict[str, Any]:
    """Rows, flags and (observation) units seen per concept of a table or a part of it."""
    entry: dict[str, Any] = {"rows": len(frame)}
    if "flag" in frame:
        flags = Counter(frame["flag"])
    elif table == "medication_request":
        flags = Counter(np.where(frame["concept"].notna(), "ok", "unknown_code"))
    else:
        return entry
    entry["flags"] = {flag: int(flags.get(flag, 0)) for flag in hz.FLAGS}
    if table == "observation":
        entry["units_seen"] = units_seen(frame)
    return entry


def units_seen(observations: pd.DataFrame) -> dict[str, dict[str, int]]:
    """How often each unit (or "(none)") was met per harmonized concept."""
    known = observations[observations["concept"].notna()]
    units = known["unit"].where(known["unit"].notna() & (known["unit"] != ""), "(none)")
    seen: dict[str, dict[str, int]] = {}
    for (concept, unit), count in Counter(zip(known["concept"], units, strict=True)).items():
        seen.setdefault(concept, {})[unit] = count
    return seen


def merge_counts(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """`table_counts` of a table from the counts of its parts."""
    total: dict[str, Any] = {"rows": 0}
    for part in parts:
        total["rows"] += part["rows"]
        if "flags" in part:
            flags = total.setdefault("flags", dict.fromkeys(hz.FLAGS, 0))
            for flag, count in part["flags"].items():
                flags[flag] += count
        if "units_seen" in part:
            seen = total.setdefault("units_seen", {})
            for concept, units in part["units_seen"].items():
                for unit, count in units.items():
                    seen.setdefault(concept, {})[unit] = seen.get(concept, {}).get(unit, 0) + count
    return total


def harmonization_report(tables: dict[str, dict[str, Any]], files: list[dict[str, Any]], quarantined: int
                         ) -> dict[str, Any]:
    """The content of `harmonization.json` from each table's counts and the files' accounts."""
    tables = {name: dict(entry) for name, entry in tables.items()}
    units = tables.get("observation", {}).pop("units_seen", {})
    lines = sum(f["lines"] for f in files)
    accepted = sum(f["resources"] for f in files)
    return {"tables": tables, "files": files, "units_seen": units,
            "reconciliation": {"lines": lines, "resources": accepted, "quarantined": quarantined,
                               "balanced": lines == accepted + quarantined}}


@dataclass
class FlattenResult:
    """One site flattened in memory: the tables, the quarantine and the files' accounts."""

    tables: dict[str, pd.DataFrame]
    quarantine: list[dict[str, Any]]
    files: list[dict[str, Any]]
    units: dict[str, dict[str, int]] = field(default_factory=dict)

    def harmonization(self) -> dict[str, Any]:
        """Counts per table of each flag, file-level line accounting and the reconciliation."""
        counts = {name: table_counts(name, frame) for name, frame in self.tables.items()}
        return harmonization_report(counts, self.files, len(self.quarantine))
