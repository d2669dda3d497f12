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
result is collected to write one Parquet file.
"""

from __future__ import annotations

import datetime as dt
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from fedlab import harmonization as hz
from fedlab.io import SUCCESS, is_complete, staging_dir, write_json

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


class FeatureError(ValueError):
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
    tables = {}
    for name, columns in REQUIRED_COLUMNS.items():
        path = folder / f"{name}.parquet"
        if not path.exists():
            raise FeatureError(f"site {site}: table {name}.parquet not found in {folder}")
        frame = spark.read.parquet(str(path))
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise FeatureError(f"site {site}: {path} lacks column(s) {', '.join(missing)}")
        tables[name] = frame
    return tables


def _seconds(column: str) -> Column:
    from pyspark.sql import functions as F

    return F.col(column).cast("timestamp").cast("double")


# ---- cohort, index, label -----------------------------------------------------------------

def data_end_seconds(t: dict[str, DataFrame]) -> float | None:
    """The latest dated event in the site's data (epoch seconds)."""
    from pyspark.sql import functions as F

    dates = (t["encounter"].select(_seconds("start").alias("s"))
             .unionByName(t["observation"].select(_seconds("effective").alias("s")))
             .unionByName(t["condition"].select(_seconds("onset").alias("s")))
             .unionByName(t["medication_request"].select(_seconds("authored_on").alias("s"))))
    return dates.agg(F.max("s")).first()[0]


def outcome_events(t: dict[str, DataFrame], outcome: str) -> DataFrame:
    from pyspark.sql import functions as F

    spec = OUTCOMES[outcome]
    events = (t["condition"].filter(F.col("concept").isin(*spec["conditions"]))
              .select("patient_id", _seconds("onset").alias("event_s")))
    events = events.unionByName(t["medication_request"].filter(F.col("concept").isin(*spec["medications"]))
                                .select("patient_id", _seconds("authored_on").alias("event_s")))
    if spec["hba1c_at_least"] is not None:
        high = (F.col("concept") == "hba1c") & (F.col("value_canonical") >= spec["hba1c_at_least"])
        events = events.unionByName(t["observation"].filter(high)
                                    .select("patient_id", _seconds("effective").alias("event_s")))
    return events.filter(F.col("event_s").isNotNull())


def candidate_encounters(t: dict[str, DataFrame]) -> DataFrame:
    from pyspark.sql import functions as F

    enc = t["encounter"].select("encounter_id", "patient_id", "class_code", "type_code",
                                _seconds("start").alias("index_s")).filter(F.col("index_s").isNotNull())
    wellness = enc.filter(F.col("type_code").isin(*WELLNESS_TYPES))
    with_wellness = wellness.select("patient_id").distinct()
    fallback = enc.filter(F.col("class_code") == "AMB").join(with_wellness, "patient_id", "left_anti")
    return wellness.unionByName(fallback).select("encounter_id", "patient_id", "index_s")


