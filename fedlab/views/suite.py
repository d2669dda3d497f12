"""Run the SQL-on-FHIR v2 test suite (a folder of test JSON files) against the runner.

Each file holds `resources` and `tests: [{title, tags?, view, expect | expectColumns | expectError}]`.
A case passes when the rows equal `expect` as a multiset (the specification leaves row order
open), every row has exactly the expected columns, the column order equals `expectColumns` when
given, and `expectError` cases raise `ViewDefinitionError`. Cases tagged `shareable` are the ones
the specification asks every implementation to pass; they are also counted separately.

    python -m fedlab.views.suite DIR   # prints the JSON summary
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlab.views.runner import ViewDefinitionError, compile_view, rows_for_resource

SHAREABLE = "shareable"


def run_suite(folder: Path | str) -> dict[str, Any]:
    """Per-file and total pass counts and rates for every test file in `folder`."""
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*.json") if p.name != "tests.schema.json")
    if not files:
        raise FileNotFoundError(f"no SQL-on-FHIR test files (*.json) in {folder}")
    per_file = {path.name: run_file(path) for path in files}
    totals = {key: sum(f[key] for f in per_file.values())
              for key in ("cases", "passed", "shareable_cases", "shareable_passed")}  # fmt: skip
    return {
        "folder": str(folder),
        "files": per_file,
        **totals,
        "pass_rate": _rate(totals["passed"], totals["cases"]),
        "shareable_pass_rate": _rate(totals["shareable_passed"], totals["shareable_cases"]),
        "failures": [{"file": name, **failure} for name, f in per_file.items() for failure in f["failures"]],
    }


def run_file(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: invalid JSON ({error.msg})") from None
    resources = document.get("resources", [])
    summary: dict[str, Any] = {"cases": 0, "passed": 0, "shareable_cases": 0, "shareable_passed": 0, "failures": []}
    for index, case in enumerate(document.get("tests", [])):
        title = case.get("title", f"tests[{index}]")
        reason = check_case(case, resources)
        shareable = SHAREABLE in case.get("tags", [])
        summary["cases"] += 1
        summary["shareable_cases"] += shareable
        if reason is None:
            summary["passed"] += 1
            summary["shareable_passed"] += shareable
        else:
            summary["failures"].append({"title": title, "shareable": shareable, "reason": reason})
    return summary


def check_case(case: dict[str, Any], resources: list[dict[str, Any]]) -> str | None:
    """None when the case passes, else why it failed."""
    try:
        compiled = compile_view(case.get("view"))
        rows = [row for resource in resources for row in rows_for_resource(compiled, resource)]
    except ViewDefinitionError as error:
        return None if case.get("expectError") else f"unexpected error: {error}"
    except Exception as error:  # a crash is a failure of the runner, reported, not raised
        return f"crash: {type(error).__name__}: {error}"
    if case.get("expectError"):
        return "expected an error, got rows"
    if "expectColumns" in case and compiled.columns != case["expectColumns"]:
        return f"columns {compiled.columns} != expected {case['expectColumns']}"
    if "expect" in case:
        return _compare_rows(rows, case["expect"])
    return None


def _compare_rows(actual: list[dict], expected: list[dict]) -> str | None:
    for row in expected:
        if rows_keys := (set(actual[0]) if actual else None):
            if set(row) != rows_keys:
                return f"columns {sorted(rows_keys)} != expected {sorted(row)}"
    got, want = Counter(map(_canonical, actual)), Counter(map(_canonical, expected))
    if got == want:
        return None
    return f"rows differ: missing {list((want - got).elements())[:3]}, unexpected {list((got - want).elements())[:3]}"


def _canonical(row: dict) -> str:
    return json.dumps(_normalize(row), sort_keys=True)


def _normalize(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _normalize(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_normalize(item) for item in value]
    return value


def _rate(passed: int, cases: int) -> float:
    return round(passed / cases, 4) if cases else 0.0


def main_views_test(argv: Sequence[str] | None = None) -> int:
    """`fedlab views test DIR`: print the suite summary as JSON; exit 1 if any shareable case fails."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m fedlab.views.suite DIR", file=sys.stderr)
        return 2
    summary = run_suite(Path(args[0]))
    print(json.dumps(summary, indent=2))
    return 0 if summary["shareable_passed"] == summary["shareable_cases"] else 1


if __name__ == "__main__":
    raise SystemExit(main_views_test())
