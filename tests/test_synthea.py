"""The Synthea-shaped generator: determinism, FHIR validity, Synthea's shape, site differences."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import re
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from fedlab.config import ConfigError, experiment_from_dict
from fedlab.errors import FedlabError
from fedlab.io import SUCCESS, read_json
from fedlab.synthea import generate
from fedlab.synthea.export import dumps, transaction_bundle, transaction_bundle_json
from fedlab.synthea.lifecycle import wellness_interval_years

# The package re-exports the function `generate`, which shadows the module of the same name.
gen_mod = importlib.import_module("fedlab.synthea.generate")

SNOMED_CONDITIONS = {"714628002", "44054006", "59621000", "55822004", "162864005",
                     "431855005", "431856006", "433144002", "431857002"}
ICD10_CONDITIONS = {"R73.03", "E11.9", "I10", "E78.5", "E66.9", "N18.1", "N18.2", "N18.30", "N18.4"}
T2D_CODES = {"44054006", "E11.9"}


ENGINES = ("gmf", "python")


def _experiment(root: Path, sites: list[dict[str, Any]], seed: int = 7, workers: int = 1,
                years: int = 8, engine: str = "gmf", **generate_options: Any):
    return experiment_from_dict({"name": "t", "seed": seed, "sites": sites,
                                 "generate": {"years_of_history": years, "workers": workers, "engine": engine,
                                              **generate_options}}, root=root)


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, with the run's timings removed from the completion marker."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == SUCCESS:
                info = json.loads(data)
                info.pop("timings")
                data = json.dumps(info, sort_keys=True).encode()
            files[str(path.relative_to(folder))] = data
    return files


def _ndjson(folder: Path, resource_type: str) -> list[dict[str, Any]]:
    path = folder / "bulk" / f"{resource_type}.ndjson"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _patient_bundles(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((folder / "fhir").glob("*.json"))
            if "Information" not in p.name]


@pytest.fixture(scope="module", params=ENGINES)
def sites(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three small sites generated once per engine: plain SNOMED, sick SNOMED, and ICD-10 + mmol/L."""
    root = tmp_path_factory.mktemp(f"synthea_{request.param}")
    exp = _experiment(root, engine=request.param, sites=[
        {"id": "plain", "patients": 40, "seed": 11},
        {"id": "sick", "patients": 40, "seed": 12, "age_mean": 62, "bmi_shift": 4,
         "diabetes_risk": 4, "hypertension_risk": 3},
        {"id": "metro_icd", "patients": 40, "seed": 13, "age_mean": 60, "diabetes_risk": 3,
         "condition_system": "icd10", "glucose_unit": "mmol/L"},
    ])
    return generate(exp, progress=False)


# ---------------------------------------------------------------- layout and determinism

def test_folder_layout_and_counts_match_success_marker(sites: dict[str, Path]) -> None:
    for folder in sites.values():
        info = read_json(folder / SUCCESS)
        assert info["stage"] == "generate" and info["seed"] == 7 and info["patients"] == 40
        bundles = _patient_bundles(folder)
        assert len(bundles) == 40 == info["files"]["bundles"]
        for name in info["files"]["providers"]:
            assert re.fullmatch(r"(hospital|practitioner)Information\d{13}\.json", name)
            assert (folder / "fhir" / name).is_file()
        for path in (folder / "bulk").glob("*.ndjson"):
            lines = path.read_text().splitlines()
            assert len(lines) == info["counts"][path.stem], path.name
        assert set(info["counts"]) == {p.stem for p in (folder / "bulk").glob("*.ndjson")}
        in_bundles = Counter(e["resource"]["resourceType"] for b in bundles for e in b["entry"])
        assert in_bundles == Counter({t: n for t, n in info["counts"].items()
                                      if t not in ("Organization", "Practitioner")})


