"""Spark feature engineering: cohort, one index encounter per patient, label, features at index.

Per site, from `data/tables/<run>/<site>/*.parquet` (see docs/architecture.md):

- Candidate index encounters: wellness encounters (SNOMED 185349003, or 162673000 "general
  examination" in older Synthea); a patient with none contributes all ambulatory (AMB) encounters.
- Eligible: age >= task.min_age at the encounter; no outcome event at or before it; and either the
  outcome occurs within the horizon or the patient's data reach index + max(horizon,
  min_followup) (data end = the site's latest event date, or the patient's death if earlier).
- One index per patient: the eligible encounter with the smallest SHA-256 of
  "<experiment seed>|<patient_id>|<encounter_id>" (deterministic, independent of row order).
- Label: an outcome event in (index, index + horizon]. Outcome events: a condition of the outcome
  concept (onset), for t2d also HbA1c >= 6.5 % and an antidiabetic order; for hypertension also an
  antihypertensive order.
- Features use data in [index - lookback, index] only (active conditions: onset <= index and not
  abated at index). Years are 365.25 days.

All computation is Spark DataFrame code with window functions; only the final one-row-per-patient
result is collected to write one Parquet file per site. The sites still to build run as one Spark
plan over the union of their tables tagged with a `site` column; every join, window and grouping is
keyed by `site` (as is the data end date), so one site's rows never touch another site's features.
The per-query planning and scheduling cost, which dominates at site sizes, is then paid once.

`task.on_site_error`: a site whose tables are missing or lack a needed column, that has no dated
events, whose cohort is empty or whose label has one class is, with "skip", not given features;
its folder holds `_SKIPPED.json` (the reason) and `_SUCCESS.json` (`"skipped": true`), so it counts
as done and training leaves it out. With "raise" the first two raise `FeatureError` naming the site
and what is missing; an empty cohort or a single label class warns (`FeatureWarning`) and writes.
"""

from __future__ import annotations

import datetime as dt
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from fedlab import harmonization as hz
from fedlab.errors import FedlabError
from fedlab.io import SUCCESS, is_complete, read_json, staging_dir, write_json
from fedlab.stages import record_written

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import Column, DataFrame, SparkSession

    from fedlab.config import Experiment, TaskConfig

YEAR_SECONDS = 365.25 * 86400.0
WELLNESS_TYPES = ("185349003", "162673000")
LAB_CONCEPTS = ("bmi", "sbp", "dbp", "glucose", "hba1c", "total_cholesterol", "ldl", "hdl", "triglycerides", "egfr")
LAB_UNITS = {"bmi": "kg/m2", "sbp": "mm[Hg]", "dbp": "mm[Hg]", "glucose": "mg/dL", "hba1c": "%",
             "total_cholesterol": "mg/dL", "ldl": "mg/dL", "hdl": "mg/dL", "triglycerides": "mg/dL",
             "egfr": "mL/min/{1.73_m2}"}
RACES = ("white", "black", "asian")  # everything else (native, pacific, other, unknown) -> race_other
ENCOUNTER_CLASSES = ("AMB", "EMER", "IMP")
CONDITION_CONCEPTS = ("prediabetes", "t2d", "hypertension", "hyperlipidemia", "obesity", "ckd")
MEDICATION_CLASSES = ("antidiabetic", "antihypertensive", "statin")
# What counts as the outcome; the same concepts are left out of the features (always 0 in the cohort).
OUTCOMES: dict[str, dict[str, Any]] = {
    "t2d": {"conditions": ("t2d",), "medications": ("antidiabetic",), "hba1c_at_least": 6.5},
    "hypertension": {"conditions": ("hypertension",), "medications": ("antihypertensive",), "hba1c_at_least": None},
}
REQUIRED_COLUMNS = {
    "patient": ("patient_id", "birth_date", "gender", "race", "ethnicity", "deceased"),
    "encounter": ("encounter_id", "patient_id", "class_code", "type_code", "start"),
    "condition": ("patient_id", "onset", "abatement", "concept"),
    "observation": ("observation_id", "patient_id", "effective", "concept", "value_canonical"),
    "medication_request": ("patient_id", "authored_on", "concept"),
}
ID_COLUMNS = ("patient_id", "index_date")
SITE = "site"  # the column tagging every row with its site while all sites run in one plan
SKIPPED = "_SKIPPED.json"


