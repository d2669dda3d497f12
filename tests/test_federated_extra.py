"""fedlab.federated extras: Cyclic, LR tuning on validation, quantized updates, client-level DP,
client sampling, communication curves and crossover, interactive training."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import linear_split, smoke_experiment_in

from fedlab.config import TrainConfig
from fedlab.federated import comms, cyclic, data, privacy, quantize, toydata, tuning
from fedlab.federated.data import SiteSplit
from fedlab.federated.fedavg import Aggregation, build_process, client_schedule, train_federated
from fedlab.federated.local import client_batches, sgd_train
from fedlab.federated.models import forward_numpy, initial_weights, make_model_fn, predict
from fedlab.federated.runner import Runner
from fedlab.io import read_json

ROOT = Path(__file__).resolve().parents[1]
N_FEATURES = 3


@pytest.fixture(scope="module")
def clients() -> list[SiteSplit]:
    return [linear_split("a", 40, 1), linear_split("b", 30, 2), linear_split("c", 24, 3)]


# ---------------------------------------------------------------- Cyclic


def test_cyclic_round_equals_sequential_keras_sgd_in_the_seeded_order(clients) -> None:
    cfg = TrainConfig(rounds=2, local_steps=3, batch_size=8, client_lr=0.2)
    init = initial_weights("logreg", N_FEATURES, seed=4)
    trained = cyclic.train_cyclic("logreg", init, clients, [c.x_train for c in clients], 7, 0, cfg)
    orders = cyclic.visit_orders(7, 0, len(clients), None, cfg.rounds)
    assert all(sorted(o) == [0, 1, 2] for o in orders) and orders == cyclic.visit_orders(7, 0, 3, None, 2)
    streams = [client_batches(7, 0, c, cfg.batch_size, cfg.rounds * cfg.local_steps) for c in clients]
    weights = init
    for r, order in enumerate(orders):
        for k in order:
            window = streams[k][r * cfg.local_steps : (r + 1) * cfg.local_steps]
            weights, _ = sgd_train(
                "logreg",
                weights,
                clients[k].x_train,
                clients[k].y_train,
                window,
                cfg.client_lr,
                cfg.local_steps,
            )
    for got, want in zip(trained.weights, weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(trained.loss_history) == 2 and trained.method == "cyclic"


def test_client_sampling_is_seeded_and_sized() -> None:
    a = client_schedule(1, 2, 6, 2, 5)
    assert a == client_schedule(1, 2, 6, 2, 5) and a != client_schedule(1, 3, 6, 2, 5)
    assert all(len(r) == 2 and len(set(r)) == 2 for r in a) and len({tuple(r) for r in a}) > 1
    assert client_schedule(1, 2, 3, None, 2) == [[0, 1, 2], [0, 1, 2]]


# ---------------------------------------------------------------- quantization


def test_quantized_aggregator_changes_the_mean_by_at_most_one_step(tff) -> None:
    rng = np.random.default_rng(0)
    values = [rng.normal(size=7).astype(np.float32) for _ in range(3)]
    value_type = tff.TensorType(np.float32, [7])
    exact = np.mean(values, axis=0)
    process = quantize.quantized_mean_factory(tff, 8).create(value_type, tff.TensorType(np.float32))
    got = np.asarray(process.next(process.initialize(), values, [1.0, 1.0, 1.0]).result)
    step = max(quantize.step_size(v, 8) for v in values)
    error = np.abs(got - exact)
    assert error.max() > 0  # quantization really applied to a 7-element tensor
    assert error.max() <= step
    coarse = quantize.quantized_mean_factory(tff, 2).create(value_type, tff.TensorType(np.float32))
    coarse_error = np.abs(np.asarray(coarse.next(coarse.initialize(), values, [1.0] * 3).result) - exact)
    assert coarse_error.max() > error.max()


def test_quantized_bytes_are_about_a_quarter() -> None:
    shapes = [(50, 16), (16,), (16, 1), (1,)]
    raw = sum(int(np.prod(s)) * 4 for s in shapes)
    encoded = quantize.encoded_bytes(shapes, 8)
    assert encoded == (200 + 4 + 4 + 1) * 4 + 4 * 8
    assert 0.25 < encoded / raw < 0.27
    assert quantize.encoded_tensor_bytes(7, 8) == 8 + 8


def test_quantized_fedavg_round_is_close_to_but_not_the_exact_round(tff, clients) -> None:
    cfg = TrainConfig(rounds=1, local_steps=3, batch_size=8, client_lr=0.3)
    model_fn = make_model_fn("logreg", N_FEATURES)
    init = initial_weights("logreg", N_FEATURES, seed=5)
    xs = [c.x_train for c in clients]
    exact = train_federated(
        tff, "fedavg", build_process(tff, "fedavg", model_fn, cfg), init, clients, xs, 7, 0, cfg
    )
    quant = train_federated(
        tff,
        "fedavg",
        build_process(tff, "fedavg", model_fn, cfg, aggregation=Aggregation(quantize_bits=8)),
        init,
        clients,
        xs,
        7,
        0,
        cfg,
    )
    diffs = [np.abs(a - b).max() for a, b in zip(exact.weights, quant.weights, strict=True)]
    assert max(diffs) > 0 and max(diffs) < 0.01


# ---------------------------------------------------------------- differential privacy


def test_epsilon_falls_with_noise_and_grows_with_rounds_and_sampling() -> None:
    by_noise = [privacy.epsilon(z, 1.0, 20, 1e-5) for z in (0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:], strict=False))
    by_rounds = [privacy.epsilon(1.0, 1.0, r, 1e-5) for r in (1, 10, 100)]
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:], strict=False))
    assert privacy.epsilon(1.0, 0.1, 20, 1e-5) < privacy.epsilon(1.0, 1.0, 20, 1e-5)
    assert privacy.epsilon(0.0, 1.0, 20, 1e-5) is None
    assert privacy.warning_for(3) and privacy.warning_for(500) is None


def test_dp_training_runs_is_seeded_and_differs_from_non_private(tff, clients) -> None:
    cfg = TrainConfig(rounds=2, local_steps=2, batch_size=8, client_lr=0.3)
    model_fn = make_model_fn("logreg", N_FEATURES)
    init = initial_weights("logreg", N_FEATURES, seed=1)
    xs = [c.x_train for c in clients]
    plain = train_federated(
        tff, "fedavg", build_process(tff, "fedavg", model_fn, cfg), init, clients, xs, 0, 0, cfg
    )
    dp = Aggregation(noise_multiplier=1.0, clip=0.5, clients_per_round=3, noise_seed=11)
    process = build_process(tff, "fedavg", model_fn, cfg, aggregation=dp)
    private = [train_federated(tff, "fedavg", process, init, clients, xs, 0, 0, cfg) for _ in range(2)]
    other = train_federated(
        tff,
        "fedavg",
        build_process(tff, "fedavg", model_fn, cfg, aggregation=replace(dp, noise_seed=12)),
        init,
        clients,
        xs,
        0,
        0,
        cfg,
    )
    for a, b, p, o in zip(private[0].weights, private[1].weights, plain.weights, other.weights, strict=True):
        assert np.all(np.isfinite(a)) and a.tobytes() == b.tobytes()  # same noise seed: same model
        assert not np.allclose(a, p, atol=1e-3)  # noise (and clipping) changed the model
        assert not np.allclose(a, o, atol=1e-6)  # another noise seed: other noise


def test_adaptive_clipping_probe_reports_a_reason_or_none(tff) -> None:
    reason = privacy.adaptive_clipping_builds(tff, 1.0, 3, 1.0)
    assert reason is None or "seed" in reason or "Error" in reason


# ---------------------------------------------------------------- LR tuning never reads test data


def _site_splits(exp, n_rows: dict[str, int]) -> list[SiteSplit]:
    frames = toydata.fabricate(exp, sizes=n_rows, strength=3.0)
    del frames
    sites = data.load_sites(exp)
    return [data.split_site(s, 0.3, data.stream_rng(exp.seed, 0, "split", s.site)) for s in sites]


def test_lr_tuning_ignores_test_labels(tmp_path: Path, tff) -> None:
    exp = smoke_experiment_in(
        tmp_path,
        {"train.rounds": 2, "train.local_steps": 3, "train.lr_grid": [0.01, 1.0], "train.val_fraction": 0.3},
    )
    splits = _site_splits(exp, {"general": 120, "rural": 90, "metro_icd": 80})
    runner = Runner(tff, exp, make_model_fn("logreg", len(data.load_sites(exp)[0].features)), len(splits))
    first = tuning.tune_learning_rates(runner, ["local", "fedavg"], splits, 0, [0.01, 1.0])
    rng = np.random.default_rng(9)
    poisoned = [replace(s, y_test=1 - s.y_test, x_test=rng.normal(size=s.x_test.shape) * 50) for s in splits]
    second = tuning.tune_learning_rates(runner, ["local", "fedavg"], poisoned, 0, [0.01, 1.0])
    assert first["scores"] == second["scores"] and first["chosen"] == second["chosen"]
    assert first["criterion"] == "auroc" and set(first["chosen"]) == {"local", "fedavg"}
    assert first["chosen"]["fedavg"] == 1.0  # 0.01 barely moves a model in 6 steps
    inner = tuning.validation_splits(exp.seed, 0, splits, 0.3)
    for split, val in zip(splits, inner, strict=True):
        assert len(val.y_train) + len(val.y_test) == len(split.y_train)
        assert not set(val.test_patient) & set(val.train_patient)
        assert set(val.test_patient) <= set(split.train_patient)


# ---------------------------------------------------------------- the stage with every option


@pytest.fixture(scope="module")
def extra_run(tmp_path_factory, tff):
    from fedlab.federated import train

    tmp_path = tmp_path_factory.mktemp("extra")
    exp = smoke_experiment_in(
        tmp_path,
        {
            "train.rounds": 3,
            "train.local_steps": 4,
            "train.bootstrap": 0,
            "train.seeds": [0],
            "train.model": "mlp",
            "train.methods": ["pooled", "fedavg", "cyclic"],
            "train.lr_grid": [0.05, 0.5],
            "train.quantize_bits": 8,
            "train.clients_per_round": 2,
            "train.scaling": "per_site",
            "train.privacy": {"enabled": True, "noise_multiplier": 0.8, "clip": 1.0, "sweep": [0.5, 4.0]},
        },
    )
    toydata.fabricate(exp, sizes={"general": 150, "rural": 100, "metro_icd": 80}, strength=3.0)
    for site in exp.site_ids:  # a Bulk Data export of every site, as the export stage leaves it
        folder = exp.data_path("export", None, site)
        folder.mkdir(parents=True)
        (folder / "Patient.ndjson").write_bytes(b"x" * 5000)
    return exp, read_json(train(exp, progress=False))


def test_results_carry_tuning_privacy_and_sweep(extra_run) -> None:
    exp, results = extra_run
    tuned = results["tuning"]
    assert set(tuned["chosen"]) == {"pooled", "fedavg", "cyclic"} and tuned["seed"] == 0
    assert all(set(v) == {"0.05", "0.5"} for v in tuned["scores"].values())
    assert results["client_lr"] == tuned["chosen"]
    record = results["privacy"]["fedavg"]
    assert record["clients_per_round"] == 2 and record["rounds"] == 3 and record["epsilon"] > 0
    assert record["warning"] and record["sampling_probability"] == pytest.approx(2 / 3)
    assert results["privacy"]["cyclic"]["applied"] is False
    curve = results["privacy_curve"]
    assert [p["noise_multiplier"] for p in curve] == [0.5, 4.0]
    assert curve[0]["epsilon"] > curve[1]["epsilon"]
    assert all(0 <= p["auroc_pooled"] <= 1 for p in curve)
    assert results["scaling"]["mode"] == "per_site" and "secure_aggregator" in results["secure_aggregation"]


def test_results_carry_comm_curves_quantized_bytes_and_crossover(extra_run) -> None:
    exp, results = extra_run
    comm = results["communication"]
    assert comm["clients_per_round"] == 2 and comm["total_bytes"] == 3 * 2 * (
        comm["bytes_down_per_client_per_round"] + comm["bytes_up_per_client_per_round"]
    )
    q = comm["quantization"]
    assert q["delta_bytes_quantized"] == quantize.encoded_bytes([(6, 16), (16,), (16, 1), (1,)], 8)
    assert q["delta_bytes_float32"] == 4 * 129 and q["delta_bytes_quantized"] == 164
    assert q["bytes_up_per_client_per_round_quantized"] < q["bytes_up_per_client_per_round_unquantized"]
    fedavg_bytes = comm["per_method"]["fedavg"]
    assert fedavg_bytes["bytes_up_per_client_per_round"] == q["bytes_up_per_client_per_round_quantized"]
    assert comm["per_method"]["cyclic"]["bytes_per_round"] == 2 * 4 * 129  # 2 visits, 129 float32
    for method in ("fedavg", "cyclic"):
        points = results["comm_curve"][method]
        assert [p["round"] for p in points] == [1, 2, 3]
        assert points[-1]["cumulative_bytes"] == comm["per_method"][method]["total_bytes"]
        assert all(0 <= p["auroc_pooled"] <= 1 for p in points)
    assert "pooled" not in results["comm_curve"]
    central = comm["centralized"]
    assert central["ndjson_export"] == 3 * 5000 and central["n_patients"] == 330
    assert central["parquet_features"] == comm["raw_data_bytes"]
    cross = comm["crossover_patients"]["ndjson_export"]["fedavg"]
    assert cross == pytest.approx(fedavg_bytes["total_bytes"] * 330 / 15000)


def test_crossover_is_where_linear_centralizing_meets_flat_federated_bytes() -> None:
    n = comms.crossover_patients(federated_bytes=2000, centralized=10_000, n_patients=500)
    assert n == 100  # 100 patients ship 2,000 bytes, as the federated run does
    assert comms.crossover_patients(1, 0, 10) is None


def test_per_round_auroc_matches_the_keras_model(clients) -> None:
    weights = initial_weights("mlp", N_FEATURES, 3)
    x = clients[0].x_train
    np.testing.assert_allclose(forward_numpy(weights, x), predict("mlp", weights, x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- interactive


def test_train_interactive_reports_every_round(tmp_path: Path, tff) -> None:
    from fedlab.federated.interactive import train_interactive

    exp = smoke_experiment_in(tmp_path, {"train.local_steps": 3})
    toydata.fabricate(exp, sizes={"general": 100, "rural": 80, "metro_icd": 60}, strength=3.0)
    seen: list[tuple[int, float, float | None]] = []
    out = train_interactive(
        exp,
        None,
        ["general", "rural"],
        "cyclic",
        "mlp",
        3,
        None,
        on_round=lambda r, loss, auc: seen.append((r, loss, auc)),
    )
    assert [s[0] for s in seen] == [1, 2, 3] and out["history"][-1]["auroc_pooled"] == seen[-1][2]
    assert out["epsilon"] is None and len(out["weights"]) == 4
    with pytest.raises(ValueError, match="choose sites among"):
        train_interactive(exp, None, ["nowhere"], "fedavg", "logreg", 2)