def test_bundle_file_names_follow_synthea(sites: dict[str, Path]) -> None:
    for path in (sites["plain"] / "fhir").glob("*.json"):
        if "Information" in path.name:
            continue
        match = re.fullmatch(r"([A-Z][a-z]+\d+)_([A-Z][a-z]+\d+)_([0-9a-f-]{36})\.json", path.name)
        assert match, path.name
        patient = json.loads(path.read_text())["entry"][0]["resource"]
        assert patient["id"] == match.group(3)
        assert patient["name"][0]["given"][0] == match.group(1)
        assert patient["name"][0]["family"] == match.group(2)
        assert uuid.UUID(patient["id"]).version == 4


@pytest.mark.parametrize("engine", ENGINES)
def test_same_config_is_byte_identical_twice_and_with_two_workers(tmp_path: Path, engine: str) -> None:
    site = [{"id": "a", "patients": 24, "seed": 3, "lab_missingness": 0.2}]
    first = generate(_experiment(tmp_path / "one", site, workers=1, engine=engine), progress=False)["a"]
    again = generate(_experiment(tmp_path / "two", site, workers=1, engine=engine), progress=False)["a"]
    pooled = generate(_experiment(tmp_path / "three", site, workers=2, engine=engine), progress=False)["a"]
    reference = _tree(first)
    assert len(reference) == 24 + 2 + 1 + len(list((first / "bulk").iterdir()))
    assert _tree(again) == reference
    assert _tree(pooled) == reference
    assert read_json(first / SUCCESS)["engine"] == engine


def test_different_seeds_give_different_populations(tmp_path: Path) -> None:
    site = [{"id": "a", "patients": 10, "seed": 3}]
    one = generate(_experiment(tmp_path / "one", site, seed=1), progress=False)["a"]
    two = generate(_experiment(tmp_path / "two", site, seed=2), progress=False)["a"]
    names_one = {p.name for p in (one / "fhir").iterdir()}
    names_two = {p.name for p in (two / "fhir").iterdir()}
    assert not names_one & names_two
    assert (one / "bulk" / "Observation.ndjson").read_bytes() != (two / "bulk" / "Observation.ndjson").read_bytes()


def test_assembled_bundle_json_equals_serialized_bundle() -> None:
    resources = [{"resourceType": "Patient", "id": "p1", "gender": "female"},
                 {"resourceType": "Observation", "id": "o1", "valueQuantity": {"value": 1.0000000000000002}}]
    text = transaction_bundle_json(resources, [dumps(r) for r in resources])
    assert text == dumps(transaction_bundle(resources))


# ---------------------------------------------------------------- FHIR validity and Synthea's shape

def test_every_resource_validates_as_fhir_r4b(sites: dict[str, Path]) -> None:
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.bundle import Bundle

    seen: set[str] = set()
    for folder in sites.values():
        bundles = _patient_bundles(folder)
        for bundle in bundles[:8]:
            Bundle.model_validate(bundle)
        for path in (folder / "fhir").glob("*Information*.json"):
            Bundle.model_validate(json.loads(path.read_text()))
        for path in (folder / "bulk").glob("*.ndjson"):
            model = get_fhir_model_class(path.stem)
            for line in path.read_text().splitlines()[:40]:
                model.model_validate(json.loads(line))
            seen.add(path.stem)
    assert {"Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "Procedure",
            "Immunization", "DiagnosticReport", "CarePlan", "Organization", "Practitioner"} <= seen