class FeatureError(FedlabError, ValueError):
    """A site's tables cannot produce features; the message names the site and what is missing."""


class FeatureWarning(UserWarning):
    """A site produced features that cannot train a model (empty cohort, one label class)."""


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    unit: str
    definition: str
    source_codes: list[str]
    window: str
    type: str = "float64"


def feature_specs(task: TaskConfig) -> list[FeatureSpec]:
    """The one declared feature list: every site gets these columns in this order."""
    codes = hz.concept_codes()
    lookback = f"[index - {task.lookback_years:g} y, index]"
    specs = [
        FeatureSpec("age", "a", "age at the index encounter in years (365.25-day years)", [], "at index"),
        FeatureSpec("is_female", "1", "1 if Patient.gender is female", [], "static"),
    ]
    specs += [FeatureSpec(f"race_{r}", "1", f"1 if US Core race (OMB) is {r}", [], "static") for r in RACES]
    specs.append(FeatureSpec("race_other", "1", "1 if US Core race is not white, black or asian, or unknown",
                             [], "static"))
    specs.append(FeatureSpec("hispanic", "1", "1 if US Core ethnicity is Hispanic or Latino (2135-2)", [], "static"))
    for concept in LAB_CONCEPTS:
        unit, src = LAB_UNITS[concept], codes.get(concept, [])
        specs += [
            FeatureSpec(f"{concept}_last", unit, f"latest {concept} value (harmonized)", src, lookback),
            FeatureSpec(f"{concept}_mean", unit, f"mean of {concept} values", src, lookback),
            FeatureSpec(f"{concept}_min", unit, f"minimum {concept} value", src, lookback),
            FeatureSpec(f"{concept}_max", unit, f"maximum {concept} value", src, lookback),
            FeatureSpec(f"{concept}_slope", f"{unit}/a",
                        f"least-squares slope of {concept} per year (null with fewer than 2 time points)",
                        src, lookback),
            FeatureSpec(f"{concept}_missing", "1", f"1 if no {concept} value in the window", src, lookback),
        ]
    for cls in ENCOUNTER_CLASSES:
        specs.append(FeatureSpec(f"n_enc_{cls.lower()}", "1", f"number of {cls} encounters started in the window",
                                 [f"http://terminology.hl7.org/CodeSystem/v3-ActCode|{cls}"], lookback))
    excluded = OUTCOMES[task.outcome]
    for concept in CONDITION_CONCEPTS:
        if concept not in excluded["conditions"]:
            specs.append(FeatureSpec(f"cond_{concept}", "1",
                                     f"1 if a {concept} condition is active at index (onset <= index, "
                                     "abatement null or after index)", codes.get(concept, []), "at index"))
    for cls in MEDICATION_CLASSES:
        if cls not in excluded["medications"]:
            specs.append(FeatureSpec(f"med_{cls}", "1", f"1 if a {cls} drug was ordered in the window",
                                     codes.get(cls, []), lookback))
    return specs


def feature_names(task: TaskConfig) -> list[str]:
    return [spec.name for spec in feature_specs(task)]


# ---- reading and checking -----------------------------------------------------------------

