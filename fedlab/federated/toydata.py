"""Fabricated feature tables in the features-stage format, for tests, benchmarks and demos.

Sites share a logistic signal but differ in size, feature shift and label prevalence; a fraction
of one feature is missing (with its indicator column), as the features stage writes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedlab.config import Experiment
from fedlab.io import atomic_open, write_json

N_SIGNAL = 4


def toy_frame(
    site: str,
    n_rows: int,
    seed: int,
    shift: float = 0.0,
    intercept: float = 0.0,
    strength: float = 2.0,
    missing: float = 0.1,
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(shift, 1.0, size=(n_rows, N_SIGNAL))
    coef = np.array([1.5, -1.0, 0.8, 0.0]) * strength
    logit = intercept + (x - shift) @ coef
    label = (rng.random(n_rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    lab = x[:, 0] * 10 + 100
    lab_missing = rng.random(n_rows) < missing
    lab[lab_missing] = np.nan
    frame = pd.DataFrame(
        {
            "patient_id": [f"{site}-{i:05d}" for i in range(n_rows)],
            "index_date": pd.Timestamp("2020-01-01"),
            "label": label,
        }
    )
    for j in range(N_SIGNAL):
        frame[f"f{j}"] = x[:, j]
    frame["lab_glucose"] = lab
    frame["lab_glucose_missing"] = lab_missing.astype(np.float64)
    return frame


def write_site(folder: Path, frame: pd.DataFrame) -> Path:
    """Write `features.parquet` and `data_dictionary.json` for one site."""
    folder.mkdir(parents=True, exist_ok=True)
    features = [c for c in frame.columns if c not in ("patient_id", "index_date", "label")]
    with atomic_open(folder / "features.parquet", "wb") as handle:
        frame.to_parquet(handle, index=False)
    write_json(
        folder / "data_dictionary.json",
        {
            "id_columns": ["patient_id", "index_date"],
            "label": "label",
            "features": [
                {
                    "name": name,
                    "type": "float64",
                    "unit": None,
                    "definition": "synthetic",
                    "source_codes": [],
                    "window": None,
                }
                for name in features
            ],
        },
    )
    return folder


def fabricate(
    exp: Experiment, run: str | None = None, sizes: dict[str, int] | None = None, strength: float = 2.0
) -> dict[str, pd.DataFrame]:
    """Write toy feature tables for every site of `exp`; returns the frames by site id."""
    frames = {}
    for k, site in enumerate(exp.sites):
        n_rows = (sizes or {}).get(site.id, site.patients)
        frame = toy_frame(
            site.id,
            n_rows,
            seed=site.seed,
            shift=0.3 * k,
            intercept=-0.5 + 0.4 * k,
            strength=strength,
            missing=0.1 + 0.1 * k,
        )
        write_site(exp.data_path("features", run, site.id), frame)
        frames[site.id] = frame
    return frames
