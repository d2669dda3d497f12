"""The flatten stage's output contract: which resource type fills which table, each table's
Arrow schema, the raw columns an engine hands over, and the one error the stage raises."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pyarrow as pa

from fedlab.errors import FedlabError

UTC_TS = pa.timestamp("us", tz="UTC")

TABLE_OF_TYPE = {
    "Patient": "patient",
    "Encounter": "encounter",
    "Condition": "condition",
    "Observation": "observation",
    "MedicationRequest": "medication_request",
}

SCHEMAS: dict[str, pa.Schema] = {
    "patient": pa.schema([("patient_id", pa.string()), ("birth_date", pa.date32()), ("gender", pa.string()),
                          ("race", pa.string()), ("ethnicity", pa.string()), ("deceased", UTC_TS)]),
    "encounter": pa.schema([("encounter_id", pa.string()), ("patient_id", pa.string()),
                            ("class_code", pa.string()), ("type_code", pa.string()),
                            ("start", UTC_TS), ("end", UTC_TS)]),
    "condition": pa.schema([("condition_id", pa.string()), ("patient_id", pa.string()),
                            ("encounter_id", pa.string()), ("system", pa.string()), ("code", pa.string()),
                            ("onset", UTC_TS), ("abatement", UTC_TS), ("concept", pa.string()),
                            ("flag", pa.string())]),
    "observation": pa.schema([("observation_id", pa.string()), ("patient_id", pa.string()),
                              ("encounter_id", pa.string()), ("effective", UTC_TS), ("loinc", pa.string()),
                              ("value", pa.float64()), ("unit", pa.string()), ("concept", pa.string()),
                              ("value_canonical", pa.float64()), ("unit_canonical", pa.string()),
                              ("flag", pa.string())]),
    "medication_request": pa.schema([("medication_request_id", pa.string()), ("patient_id", pa.string()),
                                     ("encounter_id", pa.string()), ("authored_on", UTC_TS),
                                     ("rxnorm", pa.string()), ("status", pa.string()), ("concept", pa.string())]),
}

# What an engine gives per resource type (`Engine.frames`): the columns of fedlab's ViewDefinitions
# (`fedlab/views/definitions/<table>.json`), raw: codes as found, dates and times as FHIR strings,
# race and ethnicity as OMB category codes. `fedlab.flatten.derive` turns them into the tables.
RAW_COLUMNS: dict[str, list[str]] = {
    "Patient": ["patient_id", "birth_date", "gender", "race", "ethnicity", "deceased"],
    "Encounter": ["encounter_id", "patient_id", "class_code", "type_code", "start", "end"],
    "Condition": ["condition_id", "patient_id", "encounter_id", "system", "code", "onset", "abatement"],
    "Observation": ["observation_id", "patient_id", "encounter_id", "effective", "loinc", "value", "unit"],
    "MedicationRequest": ["medication_request_id", "patient_id", "encounter_id", "authored_on", "rxnorm", "status"],
}


class FlattenError(FedlabError, ValueError):
    """Input that cannot be flattened at all (missing folder, unreadable manifest, unknown engine)."""


def conform(frame: pd.DataFrame, schema: pa.Schema) -> pd.DataFrame:
    """Exactly the contract's columns, in order, timestamps as UTC microseconds, nulls as None."""
    columns = {}
    for fld in schema:
        column = frame[fld.name]
        if pa.types.is_timestamp(fld.type):
            if str(column.dtype) != "datetime64[us, UTC]":  # else already what this gives
                column = pd.to_datetime(column, utc=True).astype("datetime64[us, UTC]")
        elif pa.types.is_floating(fld.type):
            if column.dtype != "float64":
                column = pd.to_numeric(column, errors="coerce").astype("float64")
        elif pa.types.is_string(fld.type):
            values = column.to_numpy(dtype=object)
            nulls = pd.isna(values)
            if nulls.any():
                values = values.copy()
                values[nulls] = None
            column = values
        columns[fld.name] = column.array if isinstance(column, pd.Series) else column
    return pd.DataFrame(columns, index=pd.RangeIndex(len(frame)))


def empty_table(table: str) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in SCHEMAS[table].names})


def spark_schema(schema: pa.Schema) -> Any:
    """The Spark schema of a table contract (strings, dates, UTC timestamps, doubles)."""
    from pyspark.sql.types import DateType, DoubleType, StringType, StructField, StructType, TimestampType

    def spark_type(arrow_type: pa.DataType) -> Any:
        if pa.types.is_string(arrow_type):
            return StringType()
        if pa.types.is_date32(arrow_type):
            return DateType()
        if pa.types.is_timestamp(arrow_type):
            return TimestampType()
        if pa.types.is_float64(arrow_type):
            return DoubleType()
        raise FlattenError(f"no Spark type for {arrow_type} in the table contract")

    return StructType([StructField(f.name, spark_type(f.type), nullable=True) for f in schema])