def read_tables(spark: SparkSession, folder: Path, site: str) -> dict[str, DataFrame]:
    """The needed columns of each table; the schema comes from the Parquet footer read locally,
    which spares Spark one schema-inference job per table."""
    tables = {}
    for name, columns in REQUIRED_COLUMNS.items():
        path = folder / f"{name}.parquet"
        if not path.exists():
            raise FeatureError(f"site {site}: table {name}.parquet not found in {folder}; run `fedlab flatten` first")
        arrow_schema = _parquet_schema(path)
        missing = [c for c in columns if c not in arrow_schema.names]
        if missing:
            raise FeatureError(f"site {site}: {path} lacks column(s) {', '.join(missing)}")
        ddl = [_spark_type(arrow_schema.field(c).type) for c in columns]
        if None in ddl:  # an unusual type: let Spark read the schema itself
            tables[name] = spark.read.parquet(str(path)).select(*columns)
        else:
            schema = ", ".join(f"`{c}` {t}" for c, t in zip(columns, ddl, strict=True))
            tables[name] = spark.read.schema(schema).parquet(str(path))
    return tables


def _parquet_schema(path: Path) -> pa.Schema:
    """A table's schema, from one Parquet file or a Parquet dataset folder (`flatten.runner:
    spark-distributed` writes folders of part files)."""
    if path.is_dir():
        import pyarrow.dataset as ds

        return ds.dataset(path, format="parquet").schema
    return pq.read_schema(path)


def _spark_type(arrow_type: pa.DataType) -> str | None:
    checks = [(pa.types.is_string, "STRING"), (pa.types.is_large_string, "STRING"), (pa.types.is_date32, "DATE"),
              (pa.types.is_timestamp, "TIMESTAMP"), (pa.types.is_float64, "DOUBLE"), (pa.types.is_int64, "BIGINT")]
    return next((ddl for check, ddl in checks if check(arrow_type)), None)


def _seconds(column: str) -> Column:
    from pyspark.sql import functions as F

    return F.col(column).cast("timestamp").cast("double")


# ---- cohort, index, label -----------------------------------------------------------------

def combine_sites(per_site: dict[str, dict[str, DataFrame]]) -> dict[str, DataFrame]:
    """Each table as the union of all sites' rows, tagged with a `site` column."""
    from pyspark.sql import DataFrame
    from pyspark.sql import functions as F

    return {name: reduce(DataFrame.unionByName,
                         [tables[name].withColumn(SITE, F.lit(site)) for site, tables in per_site.items()])
            for name in REQUIRED_COLUMNS}


def data_end(t: dict[str, DataFrame]) -> DataFrame:
    """(site, data_end_s): the latest dated event of each site (epoch seconds)."""
    from pyspark.sql import functions as F

    dates = (t["encounter"].select(SITE, _seconds("start").alias("s"))
             .unionByName(t["observation"].select(SITE, _seconds("effective").alias("s")))
             .unionByName(t["condition"].select(SITE, _seconds("onset").alias("s")))
             .unionByName(t["medication_request"].select(SITE, _seconds("authored_on").alias("s"))))
    return dates.groupBy(SITE).agg(F.max("s").alias("data_end_s"))


def outcome_events(t: dict[str, DataFrame], outcome: str) -> DataFrame:
    from pyspark.sql import functions as F

    spec = OUTCOMES[outcome]
    events = (t["condition"].filter(F.col("concept").isin(*spec["conditions"]))
              .select(SITE, "patient_id", _seconds("onset").alias("event_s")))
    events = events.unionByName(t["medication_request"].filter(F.col("concept").isin(*spec["medications"]))
                                .select(SITE, "patient_id", _seconds("authored_on").alias("event_s")))
    if spec["hba1c_at_least"] is not None:
        high = (F.col("concept") == "hba1c") & (F.col("value_canonical") >= spec["hba1c_at_least"])
        events = events.unionByName(t["observation"].filter(high)
                                    .select(SITE, "patient_id", _seconds("effective").alias("event_s")))
    return events.filter(F.col("event_s").isNotNull())


