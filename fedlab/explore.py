"""Small readers the notebooks use to look at each stage's files (read-only, by the data contract)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from fedlab.config import Experiment
from fedlab.federated.data import SKIPPED


def iter_ndjson(path: Path, limit: int | None = None) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for count, line in enumerate(handle):
            if limit is not None and count >= limit:
                return
            if line.strip():
                yield json.loads(line)


def site_patients(exp: Experiment, run: str) -> pd.DataFrame:
    """One row per generated patient: site, age at the reference date, gender, race."""
    ref = pd.Timestamp(exp.generate.reference_date)
    rows = []
    for site in exp.site_ids:
        for patient in iter_ndjson(exp.data_path("synthea", run, site) / "bulk" / "Patient.ndjson"):
            birth = pd.Timestamp(patient["birthDate"])
            rows.append({"site": site, "gender": patient.get("gender"), "age": (ref - birth).days / 365.25,
                         "race": _race(patient), "dead": "deceasedDateTime" in patient})
    return pd.DataFrame(rows)


def _race(patient: dict[str, Any]) -> str | None:
    for ext in patient.get("extension", []):
        if ext.get("url", "").endswith("us-core-race"):
            for sub in ext.get("extension", []):
                if sub.get("url") == "text":
                    return sub.get("valueString")
    return None


def site_observations(exp: Experiment, run: str, codes: set[str], limit: int | None = None) -> pd.DataFrame:
    """Observation values for the given LOINC codes, per site, as the site recorded them."""
    rows = []
    for site in exp.site_ids:
        path = exp.data_path("synthea", run, site) / "bulk" / "Observation.ndjson"
        for obs in iter_ndjson(path, limit):
            coding = obs.get("code", {}).get("coding", [{}])[0]
            quantity = obs.get("valueQuantity")
            if coding.get("code") in codes and quantity:
                rows.append({"site": site, "loinc": coding["code"], "value": quantity.get("value"),
                             "unit": quantity.get("unit")})
    return pd.DataFrame(rows)


def site_condition_codes(exp: Experiment, run: str) -> pd.DataFrame:
    """Counts of condition codes per site and code system (shows SNOMED vs ICD-10-CM sites)."""
    rows = []
    for site in exp.site_ids:
        for cond in iter_ndjson(exp.data_path("synthea", run, site) / "bulk" / "Condition.ndjson"):
            for coding in cond.get("code", {}).get("coding", [])[:1]:
                rows.append({"site": site, "system": coding.get("system", "").rsplit("/", 1)[-1],
                             "code": coding.get("code"), "display": coding.get("display")})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.value_counts().rename("n").reset_index()


def site_condition_prevalence(exp: Experiment, run: str) -> pd.DataFrame:
    """Share of each site's patients ever diagnosed with each condition code (as the site codes it)."""
    rows = []
    for site in exp.site_ids:
        folder = exp.data_path("synthea", run, site) / "bulk"
        n_patients = sum(1 for _ in iter_ndjson(folder / "Patient.ndjson"))
        seen: set[tuple[str, str, str]] = set()
        for cond in iter_ndjson(folder / "Condition.ndjson"):
            coding = (cond.get("code", {}).get("coding") or [{}])[0]
            patient = cond.get("subject", {}).get("reference", "")
            seen.add((patient, coding.get("code", ""), coding.get("display", "")))
        counts = pd.Series([(code, display) for _, code, display in seen]).value_counts()
        for (code, display), n in counts.items():
            rows.append({"site": site, "code": code, "display": display, "prevalence": n / max(n_patients, 1)})
    return pd.DataFrame(rows)


def read_tables(exp: Experiment, run: str, table: str) -> pd.DataFrame:
    frames = []
    for site in exp.site_ids:
        path = exp.data_path("tables", run, site) / f"{table}.parquet"
        if path.exists():  # a file, or a Parquet dataset folder (runner spark-distributed)
            frames.append(pd.read_parquet(path).assign(site=site))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_features(exp: Experiment, run: str) -> pd.DataFrame:
    """Every site's feature table with a `site` column; sites the features stage skipped are left out."""
    folders = {s: exp.data_path("features", run, s) for s in exp.site_ids}
    frames = [pd.read_parquet(folder / "features.parquet").assign(site=s)
              for s, folder in folders.items() if not (folder / SKIPPED).is_file()]
    return pd.concat(frames, ignore_index=True)


def compact_ids(frame: pd.DataFrame, width: int = 8) -> pd.DataFrame:
    """A copy for display: id columns (`*_id`) cut to their first `width` characters plus "…"."""
    out = frame.copy()
    for column in out.columns:
        if str(column).endswith("_id") and out[column].dtype == object:
            out[column] = out[column].map(lambda v: v if not isinstance(v, str) or len(v) <= width + 1
                                          else v[:width] + "…")
    return out


def site_axes(plt: Any, n: int, per_row: int = 4, size: tuple[float, float] = (3.2, 3.0),
              **kwargs: Any) -> tuple[Any, list[Any]]:
    """A figure with one small plot per site (or per column), `per_row` to a row, as a flat list;
    works for one site as for twelve."""
    rows, cols = -(-n // per_row), min(n, per_row)
    fig, grid = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False, **kwargs)
    axes = list(grid.flat)
    for extra in axes[n:]:
        extra.set_visible(False)
    return fig, axes[:n]
