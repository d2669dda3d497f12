"""One federated run for exploration (the training notebook's widgets call this): chosen sites,
method, model, rounds and DP noise; a callback receives the loss and pooled-test AUROC of the
global model after every round. Nothing is written to disk; the train stage is `train.train`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from fedlab.config import Experiment
from fedlab.federated import data, fedavg, privacy
from fedlab.federated.models import forward_numpy, initial_weights, make_model_fn
from fedlab.federated.runner import CONTROL_VARIATE_METHODS, POOLED_TEST, SEQUENTIAL_METHODS, Runner, scale
from fedlab.tffctx import init_tff

INTERACTIVE_METHODS = (*fedavg.FEDERATED_METHODS, *CONTROL_VARIATE_METHODS, *SEQUENTIAL_METHODS)
# (round number from 1, mean client training loss, pooled-test AUROC or None)
ProgressCallback = Callable[[int, float, float | None], None]


def interactive_experiment(
    exp: Experiment, sites: list[str], model: str, rounds: int, noise: float | None
) -> Experiment:
    """`exp` restricted to `sites`, with the given model, rounds and DP noise (None or 0: no DP)."""
    unknown = [s for s in sites if s not in exp.site_ids]
    if unknown or not sites:
        raise ValueError(f"choose sites among {exp.site_ids}; got {sites}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    train_cfg = exp.train.model_copy(
        update={
            "model": model,
            "rounds": int(rounds),
            "clients_per_round": None,
            "privacy": exp.train.privacy.model_copy(
                update={"enabled": bool(noise), "noise_multiplier": noise or 0.0}
            ),
        }
    )
    kept = [exp.site(s) for s in sites]
    return exp.model_copy(update={"sites": kept, "train": train_cfg})


def train_interactive(
    exp: Experiment,
    run: str | None,
    sites: list[str],
    method: str,
    model: str,
    rounds: int,
    noise: float | None = None,
    on_round: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Train `method` on `sites` (first training seed); returns the per-round history, the final
    pooled-test AUROC and, with DP noise, the epsilon of the run."""
    if method not in INTERACTIVE_METHODS:
        raise ValueError(f"interactive training supports {list(INTERACTIVE_METHODS)}, not {method!r}")
    sub = interactive_experiment(exp, sites, model, rounds, noise)
    cfg = sub.train
    seed = cfg.seeds[0]
    tff = init_tff(seed)
    loaded = data.load_sites(sub, run)
    splits = [
        data.split_site(s, cfg.test_fraction, data.stream_rng(sub.seed, seed, "split", s.site))
        for s in loaded
    ]
    scaled = scale(tff, splits, cfg.scaling)
    x, y = scaled.tests[POOLED_TEST]
    history: list[dict[str, Any]] = []

    def record(r: int, weights: list[np.ndarray], loss: float) -> None:
        auroc = float(roc_auc_score(y, forward_numpy(weights, x))) if len(np.unique(y)) == 2 else None
        history.append({"round": r + 1, "loss": loss, "auroc_pooled": auroc})
        if on_round is not None:
            on_round(r + 1, loss, auroc)

    runner = Runner(tff, sub, make_model_fn(model, len(loaded[0].features)), len(loaded))
    init = initial_weights(model, len(loaded[0].features), seed)
    trained = runner.run(method, seed, init, splits, scaled.train, cfg.client_lr, on_round=record)[0]
    private = bool(noise) and method in fedavg.FEDERATED_METHODS
    return {
        "method": method,
        "sites": list(sites),
        "model": model,
        "rounds": rounds,
        "history": history,
        "auroc_pooled": history[-1]["auroc_pooled"] if history else None,
        "epsilon": privacy.epsilon(float(noise), 1.0, rounds, cfg.privacy.target_delta) if private else None,
        "weights": trained.weights,
    }