def candidate_encounters(t: dict[str, DataFrame]) -> DataFrame:
    """Wellness encounters; all AMB encounters of a patient who has no wellness encounter."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    enc = (t["encounter"].select(SITE, "encounter_id", "patient_id", "class_code", "type_code",
                                 _seconds("start").alias("index_s")).filter(F.col("index_s").isNotNull())
           .withColumn("wellness", F.coalesce(F.col("type_code").isin(*WELLNESS_TYPES), F.lit(False))))
    enc = enc.withColumn("has_wellness", F.max(F.col("wellness").cast("int")).over(Window.partitionBy(SITE, "patient_id")))
    keep = F.col("wellness") | ((F.col("has_wellness") == 0) & (F.col("class_code") == "AMB"))
    return enc.filter(keep).select(SITE, "encounter_id", "patient_id", "index_s")


def label_candidates(t: dict[str, DataFrame], task: TaskConfig, ends: DataFrame) -> DataFrame:
    """Every candidate encounter with its eligibility flags and label; `ends` is `data_end(t)`."""
    from pyspark.sql import functions as F

    patients = (t["patient"].select(SITE, "patient_id", "gender", "race", "ethnicity",
                                    _seconds("birth_date").alias("birth_s"), _seconds("deceased").alias("death_s"))
                .join(F.broadcast(ends), SITE, "left"))
    first_event = (outcome_events(t, task.outcome).groupBy(SITE, "patient_id")
                   .agg(F.min("event_s").alias("first_event_s")))
    horizon_s = task.horizon_years * YEAR_SECONDS
    followup_s = max(task.horizon_years, task.min_followup_years) * YEAR_SECONDS
    end_s = F.least(F.coalesce(F.col("death_s"), F.col("data_end_s")), F.col("data_end_s"))
    cand = (candidate_encounters(t).join(patients, [SITE, "patient_id"], "inner")
            .join(first_event, [SITE, "patient_id"], "left")
            .withColumn("age", (F.col("index_s") - F.col("birth_s")) / YEAR_SECONDS))
    # No event at or before index, so the first event decides the label: in (index, index + horizon].
    no_prior = F.col("first_event_s").isNull() | (F.col("first_event_s") > F.col("index_s"))
    label = F.col("first_event_s").isNotNull() & (F.col("first_event_s") <= F.col("index_s") + horizon_s)
    return (cand.withColumn("age_ok", F.col("age") >= task.min_age)
            .withColumn("no_prior", no_prior)
            .withColumn("label", no_prior & label)
            .withColumn("followup_ok", F.col("label") | (end_s >= F.col("index_s") + followup_s)))


def select_index(cand: DataFrame, seed: int) -> DataFrame:
    """One eligible encounter per patient: the smallest hash of (seed, patient, encounter)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    eligible = cand.filter(F.col("age_ok") & F.col("no_prior") & F.col("followup_ok"))
    key = F.sha2(F.concat_ws("|", F.lit(str(seed)), F.col("patient_id"), F.col("encounter_id")), 256)
    order = Window.partitionBy(SITE, "patient_id").orderBy(key, F.col("encounter_id"))
    return eligible.withColumn("_rank", F.row_number().over(order)).filter(F.col("_rank") == 1).drop("_rank")


FUNNEL_STEPS = ("with_candidate_encounter", "age_eligible", "no_prior_outcome", "cohort")


def funnel(t: dict[str, DataFrame], cand: DataFrame, ends: DataFrame) -> dict[str, dict[str, Any]]:
    """Per site: patients left after each cohort rule (a patient counts if any candidate encounter
    passes), and `data_end_s`; one Spark job. A site with no rows at all is absent."""
    from pyspark.sql import functions as F

    steps = {
        "with_candidate_encounter": F.lit(True),
        "age_eligible": F.col("age_ok"),
        "no_prior_outcome": F.col("age_ok") & F.col("no_prior"),
        "cohort": F.col("age_ok") & F.col("no_prior") & F.col("followup_ok"),
    }
    per_patient = cand.groupBy(SITE, "patient_id").agg(
        *[F.max(F.coalesce(rule, F.lit(False)).cast("int")).alias(name) for name, rule in steps.items()])
    per_site = per_patient.groupBy(SITE).agg(*[F.sum(name).alias(name) for name in steps])
    patients = t["patient"].groupBy(SITE).agg(F.count(F.lit(1)).alias("patients"))
    rows = patients.join(ends, SITE, "full").join(per_site, SITE, "left").collect()
    return {row[SITE]: {"patients": int(row["patients"] or 0), **{name: int(row[name] or 0) for name in steps},
                        "data_end_s": row["data_end_s"]} for row in rows}


