"""Flatten FHIR R4 resources into tidy, harmonized Parquet tables with fhiry.

Resources come from a site's Bulk Data export (`<Type>.ndjson`, references `Type/id`) or from
Synthea transaction bundles (`*.json`, references `urn:uuid:id`). Every input line (or bundle
entry) is checked first; a bad one goes to quarantine with its file, line and reason, and the
rest is flattened. Valid resources are handed to fhiry (`Fhiry.process_bundle_dict`) in chunks
of synthetic collection bundles: fhiry's NDJSON reader is quadratic and its folder mode blanks
code columns, so neither is used. The tidy tables of docs/architecture.md are then derived from
fhiry's columns, and codes and units are harmonized with the maps in `fedlab/harmonization/`.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fedlab import harmonization as hz
from fedlab.io import SUCCESS, atomic_open, is_complete, read_json, staging_dir, write_json

if TYPE_CHECKING:
    from fedlab.config import Experiment

CHUNK_SIZE = 2000
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

# Fields a resource must have for its row to mean anything; alternatives separated by "|".
REQUIRED: dict[str, list[str]] = {
    "Patient": ["id", "birthDate"],
    "Encounter": ["id", "subject.reference", "period.start"],
    "Condition": ["id", "subject.reference", "code.coding", "onsetDateTime|onsetPeriod.start|recordedDate"],
    "Observation": ["id", "subject.reference", "code.coding",
                    "effectiveDateTime|effectivePeriod.start|effectiveInstant|issued"],
    "MedicationRequest": ["id", "subject.reference", "medicationCodeableConcept.coding", "authoredOn"],
}
DATETIME_FIELDS: dict[str, list[str]] = {
    "Patient": ["birthDate", "deceasedDateTime"],
    "Encounter": ["period.start", "period.end"],
    "Condition": ["onsetDateTime", "onsetPeriod.start", "recordedDate", "abatementDateTime"],
    "Observation": ["effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"],
    "MedicationRequest": ["authoredOn"],
}
_DATETIME = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")

RACE_OMB = {"2106-3": "white", "2054-5": "black", "2028-9": "asian", "1002-5": "native",
            "2076-8": "pacific", "2131-1": "other"}
ETHNICITY_OMB = {"2135-2": "hispanic", "2186-5": "nonhispanic"}
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


class FlattenError(ValueError):
    """Input that cannot be flattened at all (missing folder, unreadable manifest)."""


@dataclass
class FlattenResult:
    tables: dict[str, pd.DataFrame]
    quarantine: list[dict[str, Any]]
    files: list[dict[str, Any]]
    units: dict[str, dict[str, int]] = field(default_factory=dict)

    def harmonization(self) -> dict[str, Any]:
        """Counts per table of each flag, file-level line accounting and the reconciliation."""
        tables: dict[str, Any] = {}
        for name, frame in self.tables.items():
            entry: dict[str, Any] = {"rows": len(frame)}
            if "flag" in frame:
                flags = Counter(frame["flag"])
            elif name == "medication_request":
                flags = Counter(np.where(frame["concept"].notna(), "ok", "unknown_code"))
            else:
                flags = None
            if flags is not None:
                entry["flags"] = {flag: int(flags.get(flag, 0)) for flag in hz.FLAGS}
            tables[name] = entry
        lines = sum(f["lines"] for f in self.files)
        accepted = sum(f["resources"] for f in self.files)
        return {
            "tables": tables,
            "files": self.files,
            "units_seen": self.units,
            "reconciliation": {"lines": lines, "resources": accepted, "quarantined": len(self.quarantine),
                               "balanced": lines == accepted + len(self.quarantine)},
        }


# ---- input checks -------------------------------------------------------------------------

def _get(resource: dict[str, Any], dotted: str) -> Any:
    node: Any = resource
    for key in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def check_resource(resource: Any, expected_type: str | None) -> str | None:
    """The reason a resource cannot be used, or None if it is fine."""
    if not isinstance(resource, dict):
        return f"not a JSON object (got {type(resource).__name__})"
    rtype = resource.get("resourceType")
    if expected_type and rtype != expected_type:
        return f"resourceType {rtype!r} in a {expected_type} file"
    if rtype not in REQUIRED:
        return None
    for spec in REQUIRED[rtype]:
        if not any(_get(resource, alt) not in (None, "", []) for alt in spec.split("|")):
            return f"{rtype} {resource.get('id', '?')}: missing required field {spec}"
    value = _get(resource, "valueQuantity.value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        return f"{rtype} {resource.get('id', '?')}: valueQuantity.value is not a number: {value!r}"
    for name in DATETIME_FIELDS[rtype]:
        value = _get(resource, name)
        if value is not None and not (isinstance(value, str) and _DATETIME.match(value)):
            return f"{rtype} {resource.get('id', '?')}: invalid dateTime in {name}: {value!r}"
    return None


# ---- fhiry --------------------------------------------------------------------------------

def run_fhiry(resources: list[dict[str, Any]]) -> pd.DataFrame:
    """One fhiry pass over resources wrapped in a synthetic collection bundle."""
    import fhiry

    flattener = fhiry.Fhiry()
    # Keep raw `coding` lists beside fhiry's "a, b" code strings: the system of each code is needed.
    flattener.delete_col_raw_coding = False
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
    frame = flattener.process_bundle_dict(bundle)
    return frame.reset_index(drop=True)


def _col(frame: pd.DataFrame, *names: str) -> pd.Series:
    """First present column among `names` (later ones fill gaps), else an all-null Series."""
    out = pd.Series([None] * len(frame), index=frame.index, dtype="object")
    for name in names:
        if name in frame:
            out = out.where(out.notna(), frame[name])
    return out.where(out.notna(), None)


def ref_id(ref: Any) -> str | None:
    """`Patient/123`, `urn:uuid:123`, `http://x/fhir/Patient/123` -> `123`."""
    if not isinstance(ref, str) or not ref:
        return None
    ref = ref.removeprefix("urn:uuid:")
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    return parts[-1] or None


def _timestamps(series: pd.Series) -> pd.Series:
    return pd.to_datetime(series, format="ISO8601", utc=True).astype("datetime64[us, UTC]")


def _pick_coding(codings: Any, preferred: Iterable[str] = ()) -> tuple[str | None, str | None]:
    """(system, code) of the first coding in a preferred system, else of the first coding."""
    if not isinstance(codings, list) or not codings:
        return None, None
    valid = [c for c in codings if isinstance(c, dict) and c.get("code")]
    if not valid:
        return None, None
    preferred = list(preferred)
    for coding in valid:
        if coding.get("system") in preferred:
            return coding.get("system"), str(coding["code"])
    return valid[0].get("system"), str(valid[0]["code"])


def _omb_code(extensions: Any, url_suffix: str) -> str | None:
    if not isinstance(extensions, list):
        return None
    for ext in extensions:
        if isinstance(ext, dict) and str(ext.get("url", "")).endswith(url_suffix):
            for sub in ext.get("extension", []):
                if sub.get("url") == "ombCategory" and isinstance(sub.get("valueCoding"), dict):
                    return sub["valueCoding"].get("code")
    return None


# ---- per-type derivations from fhiry's frame ---------------------------------------------

def _patients(frame: pd.DataFrame) -> pd.DataFrame:
    race_codes = _col(frame, "extension").map(lambda e: _omb_code(e, "us-core-race"))
    eth_codes = _col(frame, "extension").map(lambda e: _omb_code(e, "us-core-ethnicity"))
    return pd.DataFrame({
        "patient_id": _col(frame, "id"),
        "birth_date": _timestamps(_col(frame, "birthDate")).dt.date,
        "gender": _col(frame, "gender"),
        "race": race_codes.map(lambda c: RACE_OMB.get(c, "other") if c else "unknown"),
        "ethnicity": eth_codes.map(lambda c: ETHNICITY_OMB.get(c, "unknown") if c else "unknown"),
        "deceased": _timestamps(_col(frame, "deceasedDateTime")),
    })


def _encounters(frame: pd.DataFrame) -> pd.DataFrame:
    types = _col(frame, "type").map(lambda t: _pick_coding(t[0].get("coding"))[1]
                                    if isinstance(t, list) and t and isinstance(t[0], dict) else None)
    return pd.DataFrame({
        "encounter_id": _col(frame, "id"),
        "patient_id": _col(frame, "patientId").map(ref_id),
        "class_code": _col(frame, "class.code"),
        "type_code": types,
        "start": _timestamps(_col(frame, "period.start")),
        "end": _timestamps(_col(frame, "period.end")),
    })


def _conditions(frame: pd.DataFrame) -> pd.DataFrame:
    cmap = hz.condition_map()
    picked = _col(frame, "code.coding").map(_pick_coding)
    systems, codes = picked.map(lambda p: p[0]), picked.map(lambda p: p[1])
    mapped = [cmap.lookup(s, c) for s, c in zip(systems, codes, strict=True)]
    return pd.DataFrame({
        "condition_id": _col(frame, "id"),
        "patient_id": _col(frame, "patientId").map(ref_id),
        "encounter_id": _col(frame, "encounter.reference").map(ref_id),
        "system": systems,
        "code": codes,
        "onset": _timestamps(_col(frame, "onsetDateTime", "onsetPeriod.start", "recordedDate")),
        "abatement": _timestamps(_col(frame, "abatementDateTime", "abatementPeriod.start")),
        "concept": [m[0] for m in mapped],
        "flag": [m[1] for m in mapped],
    })


def _observations(frame: pd.DataFrame) -> pd.DataFrame:
    omap = hz.observation_map()
    base = pd.DataFrame({
        "observation_id": _col(frame, "id"),
        "patient_id": _col(frame, "patientId").map(ref_id),
        "encounter_id": _col(frame, "encounter.reference").map(ref_id),
        "effective": _timestamps(_col(frame, "effectiveDateTime", "effectivePeriod.start",
                                      "effectiveInstant", "issued")),
        "loinc": _col(frame, "code.coding").map(lambda c: _pick_coding(c, ["http://loinc.org"])[1]),
        "value": pd.to_numeric(_col(frame, "valueQuantity.value"), errors="coerce"),
        "unit": _col(frame, "valueQuantity.code", "valueQuantity.unit"),
    })
    components = _col(frame, "component")
    is_panel = base["loinc"].isin(omap.split_panels) & components.map(lambda c: isinstance(c, list) and bool(c))
    parts = [base[~is_panel]]
    if is_panel.any():
        parts.append(_component_rows(base[is_panel], components[is_panel]))
    return pd.concat(parts, ignore_index=True)


def _component_rows(panels: pd.DataFrame, components: pd.Series) -> pd.DataFrame:
    """One row per component of a panel (BP 85354-9 -> 8480-6 systolic, 8462-4 diastolic)."""
    rows = []
    for (_, panel), comps in zip(panels.iterrows(), components, strict=True):
        for comp in comps:
            code = _pick_coding(_get(comp, "code.coding"), ["http://loinc.org"])[1]
            quantity = comp.get("valueQuantity") or {}
            rows.append({**panel.to_dict(), "observation_id": f"{panel['observation_id']}-{code}", "loinc": code,
                         "value": quantity.get("value"), "unit": quantity.get("code") or quantity.get("unit")})
    out = pd.DataFrame(rows, columns=panels.columns)
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    return out


def _medication_requests(frame: pd.DataFrame) -> pd.DataFrame:
    meds = hz.medication_map()
    rxnorm = _col(frame, "medicationCodeableConcept.coding").map(lambda c: _pick_coding(c, [RXNORM])[1])
    return pd.DataFrame({
        "medication_request_id": _col(frame, "id"),
        "patient_id": _col(frame, "patientId").map(ref_id),
        "encounter_id": _col(frame, "encounter.reference").map(ref_id),
        "authored_on": _timestamps(_col(frame, "authoredOn")),
        "rxnorm": rxnorm,
        "status": _col(frame, "status"),
        "concept": rxnorm.map(lambda code: meds.get(code) if code else None),
    })


DERIVE = {"Patient": _patients, "Encounter": _encounters, "Condition": _conditions,
          "Observation": _observations, "MedicationRequest": _medication_requests}


# ---- unit harmonization ------------------------------------------------------------------

def harmonize_observations(obs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, dict[str, int]]]:
    """Add concept, value_canonical, unit_canonical and flag; convert with pint per (LOINC, unit)."""
    concepts = hz.observation_map().concepts
    obs = obs.copy()
    obs["concept"] = obs["loinc"].map(lambda code: concepts[code].concept if code in concepts else None)
    obs["unit_canonical"] = obs["loinc"].map(lambda code: concepts[code].unit_canonical if code in concepts else None)
    obs["value_canonical"] = np.nan
    obs["flag"] = "unknown_code"
    units_seen: dict[str, dict[str, int]] = {}
    known = obs[obs["concept"].notna()]
    groups = known.groupby([known["loinc"], known["unit"].fillna("")], sort=True).groups
    for (loinc, unit), idx in groups.items():
        lab = concepts[loinc]
        seen = units_seen.setdefault(lab.concept, {})
        seen[unit or "(none)"] = seen.get(unit or "(none)", 0) + len(idx)
        values = obs.loc[idx, "value"].to_numpy(dtype="float64")
        if unit == lab.unit_canonical:
            obs.loc[idx, "value_canonical"], obs.loc[idx, "flag"] = values, lab.flag
            continue
        try:
            if not unit:
                raise ValueError("no unit")
            obs.loc[idx, "value_canonical"] = hz.convert(values, unit, lab.unit_canonical, lab.molar_mass_g_per_mol)
            obs.loc[idx, "flag"] = "converted"
        except ValueError:
            obs.loc[idx, "flag"] = "unknown_unit"
    return obs, units_seen


# ---- reading inputs -----------------------------------------------------------------------

@dataclass
class _Source:
    path: Path
    expected_type: str | None  # None for bundles (mixed types)


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _ndjson_items(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed resource or None, parse error) for each non-blank line."""
    with _open_text(path) as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw), None
            except json.JSONDecodeError as err:
                yield lineno, None, f"malformed JSON: {err.msg} at column {err.colno}"


