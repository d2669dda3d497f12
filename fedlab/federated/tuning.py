"""Client learning rates tuned per method on validation data (FLamby's protocol), never on test.

On the first training seed only, each site's *training* split is split again by patient
(stratified, seeded by experiment seed, training seed and site) into inner-train and validation
(`train.val_fraction` of patients). Features are scaled from the inner-train rows (as configured:
federated or per site). For every method and every client LR of `train.lr_grid`, the method is
trained on inner-train with the full budget and scored on every site's validation set:

- criterion `auroc`: mean over sites of the validation AUROC (Local-k: each site's own model on
  its own validation set), when every validation set holds both classes;
- criterion `neg_log_loss`: otherwise, minus the mean over sites of the validation log-loss
  (an AUROC is undefined on a one-class set, a log-loss is not).

The LR with the highest score is chosen (ties: the first in grid order) and used for that method
on the full training split for every seed. Test rows are never read here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from fedlab.federated import data
from fedlab.federated.models import forward_numpy, initial_weights
from fedlab.federated.runner import Runner, scale


def validation_splits(
    exp_seed: int, seed: int, splits: list[data.SiteSplit], val_fraction: float
) -> list[data.SiteSplit]:
    """Inner-train / validation splits of the training rows; validation sits in the test fields."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"train.val_fraction must be in (0, 1) to tune learning rates, got {val_fraction}")
    out = []
    for split in splits:
        patients = (
            split.train_patient
            if len(split.train_patient) == len(split.y_train)
            else np.array([f"row{i}" for i in range(len(split.y_train))])
        )
        site = data.SiteData(split.site, Path(split.site), [], split.x_train, split.y_train, patients, 0)
        inner = data.split_site(site, val_fraction, data.stream_rng(exp_seed, seed, "validation", split.site))
        if len(inner.y_train) == 0 or len(inner.y_test) == 0:
            raise data.FeatureDataError(
                f"site {split.site!r}: too few training patients ({len(split.y_train)} rows) "
                "for a validation split"
            )
        out.append(inner)
    return out


def criterion(val_sets: list[tuple[np.ndarray, np.ndarray]]) -> str:
    return "auroc" if all(len(np.unique(y)) == 2 for _, y in val_sets) else "neg_log_loss"


def site_score(y: np.ndarray, p: np.ndarray, how: str) -> float:
    if how == "auroc":
        return float(roc_auc_score(y, p))
    return -float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0.0, 1.0]))


def tune_learning_rates(
    runner: Runner, methods: list[str], splits: list[data.SiteSplit], seed: int, grid: list[float]
) -> dict[str, Any]:
    """Scores of every (method, LR) on validation data and the chosen LR per method."""
    cfg = runner.cfg
    inner = validation_splits(runner.exp.seed, seed, splits, cfg.val_fraction)
    scaled = scale(runner.tff, inner, cfg.scaling)
    val_sets = [scaled.tests[s.site] for s in inner]
    how = criterion(val_sets)
    init = initial_weights(cfg.model, scaled.train[0].shape[1], seed)
    scores: dict[str, dict[str, float]] = {}
    for method in methods:
        scores[method] = {}
        for lr in grid:
            trained = runner.run(method, seed, init, inner, scaled.train, lr)
            if method == "local":  # one model per site, each judged on its own site
                per_site = [
                    site_score(y, forward_numpy(t.weights, x), how)
                    for t, (x, y) in zip(trained, val_sets, strict=True)
                ]
            else:
                per_site = [site_score(y, forward_numpy(trained[0].weights, x), how) for x, y in val_sets]
            scores[method][repr(float(lr))] = float(np.mean(per_site))
    chosen = {m: float(max(grid, key=lambda lr, m=m: scores[m][repr(float(lr))])) for m in methods}
    return {
        "scores": scores,
        "chosen": chosen,
        "criterion": how,
        "seed": seed,
        "val_fraction": cfg.val_fraction,
        "n_validation_rows": {s.site: int(len(s.y_test)) for s in inner},
        "grid": [float(lr) for lr in grid],
    }