# ---- features -----------------------------------------------------------------------------

def long_events(t: dict[str, DataFrame]) -> DataFrame:
    """Labs, encounters, conditions and drug orders as one long table: (patient, kind, key, t, end, v, id)."""
    from pyspark.sql import functions as F

    def shape(frame: DataFrame, kind: str, key: str, when: str, end: str | None, value: str | None,
              row_id: str) -> DataFrame:
        return frame.select(
            SITE, "patient_id", F.lit(kind).alias("kind"), F.col(key).cast("string").alias("key"),
            _seconds(when).alias("t"), (_seconds(end) if end else F.lit(None).cast("double")).alias("end_t"),
            (F.col(value).cast("double") if value else F.lit(None).cast("double")).alias("v"),
            F.col(row_id).cast("string").alias("row_id"))

    labs = t["observation"].filter(F.col("concept").isin(*LAB_CONCEPTS) & F.col("value_canonical").isNotNull())
    conds = t["condition"].filter(F.col("concept").isin(*CONDITION_CONCEPTS))
    meds = t["medication_request"].filter(F.col("concept").isin(*MEDICATION_CLASSES))
    encs = t["encounter"].filter(F.col("class_code").isin(*ENCOUNTER_CLASSES))
    return (shape(labs, "lab", "concept", "effective", None, "value_canonical", "observation_id")
            .unionByName(shape(encs, "enc", "class_code", "start", None, None, "encounter_id"))
            .unionByName(shape(conds, "cond", "concept", "onset", "abatement", None, "patient_id"))
            .unionByName(shape(meds, "med", "concept", "authored_on", None, None, "patient_id")))


