"""HIPAA Safe Harbor de-identification: a scanner finds every identifier kind in raw input and none in the output."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedlab.fhir.deid import (
    DeidError,
    DeidPolicy,
    deidentify_ndjson_folder,
    deidentify_resource,
    generalize_zip,
)

# Leaves under these keys are structure (code systems, canonical URLs, codes), never personal data.
STRUCTURAL_KEYS = {"system", "url", "profile", "code", "valueCode", "resourceType"}
PATTERNS = {
    "ssn": re.compile(r"\b\d{3}-\d{2}-\d{4}\b"),
    "phone/fax": re.compile(r"\b\d{3}[-. ]\d{3}[-. ]\d{4}\b|\(\d{3}\)\s*\d{3}-\d{4}"),
    "email": re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+"),
    "url": re.compile(r"https?://|www\."),
    "ip": re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b"),
    "full date": re.compile(r"\b(?:1[89]|20)\d{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])\b"),
    "street line": re.compile(r"\b\d+ [A-Z][a-z]+ (?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Terrace|Way|Drive|Dr|"
                              r"Court|Ct|Boulevard|Blvd|Place|Pl|Row|Gateway|Crossroad|Rapid|Mill|Loaf|Fork)\b"),
    "geolocation": re.compile(r"latitude|longitude|geolocation"),
}


def _leaves(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for child_key, child in value.items():
            yield from _leaves(child, child_key)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item, key)
    else:
        yield key, value


class IdentifierScanner:
    """Looks for each Safe Harbor identifier kind in NDJSON; literal kinds come from the raw Patients."""

    def __init__(self, raw_patients: list[dict[str, Any]]) -> None:
        names, identifiers, streets = set(), set(), set()
        for patient in raw_patients:
            identifiers.add(patient["id"])
            identifiers.update(i["value"] for i in patient.get("identifier", []))
            for name in patient.get("name", []):
                names.update([name.get("family", ""), *name.get("given", [])])
            for address in patient.get("address", []):
                streets.update(address.get("line", []))
        self.literals = {kind: re.compile("|".join(rf"\b{re.escape(v)}\b" for v in sorted(values) if v))
                         for kind, values in (("patient name", names), ("MRN/identifier", identifiers),
                                              ("street line", streets)) if values}

    def scan(self, resource: dict[str, Any]) -> list[tuple[str, str]]:
        found = []
        for key, value in _leaves(resource):
            if key == "postalCode" and re.fullmatch(r"\d{5}(-\d{4})?", str(value)):
                found.append(("ZIP5", str(value)))
            if key == "url" and PATTERNS["geolocation"].search(str(value)):  # the geolocation extension
                found.append(("geolocation", str(value)))
            if not isinstance(value, str) or key in STRUCTURAL_KEYS:
                continue
            for kind, pattern in (*PATTERNS.items(), *self.literals.items()):
                match = pattern.search(value)
                if match:
                    found.append((kind, match.group(0)))
        return found

    def scan_folder(self, folder: Path) -> dict[str, list[str]]:
        hits: dict[str, list[str]] = {}
        for path in sorted(folder.glob("*.ndjson")):
            for line in path.read_text().splitlines():
                for kind, text in self.scan(json.loads(line)):
                    hits.setdefault(kind, []).append(f"{path.name}: {text}")
        return hits


ALL_KINDS = {"ssn", "phone/fax", "email", "url", "ip", "full date", "street line", "geolocation", "ZIP5",
             "patient name", "MRN/identifier"}


def _read(folder: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / f"{name}.ndjson").read_text().splitlines()]


def _write(folder: Path, name: str, rows: list[dict[str, Any]]) -> None:
    (folder / f"{name}.ndjson").write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))


def _enrich(patient: dict[str, Any], index: int) -> dict[str, Any]:
    """Add the identifier kinds Synthea does not emit (fax, email, URL, IP, photo, notes, narrative)."""
    family = patient["name"][0]["family"]
    patient["telecom"] += [{"system": "fax", "value": f"555-301-{1000 + index}"},
                           {"system": "email", "value": f"{family.lower()}@example.org"},
                           {"system": "url", "value": f"https://home.example.org/~{family.lower()}"}]
    patient["photo"] = [{"contentType": "image/jpeg", "url": f"https://photos.example.org/{patient['id']}.jpg"}]
    patient["text"] = {"status": "generated", "div": f"<div xmlns=\"http://www.w3.org/1999/xhtml\">{family}</div>"}
    patient["contact"] = [{"name": {"family": family}, "telecom": [{"system": "phone", "value": "555-777-1234"}]}]
    return patient


@pytest.fixture(scope="module")
def generated_exp(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fedlab.config import experiment_from_dict
    from fedlab.synthea import generate

    exp = experiment_from_dict({"name": "deid", "sites": [{"id": "h1", "patients": 20, "seed": 5}],
                                "generate": {"years_of_history": 8}, "export": {"deidentify": True}},
                               root=tmp_path_factory.mktemp("deid"))
    generate(exp)
    return exp


@pytest.fixture(scope="module")
def generated_bulk(generated_exp: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 20-patient site, plus the identifier kinds the generator never writes."""
    bulk = generated_exp.data_path("synthea", None, "h1") / "bulk"
    raw = tmp_path_factory.mktemp("raw")
    for path in bulk.glob("*.ndjson"):
        (raw / path.name).write_text(path.read_text())
    _write(raw, "Patient", [_enrich(p, i) for i, p in enumerate(_read(raw, "Patient"))])
    observations = _read(raw, "Observation")
    observations[0]["note"] = [{"text": "called from 10.1.2.3, SSN on file 123-45-6789"}]
    observations[1]["device"] = {"display": "glucometer"}
    _write(raw, "Observation", observations)
    return raw


