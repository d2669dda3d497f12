"""Flattening with both engines (ViewDefinitions, real fhiry): typed NDJSON exports, Synthea bundles,
harmonization, quarantine."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from fedlab.config import ConfigError, experiment_from_dict, load_experiment
from fedlab.flatten import SCHEMAS, FlattenError, flatten, flatten_bundles, flatten_ndjson
from fedlab.io import read_json

SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


ENGINES = ["views", "fhiry"]


def _exp(tmp_path: Path, engine: str = "views"):
    return experiment_from_dict({"name": "t", "data_dir": str(tmp_path / "data"), "flatten": {"engine": engine},
                                 "sites": [{"id": "a", "patients": 2, "seed": 1}]})


def _quantity(value: float, unit: str) -> dict:
    return {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}


def _obs(oid: str, loinc: str, value: float | None = None, unit: str | None = None, **extra) -> dict:
    res = {"resourceType": "Observation", "id": oid, "status": "final",
           "code": {"coding": [{"system": LOINC, "code": loinc}]},
           "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
           "effectiveDateTime": "2020-01-01T10:00:00-05:00"}
    if value is not None:
        res["valueQuantity"] = _quantity(value, unit)
    res.update(extra)
    return res


def _race_ext(code: str) -> list[dict]:
    return [{"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
             "extension": [{"url": "ombCategory", "valueCoding": {"code": code}}]},
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity",
             "extension": [{"url": "ombCategory", "valueCoding": {"code": "2135-2"}}]}]


def _lines(resources: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in resources)


def _write_export(folder: Path, manifest: bool = True) -> dict[str, int]:
    """A small export with one bad line of each kind in Observation.ndjson; returns lines per file."""
    folder.mkdir(parents=True)
    files = {
        "Patient.ndjson": [
            {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970-05-01",
             "extension": _race_ext("2054-5")},
            {"resourceType": "Patient", "id": "p2", "gender": "male", "birthDate": "1960",
             "deceasedDateTime": "2024-02-03T04:05:06Z"},
        ],
        "Encounter.ndjson": [
            {"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "AMB"},
             "type": [{"coding": [{"system": SNOMED, "code": "185349003"}]}],
             "subject": {"reference": "Patient/p1"},
             "period": {"start": "2020-01-01T10:00:00-05:00", "end": "2020-01-01T10:30:00-05:00"}},
        ],
        "Condition.ndjson": [
            {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
             "encounter": {"reference": "Encounter/e1"}, "onsetDateTime": "2019-01-01",
             "code": {"coding": [{"system": SNOMED, "code": "44054006"}]}},
            {"resourceType": "Condition", "id": "c2", "subject": {"reference": "Patient/p2"},
             "onsetDateTime": "2019-01-01T00:00:00Z", "abatementDateTime": "2019-06-01T00:00:00Z",
             "code": {"coding": [{"system": ICD10, "code": "E11.65"}]}},
            {"resourceType": "Condition", "id": "c3", "subject": {"reference": "Patient/p2"},
             "onsetDateTime": "2019-01-01T00:00:00Z", "code": {"coding": [{"system": SNOMED, "code": "999999"}]}},
        ],
        "Observation.ndjson": [
            _obs("o1", "15074-8", 5.0, "mmol/L"),
            _obs("o2", "2339-0", 100.0, "mg/dL"),
            _obs("o3", "85354-9", component=[
                {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": _quantity(130.0, "mm[Hg]")},
                {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": _quantity(85.0, "mm[Hg]")},
            ]),
            _obs("o4", "4548-4", 6.1, "mg"),             # HbA1c in an impossible unit
            _obs("o5", "72514-3", 2.0, "{score}"),       # LOINC not in the concept map
            _obs("o6", "33914-3", 80.0, "mL/min"),       # eGFR without the UCUM annotation
            "{not json",
            {"resourceType": "Patient", "id": "stray"},
            {k: v for k, v in _obs("o7", "2339-0", 1.0, "mg/dL").items() if k != "subject"},
            _obs("o8", "2339-0", 1.0, "mg/dL", effectiveDateTime="yesterday"),
            _obs("o2", "2339-0", 100.0, "mg/dL"),
            _obs("o9", "2339-0", "high", "mg/dL"),
        ],
        "MedicationRequest.ndjson": [
            {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
             "subject": {"reference": "Patient/p1"}, "authoredOn": "2020-01-01T10:00:00-05:00",
             "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "860975"}]}},
            {"resourceType": "MedicationRequest", "id": "m2", "status": "stopped", "intent": "order",
             "subject": {"reference": "Patient/p1"}, "authoredOn": "2020-01-01",
             "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "123"}]}},
        ],
    }
    for name, resources in files.items():
        (folder / name).write_text(_lines(resources) + "\n")  # a trailing blank line is not a record
    if manifest:
        entries = [{"name": n, "type": n.split(".")[0], "count": len(r)} for n, r in files.items()]
        (folder / "manifest.json").write_text(json.dumps({"output": [], "files": entries}))
    return {name: len(resources) for name, resources in files.items()}


@pytest.fixture(params=ENGINES)
def flattened(tmp_path: Path, request):
    exp = _exp(tmp_path, request.param)
    lines = _write_export(exp.data_path("export", None, "a"))
    out = flatten(exp, progress=False)["a"]
    assert read_json(out / "_SUCCESS.json")["engine"] == request.param
    return out, lines


def test_tables_have_exactly_the_contract_columns(flattened):
    out, _ = flattened
    assert (out / "_SUCCESS.json").is_file()
    for table, schema in SCHEMAS.items():
        written = pq.read_schema(out / f"{table}.parquet")
        assert written.names == schema.names, table
        assert [str(f.type) for f in written] == [str(f.type) for f in schema], table


def test_quarantine_and_reconciliation(flattened):
    out, lines = flattened
    quarantine = [json.loads(x) for x in (out / "quarantine.ndjson").read_text().splitlines()]
    by_line = {q["line"]: q for q in quarantine}
    assert {q["file"] for q in quarantine} == {"Observation.ndjson"}
    assert sorted(by_line) == [7, 8, 9, 10, 11, 12]
    assert by_line[7]["reason"].startswith("malformed JSON")
    assert "resourceType 'Patient' in a Observation file" in by_line[8]["reason"]
    assert "missing required field subject.reference" in by_line[9]["reason"]
    assert "invalid dateTime in effectiveDateTime" in by_line[10]["reason"]
    assert "duplicate Observation id o2" in by_line[11]["reason"]
    assert "o9: valueQuantity.value is not a number: 'high'" in by_line[12]["reason"]
    report = read_json(out / "harmonization.json")
    rec = report["reconciliation"]
    assert rec["lines"] == sum(lines.values()) == rec["resources"] + rec["quarantined"]
    assert rec["balanced"] and rec["quarantined"] == 6
    obs_file = next(f for f in report["files"] if f["file"] == "Observation.ndjson")
    assert (obs_file["lines"], obs_file["resources"], obs_file["quarantined"]) == (12, 6, 6)
    # 6 accepted observations, the BP panel became 2 rows
    assert report["tables"]["observation"]["rows"] == 7
    assert pd.read_parquet(out / "observation.parquet").shape[0] == 7


def test_units_and_codes_are_harmonized_and_flagged(flattened):
    out, _ = flattened
    obs = pd.read_parquet(out / "observation.parquet").set_index("observation_id")
    assert obs.loc["o1", "concept"] == "glucose" and obs.loc["o1", "flag"] == "converted"
    assert obs.loc["o1", "value_canonical"] == pytest.approx(5.0 * 18.016)
    assert obs.loc["o1", "unit_canonical"] == "mg/dL" and obs.loc["o1", "value"] == 5.0
    assert obs.loc["o2", "flag"] == "ok" and obs.loc["o2", "value_canonical"] == 100.0
    assert "o3" not in obs.index
    assert obs.loc["o3-8480-6", ["concept", "value_canonical", "flag"]].tolist() == ["sbp", 130.0, "ok"]
    assert obs.loc["o3-8462-4", ["concept", "value_canonical", "unit_canonical"]].tolist() == ["dbp", 85.0, "mm[Hg]"]
    assert obs.loc["o4", "flag"] == "unknown_unit" and pd.isna(obs.loc["o4", "value_canonical"])
    assert obs.loc["o4", "value"] == 6.1  # kept, not converted
    assert obs.loc["o5", "flag"] == "unknown_code" and obs.loc["o5", "concept"] is None
    assert obs.loc["o6", "flag"] == "converted" and obs.loc["o6", "value_canonical"] == 80.0
    assert str(obs["effective"].dt.tz) == "UTC"
    assert obs.loc["o2", "effective"] == pd.Timestamp("2020-01-01T15:00:00Z")

    cond = pd.read_parquet(out / "condition.parquet").set_index("condition_id")
    assert cond.loc["c1", ["concept", "flag", "system"]].tolist() == ["t2d", "ok", SNOMED]
    assert cond.loc["c2", ["concept", "flag", "code"]].tolist() == ["t2d", "mapped", "E11.65"]
    assert cond.loc["c3", "flag"] == "unknown_code" and cond.loc["c3", "concept"] is None
    assert cond.loc["c2", "abatement"] == pd.Timestamp("2019-06-01T00:00:00Z")

    report = read_json(out / "harmonization.json")["tables"]
    assert report["observation"]["flags"] == {"ok": 3, "converted": 2, "mapped": 0, "unknown_code": 1,
                                              "unknown_unit": 1}
    assert report["condition"]["flags"]["mapped"] == 1
    assert report["medication_request"]["flags"] == {"ok": 1, "converted": 0, "mapped": 0, "unknown_code": 1,
                                                     "unknown_unit": 0}


def test_patient_encounter_medication_tables(flattened):
    out, _ = flattened
    pat = pd.read_parquet(out / "patient.parquet").set_index("patient_id")
    assert pat.loc["p1", ["gender", "race", "ethnicity"]].tolist() == ["female", "black", "hispanic"]
    assert str(pat.loc["p2", "birth_date"]) == "1960-01-01"
    assert pat.loc["p2", "deceased"] == pd.Timestamp("2024-02-03T04:05:06Z")
    assert pat.loc["p2", "race"] == "unknown"
    enc = pd.read_parquet(out / "encounter.parquet")
    assert enc.iloc[0][["encounter_id", "patient_id", "class_code", "type_code"]].tolist() == [
        "e1", "p1", "AMB", "185349003"]
    med = pd.read_parquet(out / "medication_request.parquet").set_index("medication_request_id")
    assert med.loc["m1", ["rxnorm", "concept", "status", "patient_id"]].tolist() == [
        "860975", "antidiabetic", "active", "p1"]
    assert med.loc["m2", "concept"] is None


def test_complete_folder_is_kept_unless_forced(tmp_path: Path):
    exp = _exp(tmp_path)
    _write_export(exp.data_path("export", None, "a"))
    out = flatten(exp, progress=False)["a"]
    stamp = (out / "_SUCCESS.json").stat().st_mtime_ns
    flatten(exp, progress=False)
    assert (out / "_SUCCESS.json").stat().st_mtime_ns == stamp
    flatten(exp, progress=False, force=True)
    assert (out / "_SUCCESS.json").stat().st_mtime_ns != stamp


@pytest.mark.parametrize("engine", ENGINES)
def test_without_manifest_reads_every_ndjson_including_gzip(tmp_path: Path, engine: str):
    folder = tmp_path / "export"
    _write_export(folder, manifest=False)
    raw = (folder / "Observation.ndjson").read_bytes()
    (folder / "Observation.ndjson").unlink()
    (folder / "Observation.1.ndjson.gz").write_bytes(gzip.compress(raw))
    from fedlab.flatten import export_files

    paths, types = export_files(folder)
    assert types == {} and "Observation.1.ndjson.gz" in [p.name for p in paths]
    result = flatten_ndjson(paths, engine=engine)
    assert len(result.tables["observation"]) == 7 and len(result.quarantine) == 6


def test_missing_export_folder_names_it(tmp_path: Path):
    with pytest.raises(FlattenError, match=r"export folder not found for site\(s\) a in .*/data/export/t; run `fedlab export"):
        flatten(_exp(tmp_path), progress=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_real_synthea_bundles(reference_dir: Path, engine: str):
    paths = sorted((reference_dir / "synthea-sample").glob("*.json"))
    assert len(paths) == 2
    tables = flatten_bundles(paths, engine=engine)
    assert len(tables["patient"]) == 2
    obs = tables["observation"]
    for concept, unit in [("bmi", "kg/m2"), ("sbp", "mm[Hg]"), ("dbp", "mm[Hg]"), ("glucose", "mg/dL"),
                          ("hba1c", "%")]:
        rows = obs[obs["concept"] == concept]
        assert len(rows) > 0, concept
        assert rows["value_canonical"].notna().all() and (rows["unit_canonical"] == unit).all(), concept
    sbp = obs[obs["concept"] == "sbp"]["value_canonical"]
    assert sbp.between(60, 250).all()
    assert not obs["loinc"].isin(["55284-4", "85354-9"]).any()  # panels were split
    # every referenced patient exists; urn:uuid: prefixes are gone
    assert set(obs["patient_id"]) <= set(tables["patient"]["patient_id"])
    assert not tables["encounter"]["encounter_id"].str.startswith("urn:").any()
    cond = tables["condition"]
    assert {"obesity", "prediabetes", "hyperlipidemia"} <= set(cond["concept"].dropna())
    assert (cond.loc[cond["concept"].notna(), "flag"] == "ok").all()
    assert (cond.loc[cond["concept"].isna(), "flag"] == "unknown_code").all()


def test_engine_is_a_config_key_and_switching_it_reflattens(tmp_path: Path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "x.yaml").write_text(f"name: x\ndata_dir: {tmp_path / 'data'}\nsites: [{{id: a, patients: 2, seed: 1}}]\n")
    exp = load_experiment(configs / "x.yaml")
    assert exp.flatten.engine == "views"
    _write_export(exp.data_path("export", None, "a"))
    out = flatten(exp, progress=False)["a"]
    assert read_json(out / "_SUCCESS.json")["engine"] == "views"
    views_obs = pd.read_parquet(out / "observation.parquet")
    fhiry_exp = load_experiment(configs / "x.yaml", {"flatten.engine": "fhiry"})
    flatten(fhiry_exp, progress=False)
    assert read_json(out / "_SUCCESS.json")["engine"] == "fhiry"
    fhiry_obs = pd.read_parquet(out / "observation.parquet")
    key = ["observation_id"]
    pd.testing.assert_frame_equal(views_obs.sort_values(key).reset_index(drop=True),
                                  fhiry_obs.sort_values(key).reset_index(drop=True))
    with pytest.raises(ConfigError, match="flatten.engine"):
        load_experiment(configs / "x.yaml", {"flatten.engine": "pandas"})


@pytest.mark.parametrize("engine", ENGINES)
def test_less_common_fhir_shapes(tmp_path: Path, engine: str):
    """Choice alternatives, a unit given only as text, a non-LOINC code, a multi-component survey."""
    folder = tmp_path / "export"
    folder.mkdir()
    period = {k: v for k, v in _obs("q1", "2339-0", 90.0, "mg/dL").items() if k != "effectiveDateTime"}
    period["effectivePeriod"] = {"start": "2021-03-04T05:06:07Z"}
    issued = {k: v for k, v in _obs("q2", "2339-0", 95.0, "mg/dL").items() if k != "effectiveDateTime"}
    issued["issued"] = "2021-03-05T00:00:00Z"
    text_unit = _obs("q3", "2339-0", 5.5)
    text_unit["valueQuantity"] = {"value": 5.5, "unit": "mmol/L"}
    local_code = _obs("q4", "2339-0", 1.0, "mg/dL", code={"coding": [{"system": "urn:local", "code": "GLU"}]})
    survey = _obs("q5", "44249-1", component=[
        {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": _quantity(120.0, "mm[Hg]")},
        {"code": {"coding": [{"system": LOINC, "code": "44250-9"}]}, "valueInteger": 2}])
    (folder / "Observation.ndjson").write_text(_lines([period, issued, text_unit, local_code, survey]))
    (folder / "Condition.ndjson").write_text(_lines([
        {"resourceType": "Condition", "id": "c9", "subject": {"reference": "Patient/p1"},
         "onsetPeriod": {"start": "2018-01-01"}, "abatementPeriod": {"start": "2018-02-01"},
         "code": {"coding": [{"system": SNOMED, "display": "no code"}, {"system": ICD10, "code": "E11.9"}]}}]))
    result = flatten_ndjson(sorted(folder.glob("*.ndjson")), engine=engine)
    assert not result.quarantine
    obs = result.tables["observation"].set_index("observation_id")
    assert obs.loc["q1", "effective"] == pd.Timestamp("2021-03-04T05:06:07Z")
    assert obs.loc["q2", "effective"] == pd.Timestamp("2021-03-05T00:00:00Z")
    assert obs.loc["q3", ["unit", "flag"]].tolist() == ["mmol/L", "converted"]
    assert obs.loc["q3", "value_canonical"] == pytest.approx(5.5 * 18.016)
    assert obs.loc["q4", "loinc"] is None and obs.loc["q4", "flag"] == "unknown_code"  # `loinc` holds LOINC only
    assert obs.loc["q5-8480-6", ["concept", "value_canonical"]].tolist() == ["sbp", 120.0]
    assert obs.loc["q5-44250-9", "flag"] == "unknown_code" and pd.isna(obs.loc["q5-44250-9", "value"])
    cond = result.tables["condition"].iloc[0]
    assert [cond["system"], cond["code"], cond["concept"], cond["flag"]] == [ICD10, "E11.9", "t2d", "mapped"]
    assert cond["onset"] == pd.Timestamp("2018-01-01T00:00:00Z")
    assert cond["abatement"] == pd.Timestamp("2018-02-01T00:00:00Z")


def test_compiled_views_agree_with_the_reference_runner_on_odd_shapes(tmp_path: Path):
    """Coding lists filtered by system and the reference forms a Bulk export or bundle may hold give
    the documented values, and the compiled views give exactly the reference runner's rows."""
    from fedlab.flatten import ViewsEngine
    from fedlab.views import load_definitions
    from fedlab.views.runner import compile_view, rows_for_resource

    codings = {
        "k1": [{"system": "urn:local", "code": "GLU"}, {"system": LOINC, "code": "2339-0"},
               {"system": LOINC, "code": "2345-7"}],
        "k2": [{"system": LOINC, "display": "no code"}, {"system": LOINC, "code": "2345-7"}],
        "k3": [{"system": "urn:local", "code": "2339-0"}],
    }
    subjects = {
        "r1": ({"reference": "Patient/p1/_history/3"}, "p1"),
        "r2": ({"reference": "http://example.org/fhir/Patient/p2"}, "p2"),
        "r3": ({"reference": "urn:uuid:9f1c-77"}, "9f1c-77"),
        "r4": ({"reference": "urn:uuid:9f1c-78", "type": "Group"}, None),
        "r5": ({"reference": "Group/g1"}, None),
        "r6": ({"reference": "#contained-1"}, None),
        "r7": ({"reference": "Patient/a b"}, None),
    }
    resources = [_obs(oid, "2339-0", 5.0, "mmol/L", code={"coding": coding}) for oid, coding in codings.items()]
    resources += [_obs(oid, "2339-0", 5.0, "mmol/L", subject=subject) for oid, (subject, _) in subjects.items()]
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "Observation.ndjson").write_text(_lines(resources))
    result = flatten_ndjson([folder / "Observation.ndjson"])
    assert not result.quarantine
    obs = result.tables["observation"].set_index("observation_id")
    assert [obs.loc[oid, "loinc"] for oid in codings] == ["2339-0", "2345-7", None]
    assert [obs.loc[oid, "patient_id"] for oid in subjects] == [expected for _, expected in subjects.values()]

    engine = ViewsEngine()
    reference = compile_view(load_definitions()["observation"])
    for resource in resources:
        expected = [tuple(row[c] for c in reference.columns) for row in rows_for_resource(reference, resource)]
        assert engine.rows_of("Observation", resource) == expected, resource["id"]
    assert engine.fallbacks == 0