def window_features(t: dict[str, DataFrame], index: DataFrame, task: TaskConfig) -> DataFrame:
    """Every feature that looks at events, one row per patient, from a single pass over the events.

    Labs, encounters and orders count only in [index - lookback, index]; a condition counts when
    onset <= index and it is not abated at index. Lab statistics come from whole-partition window
    frames in a fixed row order, so sums are added in the same order on every run.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    lookback_s = task.lookback_years * YEAR_SECONDS
    in_lookback = (F.col("t") <= F.col("index_s")) & (F.col("t") >= F.col("index_s") - lookback_s)
    active = ((F.col("t") <= F.col("index_s"))
              & (F.col("end_t").isNull() | (F.col("end_t") > F.col("index_s"))))
    events = (long_events(t).join(F.broadcast(index), [SITE, "patient_id"])
              .filter(F.when(F.col("kind") == "cond", active).otherwise(in_lookback))
              .withColumn("x", (F.col("t") - F.col("index_s")) / YEAR_SECONDS))
    group = Window.partitionBy(SITE, "patient_id", "kind", "key").orderBy("t", "row_id")
    whole = group.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    n, sx, sv = F.count("v").over(whole), F.sum("x").over(whole), F.sum("v").over(whole)
    sxx, sxv = F.sum(F.col("x") * F.col("x")).over(whole), F.sum(F.col("x") * F.col("v")).over(whole)
    denom = n * sxx - sx * sx
    stats = events.select(
        SITE, "patient_id", "kind", "key", F.col("v").alias("last"), (sv / n).alias("mean"),
        F.min("v").over(whole).alias("min"), F.max("v").over(whole).alias("max"),
        F.when((n >= 2) & (denom > 1e-12), (n * sxv - sx * sv) / denom).alias("slope"),
        F.count(F.lit(1)).over(whole).alias("count"),
        # the latest row is the last in the frame's order: one sort serves every statistic
        F.row_number().over(group).alias("_position"),
    ).filter(F.col("_position") == F.col("count"))

    def pick(kind: str, key: str, stat: str) -> Column:
        # exactly one row per (patient, kind, key) survives, so max() just picks it
        return F.max(F.when((F.col("kind") == kind) & (F.col("key") == key), F.col(stat)))

    aggs = [pick("lab", c, s).alias(f"{c}_{s}") for c in LAB_CONCEPTS for s in ("last", "mean", "min", "max", "slope")]
    aggs += [pick("enc", c, "count").alias(f"n_enc_{c.lower()}") for c in ENCOUNTER_CLASSES]
    aggs += [pick("cond", c, "count").alias(f"cond_{c}") for c in CONDITION_CONCEPTS]
    aggs += [pick("med", c, "count").alias(f"med_{c}") for c in MEDICATION_CLASSES]
    return stats.groupBy(SITE, "patient_id").agg(*aggs)


def assemble(t: dict[str, DataFrame], cohort: DataFrame, task: TaskConfig) -> DataFrame:
    """Join the event features onto the cohort; fill counts/flags with 0; all features float64."""
    from pyspark.sql import functions as F

    frame = cohort.select(
        SITE, "patient_id", "index_s", "label", "age",
        (F.col("gender") == "female").alias("is_female"),
        *[(F.col("race") == r).alias(f"race_{r}") for r in RACES],
        (~F.coalesce(F.col("race").isin(*RACES), F.lit(False))).alias("race_other"),
        (F.col("ethnicity") == "hispanic").alias("hispanic"),
    )
    index = cohort.select(SITE, "patient_id", "index_s")
    frame = frame.join(window_features(t, index, task), [SITE, "patient_id"], "left")
    columns = []
    for name in feature_names(task):
        if name.endswith("_missing"):
            value = F.when(F.col(name.removesuffix("_missing") + "_last").isNull(), 1.0).otherwise(0.0)
        elif name.startswith(("cond_", "med_")):
            value = F.when(F.col(name) > 0, 1.0).otherwise(0.0)
        elif name.startswith(("n_enc_", "is_female", "race_", "hispanic")):
            value = F.coalesce(F.col(name).cast("double"), F.lit(0.0))
        else:
            value = F.col(name)
        columns.append(value.cast("double").alias(name))
    index_date = F.to_date(F.col("index_s").cast("timestamp")).alias("index_date")
    return frame.select(SITE, "patient_id", index_date, F.col("label").cast("long").alias("label"), *columns)


# ---- one site, all sites ------------------------------------------------------------------

@dataclass
class SiteFeatures:
    """One site's result: features and quality facts, or `error` when none could be built."""

    site: str
    features: pd.DataFrame | None = None
    quality: dict[str, Any] | None = None
    error: str | None = None
    warnings: list[str] | None = None  # empty cohort or one label class: written only with "raise"


def site_features(spark: SparkSession, folder: Path, task: TaskConfig, seed: int,
                  site: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Features (pandas, collected from Spark) and quality facts for one site's tables."""
    result = sites_features(spark, {site: read_tables(spark, folder, site)}, task, seed)[site]
    if result.error:
        raise FeatureError(result.error)
    for message in result.warnings or []:
        warnings.warn(message, FeatureWarning, stacklevel=2)
    return result.features, result.quality


def sites_features(spark: SparkSession, tables: dict[str, dict[str, DataFrame]], task: TaskConfig,
                   seed: int) -> dict[str, SiteFeatures]:
    """Features of several sites (each `read_tables` output) in one Spark plan, each site on its own."""
    if not tables:
        return {}
    with _without_adaptive_execution(spark):
        return _sites_features(combine_sites(tables), list(tables), task, seed)


@contextmanager
def _without_adaptive_execution(spark: SparkSession) -> Iterator[None]:
    """Adaptive execution runs every shuffle stage as its own job; on site-sized data the per-job
    scheduling cost dominates, so it is off while features are built and restored afterwards.
    Large joins are broadcast explicitly where it matters."""
    key = "spark.sql.adaptive.enabled"
    previous = spark.conf.get(key, None)
    spark.conf.set(key, "false")
    try:
        yield
    finally:
        if previous is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, previous)


