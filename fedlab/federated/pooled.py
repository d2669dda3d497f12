"""Pooled: one model on the union of all sites' training sets (the centralized upper reference).

Same recipe and budget as Local-k (see `fedlab.federated.local`): `rounds * local_steps` SGD
steps of `batch_size` with the client learning rate, batches from its own seeded stream.
"""

from __future__ import annotations

import time

import numpy as np

from fedlab.federated.data import SiteSplit, batch_stream, stream_rng
from fedlab.federated.local import Trained, sgd_train


def train_pooled(
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
) -> Trained:
    start = time.perf_counter()
    x = np.concatenate(scaled_train)
    y = np.concatenate([s.y_train for s in splits])
    batches = batch_stream(len(y), batch_size, rounds * local_steps, stream_rng(exp_seed, seed, "pooled"))
    weights, history = sgd_train(kind, init, x, y, batches, lr, local_steps)
    train_sites = "+".join(s.site for s in splits)
    return Trained("pooled", train_sites, weights, history, time.perf_counter() - start)
