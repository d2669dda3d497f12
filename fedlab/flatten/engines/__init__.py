"""Flatten engines: resources in, raw frames out, behind one small interface, in a registry.

An engine receives every admitted resource of a site (`add(resource_type, resource)`, in file and
line order) and hands back one DataFrame per resource type (`frames()`) with the raw columns of
`fedlab.flatten.contract.RAW_COLUMNS` (the columns of fedlab's ViewDefinitions: codes as found,
FHIR date strings, OMB race and ethnicity codes). Everything after that (derivation,
harmonization, the schemas, quarantine and accounting) is fedlab's and the same for every engine.

A `RowEngine` flattens one resource at a time into row tuples (`rows_of`), so the Spark runners can
run it on executors. fedlab's engines are `views` (its SQL-on-FHIR ViewDefinitions, a
`RowEngine`) and `fhiry` (fhiry's DataFrame path). Your own: a subclass of `Engine` in a file of
yours, named in the YAML config as `flatten.engine: path/to/file.py:MyEngine` (relative to the
project root) or `package.module:MyEngine`, or registered with `ENGINES.register("mine", MyEngine)`.
See docs/flatten-engines.md.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedlab.registry import Registry, RegistryError

if TYPE_CHECKING:
    import pandas as pd


class Engine(ABC):
    """Resources in, raw frames out (one per resource type)."""

    name: ClassVar[str] = ""

    @abstractmethod
    def add(self, resource_type: str, resource: dict[str, Any]) -> None:
        """One admitted resource (checked, not a duplicate, of a type a table holds)."""

    @abstractmethod
    def frames(self) -> dict[str, pd.DataFrame | None]:
        """Per resource type, the raw columns of its rows (None or an empty frame when there are none)."""


class RowEngine(Engine):
    """An engine whose rows depend on one resource at a time, so it runs on Spark executors as well.

    A subclass gives `rows_of` (and `columns`, when its tuples are not in `RAW_COLUMNS` order); the
    rows are kept here, per resource type."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple]] = {}

    @abstractmethod
    def rows_of(self, resource_type: str, resource: dict[str, Any]) -> list[tuple]:
        """The rows of one resource, as tuples in `columns(resource_type)` order."""

    def row_function(self, resource_type: str) -> Callable[[dict[str, Any]], list[tuple]]:
        """`rows_of` for one resource type (an engine may give a faster function)."""
        return functools.partial(self.rows_of, resource_type)

    def columns(self, resource_type: str) -> list[str]:
        from fedlab.flatten.contract import RAW_COLUMNS

        return RAW_COLUMNS[resource_type]

    def add(self, resource_type: str, resource: dict[str, Any]) -> None:
        self.add_rows(resource_type, self.rows_of(resource_type, resource))

    def add_rows(self, resource_type: str, rows: list[tuple]) -> None:
        """Rows made by `rows_of`, here or on an executor."""
        self.rows.setdefault(resource_type, []).extend(rows)

    def clear(self) -> None:
        """Forget the rows added so far."""
        self.rows = {}

    def frames(self) -> dict[str, pd.DataFrame | None]:
        import pandas as pd

        return {rtype: pd.DataFrame.from_records(rows, columns=self.columns(rtype))
                for rtype, rows in self.rows.items() if rows}

    def spawn(self) -> Callable[[], RowEngine]:
        """A picklable factory of equivalent engines, for executors."""
        return type(self)


def _not_an_engine(found: Any) -> str | None:
    if isinstance(found, type) and issubclass(found, Engine):
        return None
    return f"{found!r} is not a subclass of fedlab.flatten.engines.Engine"


ENGINES: Registry[type[Engine]] = Registry(
    "flatten engine",
    {"views": "fedlab.flatten.engines.views:ViewsEngine", "fhiry": "fedlab.flatten.engines.fhiry:FhiryEngine"},
    check=_not_an_engine)


def engine_class(name: str, root: Path | None = None) -> type[Engine]:
    """The engine class `flatten.engine` names; FlattenError when it names none."""
    from fedlab.flatten.contract import FlattenError

    try:
        return ENGINES.get(name, root)
    except RegistryError as error:
        raise FlattenError(str(error)) from None


def make_engine(name: str, root: Path | None = None) -> Engine:
    return engine_class(name, root)()
