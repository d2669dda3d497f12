"""Seconds per TFF FedAvg round (4 fabricated sites) vs the same local steps as plain Keras fits.

Prints one JSON line and writes reports/bench/fedavg_round.json. The Keras anchor runs, per
round, one `model.fit` per client over exactly the batches that client trains on in FedAvg (no
aggregation, no serialization): the ratio is TFF's orchestration overhead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from fedlab.config import TrainConfig
from fedlab.federated.data import Scaler, SiteData, split_site, stream_rng
from fedlab.federated.fedavg import build_process, train_federated
from fedlab.federated.local import client_batches
from fedlab.federated.models import build_keras_model, initial_weights, make_model_fn
from fedlab.federated.toydata import toy_frame
from fedlab.io import write_json
from fedlab.tffctx import init_tff

ROOT = Path(__file__).resolve().parents[1]
SITES = {"general": 800, "rural": 400, "metro_icd": 500, "coastal": 300}
ROUNDS = 5
CFG = TrainConfig(rounds=ROUNDS, local_steps=10, batch_size=32, client_lr=0.1)


def make_splits() -> list:
    splits = []
    for k, (site, n_rows) in enumerate(SITES.items()):
        frame = toy_frame(site, n_rows, seed=k, shift=0.2 * k)
        features = [c for c in frame.columns if c not in ("patient_id", "index_date", "label")]
        data = SiteData(
            site,
            Path(site),
            features,
            frame[features].to_numpy(np.float64),
            frame["label"].to_numpy(np.float32),
            frame["patient_id"].to_numpy(),
            0,
        )
        splits.append(split_site(data, 0.3, stream_rng(0, 0, "split", site)))
    return splits


def fedavg_seconds_per_round(tff, splits, scaled, n_features: int) -> float:
    process = build_process(tff, "fedavg", make_model_fn("logreg", n_features), CFG)
    init = initial_weights("logreg", n_features, 0)
    warmup = CFG.model_copy(update={"rounds": 1})
    train_federated(tff, "fedavg", process, init, splits, scaled, 0, 0, warmup)
    trained = train_federated(tff, "fedavg", process, init, splits, scaled, 0, 0, CFG)
    return float(np.mean(trained.round_seconds))  # `process.next` only, as the anchor times `fit` only


def keras_seconds_per_round(splits, scaled, n_features: int) -> float:
    import tensorflow as tf

    from fedlab.federated.data import make_dataset

    models = []
    for _ in splits:
        model = build_keras_model("logreg", n_features)
        model.compile(
            optimizer=tf.keras.optimizers.SGD(CFG.client_lr), loss=tf.keras.losses.BinaryCrossentropy()
        )
        models.append(model)
    init = initial_weights("logreg", n_features, 0)
    streams = [client_batches(0, 0, s, CFG.batch_size, (ROUNDS + 1) * CFG.local_steps) for s in splits]

    def one_round(r: int) -> None:
        window = slice(r * CFG.local_steps, (r + 1) * CFG.local_steps)
        for model, split, x, stream in zip(models, splits, scaled, streams, strict=True):
            model.set_weights(init)
            model.fit(make_dataset(x, split.y_train, stream[window]), epochs=1, verbose=0)

    one_round(ROUNDS)  # warm-up: builds the train functions
    start = time.perf_counter()
    for r in range(ROUNDS):
        one_round(r)
    return (time.perf_counter() - start) / ROUNDS


def main() -> None:
    tff = init_tff(0)
    splits = make_splits()
    n_features = splits[0].x_train.shape[1]
    scaler = Scaler(
        mean=np.nanmean(np.concatenate([s.x_train for s in splits]), axis=0), std=np.ones(n_features)
    )
    scaled = [scaler.transform(s.x_train) for s in splits]
    fedavg = fedavg_seconds_per_round(tff, splits, scaled, n_features)
    keras = keras_seconds_per_round(splits, scaled, n_features)
    result = {
        "name": "fedavg_round_seconds",
        "value": round(fedavg, 4),
        "unit": "s",
        "goal": "ratio <= 1.5",
        "anchor": "keras_local_steps",
        "anchor_value": round(keras, 4),
        "ratio": round(fedavg / keras, 3),
        "sites": len(splits),
        "local_steps": CFG.local_steps,
        "batch_size": CFG.batch_size,
        "rounds": ROUNDS,
    }
    write_json(ROOT / "reports" / "bench" / "fedavg_round.json", result)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