def _sites_features(t: dict[str, DataFrame], sites: list[str], task: TaskConfig,
                    seed: int) -> dict[str, SiteFeatures]:
    ends = data_end(t)
    cand = label_candidates(t, task, ends).cache()
    try:
        facts = funnel(t, cand, ends)  # materializes `cand`
        cohort = select_index(cand, seed).cache()
        try:
            everything = assemble(t, cohort, task).toPandas()
        finally:
            cohort.unpersist()
    finally:
        cand.unpersist()
    empty = {"patients": 0, **dict.fromkeys(FUNNEL_STEPS, 0), "data_end_s": None}
    by_site = dict(iter(everything.groupby(SITE, sort=False)))
    return {site: _one_site(site, dict(facts.get(site, empty)), by_site.get(site, everything.iloc[:0]), task)
            for site in sites}


def _one_site(site: str, facts: dict[str, Any], rows: pd.DataFrame, task: TaskConfig) -> SiteFeatures:
    data_end_s = facts.pop("data_end_s")
    if data_end_s is None:
        return SiteFeatures(site, error=f"site {site}: no dated events (encounter, observation, condition, "
                                        "medication_request are all empty)")
    # one row per patient, ordered by patient_id for a deterministic file
    features = rows.drop(columns=SITE).sort_values("patient_id", ignore_index=True)
    warn = _warnings(site, facts, features)
    return SiteFeatures(site, features, _quality(features, facts, task, data_end_s, warn), warnings=warn)


def _warnings(site: str, counts: dict[str, int], features: pd.DataFrame) -> list[str]:
    if features.empty:
        stage = next((k for k, v in counts.items() if v == 0), "cohort")
        return [f"site {site}: empty cohort (no patients left at funnel step {stage!r}; funnel {counts})"]
    if features["label"].nunique() < 2:
        return [f"site {site}: every row has label {int(features['label'].iloc[0])}; "
                "a model cannot be trained or scored on this site alone"]
    return []


def _quality(features: pd.DataFrame, counts: dict[str, int], task: TaskConfig, data_end_s: float,
             warn: list[str]) -> dict[str, Any]:
    rows = len(features)
    value_columns = [c for c in features.columns if c not in (*ID_COLUMNS, "label")]
    return {
        "task": task.model_dump(),
        "reference_date": dt.datetime.fromtimestamp(data_end_s, dt.UTC).isoformat(),
        "funnel": counts,
        "rows": rows,
        "positives": int(features["label"].sum()) if rows else 0,
        "label_prevalence": float(features["label"].mean()) if rows else None,
        "missingness": {c: (float(features[c].isna().mean()) if rows else None) for c in value_columns},
        "warnings": warn,
    }


def data_dictionary(task: TaskConfig, seed: int) -> dict[str, Any]:
    return {
        "id_columns": list(ID_COLUMNS),
        "label": "label",
        "label_definition": (f"1 if a {task.outcome} outcome event occurs in (index, index + "
                             f"{task.horizon_years:g} y]; events: {OUTCOMES[task.outcome]}"),
        "index_rule": (f"among eligible wellness encounters ({', '.join(WELLNESS_TYPES)}; AMB if a patient has "
                       f"none), the smallest sha256('{seed}|patient_id|encounter_id')"),
        "task": task.model_dump(),
        "features": [asdict(spec) for spec in feature_specs(task)],
    }


def _arrow_schema(task: TaskConfig) -> pa.Schema:
    fields = [pa.field("patient_id", pa.string()), pa.field("index_date", pa.date32()),
              pa.field("label", pa.int64())]
    return pa.schema(fields + [pa.field(name, pa.float64()) for name in feature_names(task)])


