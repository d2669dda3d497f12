"""Runner `spark-distributed`: the rows stay on the executors, from reading to writing.

The same `executor_lines` records as runner `spark`, kept (persisted) on the executors. The driver
collects one summary per (file, partition): its line count, its quarantined lines and its count of
ignored types; line numbers are partition offsets plus the line's place in its partition. The
duplicate-id rule (first occurrence in file and line order wins among lines that pass the checks)
is a combineByKey over (resourceType, id) -> (file, partition, line in partition), which orders
exactly as (file, line) does; only the losers reach the driver, which records each file in the same
`Ledger` as the other runners (`Ledger.settle`), and come back to the executors as a broadcast set.
Each table's admitted rows then go, in pickled chunks, through `mapInPandas` running the same
`derive_tables` as the local runner, and Spark writes them as a Parquet dataset (a folder of part
files). The tables' counts are `table_counts` per batch of the written datasets, added up on the
driver (`merge_counts`): the same counts as the local runner's.
"""

from __future__ import annotations

import functools
import json
import pickle
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from fedlab.flatten.contract import SCHEMAS, TABLE_OF_TYPE, empty_table, spark_schema
from fedlab.flatten.derive import derive_tables
from fedlab.flatten.engines import Engine, RowEngine, engine_class
from fedlab.flatten.ledger import Ledger, duplicate_reason, harmonization_report, merge_counts, table_counts
from fedlab.flatten.readers import Source, ndjson_sources
from fedlab.flatten.runners import SparkRunner, Written
from fedlab.flatten.runners.spark import (
    Record,
    line_offsets,
    line_records,
    row_engine,
    settled_reason,
    spark_job,
)

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

ROWS_PER_CHUNK = 20_000

# What the driver holds after `flatten_ndjson_spark_distributed`: no table rows.
DistributedResult = Written


class DistributedRunner(SparkRunner):
    name = "spark-distributed"

    def run(self, sources: list[Source], engine: type[Engine], folder: Path, spark: Any = None) -> Written:
        return flatten_sources_distributed(spark, sources, engine, folder)


def flatten_ndjson_spark_distributed(spark: SparkSession, paths: list[Path], types: dict[str, str] | None,
                                     folder: Path, engine: str = "views") -> Written:
    """Flatten typed NDJSON files on Spark executors into `folder/<table>.parquet/` (Parquet datasets,
    one part file per non-empty partition; `folder` should be a staging folder that is renamed into
    place when complete). Same rows, harmonization report and quarantine as `flatten_ndjson`."""
    return flatten_sources_distributed(spark, ndjson_sources(paths, types, must_exist=True), engine_class(engine),
                                       folder)


def flatten_sources_distributed(spark: SparkSession, sources: list[Source], engine: type[Engine],
                                folder: Path) -> Written:
    from pyspark import StorageLevel

    spawn = row_engine(engine).spawn()
    context = spark.sparkContext
    # One persisted RDD per file: the accounting job reads them all, each table only its own files.
    per_file = [rdd.persist(StorageLevel.MEMORY_AND_DISK) for rdd in line_records(spark, sources, spawn)]
    excluded = None
    try:
        records = context.union(per_file) if per_file else context.emptyRDD()
        collected = spark_job(sources, lambda: _accounting(records, context.defaultParallelism).collect())
        summaries = [value for kind, value in collected if kind == "summary"]
        duplicates = [value for kind, value in collected if kind == "duplicate"]
        ledger = _settle(sources, summaries, duplicates)
        excluded = context.broadcast({position for position, _ in duplicates})
        tables = {}
        for rtype, table in TABLE_OF_TYPE.items():
            # A typed file's admitted lines all have its type (other types are quarantined).
            own = [rdd for rdd, source in zip(per_file, sources, strict=True)
                   if source.expected_type in (rtype, "", None)]
            rows = context.union(own) if own else context.emptyRDD()
            path = folder / f"{table}.parquet"
            spark_job(sources, lambda rtype=rtype, rows=rows, path=path: _write_dataset(
                spark, rows, rtype, spawn, excluded, path))
            tables[table] = spark_job(sources, lambda table=table, path=path: _dataset_counts(spark, table, path))
    finally:
        for rdd in per_file:
            rdd.unpersist()
        if excluded is not None:
            excluded.unpersist()
    report = harmonization_report(tables, ledger.files, len(ledger.quarantine))
    return Written(report, ledger.quarantine, {table: entry["rows"] for table, entry in tables.items()})


# ---- the books: line counts, checks and the duplicate rule, one Spark job ----------------------

def _accounting(records: Any, partitions: int) -> Any:
    """One job over the persisted records: ("summary", (file, partition, lines incl. blank, non-blank
    lines, ignored types, [(line in partition, reason)] of the lines that failed the checks)) per
    partition, and ("duplicate", ((file, partition, line in partition), reason)) for every checked
    line whose (type, id) an earlier line already took. Summaries ride the same shuffle under keys
    no resource has (None instead of a type), so the records are read once."""
    keyed = records.mapPartitions(_keyed_lines)
    merged = keyed.combineByKey(_first_seen, _add_seen, _merge_seen, partitions)
    return merged.flatMap(_accounting_output)


