"""Cyclic (FLamby's sequential strategy): one model travels from site to site.

Each round visits the sites (or `clients_per_round` of them, drawn as for FedAvg) in a seeded
order; at each visit the site takes `local_steps` SGD steps (plain Keras, no momentum, the
client learning rate) on the very batches client k would use in that round of FedAvg, starting
from the weights the previous site handed over. There is no server aggregation, hence no TFF.

Communication: the model weights travel directly from site to site, one transfer per visit (the
first visit of round 0 receives the initial model from the coordinator; the last site of a round
hands over to the first of the next). Nothing else is sent: no metrics, no client weights.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from fedlab.config import TrainConfig
from fedlab.federated.data import SiteSplit, make_dataset, stream_rng
from fedlab.federated.fedavg import RoundCallback, client_schedule
from fedlab.federated.local import Trained, client_batches
from fedlab.federated.models import build_keras_model


def visit_orders(
    exp_seed: int, seed: int, n_sites: int, clients_per_round: int | None, rounds: int
) -> list[list[int]]:
    """Per round, the participating sites in the order the model visits them."""
    rng = stream_rng(exp_seed, seed, "cyclic-order")
    return [
        [int(k) for k in rng.permutation(participants)]
        for participants in client_schedule(exp_seed, seed, n_sites, clients_per_round, rounds)
    ]


def weights_bytes(weights: list[np.ndarray]) -> int:
    return int(sum(w.nbytes for w in weights))


def train_cyclic(
    kind: str,
    init: list[np.ndarray],
    splits: list[SiteSplit],
    scaled_train: list[np.ndarray],
    exp_seed: int,
    seed: int,
    cfg: TrainConfig,
    lr: float | None = None,
    on_round: RoundCallback | None = None,
) -> Trained:
    """Sequential training over `cfg.rounds` rounds; the loss of a round is the mean over its steps."""
    start = time.perf_counter()
    n_steps = cfg.rounds * cfg.local_steps
    streams = [client_batches(exp_seed, seed, split, cfg.batch_size, n_steps) for split in splits]
    step = _Stepper(kind, init, scaled_train[0].shape[1], cfg.client_lr if lr is None else lr)
    orders = visit_orders(exp_seed, seed, len(splits), cfg.clients_per_round, cfg.rounds)
    history, round_seconds = [], []
    for r, order in enumerate(orders):
        round_start = time.perf_counter()
        window = slice(r * cfg.local_steps, (r + 1) * cfg.local_steps)
        losses = [
            float(step.run(bx, by))
            for k in order
            for bx, by in make_dataset(scaled_train[k], splits[k].y_train, streams[k][window])
        ]
        history.append(float(np.mean(losses)))
        round_seconds.append(time.perf_counter() - round_start)
        if on_round is not None:
            on_round(r, step.weights(), history[-1])
    train_sites = "+".join(s.site for s in splits)
    return Trained("cyclic", train_sites, step.weights(), history, time.perf_counter() - start, round_seconds)


class _Stepper:
    """One Keras model and a compiled SGD step, reused across all visits (SGD keeps no state)."""

    def __init__(self, kind: str, init: list[np.ndarray], n_features: int, lr: float) -> None:
        import tensorflow as tf

        self.model = build_keras_model(kind, n_features)
        self.model.set_weights(init)
        optimizer = tf.keras.optimizers.SGD(learning_rate=lr)
        loss_fn = tf.keras.losses.BinaryCrossentropy()
        model = self.model

        @tf.function
        def run(features: Any, labels: Any) -> Any:
            with tf.GradientTape() as tape:
                loss = loss_fn(labels, model(features, training=True))
            optimizer.apply_gradients(
                zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables, strict=True)
            )
            return loss

        self.run = run

    def weights(self) -> list[np.ndarray]:
        return [np.asarray(w) for w in self.model.get_weights()]
