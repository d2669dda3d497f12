"""Scores (AUROC, AUPRC, Brier, accuracy) of every model on every test set, with bootstrap CIs.

A test set with a single label class has no AUROC/AUPRC: the cell is recorded with value None
and a reason (FLamby falls back to accuracy in that case; Brier and accuracy are still given).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, average_precision_score, brier_score_loss, roc_auc_score

METRICS = ("auroc", "auprc", "brier", "accuracy")
RANK_METRICS = ("auroc", "auprc")
SINGLE_CLASS = "test set holds a single label class"

CI_METHOD = (
    "mean = mean over seeds of the point estimate on the full test set; 95% CI = 2.5th and 97.5th "
    "percentiles of the pooled distribution of (seed x bootstrap replicate) values: per seed, the "
    "model's predictions are rescored on `bootstrap` resamples of patients drawn with replacement "
    "within each site's test set (the pooled test set resamples every site separately and "
    "concatenates); resamples are shared by all methods of one seed, so differences are paired; "
    "replicates with a single class are dropped for AUROC/AUPRC. With bootstrap=0 the CI is the "
    "2.5/97.5 percentiles of the per-seed values (null with one seed)."
)


def score(y: np.ndarray, p: np.ndarray) -> dict[str, tuple[float | None, str | None]]:
    """Every metric as (value, None) or (None, reason)."""
    if len(y) == 0:
        return {m: (None, "empty test set") for m in METRICS}
    out: dict[str, tuple[float | None, str | None]] = {
        "brier": (float(brier_score_loss(y, p)), None),
        "accuracy": (float(accuracy_score(y, p >= 0.5)), None),
    }
    if len(np.unique(y)) < 2:
        out.update({m: (None, SINGLE_CLASS) for m in RANK_METRICS})
    else:
        out["auroc"] = (float(roc_auc_score(y, p)), None)
        out["auprc"] = (float(average_precision_score(y, p)), None)
    return {m: out[m] for m in METRICS}


def patient_resamples(patient: np.ndarray, n_resamples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of `n_resamples` bootstrap resamples of patients (all rows of a drawn patient)."""
    if len(patient) == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(n_resamples)]
    _, row_patient = np.unique(patient, return_inverse=True)
    n_patients = row_patient.max() + 1
    if n_patients == len(patient):
        return [rng.integers(0, n_patients, n_patients) for _ in range(n_resamples)]
    rows_of = [np.flatnonzero(row_patient == k) for k in range(n_patients)]
    return [
        np.concatenate([rows_of[k] for k in rng.integers(0, n_patients, n_patients)])
        for _ in range(n_resamples)
    ]


def pooled_resamples(per_site: list[list[np.ndarray]], sizes: list[int]) -> list[np.ndarray]:
    """Resamples of the concatenated test set: replicate b joins every site's replicate b."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return [
        np.concatenate([site[b] + off for site, off in zip(per_site, offsets, strict=True)])
        for b in range(len(per_site[0]))
    ]


def summarize_cell(
    per_seed: Mapping[int, tuple[np.ndarray, np.ndarray]], resamples: Mapping[int, list[np.ndarray]]
) -> dict[str, dict[str, Any]]:
    """Per metric: mean over seeds, 95% CI, n_seeds, n_bootstrap kept (see CI_METHOD)."""
    summary = {}
    point = {seed: score(y, p) for seed, (y, p) in per_seed.items()}
    replicate_values = _replicate_values(per_seed, resamples)
    for metric in METRICS:
        values = [point[s][metric][0] for s in per_seed if point[s][metric][0] is not None]
        reasons = sorted({point[s][metric][1] for s in per_seed if point[s][metric][1]})
        boot = replicate_values[metric]
        spread = boot if boot else (values if len(values) > 1 else [])
        summary[metric] = {
            "mean": float(np.mean(values)) if values else None,
            "ci_low": float(np.percentile(spread, 2.5)) if spread else None,
            "ci_high": float(np.percentile(spread, 97.5)) if spread else None,
            "n_seeds": len(values),
            "n_bootstrap": len(boot),
            **({"missing_reason": "; ".join(reasons)} if reasons else {}),
        }
    return summary


def _replicate_values(
    per_seed: Mapping[int, tuple[np.ndarray, np.ndarray]], resamples: Mapping[int, list[np.ndarray]]
) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {m: [] for m in METRICS}
    for seed, (y, p) in per_seed.items():
        for rows in resamples.get(seed, []):
            if len(rows) == 0:
                continue
            yb, pb = y[rows], p[rows]
            values["brier"].append(float(np.mean((pb - yb) ** 2)))
            values["accuracy"].append(float(np.mean((pb >= 0.5) == (yb == 1))))
            if 0 < yb.sum() < len(yb):
                values["auroc"].append(float(roc_auc_score(yb, pb)))
                values["auprc"].append(float(average_precision_score(yb, pb)))
    return values
