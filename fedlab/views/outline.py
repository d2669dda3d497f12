"""A ViewDefinition at a glance: one row per column, with the FHIRPath that fills it and the
`forEach` / `unionAll` branches it sits in, instead of the nested JSON."""

from __future__ import annotations

from typing import Any

import pandas as pd


def view_outline(view: dict[str, Any]) -> pd.DataFrame:
    """Columns of `view` in order: name, type, path, and the chain of branch conditions above it."""
    rows: list[dict[str, str]] = []
    for select in view.get("select", []):
        _walk(select, [], rows)
    return pd.DataFrame(rows, columns=["column", "type", "path", "within"])


def _walk(select: dict[str, Any], context: list[str], rows: list[dict[str, str]]) -> None:
    for key in ("forEach", "forEachOrNull"):
        if key in select:
            context = [*context, f"{key}: {select[key]}"]
    for column in select.get("column", []):
        rows.append({"column": column["name"], "type": column.get("type", ""), "path": column["path"],
                     "within": " / ".join(context)})
    for nested in select.get("select", []):
        _walk(nested, context, rows)
    for branch, nested in enumerate(select.get("unionAll", []), start=1):
        _walk(nested, [*context, f"unionAll branch {branch}"], rows)