POLICY = DeidPolicy("site-secret-h1", reference_date=dt.date(2026, 1, 1))


@pytest.fixture(scope="module")
def deidentified(generated_bulk: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("deid-out")
    return out, deidentify_ndjson_folder(generated_bulk, out, POLICY)


def test_scanner_finds_every_kind_in_raw_input_and_nothing_after_deidentification(
        generated_bulk: Path, deidentified: tuple[Path, dict[str, int]]) -> None:
    scanner = IdentifierScanner(_read(generated_bulk, "Patient"))
    raw_hits = scanner.scan_folder(generated_bulk)
    assert set(raw_hits) == ALL_KINDS, f"scanner missed kinds in raw input: {ALL_KINDS - set(raw_hits)}"
    out, counts = deidentified
    raw_counts = {p.name[:-7]: len(p.read_text().splitlines()) for p in generated_bulk.glob("*.ndjson")}
    assert counts == raw_counts
    assert scanner.scan_folder(out) == {}


def test_references_link_through_pseudonyms(generated_bulk: Path, deidentified: tuple[Path, dict[str, int]]) -> None:
    tmp_path = deidentified[0]
    ids = {r["resourceType"] + "/" + r["id"] for p in tmp_path.glob("*.ndjson") for r in _read(tmp_path, p.stem)}
    raw_ids = {r["id"] for p in generated_bulk.glob("*.ndjson") for r in _read(generated_bulk, p.stem)}
    assert not raw_ids & {i.split("/", 1)[1] for i in ids}
    references = [value for p in tmp_path.glob("*.ndjson") for r in _read(tmp_path, p.stem)
                  for key, value in _leaves(r) if key == "reference"]
    assert len(references) > 1000 and all(ref in ids for ref in references)
    patient = _read(generated_bulk, "Patient")[0]
    assert POLICY.pseudonym(patient["id"]) == deidentify_resource(patient, POLICY)["id"]
    assert DeidPolicy("other-secret").pseudonym(patient["id"]) != POLICY.pseudonym(patient["id"])


def test_patient_is_generalized_not_emptied(generated_bulk: Path) -> None:
    raw = _read(generated_bulk, "Patient")[0]
    clean = deidentify_resource(raw, POLICY)
    for removed in ("name", "telecom", "identifier", "photo", "text", "contact"):
        assert removed not in clean
    assert clean["gender"] == raw["gender"] and clean["birthDate"] == raw["birthDate"][:4]
    assert clean["address"] == [{"state": raw["address"][0]["state"], "country": "US",
                                 "postalCode": raw["address"][0]["postalCode"][:3]}]
    kept_urls = {e["url"] for e in clean["extension"]}
    assert any("us-core-race" in u for u in kept_urls) and not any("mothersMaidenName" in u or "birthPlace" in u
                                                                    for u in kept_urls)
    assert raw["name"]  # the input is not modified


def test_dates_year_mode_and_instants() -> None:
    obs = {"resourceType": "Observation", "id": "o", "status": "final", "subject": {"reference": "Patient/p"},
           "effectiveDateTime": "2013-06-17T16:53:18-05:00", "issued": "2013-06-17T16:53:18.123-05:00",
           "meta": {"lastUpdated": "2024-01-01T00:00:00Z"}}
    clean = deidentify_resource(obs, POLICY)
    assert clean["effectiveDateTime"] == "2013" and "issued" not in clean and "lastUpdated" not in clean["meta"]


def test_shift_mode_is_consistent_per_patient_and_keeps_intervals() -> None:
    policy = DeidPolicy("k", date_mode="shift", shift_seed=3)

    def encounter(patient: str, start: str, end: str) -> dict[str, Any]:
        return {"resourceType": "Encounter", "id": f"e-{patient}-{start}", "subject": {"reference": f"Patient/{patient}"},
                "period": {"start": start, "end": end}}

    first = deidentify_resource(encounter("p1", "2013-06-17T16:53:18-05:00", "2013-06-20T10:00:00-05:00"), policy)
    second = deidentify_resource(encounter("p1", "2015-01-01", "2015-03-01"), policy)
    other = deidentify_resource(encounter("p2", "2013-06-17T16:53:18-05:00", "2013-06-20T10:00:00-05:00"), policy)
    patient = deidentify_resource({"resourceType": "Patient", "id": "p1", "birthDate": "1970-03-05"}, policy)
    offset = dt.date.fromisoformat(first["period"]["start"][:10]) - dt.date(2013, 6, 17)
    assert offset.days != 0 and abs(offset.days) <= 365
    assert first["period"]["start"].endswith("T16:53:18-05:00")
    assert dt.date.fromisoformat(second["period"]["start"]) - dt.date(2015, 1, 1) == offset
    assert dt.date.fromisoformat(second["period"]["end"]) - dt.date.fromisoformat(second["period"]["start"]) == \
        dt.date(2015, 3, 1) - dt.date(2015, 1, 1)
    assert dt.date.fromisoformat(patient["birthDate"]) - dt.date(1970, 3, 5) == offset
    assert other["period"]["start"] != first["period"]["start"]
    assert DeidPolicy("k", date_mode="shift", shift_seed=4).shift_days("p1") != policy.shift_days("p1") or \
        DeidPolicy("k", date_mode="shift", shift_seed=5).shift_days("p1") != policy.shift_days("p1")


def test_ages_over_89_are_aggregated() -> None:
    old = {"resourceType": "Patient", "id": "old", "birthDate": "1930-02-01"}
    dead_at_80 = {"resourceType": "Patient", "id": "d", "birthDate": "1930-02-01",
                  "deceasedDateTime": "2010-05-05T00:00:00Z"}
    clean_old = deidentify_resource(old, POLICY)
    assert clean_old["birthDate"] == "1936"  # 90 at the 2026 reference date: no older age is revealed
    assert any(e["url"].endswith("age-90-or-older") for e in clean_old["extension"])
    assert deidentify_resource(dead_at_80, POLICY)["birthDate"] == "1930"


@pytest.mark.parametrize(("zip_code", "expected"), [("01103", "011"), ("03601", "000"), ("89012-1234", "000"),
                                                    ("90210", "902"), ("12", "000")])
def test_zip_generalization(zip_code: str, expected: str) -> None:
    assert generalize_zip(zip_code) == expected


def test_references_to_people_lose_their_display() -> None:
    encounter = {"resourceType": "Encounter", "id": "e", "subject": {"reference": "Patient/p", "display": "Mrs. X"},
                 "participant": [{"individual": {"reference": "Practitioner/d", "display": "Dr. Y"}}],
                 "serviceProvider": {"reference": "Organization/o", "display": "GENERAL HOSPITAL"}}
    clean = deidentify_resource(encounter, POLICY)
    assert "display" not in clean["subject"] and "display" not in clean["participant"][0]["individual"]
    assert clean["serviceProvider"]["display"] == "GENERAL HOSPITAL"


def test_bad_input_is_named(tmp_path: Path) -> None:
    (tmp_path / "Patient.ndjson").write_text('{"resourceType":"Patient","id":"a"}\n{not json\n')
    with pytest.raises(DeidError, match=r"Patient.ndjson:2: not valid JSON"):
        deidentify_ndjson_folder(tmp_path, tmp_path / "out", POLICY)
    with pytest.raises(DeidError, match="date_mode"):
        DeidPolicy("k", date_mode="month")  # type: ignore[arg-type]
    with pytest.raises(DeidError, match="secret"):
        DeidPolicy("")


def test_export_stage_deidentifies_on_the_server(generated_exp: Any) -> None:
    from fedlab.fhir.export import audit_log_path, export
    from fedlab.io import read_json

    bulk = generated_exp.data_path("synthea", None, "h1") / "bulk"
    folder = export(generated_exp, progress=False)["h1"]
    scanner = IdentifierScanner(_read(bulk, "Patient"))
    assert scanner.scan_folder(folder) == {}
    manifest = read_json(folder / "manifest.json")
    assert manifest["deidentified"] == "HIPAA Safe Harbor" and manifest["deidentification"]["applied_by"] == "site server"
    exported = {f["type"]: f["lines"] for f in manifest["files"]}
    assert exported["Patient"] == 20 and exported["Observation"] == len(_read(bulk, "Observation"))
    secret = (generated_exp.data_path("export", None) / "_site_secrets" / "h1" / "deid_secret").read_text()
    assert not any(secret in p.read_text() for p in folder.iterdir())  # the key stays with the hospital
    records = [json.loads(line) for line in audit_log_path(generated_exp, None, "h1").read_text().splitlines()]
    assert [r["event"] for r in records if r["event"] != "download"] == \
        ["token-issued", "export-kickoff", "export-complete", "export-deleted"]
    assert all(r["client_id"] == "fedlab-node-h1" for r in records)
    complete = next(r for r in records if r["event"] == "export-complete")
    assert complete["deidentified"] is True and complete["patients"] == 20
