"""SCAFFOLD: the TFF process against Algorithm 1 (option II) by hand, and against FedAvg where
client drift matters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import linear_split, smoke_experiment_in
from scipy.optimize import minimize

from fedlab.config import TrainConfig
from fedlab.federated import toydata
from fedlab.federated.data import SiteSplit
from fedlab.federated.fedavg import build_process, client_schedule, train_federated
from fedlab.federated.local import client_batches
from fedlab.federated.models import initial_weights, make_model_fn
from fedlab.federated.scaffold import build_scaffold, train_scaffold
from fedlab.io import read_json

N_FEATURES = 3


def _logistic_grad(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of the mean binary cross-entropy of a logistic model; theta = (kernel..., bias)."""
    p = 1 / (1 + np.exp(-(x @ theta[:-1] + theta[-1])))
    return np.r_[x.T @ (p - y) / len(y), np.mean(p - y)]


def _scaffold_by_hand(
    clients: list[SiteSplit], init: np.ndarray, lr: float, server_lr: float, cfg: TrainConfig, picks: list
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Karimireddy et al. 2020, Algorithm 1, option II, in float64 on the batches fedlab draws."""
    x, c = init.copy(), np.zeros_like(init)
    c_i = [np.zeros_like(init) for _ in clients]
    streams = [client_batches(7, 0, s, cfg.batch_size, cfg.rounds * cfg.local_steps) for s in clients]
    for r in range(cfg.rounds):
        dy, dc = [], []
        for k in picks[r]:
            y = x.copy()
            rows_per_step = streams[k][r * cfg.local_steps : (r + 1) * cfg.local_steps]
            for rows in rows_per_step:
                g = _logistic_grad(y, clients[k].x_train[rows].astype(np.float64), clients[k].y_train[rows])
                y -= lr * (g - c_i[k] + c)
            new = c_i[k] - c + (x - y) / (len(rows_per_step) * lr)
            dy.append(y - x)
            dc.append(new - c_i[k])
            c_i[k] = new
        x = x + server_lr * np.mean(dy, axis=0)
        c = c + len(picks[r]) / len(clients) * np.mean(dc, axis=0)
    return x, c_i


def _flat(weights: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([w.reshape(-1) for w in weights]).astype(np.float64)


@pytest.mark.parametrize("per_round", [None, 2])
def test_scaffold_rounds_equal_algorithm_1_option_2_by_hand(tff, per_round) -> None:
    clients = [linear_split("a", 40, 1), linear_split("b", 30, 2), linear_split("c", 24, 3)]
    cfg = TrainConfig(rounds=3, local_steps=4, batch_size=8, client_lr=0.3, clients_per_round=per_round)
    init = initial_weights("logreg", N_FEATURES, seed=1)
    process = build_scaffold(tff, make_model_fn("logreg", N_FEATURES), 0.3, server_lr=0.8, n_clients=3)
    trained = train_scaffold(tff, process, init, clients, [c.x_train for c in clients], 7, 0, cfg)
    picks = client_schedule(7, 0, 3, per_round, cfg.rounds)
    want, _ = _scaffold_by_hand(clients, _flat(init), 0.3, 0.8, cfg, picks)
    np.testing.assert_allclose(_flat(trained.weights), want, rtol=1e-5, atol=1e-6)
    assert trained.method == "scaffold" and len(trained.loss_history) == 3
    if per_round:  # sampling really happened, so the |S|/N factor was exercised
        assert any(len(p) == 2 for p in picks)


def test_client_control_variates_stay_at_the_clients(tff) -> None:
    process = build_scaffold(tff, make_model_fn("logreg", N_FEATURES), 0.1, n_clients=2).process
    signature = process.next.type_signature
    assert str(signature.parameter[2].placement) == "CLIENTS"  # each client's c_i comes in at CLIENTS
    assert str(signature.result[1].placement) == "CLIENTS"  # and leaves at CLIENTS, never at SERVER
    state = signature.parameter[0].member
    assert [str(t) for t in state.control] == [str(t) for t in state.global_model_weights.trainable]


def _drifting_clients() -> list[SiteSplit]:
    """Two sites whose features and label mechanisms differ: FedAvg's local steps drift apart."""
    rng = np.random.default_rng(0)
    out = []
    for name, mean, w, b in (("east", [1.5, -1.0], [2.0, 0.5], -1.0), ("west", [-1.5, 1.0], [-0.5, 2.0], 1.0)):
        x = rng.normal(mean, 1.0, size=(60, 2))
        y = (rng.random(60) < 1 / (1 + np.exp(-(x @ np.array(w) + b)))).astype(np.float32)
        out.append(SiteSplit(name, x.astype(np.float32), y, x[:0].astype(np.float32), y[:0], np.array([]), True))
    return out


def test_scaffold_reaches_the_global_optimum_where_fedavg_drifts(tff) -> None:
    clients = _drifting_clients()
    # full-batch local steps (batch 64 > 60 rows): no gradient noise, only drift
    cfg = TrainConfig(rounds=30, local_steps=20, batch_size=64, client_lr=0.5)

    def average_loss(theta: np.ndarray) -> float:
        losses = []
        for c in clients:
            z = c.x_train.astype(np.float64) @ theta[:-1] + theta[-1]
            losses.append(np.mean(np.logaddexp(0, z) - c.y_train * z))
        return float(np.mean(losses))

    optimum = minimize(average_loss, np.zeros(3), method="BFGS", options={"gtol": 1e-10}).x
    init = [np.zeros((2, 1), np.float32), np.zeros(1, np.float32)]
    model_fn = make_model_fn("logreg", 2)
    xs = [c.x_train for c in clients]
    ours = train_scaffold(tff, build_scaffold(tff, model_fn, 0.5, n_clients=2), init, clients, xs, 7, 0, cfg)
    fedavg = train_federated(tff, "fedavg", build_process(tff, "fedavg", model_fn, cfg), init, clients, xs, 7,
                             0, cfg)
    scaffold_error = np.linalg.norm(_flat(ours.weights) - optimum)
    fedavg_error = np.linalg.norm(_flat(fedavg.weights) - optimum)
    assert scaffold_error < 1e-3, scaffold_error
    assert fedavg_error > 0.5, fedavg_error  # FedAvg's fixed point is not the optimum of the average loss
    assert average_loss(_flat(ours.weights)) < average_loss(_flat(fedavg.weights))


def test_scaffold_runs_in_the_train_stage(tmp_path: Path, tff) -> None:
    from fedlab.federated import train

    exp = smoke_experiment_in(tmp_path, {"train.methods": ["local", "fedavg", "scaffold"], "train.rounds": 3,
                                         "train.local_steps": 4, "train.bootstrap": 5})
    toydata.fabricate(exp, sizes={"general": 120, "rural": 90, "metro_icd": 80}, strength=3.0)
    results = read_json(train(exp, progress=False))
    assert {r["method"] for r in results["rows"]} == {"local", "fedavg", "scaffold"}
    scaffold_bytes = results["communication"]["per_method"]["scaffold"]
    fedavg_bytes = results["communication"]["per_method"]["fedavg"]
    model = 4 * (len(results["features"]) + 1)
    assert scaffold_bytes["bytes_down_per_client_per_round"] == 2 * model  # x and c
    # model delta + control delta, no client weight (unweighted mean); FedAvg: delta + weight
    assert scaffold_bytes["bytes_up_per_client_per_round"] - fedavg_bytes["bytes_up_per_client_per_round"] == model - 4
    auroc = [s for s in results["summary"] if s["method"] == "scaffold" and s["test_site"] == "pooled"
             and s["metric"] == "auroc"]
    assert auroc and auroc[0]["mean"] > 0.6
