"""Runner `spark`: a `RowEngine` on a Spark session; the driver keeps the books.

Executors read the NDJSON (`textFile`, gzip by extension, lines split as Python splits them),
parse, check and flatten each line (`executor_lines`), so malformed lines are quarantined there
too. What needs the whole site in file order, the duplicate-id rule and the accounting, runs on
the driver over the collected per-line records (a few fields and the flat rows, far smaller than
the JSON), with the same `Ledger` as the local runner, then the same derivation, harmonization and
Parquet writing: both runners write identical files. Driver memory bounds the site size; the
`spark-distributed` runner has no such bound.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlab.flatten.checks import check_resource
from fedlab.flatten.contract import TABLE_OF_TYPE, FlattenError
from fedlab.flatten.engines import Engine, RowEngine, engine_class
from fedlab.flatten.ledger import FlattenResult, Ledger
from fedlab.flatten.readers import Source, ends_with_newline, json_error, loads_line, ndjson_sources
from fedlab.flatten.runners import SparkRunner, Written
from fedlab.flatten.runners.local import finish
from fedlab.flatten.write import write_parquet_tables
from fedlab.registry import USER_MODULE_PREFIX

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# An executor's record of one non-blank line: (file, partition, line in partition, reason, resourceType,
# id, rows); after a partition's lines, (file, partition, None, line count, None, None, None).
Record = tuple


class SparkLinesRunner(SparkRunner):
    name = "spark"

    def run(self, sources: list[Source], engine: type[Engine], folder: Path, spark: Any = None) -> Written:
        return write_parquet_tables(flatten_sources_spark(spark, sources, engine), folder)


def flatten_ndjson_spark(spark: SparkSession, paths: list[Path], types: dict[str, str] | None = None,
                         engine: str = "views") -> FlattenResult:
    """`flatten_ndjson` with the per-line work done by Spark executors (a `RowEngine` only)."""
    return flatten_sources_spark(spark, ndjson_sources(paths, types, must_exist=True), engine_class(engine))


def flatten_sources_spark(spark: SparkSession, sources: list[Source], engine: type[Engine]) -> FlattenResult:
    flattener = row_engine(engine)
    ledger = Ledger()
    if not sources:
        return finish(flattener, ledger)
    parts = line_records(spark, sources, flattener.spawn())
    records = spark_job(sources, lambda: spark.sparkContext.union(parts).collect())
    records, last_line = number_lines(records)
    stats = [ledger.open(source) for source in sources]
    for file_index, lineno, reason, rtype, rid, rows in records:
        reason = settled_reason(reason, lineno == last_line[file_index], sources[file_index].path)
        if ledger.admit(stats[file_index], lineno, reason, rtype, rid):
            flattener.add_rows(rtype, rows)
    return finish(flattener, ledger)


def row_engine(engine: type[Engine]) -> RowEngine:
    """An instance of `engine`, which must be a `RowEngine` to run on executors."""
    if not issubclass(engine, RowEngine):
        raise FlattenError(f"the Spark runners run a RowEngine (one resource at a time, e.g. views), "
                           f"not {engine.name or engine.__name__!r}")
    module = sys.modules.get(engine.__module__)
    if engine.__module__.startswith(USER_MODULE_PREFIX) and module is not None:
        from pyspark import cloudpickle  # a class from a user's file travels by value, not by import

        cloudpickle.register_pickle_by_value(module)
    return engine()


def line_records(spark: SparkSession, sources: list[Source], spawn: Callable[[], RowEngine]) -> list[Any]:
    """One RDD of `executor_lines` records per input file."""
    from fedlab.views.spark import use_driver_python_locally

    use_driver_python_locally(spark)
    context = spark.sparkContext
    return [context.textFile(str(source.path.resolve())).mapPartitionsWithIndex(
        functools.partial(executor_lines, index, source.expected_type, spawn))
        for index, source in enumerate(sources)]


def executor_lines(file_index: int, expected_type: str | None, spawn: Callable[[], RowEngine],
                   partition: int, lines: Iterable[str]) -> Iterator[Record]:
    """On an executor: a `Record` per non-blank line, then the partition's line count, so the driver
    can number the lines (`zipWithIndex` would cost one extra Spark job per file)."""
    engine = spawn()  # views compile once per Python worker (compile_view caches)
    count = 0
    for local, text in enumerate(lines):
        count += 1
        if partition == 0 and local == 0:
            text = text.removeprefix("\ufeff")  # a byte-order mark, as the local runner's utf-8-sig
        if not text or text.isspace():
            continue
        try:
            resource = loads_line(text)
        except json.JSONDecodeError:
            # The local runner reads lines with their newline, which moves some error positions:
            # keep both messages; the driver knows which line is the file's last.
            yield file_index, partition, local, (json_error(text + "\n"), json_error(text)), None, None, None
            continue
        reason = check_resource(resource, expected_type)
        if reason:
            yield file_index, partition, local, reason, None, None, None
            continue
        rtype = resource.get("resourceType")
        rows = engine.rows_of(rtype, resource) if rtype in TABLE_OF_TYPE else None
        yield file_index, partition, local, None, rtype, resource.get("id"), rows
    yield file_index, partition, None, count, None, None, None


def line_offsets(counts: dict[tuple[int, int], int]) -> tuple[dict[tuple[int, int], int], dict[int, int]]:
    """From the line count of each (file, partition): the number of lines before each partition in
    its file, and each file's number of lines."""
    offsets: dict[tuple[int, int], int] = {}
    totals: dict[int, int] = {}
    for file_index, partition in sorted(counts):
        offsets[(file_index, partition)] = totals.get(file_index, 0)
        totals[file_index] = totals.get(file_index, 0) + counts[(file_index, partition)]
    return offsets, totals


def number_lines(records: list[Record]) -> tuple[list[tuple], dict[int, int]]:
    """(file, line number, reason, resourceType, id, rows) in file and line order, and the number
    of lines of each file."""
    offsets, totals = line_offsets({(r[0], r[1]): r[3] for r in records if r[2] is None})
    numbered = [(r[0], offsets[(r[0], r[1])] + r[2] + 1, *r[3:]) for r in records if r[2] is not None]
    numbered.sort(key=lambda record: (record[0], record[1]))
    return numbered, totals


def settled_reason(reason: Any, last_line: bool, path: Path) -> Any:
    """A malformed line's two messages (with and without a newline) settled: the local runner reads
    every line with its newline except a last line that has none."""
    if isinstance(reason, tuple):
        return reason[1] if last_line and not ends_with_newline(path) else reason[0]
    return reason


def spark_job(sources: list[Source], job: Callable[[], Any]) -> Any:
    """`job()`, with a Spark failure turned into a FlattenError naming the inputs."""
    try:
        return job()
    except Exception as error:  # py4j / PythonException: name the input instead of a JVM trace
        message = str(error).strip().splitlines()
        raise FlattenError(f"Spark could not flatten {', '.join(str(s.path) for s in sources)}: "
                           f"{message[-1] if message else type(error).__name__}") from None