def test_bundle_shape_matches_real_synthea_bundles(sites: dict[str, Path], reference_dir: Path) -> None:
    samples = [json.loads(p.read_text()) for p in sorted((reference_dir / "synthea-sample").glob("*.json"))]
    ours = _patient_bundles(sites["sick"])[0]
    for sample in samples:
        assert set(ours) == set(sample)
        assert ours["type"] == sample["type"] == "transaction"
        for entry in sample["entry"][:3] + ours["entry"][:3]:
            assert list(entry) == ["fullUrl", "resource", "request"]
            assert entry["fullUrl"] == f"urn:uuid:{entry['resource']['id']}"
            assert entry["request"] == {"method": "POST", "url": entry["resource"]["resourceType"]}
    sample_patient = samples[0]["entry"][0]["resource"]
    patient = ours["entry"][0]["resource"]
    assert patient["resourceType"] == "Patient"
    ours_urls = {e["url"] for e in patient["extension"]}
    assert ours_urls <= {e["url"] for e in sample_patient["extension"]}
    assert {u.rsplit("/", 1)[1] for u in ours_urls} >= {"us-core-race", "us-core-ethnicity", "us-core-birthsex"}
    assert set(patient) <= set(sample_patient) | {"deceasedDateTime"}
    # Blood pressure: one panel with systolic and diastolic components, as in Synthea.
    sample_components = {c["code"]["coding"][0]["code"] for b in samples for e in b["entry"]
                         for c in e["resource"].get("component", [])}
    panels = [e["resource"] for e in ours["entry"] if e["resource"].get("code", {}).get("coding", [{}])[0]
              .get("code") == "85354-9"]
    assert panels
    for panel in panels:
        assert {c["code"]["coding"][0]["code"] for c in panel["component"]} == {"8480-6", "8462-4"} \
            == sample_components
        assert all(c["valueQuantity"]["unit"] == "mm[Hg]" for c in panel["component"])
    # Each resource type we share with Synthea uses only keys Synthea uses (plus R4 ones it omits).
    sample_keys: dict[str, set[str]] = defaultdict(set)
    for b in samples:
        for e in b["entry"]:
            sample_keys[e["resource"]["resourceType"]] |= set(e["resource"])
    extra_allowed = {"Condition": {"category", "abatementDateTime"}, "Encounter": {"reasonCode"},
                     "MedicationRequest": {"dosageInstruction"}, "Observation": {"valueCodeableConcept"}}
    for entry in ours["entry"]:
        resource = entry["resource"]
        kind = resource["resourceType"]
        assert set(resource) <= sample_keys[kind] | extra_allowed.get(kind, set()), kind


def test_bundle_order_and_references(sites: dict[str, Path]) -> None:
    order = ["Encounter", "Condition", "Observation", "Procedure", "MedicationRequest", "Immunization",
             "DiagnosticReport", "CarePlan"]
    for bundle in _patient_bundles(sites["sick"]):
        kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
        assert kinds[0] == "Patient" and kinds.count("Patient") == 1
        block: list[str] = []
        for kind in kinds[1:] + ["Encounter"]:
            if kind == "Encounter":
                ranks = [order.index(k) for k in block]
                assert ranks == sorted(ranks), block
                block = []
            block.append(kind)
        ids = {e["resource"]["id"] for e in bundle["entry"]}
        for ref in re.findall(r'"reference":"([^"]+)"', json.dumps(bundle, separators=(",", ":"))):
            if ref.startswith("urn:uuid:"):
                assert ref[9:] in ids
            else:
                assert re.fullmatch(r"(Organization\?identifier=https://github\.com/synthetichealth/synthea"
                                    r"|Practitioner\?identifier=http://hl7\.org/fhir/sid/us-npi)\|\w[\w-]*", ref)


def test_bulk_references_resolve_to_exported_resources(sites: dict[str, Path]) -> None:
    folder = sites["sick"]
    ids = {(p.stem, json.loads(line)["id"]) for p in (folder / "bulk").glob("*.ndjson")
           for line in p.read_text().splitlines()}
    references = 0
    for path in (folder / "bulk").glob("*.ndjson"):
        text = path.read_text()
        assert "urn:uuid:" not in text and "?identifier=" not in text
        for kind, rid in re.findall(r'"reference":"(\w+)/([0-9a-f-]+)"', text):
            assert (kind, rid) in ids
            references += 1
    assert references > 1000


