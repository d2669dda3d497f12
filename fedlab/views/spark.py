"""Run a ViewDefinition on Spark: NDJSON lines are flattened by the pure-Python runner inside
`flatMap`, so the work spreads over the cluster's executors while the semantics stay identical to
`run_view` (one implementation of the specification, not two)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlab.views.runner import INTEGER_TYPES, ViewDefinitionError, compile_view, rows_for_resource

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import DataType, StructType


def view_schema(view: dict[str, Any]) -> StructType:
    """The Spark schema of a view's rows: booleans, integers (long) and decimals (double) typed,
    everything else (ids, codes, dates, dateTimes) as strings, collections as arrays."""
    from pyspark.sql.types import StructField, StructType

    compiled = compile_view(view)
    fields = []
    for name in compiled.columns:
        column_type, collection = compiled.column_types[name]
        fields.append(StructField(name, _spark_type(column_type, collection), nullable=True))
    return StructType(fields)


def _spark_type(column_type: str | None, collection: bool) -> DataType:
    from pyspark.sql.types import ArrayType, BooleanType, DoubleType, LongType, StringType

    if column_type == "boolean":
        base: DataType = BooleanType()
    elif column_type in INTEGER_TYPES:
        base = LongType()
    elif column_type == "decimal":
        base = DoubleType()
    else:
        base = StringType()
    return ArrayType(base, containsNull=True) if collection else base


def run_view_spark(spark: SparkSession, view: dict[str, Any], ndjson_paths: Sequence[str | Path]) -> DataFrame:
    """Rows of `view` over the resources in `ndjson_paths` (one JSON resource per line)."""
    schema = view_schema(view)
    paths = [str(Path(p).resolve()) for p in ndjson_paths]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"NDJSON input not found: {missing}")
    if not paths:
        return spark.createDataFrame([], schema)
    use_driver_python_locally(spark)
    lines = spark.sparkContext.textFile(",".join(paths))
    columns = schema.fieldNames()
    string_columns = {f.name for f in schema.fields if f.dataType.typeName() == "string"}
    rows = lines.mapPartitions(lambda part: _flatten_partition(view, part, columns, string_columns))
    return spark.createDataFrame(rows, schema)


def use_driver_python_locally(spark: SparkSession) -> None:
    """In local mode, run Python workers on this interpreter (the one that has fhirpathpy and
    fedlab) rather than whatever `python3` is on PATH when PYSPARK_PYTHON is unset. On a cluster
    the executors' Python must provide fedlab and fhirpathpy itself."""
    context = spark.sparkContext
    if context.master.startswith("local") and not os.environ.get("PYSPARK_PYTHON"):
        context.pythonExec = sys.executable


def _flatten_partition(
    view: dict[str, Any], lines: Iterable[str], columns: list[str], string_columns: set[str]
) -> Iterator[tuple]:
    compiled = compile_view(view)  # once per partition: compiled paths do not pickle
    for line in lines:
        if not line.strip():
            continue
        try:
            resource = json.loads(line)
        except json.JSONDecodeError as error:
            raise ViewDefinitionError(
                f"view {compiled.label}: an NDJSON line is not JSON ({error.msg}): {line[:80]!r}"
            ) from None
        for row in rows_for_resource(compiled, resource):
            yield tuple(_spark_value(row[name], name in string_columns) for name in columns)


def _spark_value(value: Any, as_string: bool) -> Any:
    if as_string and value is not None and not isinstance(value, str):
        return json.dumps(value) if isinstance(value, dict | list) else str(value)
    return value