def _bundle_items(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(entry number, resource, error) for each entry of a bundle; a broken file is one bad item."""
    try:
        with open(path, encoding="utf-8") as handle:
            bundle = json.load(handle)
    except json.JSONDecodeError as err:
        yield err.lineno, None, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}"
        return
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        yield 0, None, "not a FHIR Bundle"
        return
    for number, entry in enumerate(bundle.get("entry") or [], start=1):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        yield number, resource, None if resource is not None else "bundle entry without resource"


def flatten_sources(sources: list[_Source], bundles: bool = False) -> FlattenResult:
    """Check every item, run fhiry over valid ones in chunks, derive and harmonize the tables."""
    quarantine: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    parts: dict[str, list[pd.DataFrame]] = {t: [] for t in TABLE_OF_TYPE}
    seen_ids: dict[str, set[str]] = {t: set() for t in TABLE_OF_TYPE}
    chunk: list[dict[str, Any]] = []

    def flush() -> None:
        if chunk:
            frame = run_fhiry(chunk)
            for rtype, sub in frame.groupby("resourceType", sort=False):
                parts[str(rtype)].append(DERIVE[str(rtype)](sub.reset_index(drop=True)))
            chunk.clear()

    for source in sources:
        stats = {"file": source.path.name, "type": source.expected_type, "lines": 0, "resources": 0,
                 "quarantined": 0, "ignored_types": 0}
        items = _bundle_items(source.path) if bundles else _ndjson_items(source.path)
        for lineno, resource, error in items:
            stats["lines"] += 1
            reason = error or check_resource(resource, source.expected_type)
            rtype = resource.get("resourceType") if isinstance(resource, dict) else None
            if reason is None and rtype in seen_ids and resource["id"] in seen_ids[rtype]:
                reason = f"duplicate {rtype} id {resource['id']}"
            if reason:
                quarantine.append({"file": source.path.name, "line": lineno, "reason": reason})
                stats["quarantined"] += 1
                continue
            stats["resources"] += 1
            if rtype not in TABLE_OF_TYPE:
                stats["ignored_types"] += 1  # counted as read; not part of the tidy tables
                continue
            seen_ids[rtype].add(resource["id"])
            chunk.append(resource)
            if len(chunk) >= CHUNK_SIZE:
                flush()
        files.append(stats)
    flush()

    tables = {}
    for rtype, table in TABLE_OF_TYPE.items():
        columns = SCHEMAS[table].names
        frames = [p for p in parts[rtype] if len(p)]
        tables[table] = (pd.concat(frames, ignore_index=True) if frames
                         else pd.DataFrame({c: pd.Series(dtype="object") for c in columns}))
    tables["observation"], units = harmonize_observations(tables["observation"])
    for table in tables:
        tables[table] = _conform(tables[table], SCHEMAS[table])
    return FlattenResult(tables, quarantine, files, units)


def _conform(frame: pd.DataFrame, schema: pa.Schema) -> pd.DataFrame:
    """Exactly the contract's columns, in order, timestamps as UTC microseconds."""
    frame = frame[schema.names].copy()
    for fld in schema:
        if pa.types.is_timestamp(fld.type):
            frame[fld.name] = pd.to_datetime(frame[fld.name], utc=True).astype("datetime64[us, UTC]")
        elif pa.types.is_floating(fld.type):
            frame[fld.name] = pd.to_numeric(frame[fld.name], errors="coerce").astype("float64")
    return frame.reset_index(drop=True)


def flatten_ndjson(paths: list[Path], types: dict[str, str] | None = None) -> FlattenResult:
    """Flatten typed NDJSON files; `types` maps a file name to its resource type (from the manifest)."""
    types = types or {}
    sources = [_Source(Path(p), types.get(Path(p).name) or _type_from_name(Path(p).name)) for p in paths]
    return flatten_sources(sources)


def flatten_bundles(paths: Iterable[str | Path]) -> dict[str, pd.DataFrame]:
    """Flatten Synthea transaction bundles (`urn:uuid:` references) into the tidy tables."""
    return flatten_bundles_result(paths).tables


def flatten_bundles_result(paths: Iterable[str | Path]) -> FlattenResult:
    sources = [_Source(Path(p), None) for p in sorted(Path(p) for p in paths)]
    return flatten_sources(sources, bundles=True)


def _type_from_name(name: str) -> str:
    return name.split(".", 1)[0]


def export_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """Files to read from an export folder: the manifest's `files` list, else every *.ndjson(.gz)."""
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = read_json(manifest_path)
        except json.JSONDecodeError as err:
            raise FlattenError(f"{manifest_path}: not valid JSON: {err}") from None
        entries = manifest.get("files")
        if not isinstance(entries, list):
            raise FlattenError(f"{manifest_path}: no 'files' list")
        paths, types = [], {}
        for entry in entries:
            name = entry.get("name") or entry.get("file") or entry.get("path")
            if not name:
                raise FlattenError(f"{manifest_path}: a 'files' entry has no name: {entry}")
            path = folder / Path(name).name
            if not path.is_file():
                raise FlattenError(f"{manifest_path}: lists {name}, which is not in {folder}")
            paths.append(path)
            if entry.get("type"):
                types[path.name] = entry["type"]
        return paths, types
    paths = sorted(p for p in folder.iterdir() if p.name.endswith((".ndjson", ".ndjson.gz")))
    if not paths:
        raise FlattenError(f"{folder}: no manifest.json and no *.ndjson files")
    return paths, {}


# ---- writing ------------------------------------------------------------------------------

def _to_arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def write_tables(result: FlattenResult, out: Path, info: dict[str, Any]) -> Path:
    """Write the tables, harmonization.json and quarantine.ndjson atomically, `_SUCCESS.json` last."""
    started = time.perf_counter()
    with staging_dir(out) as tmp:
        for table, frame in result.tables.items():
            pq.write_table(_to_arrow(frame, SCHEMAS[table]), tmp / f"{table}.parquet")
        write_json(tmp / "harmonization.json", result.harmonization())
        with atomic_open(tmp / "quarantine.ndjson", "w", encoding="utf-8") as handle:
            for row in result.quarantine:
                handle.write(json.dumps(row, sort_keys=True) + "\n")
        counts = {table: len(frame) for table, frame in result.tables.items()}
        write_json(tmp / SUCCESS, {"stage": "flatten", **info, "counts": counts,
                                   "quarantined": len(result.quarantine),
                                   "write_seconds": round(time.perf_counter() - started, 3),
                                   "finished": dt.datetime.now(dt.UTC).isoformat()})
    return out


def flatten_site(folder: Path, out: Path, site: str | None = None) -> Path:
    if not folder.is_dir():
        raise FlattenError(f"export folder not found: {folder}" + (f" (site {site})" if site else ""))
    started = time.perf_counter()
    paths, types = export_files(folder)
    result = flatten_ndjson(paths, types)
    info = {"site": site, "source": str(folder), "seconds": round(time.perf_counter() - started, 3)}
    return write_tables(result, out, info)


def flatten(exp: Experiment, run: str | None = None, sites: list[str] | None = None, force: bool = False,
            progress: bool = True) -> dict[str, Path]:
    """Flatten each site's export into `data/tables/<run>/<site>/`; complete folders are kept unless force."""
    site_ids = sites or exp.site_ids
    for site in site_ids:
        exp.site(site)  # unknown site -> ConfigError naming the config
    outputs: dict[str, Path] = {}
    iterator: Iterable[str] = site_ids
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(site_ids, desc="flatten", unit="site")
    for site in iterator:
        out = exp.data_path("tables", run, site)
        if is_complete(out) and not force:
            outputs[site] = out
            continue
        outputs[site] = flatten_site(exp.data_path("export", run, site), out, site)
    return outputs
