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

Aggregation options (`Aggregation`): 8-bit (or `quantize_bits`) quantized updates through TFF's
encoded sum (see `fedlab.federated.quantize`); client-level DP through a
`DifferentiallyPrivateFactory` (see `fedlab.federated.privacy`), which averages clipped updates
uniformly (`build_unweighted_fed_avg`), as DP-FedAvg does. The server learning rate of a method
is `server_lrs[method]` when given, else `server_lr`. When `clients_per_round` is below the
number of sites, each round a seeded draw (experiment seed, training seed) picks that many
clients without replacement; the others skip the round (their batch windows go unused).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from fedlab.config import TrainConfig
from fedlab.federated import privacy, quantize
from fedlab.federated.data import SiteSplit, make_dataset, stream_rng
from fedlab.federated.fedprox import build_proximal_sgd
from fedlab.federated.local import Trained, client_batches

FEDERATED_METHODS = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")
# (round index, global trainable weights after the round, mean client training loss)
RoundCallback = Callable[[int, list[np.ndarray], float], None]


@dataclass(frozen=True)
class Aggregation:
    """How client updates reach the server: exact weighted mean, quantized, and/or with DP noise."""

    quantize_bits: int | None = None
    noise_multiplier: float | None = None  # None: no differential privacy
    clip: float = 1.0
    clients_per_round: int = 1
    noise_seed: int = 0

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None


def build_process(
    tff: ModuleType,
    method: str,
    model_fn: Any,
    cfg: TrainConfig,
    client_lr: float | None = None,
    aggregation: Aggregation | None = None,
) -> Any:
    """The TFF learning process of one federated method (client LR defaults to `cfg.client_lr`)."""
    lr = cfg.client_lr if client_lr is None else client_lr
    if method == "fedprox":
        client_optimizer = build_proximal_sgd(lr, cfg.prox_mu)
    else:
        client_optimizer = tff.learning.optimizers.build_sgdm(learning_rate=lr)
    server_lr = cfg.server_lrs.get(method, cfg.server_lr)
    common = dict(
        client_optimizer_fn=client_optimizer,
        server_optimizer_fn=_server_optimizer(tff, method, server_lr),
        # The iterator loop runs a round several times faster on CPU than the default
        # DatasetReduce loop (which exists for TPUs); the arithmetic is the same.
        loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR,
    )
    aggregation = aggregation or Aggregation()
    if aggregation.private:
        record_sum = (
            quantize.quantized_sum_factory(tff, aggregation.quantize_bits)
            if aggregation.quantize_bits
            else None
        )
        factory = privacy.dp_aggregator(
            tff,
            aggregation.noise_multiplier,
            aggregation.clip,
            aggregation.clients_per_round,
            aggregation.noise_seed,
            record_sum,
        )
        return tff.learning.algorithms.build_unweighted_fed_avg(model_fn, model_aggregator=factory, **common)
    if aggregation.quantize_bits:
        common["model_aggregator"] = quantize.quantized_mean_factory(tff, aggregation.quantize_bits)
    return tff.learning.algorithms.build_weighted_fed_avg(model_fn, **common)


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
    on_round: RoundCallback | None = None,
) -> Trained:
    """Run `cfg.rounds` rounds from the given initial weights; returns final weights and losses."""
    start = time.perf_counter()
    n_steps = cfg.rounds * cfg.local_steps
    streams = [client_batches(exp_seed, seed, split, cfg.batch_size, n_steps) for split in splits]
    state = process.initialize()
    state = process.set_model_weights(
        state, tff.learning.models.ModelWeights(trainable=list(init), non_trainable=[])
    )
    picks = client_schedule(exp_seed, seed, len(splits), cfg.clients_per_round, cfg.rounds)
    history, round_seconds = [], []
    for r in range(cfg.rounds):
        window = slice(r * cfg.local_steps, (r + 1) * cfg.local_steps)
        client_data = [make_dataset(scaled_train[k], splits[k].y_train, streams[k][window]) for k in picks[r]]
        round_start = time.perf_counter()
        output = process.next(state, client_data)
        round_seconds.append(time.perf_counter() - round_start)
        state = output.state
        history.append(float(output.metrics["client_work"]["train"]["loss"]))
        if on_round is not None:
            on_round(r, [np.asarray(w) for w in process.get_model_weights(state).trainable], history[-1])
    weights = [np.asarray(w) for w in process.get_model_weights(state).trainable]
    train_sites = "+".join(s.site for s in splits)
    return Trained(method, train_sites, weights, history, time.perf_counter() - start, round_seconds)


def client_schedule(
    exp_seed: int, seed: int, n_sites: int, clients_per_round: int | None, rounds: int
) -> list[list[int]]:
    """Indices of the clients taking part in each round (all of them unless sampling)."""
    if clients_per_round is None or clients_per_round >= n_sites:
        return [list(range(n_sites)) for _ in range(rounds)]
    rng = stream_rng(exp_seed, seed, "client-sampling")
    return [sorted(rng.choice(n_sites, clients_per_round, replace=False).tolist()) for _ in range(rounds)]
