"""Writing a flattened site: one Parquet file per table, `harmonization.json`, `quarantine.ndjson`,
and `_SUCCESS.json` last, all inside a staging folder that is renamed into place when complete."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fedlab.flatten.contract import SCHEMAS
from fedlab.io import SUCCESS, atomic_open, staging_dir, write_json

if TYPE_CHECKING:
    from fedlab.flatten.ledger import FlattenResult
    from fedlab.flatten.runners import Written


def to_arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def write_parquet_tables(result: FlattenResult, folder: Path) -> Written:
    """Each table of `result` as `folder/<table>.parquet` (one file)."""
    from fedlab.flatten.runners import Written

    started = time.perf_counter()
    for table, frame in result.tables.items():
        pq.write_table(to_arrow(frame, SCHEMAS[table]), folder / f"{table}.parquet")
    counts = {table: len(frame) for table, frame in result.tables.items()}
    return Written(result.harmonization(), result.quarantine, counts, time.perf_counter() - started)


def write_reports(folder: Path, written: Written, info: dict[str, Any]) -> None:
    """`harmonization.json`, `quarantine.ndjson`, then `_SUCCESS.json` (stage, info, counts, timing)."""
    started = time.perf_counter()
    write_json(folder / "harmonization.json", written.report)
    with atomic_open(folder / "quarantine.ndjson", "w", encoding="utf-8") as handle:
        for row in written.quarantine:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
    seconds = written.write_seconds + time.perf_counter() - started
    write_json(folder / SUCCESS, {"stage": "flatten", **info, "counts": written.counts,
                                  "quarantined": len(written.quarantine), "write_seconds": round(seconds, 3),
                                  "finished": dt.datetime.now(dt.UTC).isoformat()})


def write_tables(result: FlattenResult, out: Path, info: dict[str, Any]) -> Path:
    """Write a result's tables and reports into `out` atomically, `_SUCCESS.json` last."""
    with staging_dir(out) as tmp:
        write_reports(tmp, write_parquet_tables(result, tmp), info)
    return out
