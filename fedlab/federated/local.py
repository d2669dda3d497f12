"""Local-k: each site trains alone, with exactly the pooled recipe (plain Keras SGD).

Budget: a Local or Pooled model takes `rounds * local_steps` optimizer steps of `batch_size`,
the number of steps one client takes over a whole federated run, with the client learning rate
(SGD, no momentum). Local-k draws the very batches that client k draws in the federated run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedlab.federated.data import SiteSplit, batch_stream, make_dataset, stream_rng
from fedlab.federated.models import build_keras_model


@dataclass(frozen=True)
class Trained:
    method: str
    train_sites: str
    weights: list[np.ndarray]
    loss_history: list[float]  # mean training loss per block of `local_steps` steps ("round")
    seconds: float
    round_seconds: list[float] = field(default_factory=list)  # federated methods: time of each `next`


def sgd_train(
    kind: str,
    init: list[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    batches: list[np.ndarray],
    lr: float,
    steps_per_round: int,
) -> tuple[list[np.ndarray], list[float]]:
    """Plain-Keras SGD over the given batches, in order; returns weights and loss per round."""
    import tensorflow as tf

    model = build_keras_model(kind, x.shape[1])
    model.set_weights(init)
    optimizer = tf.keras.optimizers.SGD(learning_rate=lr)
    loss_fn = tf.keras.losses.BinaryCrossentropy()

    @tf.function
    def step(features: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(features, training=True))
        optimizer.apply_gradients(
            zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables, strict=True)
        )
        return loss

    losses = [float(step(bx, by)) for bx, by in make_dataset(x, y, batches)]
    history = [
        float(np.mean(losses[i : i + steps_per_round])) for i in range(0, len(losses), steps_per_round)
    ]
    return [np.asarray(w) for w in model.get_weights()], history


def client_batches(
    exp_seed: int, seed: int, split: SiteSplit, batch_size: int, n_steps: int
) -> list[np.ndarray]:
    """The batch stream of one site; shared by Local-k and client k of every federated method."""
    return batch_stream(
        len(split.y_train), batch_size, n_steps, stream_rng(exp_seed, seed, "client", split.site)
    )


def train_local(
    kind: str,
    init: list[np.ndarray],
    splits: list[SiteSplit],
    scaled_train: list[np.ndarray],
    exp_seed: int,
    seed: int,
    batch_size: int,
    lr: float,
    rounds: int,
    local_steps: int,
) -> list[Trained]:
    import time

    trained = []
    for split, x in zip(splits, scaled_train, strict=True):
        start = time.perf_counter()
        batches = client_batches(exp_seed, seed, split, batch_size, rounds * local_steps)
        weights, history = sgd_train(kind, init, x, split.y_train, batches, lr, local_steps)
        trained.append(Trained("local", split.site, weights, history, time.perf_counter() - start))
    return trained
