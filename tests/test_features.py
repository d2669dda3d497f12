"""Spark features on hand-built tables: leakage, label window, determinism, column contract."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedlab.config import experiment_from_dict
from fedlab.features import (
    FeatureError,
    FeatureWarning,
    build_features,
    feature_names,
    skipped_sites,
    write_skipped,
)
from fedlab.federated.data import FeatureDataError, SkippedSiteWarning, load_sites
from fedlab.flatten import SCHEMAS
from fedlab.io import is_complete, read_json

INDEX = pd.Timestamp("2020-01-01T09:00:00Z")
DAY = pd.Timedelta(days=1)
HORIZON = pd.Timedelta(days=365.25)  # horizon_years = 1


def _exp(tmp_path: Path, outcome: str = "t2d", seed: int = 5):
    return experiment_from_dict({
        "name": "t", "seed": seed, "data_dir": str(tmp_path / "data"),
        "sites": [{"id": "a", "patients": 9, "seed": 1}, {"id": "b", "patients": 2, "seed": 2}],
        "task": {"outcome": outcome, "min_age": 18, "lookback_years": 2, "horizon_years": 1},
    })


class Site:
    """Rows for the five tables of one site, written as the flatten stage would write them."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict]] = {t: [] for t in SCHEMAS}

    def patient(self, pid, birth="1970-01-01", gender="female", race="white", ethnicity="nonhispanic",
                deceased=None):
        self.rows["patient"].append({"patient_id": pid, "birth_date": pd.Timestamp(birth).date(), "gender": gender,
                                     "race": race, "ethnicity": ethnicity,
                                     "deceased": pd.Timestamp(deceased, tz="UTC") if deceased else None})

    def encounter(self, pid, eid, start, cls="AMB", type_code="185349003"):
        self.rows["encounter"].append({"encounter_id": eid, "patient_id": pid, "class_code": cls,
                                       "type_code": type_code, "start": start, "end": start})

    def condition(self, pid, concept, onset, abatement=None, code="x"):
        n = len(self.rows["condition"])
        self.rows["condition"].append({"condition_id": f"c{n}", "patient_id": pid, "encounter_id": None,
                                       "system": "http://snomed.info/sct", "code": code, "onset": onset,
                                       "abatement": abatement, "concept": concept, "flag": "ok"})

    def obs(self, pid, concept, when, value):
        n = len(self.rows["observation"])
        self.rows["observation"].append({"observation_id": f"o{n:04d}", "patient_id": pid, "encounter_id": None,
                                         "effective": when, "loinc": "x", "value": value, "unit": "u",
                                         "concept": concept, "value_canonical": value, "unit_canonical": "u",
                                         "flag": "ok"})

    def med(self, pid, concept, when):
        n = len(self.rows["medication_request"])
        self.rows["medication_request"].append({"medication_request_id": f"m{n}", "patient_id": pid,
                                                "encounter_id": None, "authored_on": when, "rxnorm": "1",
                                                "status": "active", "concept": concept})

    def write(self, folder: Path, drop: tuple[str, str] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for table, schema in SCHEMAS.items():
            frame = pd.DataFrame(self.rows[table], columns=schema.names)
            arrow = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
            if drop and drop[0] == table:
                arrow = arrow.drop_columns([drop[1]])
            pq.write_table(arrow, folder / f"{table}.parquet")


def leakage_site() -> Site:
    s = Site()
    # p1: the leakage probe. Plausible values before index, absurd ones after it.
    s.patient("p1", race="black", ethnicity="hispanic")
    s.encounter("p1", "e1", INDEX)
    s.encounter("p1", "e1-old", INDEX - 400 * DAY, cls="EMER", type_code="1")
    s.encounter("p1", "e1-late-emer", INDEX + 10 * DAY, cls="EMER", type_code="1")
    s.encounter("p1", "e1-late-imp", INDEX + 20 * DAY, cls="IMP", type_code="1")
    s.obs("p1", "bmi", INDEX - 3 * 365 * DAY, 10.0)   # before the 2-year lookback
    s.obs("p1", "bmi", INDEX - 365 * DAY, 30.0)
    s.obs("p1", "bmi", INDEX, 32.0)
    s.obs("p1", "bmi", INDEX + DAY, 500.0)
    s.obs("p1", "sbp", INDEX + 5 * DAY, 300.0)
    s.obs("p1", "glucose", INDEX + 30 * DAY, 999.0)
    s.obs("p1", "hba1c", INDEX + 30 * DAY, 5.0)      # after index, below the outcome threshold
    s.condition("p1", "hypertension", INDEX + 60 * DAY)
    s.condition("p1", "obesity", INDEX - 100 * DAY)
    s.condition("p1", "ckd", INDEX - 100 * DAY, abatement=INDEX - DAY)
    s.med("p1", "antihypertensive", INDEX + 2 * DAY)
    s.med("p1", "statin", INDEX - 30 * DAY)
    # label window edges
    s.patient("p2"); s.encounter("p2", "e2", INDEX); s.condition("p2", "t2d", INDEX + DAY)  # noqa: E702
    s.patient("p3"); s.encounter("p3", "e3", INDEX); s.condition("p3", "t2d", INDEX + HORIZON + DAY)  # noqa: E702
    s.patient("p4"); s.encounter("p4", "e4", INDEX); s.obs("p4", "hba1c", INDEX + DAY, 7.0)  # noqa: E702
    s.patient("p5"); s.encounter("p5", "e5", INDEX); s.med("p5", "antidiabetic", INDEX + 10 * DAY)  # noqa: E702
    # excluded: outcome before index, too young, died before the horizon without the outcome
    s.patient("p6"); s.encounter("p6", "e6", INDEX); s.condition("p6", "t2d", INDEX - DAY)  # noqa: E702
    s.patient("p7", birth="2010-01-01"); s.encounter("p7", "e7", INDEX)  # noqa: E702
    s.patient("p8", deceased="2020-06-01"); s.encounter("p8", "e8", INDEX)  # noqa: E702
    # several eligible wellness encounters: one is chosen by the seeded hash
    s.patient("p9", gender="male")
    for k in range(4):
        s.encounter("p9", f"e9-{k}", INDEX + k * 30 * DAY)
    # data run to 2025 so every other patient has full follow-up
    s.encounter("p9", "e9-late", pd.Timestamp("2025-01-01T00:00:00Z"), cls="AMB", type_code="1")
    return s


def sparse_site() -> Site:
    """No labs except BMI, no conditions, no medications; only AMB encounters (no wellness type)."""
    s = Site()
    s.patient("q1", race="asian")
    s.encounter("q1", "f1", INDEX, type_code="1")
    s.obs("q1", "bmi", INDEX - 10 * DAY, 25.0)
    s.patient("q2", race="unknown", gender="male")
    s.encounter("q2", "f2", INDEX, type_code="1")
    s.condition("q2", "t2d", INDEX + 100 * DAY)
    s.encounter("q2", "f3", pd.Timestamp("2024-01-01T00:00:00Z"), cls="EMER", type_code="1")
    return s


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("features")
    exp = _exp(tmp)
    leakage_site().write(exp.data_path("tables", None, "a"))
    sparse_site().write(exp.data_path("tables", None, "b"))
    outs = build_features(exp, spark=spark)
    frames = {site: pd.read_parquet(out / "features.parquet").set_index("patient_id") for site, out in outs.items()}
    return exp, outs, frames


def test_nothing_after_index_reaches_the_features(built):
    _, _, frames = built
    p1 = frames["a"].loc["p1"]
    assert p1["bmi_last"] == 32.0 and p1["bmi_mean"] == 31.0
    assert (p1["bmi_min"], p1["bmi_max"]) == (30.0, 32.0)
    assert p1["bmi_slope"] == pytest.approx(2.0 / (365 / 365.25))
    assert p1["bmi_missing"] == 0.0
    for concept in ("sbp", "glucose", "hba1c"):
        assert p1[f"{concept}_missing"] == 1.0 and pd.isna(p1[f"{concept}_last"]), concept
    assert p1["med_antihypertensive"] == 0.0 and p1["med_statin"] == 1.0
    assert p1["cond_obesity"] == 1.0 and p1["cond_ckd"] == 0.0  # ckd abated before index
    assert "cond_hypertension" in p1 and p1["cond_hypertension"] == 0.0
    assert (p1["n_enc_amb"], p1["n_enc_emer"], p1["n_enc_imp"]) == (1.0, 1.0, 0.0)
    assert (p1["race_black"], p1["race_white"], p1["hispanic"], p1["is_female"]) == (1.0, 0.0, 1.0, 1.0)
    assert p1["age"] == pytest.approx((INDEX - pd.Timestamp("1970-01-01", tz="UTC")).total_seconds() / 86400 / 365.25, rel=1e-6)
    assert p1["label"] == 0
    values = frames["a"].drop(columns=["index_date", "label"]).to_numpy(dtype=float)
    assert not (values >= 299).any()  # none of the post-index extremes (300, 500, 999) appears anywhere


def test_label_uses_only_index_to_index_plus_horizon(built):
    _, _, frames = built
    labels = frames["a"]["label"].to_dict()
    assert labels["p2"] == 1  # t2d the day after index
    assert labels["p3"] == 0  # t2d one day after index + horizon
    assert labels["p4"] == 1  # HbA1c 7.0 the day after index
    assert labels["p5"] == 1  # antidiabetic started within the horizon
    assert labels["p1"] == 0  # HbA1c 5.0 after index is not an event


def test_cohort_exclusions_and_funnel(built):
    _, outs, frames = built
    assert set(frames["a"].index) == {"p1", "p2", "p3", "p4", "p5", "p9"}
    quality = read_json(outs["a"] / "quality.json")
    assert quality["funnel"] == {"patients": 9, "with_candidate_encounter": 9, "age_eligible": 8,
                                 "no_prior_outcome": 7, "cohort": 6}
    assert quality["rows"] == 6 and quality["positives"] == 3
    assert quality["label_prevalence"] == pytest.approx(0.5)
    assert quality["missingness"]["glucose_last"] == 1.0 and quality["missingness"]["age"] == 0.0


def test_one_index_per_patient_by_the_seeded_hash(built):
    exp, _, frames = built
    chosen = min((f"e9-{k}" for k in range(4)),
                 key=lambda e: hashlib.sha256(f"{exp.seed}|p9|{e}".encode()).hexdigest())
    expected_day = (INDEX + int(chosen[-1]) * 30 * DAY).date()
    assert frames["a"].loc["p9", "index_date"] == expected_day
    assert frames["a"].index.is_unique


def test_same_columns_in_same_order_across_sites(built):
    exp, outs, frames = built
    names = feature_names(exp.task)
    cols = {site: list(pd.read_parquet(out / "features.parquet").columns) for site, out in outs.items()}
    assert cols["a"] == cols["b"] == ["patient_id", "index_date", "label", *names]
    b = frames["b"]
    assert b["hba1c_last"].isna().all() and (b["hba1c_missing"] == 1.0).all()
    assert b.loc["q2", "label"] == 1 and b.loc["q2", "race_other"] == 1.0 and b.loc["q1", "race_asian"] == 1.0
    for out in outs.values():
        schema = pq.read_schema(out / "features.parquet")
        assert all(str(schema.field(n).type) == "double" for n in names)
        dictionary = read_json(out / "data_dictionary.json")
        assert [f["name"] for f in dictionary["features"]] == names
        assert dictionary["id_columns"] == ["patient_id", "index_date"] and dictionary["label"] == "label"
        assert all({"name", "type", "unit", "definition", "source_codes", "window"} <= set(f)
                   for f in dictionary["features"])


def test_same_input_gives_identical_features(built, spark):
    exp, outs, _ = built
    before = (outs["a"] / "features.parquet").read_bytes()
    build_features(exp, sites=["a"], spark=spark, force=True)
    assert (outs["a"] / "features.parquet").read_bytes() == before


def test_hypertension_task(spark, tmp_path):
    exp = _exp(tmp_path, outcome="hypertension")
    leakage_site().write(exp.data_path("tables", None, "a"))
    out = build_features(exp, sites=["a"], spark=spark)["a"]
    frame = pd.read_parquet(out / "features.parquet").set_index("patient_id")
    assert read_json(out / "quality.json")["task"]["outcome"] == "hypertension"
    assert "cond_hypertension" not in frame and "med_antihypertensive" not in frame
    assert {"cond_t2d", "med_antidiabetic"} <= set(frame.columns)
    assert frame.loc["p1", "label"] == 1  # hypertension onset 60 days after index
    assert frame.loc["p2", "cond_t2d"] == 0.0  # t2d the day after index is not active at index
    assert frame.loc["p6", "cond_t2d"] == 1.0  # t2d before index is a feature here, not an exclusion
    assert frame["label"].sum() == 1


def test_single_label_class_warns(spark, tmp_path):
    exp = _exp(tmp_path)
    sparse_site().write(exp.data_path("tables", None, "b"))
    s = Site()
    s.patient("z1"); s.encounter("z1", "z1e", INDEX)  # noqa: E702
    s.encounter("z1", "z1-late", pd.Timestamp("2025-01-01T00:00:00Z"), type_code="1")
    s.write(exp.data_path("tables", None, "a"))
    with pytest.warns(FeatureWarning, match="site a: every row has label 0"):
        build_features(exp, sites=["a"], spark=spark)


def test_missing_column_names_site_and_column(spark, tmp_path):
    exp = _exp(tmp_path)
    leakage_site().write(exp.data_path("tables", None, "a"), drop=("observation", "value_canonical"))
    with pytest.raises(FeatureError, match=r"site a: .*observation.parquet lacks column\(s\) value_canonical"):
        build_features(exp, sites=["a"], spark=spark)


def test_empty_cohort_warns_and_writes_empty_features(spark, tmp_path):
    exp = _exp(tmp_path)
    s = Site()
    s.patient("kid", birth="2015-01-01")
    s.encounter("kid", "k1", INDEX)
    s.write(exp.data_path("tables", None, "a"))
    with pytest.warns(FeatureWarning, match="site a: empty cohort"):
        out = build_features(exp, sites=["a"], spark=spark)["a"]
    frame = pd.read_parquet(out / "features.parquet")
    assert frame.empty and list(frame.columns)[3:] == feature_names(exp.task)


def single_class_site() -> Site:
    s = Site()
    s.patient("z1"); s.encounter("z1", "z1e", INDEX)  # noqa: E702
    s.encounter("z1", "z1-late", pd.Timestamp("2025-01-01T00:00:00Z"), type_code="1")
    return s


@pytest.fixture(scope="module")
def skipping(spark, tmp_path_factory):
    """Four sites under on_site_error: skip: two good, one single-class, one lacking a column."""
    exp = experiment_from_dict({
        "name": "t", "seed": 5, "data_dir": str(tmp_path_factory.mktemp("skip") / "data"),
        "sites": [{"id": s, "patients": 2, "seed": k} for k, s in enumerate(("a", "b", "one_class", "no_col"))],
        "task": {"outcome": "t2d", "min_age": 18, "lookback_years": 2, "horizon_years": 1, "on_site_error": "skip"},
    })
    leakage_site().write(exp.data_path("tables", None, "a"))
    sparse_site().write(exp.data_path("tables", None, "b"))
    single_class_site().write(exp.data_path("tables", None, "one_class"))
    leakage_site().write(exp.data_path("tables", None, "no_col"), drop=("observation", "value_canonical"))
    with pytest.warns(FeatureWarning) as caught:
        outs = build_features(exp, spark=spark)
    return exp, outs, [str(w.message) for w in caught]


def test_skip_writes_a_record_instead_of_features(skipping):
    exp, outs, messages = skipping
    assert sorted(outs) == ["a", "b"]
    no_col, one_class = (exp.data_path("features", None, s) for s in ("no_col", "one_class"))
    assert read_json(no_col / "_SKIPPED.json")["reason"].startswith("site no_col: ")
    assert "lacks column(s) value_canonical" in read_json(no_col / "_SKIPPED.json")["reason"]
    assert "every row has label 0" in read_json(one_class / "_SKIPPED.json")["reason"]
    for folder in (no_col, one_class):
        assert not (folder / "features.parquet").exists()
        assert is_complete(folder) and read_json(folder / "_SUCCESS.json")["skipped"] is True
    assert any(m.startswith("site no_col skipped") and "value_canonical" in m for m in messages)
    assert any(m.startswith("site one_class skipped") and "label 0" in m for m in messages)
    assert skipped_sites(exp) == {s: read_json(exp.data_path("features", None, s) / "_SKIPPED.json")["reason"]
                                  for s in ("one_class", "no_col")}


def test_skipped_sites_do_not_change_the_others(skipping, built):
    _, outs, _ = skipping
    _, alone, _ = built  # the same two sites built without the skipped ones
    for site in ("a", "b"):
        assert (outs[site] / "features.parquet").read_bytes() == (alone[site] / "features.parquet").read_bytes()


def test_skipped_site_counts_as_done(skipping, spark, recwarn):
    exp, outs, _ = skipping
    record = (exp.data_path("features", None, "no_col") / "_SKIPPED.json").read_bytes()
    assert build_features(exp, spark=spark) == outs  # nothing rebuilt, nothing warned again
    assert not [w for w in recwarn if issubclass(w.category, FeatureWarning)]
    assert (exp.data_path("features", None, "no_col") / "_SKIPPED.json").read_bytes() == record


def test_training_loader_leaves_skipped_sites_out(skipping, tmp_path):
    exp, _, _ = skipping
    with pytest.warns(SkippedSiteWarning, match=r"site 'no_col' left out of training.*value_canonical"):
        sites = load_sites(exp, methods=["local", "fedavg"])
    assert [s.site for s in sites] == ["a", "b"]
    # with one site left, local training still runs and federated methods stop with a clear error
    config = exp.model_dump(mode="json")
    shutil.copytree(exp.data_path("features", None, "a").parent.parent, tmp_path / "data" / "features")
    exp = experiment_from_dict({**config, "data_dir": str(tmp_path / "data")})
    write_skipped(exp.data_path("features", None, "b"), "b", "site b: test", exp.task.name)
    with pytest.warns(SkippedSiteWarning):
        assert [s.site for s in load_sites(exp, methods=["local"])] == ["a"]
    with pytest.warns(SkippedSiteWarning), pytest.raises(FeatureDataError, match=r"\['fedavg'\] need at least 2.*no_col"):
        load_sites(exp, methods=["local", "fedavg"])
