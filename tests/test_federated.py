"""fedlab.federated: FedAvg against plain Keras, determinism, federated scaling, the train stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import linear_split, smoke_experiment_in

from fedlab.config import TrainConfig
from fedlab.federated import data, evaluate, toydata
from fedlab.federated.data import FeatureDataError, SiteSplit
from fedlab.federated.fedavg import build_process, train_federated
from fedlab.federated.local import client_batches
from fedlab.federated.models import build_keras_model, initial_weights, make_model_fn
from fedlab.io import read_json

ROOT = Path(__file__).resolve().parents[1]
N_FEATURES = 3


@pytest.fixture(scope="module")
def clients() -> list[SiteSplit]:
    # "tiny" has fewer rows than one batch, so FedAvg's example weights are not uniform.
    return [linear_split("big", 40, 1), linear_split("mid", 25, 2), linear_split("tiny", 5, 3)]


@pytest.fixture(scope="module")
def fedavg_setup(tff):
    cfg = TrainConfig(rounds=1, local_steps=3, batch_size=8, client_lr=0.3, server_lr=1.0)
    return cfg, build_process(tff, "fedavg", make_model_fn("logreg", N_FEATURES), cfg)


def _keras_local_update(init: list[np.ndarray], split: SiteSplit, batches: list[np.ndarray], lr: float):
    import tensorflow as tf

    model = build_keras_model("logreg", N_FEATURES)
    model.set_weights(init)
    model.compile(
        optimizer=tf.keras.optimizers.SGD(learning_rate=lr), loss=tf.keras.losses.BinaryCrossentropy()
    )
    for rows in batches:
        model.train_on_batch(split.x_train[rows], split.y_train[rows].reshape(-1, 1))
    return model.get_weights(), sum(len(rows) for rows in batches)


def test_one_fedavg_round_equals_example_weighted_keras_average(tff, clients, fedavg_setup) -> None:
    cfg, process = fedavg_setup
    init = initial_weights("logreg", N_FEATURES, seed=5)
    trained = train_federated(tff, "fedavg", process, init, clients, [c.x_train for c in clients], 7, 0, cfg)

    updates, counts = zip(
        *(
            _keras_local_update(
                init, c, client_batches(7, 0, c, cfg.batch_size, cfg.local_steps), cfg.client_lr
            )
            for c in clients
        ),
        strict=True,
    )
    assert counts == (24, 24, 15)
    share = np.array(counts, dtype=np.float64) / sum(counts)
    expected = [sum(s * u[i] for s, u in zip(share, updates, strict=True)) for i in range(len(init))]
    uniform = [np.mean([u[i] for u in updates], axis=0) for i in range(len(init))]
    for got, want, plain, start in zip(trained.weights, expected, uniform, init, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, start, atol=1e-4)  # training moved the weights
        assert not np.allclose(want, plain, atol=1e-6)  # weighting matters in this set-up


def _keras_proximal_update(
    init: list[np.ndarray], split: SiteSplit, batches: list[np.ndarray], lr: float, mu: float
) -> list[np.ndarray]:
    """Plain-Keras FedProx local solver: SGD on BCE + (mu/2)||w - w_init||^2."""
    import tensorflow as tf

    model = build_keras_model("logreg", N_FEATURES)
    model.set_weights(init)
    loss_fn = tf.keras.losses.BinaryCrossentropy()
    for rows in batches:
        with tf.GradientTape() as tape:
            loss = loss_fn(split.y_train[rows].reshape(-1, 1), model(split.x_train[rows]))
            loss += (
                mu
                / 2
                * tf.add_n(
                    [
                        tf.reduce_sum((v - w0) ** 2)
                        for v, w0 in zip(model.trainable_variables, init, strict=True)
                    ]
                )
            )
        grads = tape.gradient(loss, model.trainable_variables)
        for var, grad in zip(model.trainable_variables, grads, strict=True):
            var.assign_sub(lr * grad)
    return model.get_weights()


def test_fedprox_round_equals_keras_proximal_sgd_and_tff_builder_sign_is_flipped(tff, clients) -> None:
    cfg = TrainConfig(rounds=1, local_steps=4, batch_size=8, client_lr=0.3, prox_mu=2.0)
    model_fn = make_model_fn("logreg", N_FEATURES)
    init = initial_weights("logreg", N_FEATURES, seed=2)
    pair = clients[:2]  # equal example counts: the server average is the plain mean
    ours = train_federated(
        tff,
        "fedprox",
        build_process(tff, "fedprox", model_fn, cfg),
        init,
        pair,
        [c.x_train for c in pair],
        7,
        0,
        cfg,
    )
    batches = [client_batches(7, 0, c, cfg.batch_size, cfg.local_steps) for c in pair]
    proximal = [
        _keras_proximal_update(init, c, b, cfg.client_lr, cfg.prox_mu)
        for c, b in zip(pair, batches, strict=True)
    ]
    anti = [
        _keras_proximal_update(init, c, b, cfg.client_lr, -cfg.prox_mu)
        for c, b in zip(pair, batches, strict=True)
    ]
    for i, got in enumerate(ours.weights):
        np.testing.assert_allclose(got, (proximal[0][i] + proximal[1][i]) / 2, rtol=1e-5, atol=1e-6)
    # TFF 0.87's own builder applies mu with the opposite sign; if this starts failing, TFF was fixed.
    tff_builder = tff.learning.algorithms.build_weighted_fed_prox(
        model_fn,
        proximal_strength=cfg.prox_mu,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=cfg.client_lr),
        loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR,
    )
    theirs = train_federated(tff, "fedprox", tff_builder, init, pair, [c.x_train for c in pair], 7, 0, cfg)
    for i, got in enumerate(theirs.weights):
        np.testing.assert_allclose(got, (anti[0][i] + anti[1][i]) / 2, rtol=1e-5, atol=1e-6)


def test_same_seed_gives_bit_identical_weights(tff, clients) -> None:
    from fedlab.tffctx import init_tff

    cfg = TrainConfig(rounds=2, local_steps=2, batch_size=8)
    process = build_process(tff, "fedavg", make_model_fn("logreg", N_FEATURES), cfg)
    runs = []
    for seed in (3, 3, 4):
        init_tff(seed)
        init = initial_weights("logreg", N_FEATURES, seed)
        runs.append(
            train_federated(tff, "fedavg", process, init, clients, [c.x_train for c in clients], 0, seed, cfg)
        )
    for a, b in zip(runs[0].weights, runs[1].weights, strict=True):
        assert a.tobytes() == b.tobytes()
    assert runs[0].loss_history == runs[1].loss_history
    assert any(not np.array_equal(a, c) for a, c in zip(runs[0].weights, runs[2].weights, strict=True))


def test_federated_scaling_statistics_equal_pooled_statistics(tff) -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(loc=k, scale=k + 1, size=(n, 4)) for k, n in enumerate((30, 12, 50))]
    parts[1][:5, 2] = np.nan
    parts[2][:, 3] = np.nan  # a site that never measures feature 3
    federated = data.federated_statistics(tff, [data.site_statistics(p) for p in parts])
    pooled = np.concatenate(parts)
    local_sum = data.site_statistics(pooled)
    for key in ("count", "total", "total_sq"):
        np.testing.assert_allclose(federated[key], local_sum[key], rtol=1e-12)
    scaler = data.scaler_from_statistics(federated)
    np.testing.assert_allclose(scaler.mean, np.nanmean(pooled, axis=0), rtol=1e-10)
    np.testing.assert_allclose(scaler.std, np.nanstd(pooled, axis=0), rtol=1e-8)
    scaled = scaler.transform(pooled)
    assert scaled.dtype == np.float32 and not np.isnan(scaled).any()
    assert np.all(scaled[np.isnan(pooled)] == 0)
    np.testing.assert_allclose(
        np.nanmean(scaler.transform(pooled).astype(np.float64), axis=0)[:3], 0, atol=0.05
    )


def test_scaler_handles_constant_and_never_observed_features() -> None:
    stats = data.site_statistics(np.array([[1.0, np.nan], [1.0, np.nan]]))
    scaler = data.scaler_from_statistics(stats)
    assert scaler.mean.tolist() == [1.0, 0.0] and scaler.std.tolist() == [1.0, 1.0]
    assert scaler.transform(np.array([[3.0, np.nan]])).tolist() == [[2.0, 0.0]]


def test_split_is_stratified_by_patient_and_seeded() -> None:
    frame = toydata.toy_frame("s", 100, seed=1)
    frame = pd.concat(
        [frame, frame.iloc[:10].assign(index_date=pd.Timestamp("2021-01-01"))]
    )  # repeat patients
    site = data.SiteData(
        "s",
        Path("s"),
        list(frame.columns[3:]),
        frame[frame.columns[3:]].to_numpy(),
        frame["label"].to_numpy(np.float32),
        frame["patient_id"].to_numpy(),
        0,
    )
    a = data.split_site(site, 0.3, data.stream_rng(1, 2, "split", "s"))
    b = data.split_site(site, 0.3, data.stream_rng(1, 2, "split", "s"))
    assert np.array_equal(a.test_patient, b.test_patient) and a.stratified
    assert len(set(a.test_patient)) == 30
    train_patients = set(site.patient_id) - set(a.test_patient)
    assert len(a.y_train) == sum(site.patient_id[i] in train_patients for i in range(len(site.y)))
    assert abs(a.y_test.mean() - site.y.mean()) < 0.08


def test_score_skips_rank_metrics_for_a_single_class() -> None:
    result = evaluate.score(np.zeros(5), np.array([0.1, 0.2, 0.7, 0.4, 0.3]))
    assert result["auroc"] == (None, evaluate.SINGLE_CLASS) and result["auprc"][0] is None
    assert result["accuracy"] == (0.8, None)
    assert result["brier"][0] == pytest.approx(np.mean(np.array([0.1, 0.2, 0.7, 0.4, 0.3]) ** 2))


# ---------------------------------------------------------------- input checks (no TFF needed)


def test_sites_with_different_feature_columns_are_rejected(tmp_path: Path) -> None:
    exp = smoke_experiment_in(tmp_path)
    frames = toydata.fabricate(exp, sizes={s: 30 for s in exp.site_ids})
    toydata.write_site(
        exp.data_path("features", None, "rural"), frames["rural"].drop(columns=["f2"]).assign(bmi=1.0)
    )
    with pytest.raises(FeatureDataError) as err:
        data.load_sites(exp)
    message = str(err.value)
    assert "'rural'" in message and "'f2'" in message and "'bmi'" in message and "features.parquet" in message


def test_bad_labels_missing_tables_and_dictionary_mismatch_are_named(tmp_path: Path) -> None:
    exp = smoke_experiment_in(tmp_path)
    frames = toydata.fabricate(exp, sizes={s: 30 for s in exp.site_ids})
    folder = exp.data_path("features", None, "general")
    toydata.write_site(folder, frames["general"].assign(label=frames["general"]["label"].replace(1, 2)))
    with pytest.raises(FeatureDataError, match=r"general/features.parquet: column 'label' must be 0 or 1"):
        data.load_sites(exp)
    toydata.write_site(folder, frames["general"])
    (folder / "data_dictionary.json").write_text('{"features": [{"name": "f0"}]}')
    with pytest.raises(FeatureDataError, match=r"general/features.parquet: .* data_dictionary.json .*'f1'"):
        data.load_sites(exp)
    toydata.write_site(folder, frames["general"])
    shutil.rmtree(exp.data_path("features", None, "metro_icd"))
    with pytest.raises(
        FeatureDataError, match=r"metro_icd/features.parquet: features of site 'metro_icd' not found"
    ):
        data.load_sites(exp)


# ---------------------------------------------------------------- the train stage end to end


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tff):
    from fedlab.federated import train

    tmp_path = tmp_path_factory.mktemp("train")
    exp = smoke_experiment_in(
        tmp_path,
        {
            "train.rounds": 3,
            "train.local_steps": 5,
            "train.bootstrap": 20,
            "train.seeds": [0, 1],
            "train.methods": ["local", "pooled", "fedavg"],
        },
    )
    frames = toydata.fabricate(exp, sizes={"general": 160, "rural": 90, "metro_icd": 60}, strength=3.0)
    # metro_icd sees no outcome at all: its test set has one class (rank metrics are skipped).
    toydata.write_site(exp.data_path("features", None, "metro_icd"), frames["metro_icd"].assign(label=0))
    path = train(exp, progress=False)
    return exp, read_json(path), path


def test_train_writes_a_row_for_every_method_seed_test_site_and_metric(trained_run) -> None:
    exp, results, path = trained_run
    assert path == exp.report_path() / "results.json"
    models = {("local", s) for s in exp.site_ids} | {
        ("pooled", "general+rural+metro_icd"),
        ("fedavg", "general+rural+metro_icd"),
    }
    tests = [*exp.site_ids, "pooled"]
    keys = {(r["method"], r["train_sites"], r["seed"], r["test_site"], r["metric"]) for r in results["rows"]}
    expected = {
        (m, t, seed, test, metric)
        for m, t in models
        for seed in (0, 1)
        for test in tests
        for metric in evaluate.METRICS
    }
    assert keys == expected and len(results["rows"]) == len(expected)
    for method, train_sites in models:
        for seed in (0, 1):
            assert (exp.report_path() / "train" / f"{method}__{train_sites}__seed{seed}.npz").is_file()


def test_train_learns_the_synthetic_signal(trained_run) -> None:
    _, results, _ = trained_run
    by_key = {(s["method"], s["train_sites"], s["test_site"], s["metric"]): s for s in results["summary"]}
    for method, train_sites in (
        ("pooled", "general+rural+metro_icd"),
        ("fedavg", "general+rural+metro_icd"),
        ("local", "general"),
    ):
        cell = by_key[(method, train_sites, "pooled", "auroc")]
        assert cell["mean"] > 0.6, cell
        assert cell["ci_low"] <= cell["mean"] <= cell["ci_high"] and cell["n_seeds"] == 2
        assert cell["n_bootstrap"] == 40
    assert all(np.isfinite(r["value"]) for r in results["rows"] if r["value"] is not None)


def test_single_class_test_site_is_recorded_as_skipped(trained_run) -> None:
    _, results, _ = trained_run
    skipped = [
        r for r in results["rows"] if r["test_site"] == "metro_icd" and r["metric"] in ("auroc", "auprc")
    ]
    assert skipped and all(r["value"] is None and r["reason"] == evaluate.SINGLE_CLASS for r in skipped)
    kept = [r for r in results["rows"] if r["test_site"] == "metro_icd" and r["metric"] == "accuracy"]
    assert kept and all(0 <= r["value"] <= 1 for r in kept)
    cell = next(s for s in results["summary"] if s["test_site"] == "metro_icd" and s["metric"] == "auroc")
    assert cell["mean"] is None and cell["missing_reason"] == evaluate.SINGLE_CLASS


def test_results_carry_communication_history_sites_and_config(trained_run) -> None:
    exp, results, _ = trained_run
    comm = results["communication"]
    n_weights = len(results["features"]) + 1  # logreg: one kernel column and a bias
    assert comm["bytes_down_per_client_per_round"] == 4 * n_weights
    assert comm["bytes_up_per_client_per_round"] > 4 * n_weights
    assert comm["cumulative_bytes"][-1] == comm["total_bytes"] == 3 * comm["cumulative_bytes"][0]
    assert comm["raw_data_bytes"] == sum(
        exp.data_path("features", None, s).joinpath("features.parquet").stat().st_size for s in exp.site_ids
    )
    assert set(results["history"]) == {"local", "pooled", "fedavg"}
    assert all(len(h) == 3 for h in results["history"]["fedavg"]["0"].values())
    sites = results["sites"]
    assert sites["general"]["n_train"] + sites["general"]["n_test"] == 160
    assert sites["metro_icd"]["prevalence"] == 0.0
    assert results["config"]["rounds"] == 3 and "bootstrap" in results["ci_method"]
    assert results["timings"]["total_seconds"] > 0
