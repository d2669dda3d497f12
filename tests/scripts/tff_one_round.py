"""Train one FedAvg round on tiny random data through fedlab.tffctx, print the result as JSON.

Run by tests/test_tffctx.py in a child process: it must exit and close its pipes on its own.
With `--linger` it then waits to be killed, its TFF worker still running.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from fedlab.config import TrainConfig
from fedlab.federated.data import SiteSplit
from fedlab.federated.fedavg import build_process, train_federated
from fedlab.federated.models import initial_weights, make_model_fn
from fedlab.tffctx import init_tff


def tiny_split(site: str, n_rows: int, rng: np.random.Generator) -> SiteSplit:
    x = rng.normal(size=(n_rows, 3))
    y = (x[:, 0] + rng.normal(scale=0.5, size=n_rows) > 0).astype(np.float32)
    return SiteSplit(site, x, y, x[:0], y[:0], np.array([], dtype=str), True)


def main() -> None:
    tff = init_tff(0)
    cfg = TrainConfig(rounds=1, local_steps=2, batch_size=4)
    splits = [tiny_split(site, 10, np.random.default_rng(k)) for k, site in enumerate(("a", "b"))]
    process = build_process(tff, "fedavg", make_model_fn("logreg", 3), cfg)
    trained = train_federated(
        tff,
        "fedavg",
        process,
        initial_weights("logreg", 3, 0),
        splits,
        [s.x_train.astype(np.float32) for s in splits],
        0,
        0,
        cfg,
    )
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "loss": trained.loss_history,
                "weights": [w.ravel().tolist() for w in trained.weights],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
    if "--linger" in sys.argv:
        time.sleep(600)