def label_candidates(t: dict[str, DataFrame], task: TaskConfig, data_end_s: float) -> DataFrame:
    """Every candidate encounter with its eligibility flags and label."""
    from pyspark.sql import functions as F

    patients = t["patient"].select("patient_id", "gender", "race", "ethnicity",
                                   _seconds("birth_date").alias("birth_s"), _seconds("deceased").alias("death_s"))
    first_event = (outcome_events(t, task.outcome).groupBy("patient_id")
                   .agg(F.min("event_s").alias("first_event_s")))
    horizon_s = task.horizon_years * YEAR_SECONDS
    followup_s = max(task.horizon_years, task.min_followup_years) * YEAR_SECONDS
    end_s = F.least(F.coalesce(F.col("death_s"), F.lit(data_end_s)), F.lit(data_end_s))
    cand = (candidate_encounters(t).join(patients, "patient_id", "inner")
            .join(first_event, "patient_id", "left")
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
    order = Window.partitionBy("patient_id").orderBy(key, F.col("encounter_id"))
    return eligible.withColumn("_rank", F.row_number().over(order)).filter(F.col("_rank") == 1).drop("_rank")


def funnel(t: dict[str, DataFrame], cand: DataFrame) -> dict[str, int]:
    from pyspark.sql import functions as F

    def patients_where(cond: Column) -> Column:
        return F.countDistinct(F.when(cond, F.col("patient_id")))

    row = cand.agg(
        patients_where(F.lit(True)).alias("with_candidate_encounter"),
        patients_where(F.col("age_ok")).alias("age_eligible"),
        patients_where(F.col("age_ok") & F.col("no_prior")).alias("no_prior_outcome"),
        patients_where(F.col("age_ok") & F.col("no_prior") & F.col("followup_ok")).alias("cohort"),
    ).first()
    return {"patients": t["patient"].count(), **row.asDict()}


# ---- features -----------------------------------------------------------------------------

def lab_features(t: dict[str, DataFrame], index: DataFrame, lookback_s: float) -> DataFrame:
    """last/mean/min/max/slope per lab concept over the window, one row per patient."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    obs = (t["observation"].filter(F.col("concept").isin(*LAB_CONCEPTS) & F.col("value_canonical").isNotNull())
           .select("patient_id", "observation_id", "concept", _seconds("effective").alias("t"),
                   F.col("value_canonical").cast("double").alias("v")))
    win = (obs.join(index, "patient_id")
           .filter((F.col("t") <= F.col("index_s")) & (F.col("t") >= F.col("index_s") - lookback_s))
           .withColumn("x", (F.col("t") - F.col("index_s")) / YEAR_SECONDS))
    # Whole-partition frames in a fixed row order: sums are added in the same order on every run.
    group = Window.partitionBy("patient_id", "concept").orderBy("t", "observation_id")
    whole = group.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    latest = Window.partitionBy("patient_id", "concept").orderBy(F.desc("t"), F.desc("observation_id"))
    stats = (win.withColumn("n", F.count("v").over(whole))
             .withColumn("sx", F.sum("x").over(whole)).withColumn("sv", F.sum("v").over(whole))
             .withColumn("sxx", F.sum(F.col("x") * F.col("x")).over(whole))
             .withColumn("sxv", F.sum(F.col("x") * F.col("v")).over(whole))
             .withColumn("mn", F.min("v").over(whole)).withColumn("mx", F.max("v").over(whole))
             .withColumn("_latest", F.row_number().over(latest)).filter(F.col("_latest") == 1))
    denom = F.col("n") * F.col("sxx") - F.col("sx") * F.col("sx")
    slope = F.when((F.col("n") >= 2) & (denom > 1e-12),
                   (F.col("n") * F.col("sxv") - F.col("sx") * F.col("sv")) / denom)
    stats = stats.select("patient_id", "concept", F.col("v").alias("last"), (F.col("sv") / F.col("n")).alias("mean"),
                         F.col("mn").alias("min"), F.col("mx").alias("max"), slope.alias("slope"))
    return (stats.groupBy("patient_id").pivot("concept", list(LAB_CONCEPTS))
            .agg(*[F.first(s).alias(s) for s in ("last", "mean", "min", "max", "slope")]))


def encounter_counts(t: dict[str, DataFrame], index: DataFrame, lookback_s: float) -> DataFrame:
    from pyspark.sql import functions as F

    enc = t["encounter"].select("patient_id", "class_code", _seconds("start").alias("t"))
    win = (enc.join(index, "patient_id")
           .filter((F.col("t") <= F.col("index_s")) & (F.col("t") >= F.col("index_s") - lookback_s)))
    counts = win.groupBy("patient_id").pivot("class_code", list(ENCOUNTER_CLASSES)).count()
    return counts.select("patient_id", *[F.col(c).alias(f"n_enc_{c.lower()}") for c in ENCOUNTER_CLASSES])


def active_conditions(t: dict[str, DataFrame], index: DataFrame, concepts: list[str]) -> DataFrame:
    from pyspark.sql import functions as F

    cond = t["condition"].filter(F.col("concept").isin(*concepts)).select(
        "patient_id", "concept", _seconds("onset").alias("onset_s"), _seconds("abatement").alias("abate_s"))
    active = (cond.join(index, "patient_id")
              .filter((F.col("onset_s") <= F.col("index_s"))
                      & (F.col("abate_s").isNull() | (F.col("abate_s") > F.col("index_s")))))
    flags = active.groupBy("patient_id").pivot("concept", concepts).agg(F.max(F.lit(1.0)))
    return flags.select("patient_id", *[F.col(c).alias(f"cond_{c}") for c in concepts])


def medication_flags(t: dict[str, DataFrame], index: DataFrame, classes: list[str], lookback_s: float) -> DataFrame:
    from pyspark.sql import functions as F

    med = t["medication_request"].filter(F.col("concept").isin(*classes)).select(
        "patient_id", "concept", _seconds("authored_on").alias("t"))
    win = (med.join(index, "patient_id")
           .filter((F.col("t") <= F.col("index_s")) & (F.col("t") >= F.col("index_s") - lookback_s)))
    flags = win.groupBy("patient_id").pivot("concept", classes).agg(F.max(F.lit(1.0)))
    return flags.select("patient_id", *[F.col(c).alias(f"med_{c}") for c in classes])


def assemble(t: dict[str, DataFrame], cohort: DataFrame, task: TaskConfig) -> DataFrame:
    """Join the feature blocks onto the cohort; fill counts/flags with 0; all features float64."""
    from pyspark.sql import functions as F

    lookback_s = task.lookback_years * YEAR_SECONDS
    names = feature_names(task)
    conditions = [n.removeprefix("cond_") for n in names if n.startswith("cond_")]
    classes = [n.removeprefix("med_") for n in names if n.startswith("med_")]
    index = cohort.select("patient_id", "index_s")
    frame = cohort.select(
        "patient_id", "index_s", "label", "age",
        (F.col("gender") == "female").alias("is_female"),
        *[(F.col("race") == r).alias(f"race_{r}") for r in RACES],
        (~F.coalesce(F.col("race").isin(*RACES), F.lit(False))).alias("race_other"),
        (F.col("ethnicity") == "hispanic").alias("hispanic"),
    )
    blocks = [lab_features(t, index, lookback_s), encounter_counts(t, index, lookback_s),
              active_conditions(t, index, conditions), medication_flags(t, index, classes, lookback_s)]
    for block in blocks:
        frame = frame.join(block, "patient_id", "left")
    columns = []
    for name in names:
        if name.endswith("_missing"):
            value = F.when(F.col(name.removesuffix("_missing") + "_last").isNull(), 1.0).otherwise(0.0)
        elif name.startswith(("n_enc_", "cond_", "med_", "is_female", "race_", "hispanic")):
            value = F.coalesce(F.col(name).cast("double"), F.lit(0.0))
        else:
            value = F.col(name)
        columns.append(value.cast("double").alias(name))
    index_date = F.to_date(F.col("index_s").cast("timestamp")).alias("index_date")
    return (frame.select("patient_id", index_date, F.col("label").cast("long").alias("label"), *columns)
            .orderBy("patient_id"))


# ---- one site, all sites ------------------------------------------------------------------

def site_features(spark: SparkSession, folder: Path, task: TaskConfig, seed: int,
                  site: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Features (pandas, collected from Spark) and quality facts for one site's tables."""
    t = read_tables(spark, folder, site)
    data_end_s = data_end_seconds(t)
    if data_end_s is None:
        raise FeatureError(f"site {site}: no dated events in {folder} (encounter, observation, condition, "
                           "medication_request are all empty)")
    cand = label_candidates(t, task, data_end_s).cache()
    try:
        counts = funnel(t, cand)
        cohort = select_index(cand, seed).cache()
        features = assemble(t, cohort, task).toPandas()
        cohort.unpersist()
    finally:
        cand.unpersist()
    warn = _warnings(site, counts, features)
    for message in warn:
        warnings.warn(message, FeatureWarning, stacklevel=3)
    quality = _quality(features, counts, task, data_end_s, warn)
    return features, quality


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
    """Features for each site into `data/features/<run>/<site>/`; complete folders are kept unless force."""
    site_ids = sites or exp.site_ids
    for site in site_ids:
        exp.site(site)
    outputs: dict[str, Path] = {}
    for site in site_ids:
        out = exp.data_path("features", run, site)
        if is_complete(out) and not force:
            outputs[site] = out
            continue
        if spark is None:
            from fedlab.spark import get_spark

            spark = get_spark(exp)
        started = time.perf_counter()
        features, quality = site_features(spark, exp.data_path("tables", run, site), exp.task, exp.seed, site)
        info = {"site": site, "task": exp.task.name, "seed": exp.seed,
                "seconds": round(time.perf_counter() - started, 3)}
        outputs[site] = write_site(features, quality, exp.task, exp.seed, out, info)
    return outputs