def test_patient_demographics(sites: dict[str, Path]) -> None:
    for patient in _ndjson(sites["plain"], "Patient"):
        identifiers = {i.get("type", {}).get("coding", [{}])[0].get("code"): i["value"] for i in patient["identifier"]}
        assert re.fullmatch(r"999-\d\d-\d{4}", identifiers["SS"])
        assert identifiers["MR"] == patient["id"]
        age = (dt.date(2026, 1, 1) - dt.date.fromisoformat(patient["birthDate"])).days / 365.25
        assert 18 <= age <= 95.01
        geo = patient["address"][0]["extension"][0]
        assert geo["url"] == "http://hl7.org/fhir/StructureDefinition/geolocation"
        race = next(e for e in patient["extension"] if e["url"].endswith("us-core-race"))
        ethnicity = next(e for e in patient["extension"] if e["url"].endswith("us-core-ethnicity"))
        assert race["extension"][0]["valueCoding"]["system"] == "urn:oid:2.16.840.1.113883.6.238"
        assert ethnicity["extension"][0]["valueCoding"]["code"] in {"2135-2", "2186-5"}
        birthsex = next(e for e in patient["extension"] if e["url"].endswith("us-core-birthsex"))
        assert birthsex["valueCode"] == {"female": "F", "male": "M"}[patient["gender"]]


# ---------------------------------------------------------------- site differences

def test_icd10_site_codes_conditions_in_icd10_only(sites: dict[str, Path]) -> None:
    icd = _ndjson(sites["metro_icd"], "Condition")
    assert icd
    codings = [c for r in icd for c in r["code"]["coding"]]
    assert {c["system"] for c in codings} == {"http://hl7.org/fhir/sid/icd-10-cm"}
    assert {c["code"] for c in codings} <= ICD10_CONDITIONS
    assert not {c["code"] for c in codings} & SNOMED_CONDITIONS
    snomed = [c for r in _ndjson(sites["sick"], "Condition") for c in r["code"]["coding"]]
    assert {c["system"] for c in snomed} == {"http://snomed.info/sct"}
    assert {c["code"] for c in snomed} <= SNOMED_CONDITIONS


