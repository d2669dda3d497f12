"""Federated strategies through TFF's learning builders (one simulated client per site).

- `fedavg`: `build_weighted_fed_avg`, client SGD(`client_lr`), server SGD(`server_lr`).
- `fedprox`: FedAvg whose client optimizer is proximal SGD with mu = `prox_mu` (see
  `fedlab.federated.fedprox` for why not TFF's `build_weighted_fed_prox`).
- `fedadam` / `fedyogi` / `fedadagrad`: FedAvg whose server optimizer is TFF's Adam / Yogi /
  Adagrad with learning rate `server_lr` and epsilon 1e-3 (the tau of Reddi et al. 2021). The
  default `server_lr` of 1.0 suits SGD; adaptive servers usually want 0.01-0.1.

Every round each client takes exactly `local_steps` batches of `batch_size` from its batch
stream (see `fedlab.federated.data`). Client updates are weighted by the number of examples
the client processed in the round (TFF's `ClientWeighting.NUM_EXAMPLES`): with this fixed step
budget that is uniform over sites with at least `batch_size` training rows, and smaller for a
site whose whole training set is smaller than one batch. (FLamby instead weights by training-set
size; TFF 0.87's builders offer only NUM_EXAMPLES or UNIFORM.)
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

import numpy as np

from fedlab.config import TrainConfig
from fedlab.federated.data import SiteSplit, make_dataset
from fedlab.federated.fedprox import build_proximal_sgd
from fedlab.federated.local import Trained, client_batches

FEDERATED_METHODS = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")


def build_process(tff: ModuleType, method: str, model_fn: Any, cfg: TrainConfig) -> Any:
    """The TFF learning process of one federated method."""
    if method == "fedprox":
        client_optimizer = build_proximal_sgd(cfg.client_lr, cfg.prox_mu)
    else:
        client_optimizer = tff.learning.optimizers.build_sgdm(learning_rate=cfg.client_lr)
    return tff.learning.algorithms.build_weighted_fed_avg(
        model_fn,
        client_optimizer_fn=client_optimizer,
        server_optimizer_fn=_server_optimizer(tff, method, cfg.server_lr),
        # The iterator loop runs a round several times faster on CPU than the default
        # DatasetReduce loop (which exists for TPUs); the arithmetic is the same.
        loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR,
    )


def _server_optimizer(tff: ModuleType, method: str, lr: float) -> Any:
    optimizers = tff.learning.optimizers
    if method in ("fedavg", "fedprox"):
        return optimizers.build_sgdm(learning_rate=lr)
    if method == "fedadam":
        return optimizers.build_adam(learning_rate=lr, epsilon=1e-3)
    if method == "fedyogi":
        return optimizers.build_yogi(learning_rate=lr, epsilon=1e-3)
    if method == "fedadagrad":
        return optimizers.build_adagrad(learning_rate=lr, epsilon=1e-3)
    raise ValueError(f"unknown federated method {method!r}; expected one of {FEDERATED_METHODS}")


def train_federated(
    tff: ModuleType,
    method: str,
    process: Any,
    init: list[np.ndarray],
    splits: list[SiteSplit],
    scaled_train: list[np.ndarray],
    exp_seed: int,
    seed: int,
    cfg: TrainConfig,
) -> Trained:
    """Run `cfg.rounds` rounds from the given initial weights; returns final weights and losses."""
    start = time.perf_counter()
    n_steps = cfg.rounds * cfg.local_steps
    streams = [client_batches(exp_seed, seed, split, cfg.batch_size, n_steps) for split in splits]
    state = process.initialize()
    state = process.set_model_weights(
        state, tff.learning.models.ModelWeights(trainable=list(init), non_trainable=[])
    )
    history, round_seconds = [], []
    for r in range(cfg.rounds):
        window = slice(r * cfg.local_steps, (r + 1) * cfg.local_steps)
        client_data = [
            make_dataset(x, split.y_train, stream[window])
            for split, x, stream in zip(splits, scaled_train, streams, strict=True)
        ]
        round_start = time.perf_counter()
        output = process.next(state, client_data)
        round_seconds.append(time.perf_counter() - round_start)
        state = output.state
        history.append(float(output.metrics["client_work"]["train"]["loss"]))
    weights = [np.asarray(w) for w in process.get_model_weights(state).trainable]
    train_sites = "+".join(s.site for s in splits)
    return Trained(method, train_sites, weights, history, time.perf_counter() - start, round_seconds)
