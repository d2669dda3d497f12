"""Site data for training: load and check feature tables, split, scale federatedly, batch.

Missing values: features are standardized with the federated mean and standard deviation, then
every remaining NaN becomes 0, i.e. the (federated) mean of that feature. The features stage
already writes missingness-indicator columns, so the model still sees *that* a value was missing.

Batches: every client (and every Local/Pooled run) draws batches from its own stream of
epoch-wise permutations of its training rows, seeded by (experiment seed, training seed,
stream name). Round r of client k uses steps r*local_steps ... (r+1)*local_steps - 1 of
that stream, so Local-k sees exactly the batches client k sees in FedAvg. A site with fewer
training rows than `batch_size` uses its whole training set as each batch.
"""

from __future__ import annotations

import collections
import json
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from fedlab.config import Experiment
from fedlab.errors import FedlabError

ID_COLUMNS = ("patient_id", "index_date")
LABEL = "label"
SKIPPED = "_SKIPPED.json"  # written by the features stage for a site skipped under task.on_site_error: skip
SINGLE_SITE_METHODS = ("local", "pooled")  # every other method needs at least two sites


class FeatureDataError(FedlabError, ValueError):
    """A feature table is missing or does not follow the data contract; the message names it."""


class SkippedSiteWarning(UserWarning):
    """A site has no features because the features stage skipped it; training leaves it out."""


@dataclass(frozen=True)
class SiteData:
    site: str
    path: Path
    features: list[str]
    x: np.ndarray  # float64 [n, d], may hold NaN
    y: np.ndarray  # float32 [n]
    patient_id: np.ndarray
    file_bytes: int


@dataclass(frozen=True)
class SiteSplit:
    site: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_patient: np.ndarray
    stratified: bool
    train_patient: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))


@dataclass(frozen=True)
class Scaler:
    mean: np.ndarray
    std: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        scaled = (x - self.mean) / self.std
        return np.nan_to_num(scaled, nan=0.0).astype(np.float32)


# ---------------------------------------------------------------- loading and checking


def load_sites(exp: Experiment, run: str | None = None, methods: Sequence[str] | None = None) -> list[SiteData]:
    """Read the `features.parquet` of every site the features stage did not skip (each skipped site
    is left out with a `SkippedSiteWarning`); all sites must share one feature column list.
    `methods` (default `train.methods`) other than local/pooled need at least two sites."""
    skipped = _skipped_sites(exp, run)
    kept = [site_id for site_id in exp.site_ids if site_id not in skipped]
    for site_id, reason in skipped.items():
        warnings.warn(f"site {site_id!r} left out of training: the features stage skipped it ({reason})",
                      SkippedSiteWarning, stacklevel=2)
    _check_enough_sites(kept, skipped, list(methods if methods is not None else exp.train.methods))
    sites = [_load_site(exp.data_path("features", run, site_id), site_id) for site_id in kept]
    reference = sites[0]
    for other in sites[1:]:
        if other.features != reference.features:
            raise FeatureDataError(_column_mismatch(reference, other))
    return sites


