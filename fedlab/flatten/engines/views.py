"""Engine `views` (the default): fedlab's SQL-on-FHIR v2 ViewDefinitions, one per table.

Each view (`fedlab/views/definitions/<table>.json`) is compiled once into one generated Python
function over the resource dicts (`fedlab.views.plan.ViewRows`); a resource the compiled subset
cannot decide alone goes through the reference runner. The views read FHIR R4 and R5 shapes
(Encounter `period`/`actualPeriod`, `class` Coding/CodeableConcepts, MedicationRequest
`medicationCodeableConcept`/`medication.concept`). One resource at a time: a `RowEngine`, so the
Spark runners run it on executors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from fedlab.flatten.contract import TABLE_OF_TYPE
from fedlab.flatten.derive import component_row_id
from fedlab.flatten.engines import RowEngine
from fedlab.views import load_definitions
from fedlab.views.fhirpath import NeedsFullEngine
from fedlab.views.plan import ViewRows


class ViewsEngine(RowEngine):
    """Resources in, raw frames out, through fedlab's ViewDefinitions."""

    name = "views"

    def __init__(self, definitions: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.definitions = definitions or load_definitions()
        self.views: dict[str, ViewRows] = {}  # compiled on first use: a typed NDJSON file needs only its own

    def spawn(self) -> Callable[[], ViewsEngine]:
        return functools.partial(ViewsEngine, self.definitions)

    def view(self, rtype: str) -> ViewRows:
        compiled = self.views.get(rtype)
        if compiled is None:
            compiled = self.views[rtype] = ViewRows(self.definitions[TABLE_OF_TYPE[rtype]])
            if rtype == "Observation":
                self._obs_id = compiled.columns.index("observation_id")
                self._obs_loinc = compiled.columns.index("loinc")
        return compiled

    def columns(self, rtype: str) -> list[str]:
        return self.view(rtype).columns

    def row_function(self, rtype: str) -> Callable[[dict[str, Any]], list[tuple]]:
        """`rows_of` for one type, calling the view's generated function directly."""
        view = self.view(rtype)
        plan_rows = view._plan_rows
        if plan_rows is None or view.resource_type != rtype:
            return functools.partial(self.rows_of, rtype)
        split = rtype == "Observation"

        def rows(resource: dict[str, Any]) -> list[tuple]:
            try:
                found = plan_rows(resource)
            except NeedsFullEngine:
                found = view.rows(resource)  # counts the fallback; the reference runner decides
            return self._component_ids(found) if split and resource.get("component") else found

        return rows

    def rows_of(self, rtype: str, resource: dict[str, Any]) -> list[tuple]:
        view = self.views.get(rtype) or self.view(rtype)
        rows = view.rows(resource)
        return self._component_ids(rows) if rtype == "Observation" and resource.get("component") else rows

    def _component_ids(self, rows: list[tuple]) -> list[tuple]:
        """The view gives one row per component of an Observation; each needs its own id in the table."""
        return [row[:self._obs_id] + (component_row_id(row[self._obs_id], row[self._obs_loinc], index),)
                + row[self._obs_id + 1:] for index, row in enumerate(rows)]

    @property
    def fallbacks(self) -> int:
        """Resources the compiled views handed to the reference runner so far."""
        return sum(view.fallbacks for view in self.views.values())
