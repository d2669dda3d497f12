"""Flatten FHIR R4 or R5 resources into tidy, harmonized Parquet tables: the `flatten` stage.

The files follow the stage's own diagram:

    readers.py   a site's files -> (line, resource | parse error): NDJSON, Bundles, export manifests
    checks.py    each resource -> None, or the reason it cannot be used
    ledger.py    every line a resource or quarantined; unique ids; the counts of harmonization.json
    engines/     admitted resources -> raw columns: `views` (SQL-on-FHIR ViewDefinitions, default),
                 `fhiry`, or yours (a registry)
    derive.py    raw columns -> the tables: dates, labels, concepts, units (pint), the schemas
    runners/     where the work runs: `pandas` (this process), `spark`, `spark-distributed`
    write.py     Parquet, harmonization.json, quarantine.ndjson, _SUCCESS.json, atomically
    stage.py     `flatten(exp)`: each site's export folder into data/tables/<run>/<site>/
    contract.py  the table schemas, the raw columns, FlattenError

Every input line (or bundle entry) is checked first; a bad one goes to quarantine with its file,
line and reason, never silently dropped. `tests/test_flatten_parity.py` checks that both engines
and all runners give the same rows.

The names below are imported on first use, so `fedlab.config` can check `flatten.engine` and
`flatten.runner` against their registries without loading pandas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedlab.flatten.checks import DATETIME_FIELDS, REQUIRED, check_resource
    from fedlab.flatten.contract import (
        RAW_COLUMNS,
        SCHEMAS,
        TABLE_OF_TYPE,
        UTC_TS,
        FlattenError,
        spark_schema,
    )
    from fedlab.flatten.derive import (
        component_row_id,
        ethnicity_label,
        harmonize_observations,
        race_label,
        ref_id,
    )
    from fedlab.flatten.engines import ENGINES, Engine, RowEngine, make_engine
    from fedlab.flatten.engines.fhiry import FhiryEngine, run_fhiry
    from fedlab.flatten.engines.views import ViewsEngine
    from fedlab.flatten.ledger import FlattenResult, Ledger
    from fedlab.flatten.readers import export_files
    from fedlab.flatten.runners import RUNNERS, Runner, Written
    from fedlab.flatten.runners.distributed import DistributedResult, flatten_ndjson_spark_distributed
    from fedlab.flatten.runners.local import (
        flatten_bundles,
        flatten_bundles_result,
        flatten_ndjson,
        flatten_sources,
    )
    from fedlab.flatten.runners.spark import flatten_ndjson_spark
    from fedlab.flatten.stage import flatten, flatten_site
    from fedlab.flatten.write import write_tables
    from fedlab.views.plan import ViewRows

_HOMES = {
    "fedlab.flatten.checks": ("DATETIME_FIELDS", "REQUIRED", "check_resource"),
    "fedlab.flatten.contract": ("RAW_COLUMNS", "SCHEMAS", "TABLE_OF_TYPE", "UTC_TS", "FlattenError", "spark_schema"),
    "fedlab.flatten.derive": ("component_row_id", "ethnicity_label", "harmonize_observations", "race_label", "ref_id"),
    "fedlab.flatten.engines": ("ENGINES", "Engine", "RowEngine", "make_engine"),
    "fedlab.flatten.engines.fhiry": ("FhiryEngine", "run_fhiry"),
    "fedlab.flatten.engines.views": ("ViewsEngine",),
    "fedlab.flatten.ledger": ("FlattenResult", "Ledger"),
    "fedlab.flatten.readers": ("export_files",),
    "fedlab.flatten.runners": ("RUNNERS", "Runner", "Written"),
    "fedlab.flatten.runners.distributed": ("DistributedResult", "flatten_ndjson_spark_distributed"),
    "fedlab.flatten.runners.local": ("flatten_bundles", "flatten_bundles_result", "flatten_ndjson", "flatten_sources"),
    "fedlab.flatten.runners.spark": ("flatten_ndjson_spark",),
    "fedlab.flatten.stage": ("flatten", "flatten_site"),
    "fedlab.flatten.write": ("write_tables",),
    "fedlab.views.plan": ("ViewRows",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = ["DATETIME_FIELDS", "DistributedResult", "ENGINES", "Engine", "FhiryEngine", "FlattenError",
           "FlattenResult", "Ledger", "RAW_COLUMNS", "REQUIRED", "RUNNERS", "RowEngine", "Runner", "SCHEMAS",
           "TABLE_OF_TYPE", "UTC_TS", "ViewRows", "ViewsEngine", "Written", "check_resource",
           "component_row_id", "ethnicity_label", "export_files", "flatten", "flatten_bundles",
           "flatten_bundles_result", "flatten_ndjson", "flatten_ndjson_spark",
           "flatten_ndjson_spark_distributed", "flatten_site", "flatten_sources", "harmonize_observations",
           "make_engine", "race_label", "ref_id", "run_fhiry", "spark_schema", "write_tables"]


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'fedlab.flatten' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