def _skipped_sites(exp: Experiment, run: str | None) -> dict[str, str]:
    skipped = {}
    for site_id in exp.site_ids:
        record = exp.data_path("features", run, site_id) / SKIPPED
        if record.is_file():
            try:
                skipped[site_id] = str(json.loads(record.read_text())["reason"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise FeatureDataError(f"{record}: not a valid skip record ({err!r})") from None
    return skipped


def _check_enough_sites(kept: list[str], skipped: dict[str, str], methods: list[str]) -> None:
    multi_site = [m for m in methods if m not in SINGLE_SITE_METHODS]
    needed = 2 if multi_site else 1
    if len(kept) < needed:
        why = f"method(s) {multi_site} need at least 2" if multi_site else "training needs at least 1"
        raise FeatureDataError(
            f"only {len(kept)} site(s) with features ({kept}); {why}; skipped by the features stage: "
            + "; ".join(f"{site}: {reason}" for site, reason in skipped.items())
        )


def _column_mismatch(reference: SiteData, other: SiteData) -> str:
    missing = [c for c in reference.features if c not in other.features]
    extra = [c for c in other.features if c not in reference.features]
    detail = f"missing {missing}, extra {extra}" if missing or extra else "same columns in another order"
    return (
        f"{other.path}: feature columns of site {other.site!r} differ from site {reference.site!r}: {detail}"
    )


def _load_site(folder: Path, site_id: str) -> SiteData:
    path = folder / "features.parquet"
    if not path.is_file():
        raise FeatureDataError(
            f"{path}: features of site {site_id!r} not found (run `fedlab features` first)"
        )
    frame = pd.read_parquet(path)
    missing = [c for c in (*ID_COLUMNS, LABEL) if c not in frame.columns]
    if missing:
        raise FeatureDataError(f"{path}: site {site_id!r} lacks required column(s) {missing}")
    features = [c for c in frame.columns if c not in (*ID_COLUMNS, LABEL)]
    dictionary = _dictionary_features(folder / "data_dictionary.json", site_id)
    if dictionary is not None and dictionary != features:
        extra = [c for c in features if c not in dictionary]
        absent = [c for c in dictionary if c not in features]
        detail = (
            f"not in the dictionary: {extra}; in the dictionary but not in the table: {absent}"
            if extra or absent
            else "same names in another order"
        )
        raise FeatureDataError(
            f"{path}: feature columns of site {site_id!r} do not match data_dictionary.json ({detail})"
        )
    if not features:
        raise FeatureDataError(f"{path}: site {site_id!r} has no feature columns")
    return SiteData(
        site=site_id,
        path=path,
        features=features,
        x=_feature_matrix(frame, features, path),
        y=_labels(frame[LABEL], path),
        patient_id=frame["patient_id"].astype(str).to_numpy(),
        file_bytes=path.stat().st_size,
    )


def _dictionary_features(path: Path, site_id: str) -> list[str] | None:
    if not path.is_file():
        raise FeatureDataError(f"{path}: data dictionary of site {site_id!r} not found")
    try:
        entries = json.loads(path.read_text())["features"]
        return [entry["name"] for entry in entries]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise FeatureDataError(
            f'{path}: not a valid data dictionary ({err!r}); expected {{"features": [{{"name": ...}}, ...]}}'
        ) from None


def _feature_matrix(frame: pd.DataFrame, features: list[str], path: Path) -> np.ndarray:
    bad = [
        c
        for c in features
        if not pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c])
    ]
    if bad:
        raise FeatureDataError(f"{path}: feature column(s) {bad} are not numeric (contract: float64)")
    x = frame[features].to_numpy(dtype=np.float64)
    infinite = [features[j] for j in np.flatnonzero(np.isinf(x).any(axis=0))]
    if infinite:
        raise FeatureDataError(f"{path}: feature column(s) {infinite} hold infinite values")
    return x


def _labels(column: pd.Series, path: Path) -> np.ndarray:
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    bad_rows = np.flatnonzero(~np.isin(values, (0.0, 1.0)))
    if bad_rows.size:
        row = int(bad_rows[0])
        raise FeatureDataError(
            f"{path}: column {LABEL!r} must be 0 or 1; row {row} holds "
            f"{column.iloc[row]!r} ({bad_rows.size} bad row(s))"
        )
    return values.astype(np.float32)


# ---------------------------------------------------------------- splitting


def stream_rng(*keys: int | str) -> np.random.Generator:
    """A NumPy generator seeded by a tuple of ints and names (names hashed stably)."""
    return np.random.default_rng([k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys])