def test_mmol_site_reports_glucose_with_loinc_15074_8(sites: dict[str, Path]) -> None:
    def glucose(folder: Path) -> dict[str, list[float]]:
        out: dict[str, list[float]] = defaultdict(list)
        for r in _ndjson(folder, "Observation"):
            code = r["code"]["coding"][0]["code"]
            if code in ("2339-0", "15074-8"):
                assert r["valueQuantity"]["unit"] == {"2339-0": "mg/dL", "15074-8": "mmol/L"}[code]
                out[code].append(r["valueQuantity"]["value"])
        return out

    mmol, mgdl = glucose(sites["metro_icd"]), glucose(sites["plain"])
    assert set(mmol) == {"15074-8"} and set(mgdl) == {"2339-0"}
    assert 3.0 < sorted(mmol["15074-8"])[len(mmol["15074-8"]) // 2] < 9.0
    assert 55.0 < sorted(mgdl["2339-0"])[len(mgdl["2339-0"]) // 2] < 160.0


@pytest.mark.parametrize("engine", ENGINES)
def test_wellness_visits_always_have_vitals_and_missingness_drops_labs(tmp_path: Path, engine: str) -> None:
    exp = _experiment(tmp_path, [{"id": "full", "patients": 25, "seed": 5, "lab_missingness": 0.0},
                                 {"id": "gappy", "patients": 25, "seed": 5, "lab_missingness": 0.6}], engine=engine)
    folders = generate(exp, progress=False)

    def per_wellness(folder: Path) -> tuple[int, Counter[str]]:
        wellness = {r["id"] for r in _ndjson(folder, "Encounter")
                    if r["type"][0]["coding"][0]["code"] == "185349003"}
        counts: Counter[str] = Counter()
        for r in _ndjson(folder, "Observation"):
            if r["encounter"]["reference"].split("/")[1] in wellness:
                counts[r["code"]["coding"][0]["code"]] += 1
        return len(wellness), counts

    visits, full = per_wellness(folders["full"])
    assert all(full[code] == visits for code in ("8302-2", "29463-7", "39156-5", "85354-9", "8867-4",
                                                "4548-4", "2339-0", "2093-3", "18262-6", "33914-3"))
    visits_gappy, gappy = per_wellness(folders["gappy"])
    assert gappy["39156-5"] == gappy["85354-9"] == visits_gappy  # vitals are never missing
    assert 0.25 < gappy["4548-4"] / visits_gappy < 0.55


def test_wellness_schedule_follows_synthea_adult_intervals() -> None:
    assert wellness_interval_years(30, 1.0) == 3.0
    assert wellness_interval_years(45, 1.0) == 2.0
    assert wellness_interval_years(70, 1.0) == 1.0
    assert wellness_interval_years(70, 2.0) == 0.5


def test_treatment_references_the_condition_it_treats(sites: dict[str, Path]) -> None:
    folder = sites["sick"]
    conditions = {r["id"]: r["code"]["coding"][0]["code"] for r in _ndjson(folder, "Condition")}
    reasons: dict[str, set[str]] = defaultdict(set)
    for r in _ndjson(folder, "MedicationRequest"):
        assert r["intent"] == "order" and r["status"] in {"active", "stopped"}
        code = r["medicationCodeableConcept"]["coding"][0]["code"]
        for ref in r.get("reasonReference", []):
            reasons[code].add(conditions[ref["reference"].split("/")[1]])
    assert reasons["860975"] == {"44054006"}  # metformin for type 2 diabetes
    antihypertensive = reasons["314076"] | reasons["308136"] | reasons["310798"]
    assert antihypertensive == {"59621000"}


def _three_year_incidence(folder: Path) -> tuple[float, int]:
    """Among adults without T2D at a random wellness visit with 3 years of follow-up: share diagnosed."""
    import random

    t2d: dict[str, dt.datetime] = {}
    for r in _ndjson(folder, "Condition"):
        if r["code"]["coding"][0]["code"] in T2D_CODES:
            t2d[r["subject"]["reference"]] = dt.datetime.fromisoformat(r["onsetDateTime"])
    visits: dict[str, list[dt.datetime]] = defaultdict(list)
    cutoff = dt.datetime(2023, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    for r in _ndjson(folder, "Encounter"):
        start = dt.datetime.fromisoformat(r["period"]["start"])
        patient = r["subject"]["reference"]
        if r["type"][0]["coding"][0]["code"] == "185349003" and start <= cutoff and \
                (patient not in t2d or t2d[patient] > start):
            visits[patient].append(start)
    rng = random.Random(0)
    labels = []
    for patient, starts in sorted(visits.items()):
        index = rng.choice(sorted(starts))
        labels.append(patient in t2d and t2d[patient] <= index + dt.timedelta(days=3 * 365))
    return sum(labels) / len(labels), len(labels)


@pytest.mark.parametrize("engine", ENGINES)
def test_incident_t2d_rate_is_in_a_sane_band_and_follows_diabetes_risk(tmp_path: Path, engine: str) -> None:
    exp = _experiment(tmp_path, [{"id": "usual", "patients": 300, "seed": 21},
                                 {"id": "low", "patients": 150, "seed": 21, "diabetes_risk": 0.3}], years=10,
                      engine=engine)
    folders = generate(exp, progress=False)
    rate, cohort = _three_year_incidence(folders["usual"])
    assert cohort > 150
    assert 0.01 <= rate <= 0.30  # real-world ~2 % in 3 years; diabetes_risk raises it for small sites
    low_rate, _ = _three_year_incidence(folders["low"])
    assert low_rate < rate
    prevalence = read_json(folders["usual"] / SUCCESS)["summary"]["patients_with_condition"]
    assert prevalence["t2d"] > read_json(folders["low"] / SUCCESS)["summary"]["patients_with_condition"]["t2d"]


def _point_prevalence(folder: Path, reference: dt.date, codes: set[str],
                      ages: tuple[int, int]) -> tuple[float, int]:
    """Share of patients alive at `reference` and aged `ages` (inclusive) with an active condition."""
    living = {}
    for r in _ndjson(folder, "Patient"):
        age = (reference - dt.date.fromisoformat(r["birthDate"])).days // 365.25
        if "deceasedDateTime" not in r and ages[0] <= age <= ages[1]:
            living[f"Patient/{r['id']}"] = r
    with_condition = set()
    for r in _ndjson(folder, "Condition"):
        active = "abatementDateTime" not in r or dt.date.fromisoformat(r["abatementDateTime"][:10]) > reference
        if r["subject"]["reference"] in living and r["code"]["coding"][0]["code"] in codes and active and \
                dt.date.fromisoformat(r["onsetDateTime"][:10]) <= reference:
            with_condition.add(r["subject"]["reference"])
    return len(with_condition) / len(living), len(living)


@pytest.mark.parametrize("engine", ["gmf", "python"])
def test_default_site_has_cdc_like_diabetes_prevalence(tmp_path: Path, engine: str) -> None:
    """Default site: diagnosed T2D among living adults near CDC's ~11 %, rising with age; hypertension
    and obesity near US adult prevalence."""
    exp = _experiment(tmp_path, [{"id": "default", "patients": 600, "seed": 5}], years=12, workers=2,
                      engine=engine)
    folder = generate(exp, progress=False)["default"]
    reference = exp.generate.reference_date
    adults, n_adults = _point_prevalence(folder, reference, T2D_CODES, (18, 200))
    young, _ = _point_prevalence(folder, reference, T2D_CODES, (18, 44))
    old, _ = _point_prevalence(folder, reference, T2D_CODES, (65, 200))
    assert n_adults > 400
    assert 0.05 <= adults <= 0.20
    assert young < adults < old <= 0.40  # CDC: ~24 % at 65+ (a few hundred people here)
    hypertension, _ = _point_prevalence(folder, reference, {"59621000"}, (18, 200))
    young_htn, _ = _point_prevalence(folder, reference, {"59621000"}, (18, 39))
    assert 0.30 <= hypertension <= 0.60 and young_htn < hypertension
    obese, _ = _point_prevalence(folder, reference, {"162864005"}, (18, 200))
    assert 0.30 <= obese <= 0.55  # NHANES 2017-2020: ~42 % of adults have BMI >= 30


# ---------------------------------------------------------------- completion, skipping, bad input

def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    exp = _experiment(tmp_path, [{"id": "a", "patients": 6, "seed": 1}])
    real = gen_mod.build_patient

    def failing(job, index):
        if index == 3:
            raise RuntimeError("disk on fire")
        return real(job, index)

    monkeypatch.setattr(gen_mod, "build_patient", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate(exp, progress=False)
    parent = exp.data_path("synthea")
    assert list(parent.iterdir()) == []  # no site folder, no staging leftovers

    monkeypatch.setattr(gen_mod, "build_patient", real)
    folder = generate(exp, progress=False)["a"]
    before = _tree(folder)
    monkeypatch.setattr(gen_mod, "build_patient", failing)
    with pytest.raises(RuntimeError):
        generate(exp, force=True, progress=False)
    assert _tree(folder) == before  # the earlier complete folder survives a failed rebuild
    assert [p.name for p in parent.iterdir()] == ["a"]


def test_complete_site_is_skipped_unless_forced_or_changed(tmp_path: Path) -> None:
    site = {"id": "a", "patients": 4, "seed": 1}
    folder = generate(_experiment(tmp_path, [site]), progress=False)["a"]
    marker = folder / SUCCESS
    stamp = marker.stat().st_mtime_ns
    generate(_experiment(tmp_path, [site]), progress=False)
    assert marker.stat().st_mtime_ns == stamp
    generate(_experiment(tmp_path, [site]), force=True, progress=False)
    assert marker.stat().st_mtime_ns != stamp
    stamp = marker.stat().st_mtime_ns
    generate(_experiment(tmp_path, [{**site, "patients": 5}]), progress=False)
    assert read_json(marker)["patients"] == 5 and marker.stat().st_mtime_ns != stamp


def test_site_selection_and_unknown_site(tmp_path: Path) -> None:
    exp = _experiment(tmp_path, [{"id": "a", "patients": 3, "seed": 1}, {"id": "b", "patients": 3, "seed": 2}])
    assert list(generate(exp, sites=["b"], progress=False)) == ["b"]
    assert not exp.data_path("synthea", None, "a").exists()
    with pytest.raises(ConfigError, match="no site named 'zzz'"):
        generate(exp, sites=["zzz"], progress=False)


def test_unwritable_output_folder_fails_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the data folder should be")
    exp = experiment_from_dict({"name": "t", "data_dir": str(blocker), "sites": [{"id": "a", "patients": 3,
                                                                                   "seed": 1}]}, root=tmp_path)
    with pytest.raises(FedlabError, match="cannot write generated data to .*not_a_folder"):
        generate(exp, progress=False)


def test_jar_engine_without_a_jar_fails_clearly(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SYNTHEA_JAR", raising=False)
    exp = experiment_from_dict({"name": "t", "sites": [{"id": "a", "patients": 3, "seed": 1}],
                                "generate": {"engine": "synthea-jar"}}, root=tmp_path)
    with pytest.raises(FedlabError, match="SYNTHEA_JAR"):
        generate(exp, progress=False)
    assert not exp.data_path("synthea", None, "a").exists()


# ---------------------------------------------------------------- engine gmf: modules on the lifecycle physiology

def test_gmf_engine_runs_synthea_reference_modules(tmp_path: Path, reference_dir: Path) -> None:
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.bundle import Bundle

    exp = _experiment(tmp_path, [{"id": "ref", "patients": 12, "seed": 5, "age_mean": 62, "bmi_shift": 4,
                                  "diabetes_risk": 3}], years=10,
                      modules_dir=str(reference_dir / "synthea-modules"),
                      allow_missing_submodules=["anemia/anemia_sub"])
    folder = generate(exp, progress=False)["ref"]
    info = read_json(folder / SUCCESS)
    assert info["engine"] == "gmf" and info["modules"]["dir"] == str((reference_dir / "synthea-modules").resolve())
    for bundle in _patient_bundles(folder):
        Bundle.model_validate(bundle)
    for path in (folder / "bulk").glob("*.ndjson"):
        model = get_fhir_model_class(path.stem)
        for line in path.read_text().splitlines():
            model.model_validate(json.loads(line))
    encounter_types = Counter(r["type"][0]["coding"][0]["code"] for r in _ndjson(folder, "Encounter"))
    assert encounter_types["185349003"] >= 12 * 3  # Synthea's wellness schedule, in the history window
    conditions = {r["code"]["coding"][0]["code"] for r in _ndjson(folder, "Condition")}
    assert conditions & {"714628002", "44054006", "59621000", "162864005"}
    # Synthea's vitals module measured the lifecycle body: BMI readings vary between people.
    bmis = {round(r["valueQuantity"]["value"]) for r in _ndjson(folder, "Observation")
            if r["code"]["coding"][0]["code"] == "39156-5"}
    assert len(bmis) > 5


def test_gmf_modules_dir_problems_fail_before_any_work(tmp_path: Path) -> None:
    site = [{"id": "a", "patients": 3, "seed": 1}]
    with pytest.raises(FedlabError, match="modules_dir: .*nowhere is not a folder"):
        generate(_experiment(tmp_path, site, modules_dir="nowhere"), progress=False)
    broken = tmp_path / "mods"
    broken.mkdir()
    (broken / "bad.json").write_text('{"name": "bad", "gmf_version": 2, "states": {"Initial": '
                                     '{"type": "Initial", "direct_transition": "Missing"}}}')
    with pytest.raises(FedlabError, match=r"bad\.json: state 'Initial'.*Missing"):
        generate(_experiment(tmp_path, site, modules_dir=str(broken)), progress=False)
    assert not any(exp_path.is_dir() for exp_path in (tmp_path / "data" / "synthea" / "t").glob("a*"))


def test_gmf_folder_is_rebuilt_when_modules_or_engine_change(tmp_path: Path) -> None:
    import shutil

    from fedlab.synthea.gmf_life import BUILTIN_MODULES

    modules = tmp_path / "modules"
    shutil.copytree(BUILTIN_MODULES, modules)
    site = [{"id": "a", "patients": 4, "seed": 1}]
    folder = generate(_experiment(tmp_path, site, modules_dir=str(modules)), progress=False)["a"]
    marker = folder / SUCCESS
    stamp = marker.stat().st_mtime_ns
    generate(_experiment(tmp_path, site, modules_dir=str(modules)), progress=False)
    assert marker.stat().st_mtime_ns == stamp
    checkup = json.loads((modules / "checkup.json").read_text())
    checkup["states"]["Flu_Season"]["distributed_transition"][0]["distribution"] = 1.0
    checkup["states"]["Flu_Season"]["distributed_transition"][1]["distribution"] = 0.0
    (modules / "checkup.json").write_text(json.dumps(checkup))
    generate(_experiment(tmp_path, site, modules_dir=str(modules)), progress=False)
    assert marker.stat().st_mtime_ns != stamp
    immunizations = len(_ndjson(folder, "Immunization"))
    wellness = sum(r["type"][0]["coding"][0]["code"] == "185349003" for r in _ndjson(folder, "Encounter"))
    assert immunizations == wellness > 0  # the edited module now vaccinates at every visit
    generate(_experiment(tmp_path, site, engine="python"), progress=False)
    assert read_json(marker)["engine"] == "python"


def test_lifecycle_person_physiology_follows_module_attributes_and_drugs() -> None:
    from fedlab.config import SiteConfig
    from fedlab.synthea.engine import RandomSource, to_millis
    from fedlab.synthea.gmf_life import LifecyclePerson
    from fedlab.synthea.lifecycle import Rng, _Body, _demographics, _traits

    site = SiteConfig(id="x", patients=1, seed=1, age_mean=55, age_sd=1)
    rng = Rng(11)
    demo = _demographics(rng, site, dt.date(2026, 1, 1))
    body = _Body(rng, site, demo, _traits(rng, demo, 4))
    now = to_millis(dt.datetime(2020, 6, 1))
    person = LifecyclePerson(rng, site, body, to_millis(dt.datetime(2014, 1, 1)), now)
    person.advance(now)
    assert 0.0 < person.get_attribute("t2d_annual_risk") < 1.0
    sbp, _ = person.blood_pressure(now)
    person.set_attribute("hypertension", True)
    assert person.blood_pressure(now)[0] == pytest.approx(sbp + 16.0)
    person.activate("medication", "314076", object())  # lisinopril
    assert person.blood_pressure(now)[0] == pytest.approx(sbp + 5.0)
    assert person.get_attribute("hypertension_annual_risk") == 0.0
    person.set_attribute("diabetes", True)
    later = now + 365 * 86_400_000
    person.advance(later)
    untreated = person.a1c(later)
    assert untreated >= 6.5 and person.get_attribute("t2d_annual_risk") == 0.0
    person.activate("medication", "860975", object())  # metformin
    assert untreated - 1.3 <= person.a1c(later) <= untreated - 0.5 or person.a1c(later) == 5.8
    person.deactivate("medication", "860975")
    assert person.a1c(later) == untreated
    # One time step, one measurement: the BMI a module records is the one its conditions test.
    source = RandomSource(__import__("random").Random(1))
    assert person.vital_sign("BMI", later, source) == person.vital_sign("BMI", later, source)
    assert person.get_attribute("mortality_annual_risk") > 0.0
