"""Runner `pandas` (the default): a site read, checked, flattened and written in this process."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from fedlab.flatten.checks import check_resource
from fedlab.flatten.derive import derive_tables
from fedlab.flatten.engines import Engine, RowEngine, engine_class
from fedlab.flatten.ledger import FlattenResult, Ledger
from fedlab.flatten.readers import Source, bundle_sources, items, ndjson_sources
from fedlab.flatten.runners import Runner, Written
from fedlab.flatten.write import write_parquet_tables


class LocalRunner(Runner):
    name = "pandas"

    def run(self, sources: list[Source], engine: type[Engine], folder: Path, spark: Any = None) -> Written:
        return write_parquet_tables(flatten_sources(sources, engine), folder)


def flatten_sources(sources: list[Source], engine: str | type[Engine] = "views") -> FlattenResult:
    """Check every line or entry, flatten the admitted resources with `engine`, derive and harmonize."""
    flattener = (engine_class(engine) if isinstance(engine, str) else engine)()
    add = _adder(flattener)
    ledger = Ledger()
    admit = ledger.admit
    with no_cyclic_gc():
        for source in sources:
            stats, expected = ledger.open(source), source.expected_type
            for lineno, resource, error in items(source):
                reason = error or check_resource(resource, expected)
                if reason is None:
                    rtype = resource["resourceType"]
                    if admit(stats, lineno, None, rtype, resource.get("id")):
                        add(rtype, resource)
                else:
                    admit(stats, lineno, reason, None, None)
        return finish(flattener, ledger)


def _adder(engine: Engine) -> Callable[[str, dict[str, Any]], None]:
    """`engine.add`; for a RowEngine, its rows appended straight to the engine's lists."""
    if not isinstance(engine, RowEngine):
        return engine.add
    functions: dict[str, Callable[[dict[str, Any]], list[tuple]]] = {}

    def add(rtype: str, resource: dict[str, Any]) -> None:
        rows_of = functions.get(rtype)
        if rows_of is None:
            rows_of = functions[rtype] = engine.row_function(rtype)
            engine.rows.setdefault(rtype, [])
        engine.rows[rtype] += rows_of(resource)

    return add


def finish(engine: Engine, ledger: Ledger) -> FlattenResult:
    """The site's tables from what `engine` holds, with the ledger's quarantine and accounts."""
    tables, units = derive_tables(engine.frames())
    return FlattenResult(tables, ledger.quarantine, ledger.files, units)


@contextlib.contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while reading: the loop allocates millions of containers
    (parsed JSON, row tuples) that form no cycles, and the collections it would trigger mostly
    re-scan the growing list of rows. Reference counting still frees everything as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def flatten_ndjson(paths: list[Path], types: dict[str, str] | None = None, engine: str = "views") -> FlattenResult:
    """Flatten typed NDJSON files; `types` maps a file name to its resource type (from the manifest)."""
    return flatten_sources(ndjson_sources(paths, types), engine)


def flatten_bundles(paths: Iterable[str | Path], engine: str = "views") -> dict[str, pd.DataFrame]:
    """Flatten FHIR bundles (Synthea transaction bundles, `urn:uuid:` references; `.json[.gz]`)."""
    return flatten_bundles_result(paths, engine).tables


def flatten_bundles_result(paths: Iterable[str | Path], engine: str = "views") -> FlattenResult:
    return flatten_sources(bundle_sources(paths), engine)