def _keyed_lines(records: Iterable[Record]) -> Iterator[tuple]:
    """On an executor: ((type, id key), (position, id)) per line that passed the checks
    and belongs in a table, then (None, (file, partition)) -> this partition's summary."""
    key, count, non_blank, ignored, failed = None, 0, 0, 0, []
    for file_index, partition, local, reason, rtype, rid, _rows in records:
        if local is None:
            key, count = (file_index, partition), reason
            continue
        non_blank += 1
        if reason is not None:
            failed.append((local, reason))
        elif rtype not in TABLE_OF_TYPE:
            ignored += 1
        else:
            yield (rtype, _id_key(rid)), ((file_index, partition, local), rid)
    if key is not None:
        yield (None, key), ((*key, count, non_blank, ignored, failed), None)


def _accounting_output(item: tuple) -> list[tuple]:
    (rtype, _), (first, later) = item
    if rtype is None:
        return [("summary", first[0])]
    return [("duplicate", (position, duplicate_reason(rtype, rid))) for position, rid in later]


def _id_key(rid: Any) -> Any:
    # The ledger compares ids with Python equality; ids are strings in practice, anything else is
    # compared by its JSON text (type-tagged so that 1 and "1" stay different ids).
    return rid if type(rid) is str else ("json", json.dumps(rid, sort_keys=True))


def _first_seen(entry: tuple) -> tuple:
    return entry, []


def _add_seen(seen: tuple, entry: tuple) -> tuple:
    first, later = seen
    return (entry, [*later, first]) if entry[0] < first[0] else (first, [*later, entry])


def _merge_seen(left: tuple, right: tuple) -> tuple:
    first, later = left if left[0][0] < right[0][0] else right
    other = right if first is left[0] else left
    return first, [*later, other[0], *other[1]]


def _settle(sources: list[Source], summaries: list[tuple], duplicates: list[tuple]) -> Ledger:
    """The ledger of the site from the partitions' summaries and the duplicates."""
    offsets, totals = line_offsets({(s[0], s[1]): s[2] for s in summaries})
    rejected: dict[int, list[tuple[int, Any]]] = {index: [] for index in range(len(sources))}
    for file_index, partition, *_, failed in summaries:
        rejected[file_index] += [(offsets[(file_index, partition)] + local + 1, reason) for local, reason in failed]
    for (file_index, partition, local), reason in duplicates:
        rejected[file_index].append((offsets[(file_index, partition)] + local + 1, reason))
    ledger = Ledger()
    for index, source in enumerate(sources):
        lines = sorted(rejected[index], key=lambda line: line[0])
        ledger.settle(ledger.open(source), sum(s[3] for s in summaries if s[0] == index),
                      [(lineno, settled_reason(reason, lineno == totals[index], source.path)) for lineno, reason in lines],
                      sum(s[4] for s in summaries if s[0] == index))
    return ledger


# ---- the tables: derived and written on the executors ----------------------------------------

def _write_dataset(spark: SparkSession, records: Any, rtype: str, spawn: Callable[[], RowEngine],
                   excluded: Any, path: Path) -> None:
    from pyspark.sql.types import BinaryType, StructField, StructType

    chunks = records.mapPartitions(functools.partial(_admitted_chunks, rtype, excluded))
    frame = spark.createDataFrame(chunks, StructType([StructField("chunk", BinaryType(), False)]))
    table = frame.mapInPandas(functools.partial(_derive_chunks, rtype, spawn),
                              schema=spark_schema(SCHEMAS[TABLE_OF_TYPE[rtype]]))
    table.write.parquet(str(path))


def _admitted_chunks(rtype: str, excluded: Any, records: Iterable[Record]) -> Iterator[tuple[bytes]]:
    """On an executor: the rows of this partition's admitted `rtype` lines, pickled in chunks."""
    skip = excluded.value
    rows: list[tuple] = []
    for file_index, partition, local, reason, line_type, _rid, line_rows in records:
        if local is None or reason is not None or line_type != rtype or (file_index, partition, local) in skip:
            continue
        rows.extend(line_rows)
        if len(rows) >= ROWS_PER_CHUNK:
            yield (pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL),)
            rows = []
    if rows:
        yield (pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL),)


def _derive_chunks(rtype: str, spawn: Callable[[], RowEngine], batches: Iterable[pd.DataFrame]
                   ) -> Iterator[pd.DataFrame]:
    """On an executor: each chunk of rows through the local runner's derivation, harmonization and
    `conform` (`derive_tables` over an engine holding only this chunk)."""
    engine = spawn()
    for batch in batches:
        for chunk in batch["chunk"]:
            engine.clear()
            engine.add_rows(rtype, pickle.loads(chunk))
            yield derive_tables(engine.frames())[0][TABLE_OF_TYPE[rtype]]


def _dataset_counts(spark: SparkSession, table: str, path: Path) -> dict[str, Any]:
    """`table_counts` of a written dataset: counted per batch on the executors, added up here."""
    from pyspark.sql.types import StringType, StructField, StructType

    frame = spark.read.schema(spark_schema(SCHEMAS[table])).parquet(str(path))
    counted = frame.mapInPandas(functools.partial(_batch_counts, table),
                                schema=StructType([StructField("counts", StringType(), False)]))
    empty = table_counts(table, empty_table(table))  # the zero counts, also when there are no partitions
    return merge_counts([empty, *(json.loads(row["counts"]) for row in counted.collect())])


def _batch_counts(table: str, batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    parts = [table_counts(table, batch) for batch in batches]
    yield pd.DataFrame({"counts": [json.dumps(merge_counts(parts))]})