def split_site(site: SiteData, test_fraction: float, rng: np.random.Generator) -> SiteSplit:
    """Stratified train/test split by patient (all rows of a patient land on one side)."""
    patients, row_patient = np.unique(site.patient_id, return_inverse=True)
    patient_label = np.zeros(len(patients), dtype=np.float32)
    np.maximum.at(patient_label, row_patient, site.y)
    n_test = int(round(test_fraction * len(patients)))
    n_test = min(max(n_test, 1), len(patients) - 1) if len(patients) > 1 else 0
    test_mask, stratified = _stratified_choice(patient_label, n_test, rng)
    test_rows = test_mask[row_patient]
    return SiteSplit(
        site=site.site,
        x_train=site.x[~test_rows],
        y_train=site.y[~test_rows],
        x_test=site.x[test_rows],
        y_test=site.y[test_rows],
        test_patient=site.patient_id[test_rows],
        stratified=stratified,
        train_patient=site.patient_id[~test_rows],
    )


def _stratified_choice(label: np.ndarray, n_test: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Pick `n_test` items keeping the class ratio; falls back to a plain draw for a rare class."""
    mask = np.zeros(len(label), dtype=bool)
    classes = [np.flatnonzero(label == c) for c in (0.0, 1.0)]
    if any(len(members) < 2 for members in classes):
        mask[rng.permutation(len(label))[:n_test]] = True
        return mask, False
    n_pos = int(round(n_test * len(classes[1]) / len(label)))
    n_pos = min(max(n_pos, 1), len(classes[1]) - 1)
    n_neg = min(n_test - n_pos, len(classes[0]) - 1)
    mask[rng.permutation(classes[1])[:n_pos]] = True
    mask[rng.permutation(classes[0])[:n_neg]] = True
    return mask, True


# ---------------------------------------------------------------- federated scaling


def site_statistics(x: np.ndarray) -> dict[str, np.ndarray]:
    """A site's sufficient statistics for mean/variance, ignoring missing values."""
    present = ~np.isnan(x)
    values = np.where(present, x, 0.0)
    return {
        "count": present.sum(axis=0).astype(np.float64),
        "total": values.sum(axis=0),
        "total_sq": (values * values).sum(axis=0),
    }


def federated_statistics(tff: ModuleType, per_site: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Sum the sites' statistics with a `tff.federated_sum` (only sums leave a site)."""
    n_features = len(per_site[0]["count"])
    member = collections.OrderedDict(
        (key, tff.TensorType(np.float64, [n_features])) for key in ("count", "total", "total_sq")
    )

    @tff.federated_computation(tff.FederatedType(member, tff.CLIENTS))
    def aggregate(stats: Any) -> Any:
        return tff.federated_sum(stats)

    clients = [collections.OrderedDict((k, np.asarray(s[k], np.float64)) for k in member) for s in per_site]
    summed = aggregate(clients)
    return {key: np.asarray(summed[key], dtype=np.float64) for key in member}


def scaler_from_statistics(stats: dict[str, np.ndarray]) -> Scaler:
    """Mean and population standard deviation; features never observed get mean 0, sd 1."""
    count = stats["count"]
    safe = np.where(count > 0, count, 1.0)
    mean = np.where(count > 0, stats["total"] / safe, 0.0)
    variance = np.maximum(stats["total_sq"] / safe - mean * mean, 0.0)
    std = np.sqrt(variance)
    return Scaler(mean=mean, std=np.where(std > 1e-12, std, 1.0))


# ---------------------------------------------------------------- batching


def batch_stream(n_rows: int, batch_size: int, n_steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`n_steps` batches of row indices drawn from consecutive permutations (epochs)."""
    if n_rows == 0:
        raise ValueError("cannot draw batches from an empty training set")
    size = min(batch_size, n_rows)
    needed = n_steps * size
    order = np.concatenate([rng.permutation(n_rows) for _ in range(-(-needed // n_rows))])
    return [order[i * size : (i + 1) * size] for i in range(n_steps)]


def make_dataset(x: np.ndarray, y: np.ndarray, batches: list[np.ndarray]) -> Any:
    """A tf.data.Dataset yielding exactly the given batches as (float32 x, float32 y[:, None])."""
    import tensorflow as tf

    rows = np.concatenate(batches)
    features = x[rows].astype(np.float32)
    labels = y[rows].astype(np.float32).reshape(-1, 1)
    return tf.data.Dataset.from_tensor_slices((features, labels)).batch(len(batches[0]))