def write_site(features: pd.DataFrame, quality: dict[str, Any], task: TaskConfig, seed: int, out: Path,
               info: dict[str, Any]) -> Path:
    with staging_dir(out) as tmp:
        table = pa.Table.from_pandas(features, schema=_arrow_schema(task), preserve_index=False)
        pq.write_table(table, tmp / "features.parquet")
        write_json(tmp / "data_dictionary.json", data_dictionary(task, seed))
        write_json(tmp / "quality.json", quality)
        write_json(tmp / SUCCESS, {"stage": "features", **info, "rows": len(features),
                                   "finished": dt.datetime.now(dt.UTC).isoformat()})
    return out


def build_features(exp: Experiment, run: str | None = None, sites: list[str] | None = None, spark=None,
                   force: bool = False) -> dict[str, Path]:
    """Features for each site into `data/features/<run>/<site>/`; complete folders are kept unless force.

    Returns the folders of the sites that have features; a site skipped under
    `task.on_site_error: skip` (now or by an earlier run) is left out (see `skipped_sites`)."""
    site_ids = sites or exp.site_ids
    for site in site_ids:
        exp.site(site)
    pending = [site for site in site_ids if force or not is_complete(exp.data_path("features", run, site))]
    unflattened = [site for site in pending if not exp.data_path("tables", run, site).is_dir()]
    if unflattened and exp.task.on_site_error == "raise":  # before Spark's start-up, not after it
        raise FeatureError(f"no tables of site(s) {', '.join(unflattened)} in "
                           f"{exp.data_path('tables', run)}; run `fedlab flatten --config {exp.source or 'CONFIG'}` first")
    if pending and spark is None:
        from fedlab.spark import get_spark

        spark = get_spark(exp)
    started = time.perf_counter()
    tables: dict[str, dict[str, DataFrame]] = {}
    for site in pending:
        try:
            tables[site] = read_tables(spark, exp.data_path("tables", run, site), site)
        except FeatureError as err:
            _skip_or_raise(exp, run, site, str(err))
    results = sites_features(spark, tables, exp.task, exp.seed) if tables else {}
    seconds = round(time.perf_counter() - started, 3)
    for site, result in results.items():
        if result.error:
            _skip_or_raise(exp, run, site, f"{result.error}; tables: {exp.data_path('tables', run, site)}")
        elif result.warnings and exp.task.on_site_error == "skip":
            _skip_or_raise(exp, run, site, "; ".join(result.warnings))
        else:
            for message in result.warnings or []:
                warnings.warn(message, FeatureWarning, stacklevel=2)
            info = {"site": site, "task": exp.task.name, "seed": exp.seed, "seconds": seconds,
                    "sites_built_together": len(results)}
            write_site(result.features, result.quality, exp.task, exp.seed, exp.data_path("features", run, site),
                       info)
    record_written(exp, run, "features")
    return {site: exp.data_path("features", run, site) for site in site_ids
            if (exp.data_path("features", run, site) / "features.parquet").is_file()
            and not (exp.data_path("features", run, site) / SKIPPED).is_file()}


def _skip_or_raise(exp: Experiment, run: str | None, site: str, reason: str) -> None:
    if exp.task.on_site_error == "raise":
        raise FeatureError(reason)
    warnings.warn(f"site {site} skipped (task.on_site_error: skip): {reason}", FeatureWarning, stacklevel=3)
    write_skipped(exp.data_path("features", run, site), site, reason, exp.task.name)


def write_skipped(out: Path, site: str, reason: str, task_name: str) -> Path:
    """Replace a site's features folder by the record of why it has no features; it counts as complete."""
    record = {"stage": "features", "site": site, "task": task_name, "skipped": True, "reason": reason,
              "finished": dt.datetime.now(dt.UTC).isoformat()}
    with staging_dir(out) as tmp:
        write_json(tmp / SKIPPED, record)
        write_json(tmp / SUCCESS, record)
    return out


def skipped_sites(exp: Experiment, run: str | None = None) -> dict[str, str]:
    """The sites the features stage skipped, with the recorded reason."""
    records = {site: exp.data_path("features", run, site) / SKIPPED for site in exp.site_ids}
    return {site: read_json(path)["reason"] for site, path in records.items() if path.is_file()}
