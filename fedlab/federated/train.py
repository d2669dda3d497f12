"""The train stage: Local-k, Pooled and federated strategies on the sites' feature tables.

Protocol (FLamby-style, one simulated TFF client per site):
1. per site, a stratified train/test split by patient (seeded by experiment seed, training seed
   and site id; `train.test_fraction` of patients go to test);
2. feature scaling from federated sufficient statistics (per-site counts, sums, sums of squares
   of the training split, summed by a `tff.federated_sum`); missing values -> 0 after scaling;
3. every method starts from the same seeded initial weights. Budget: each federated client
   takes `local_steps` batches of `batch_size` per round for `rounds` rounds; Local-k and Pooled
   take the same total, `rounds * local_steps` SGD steps (the work of one client over the whole
   run), with the client learning rate;
4. every model is scored on every site's test set and on the pooled test set.
Results go to `reports/<run>/results.json`, final weights to `reports/<run>/train/*.npz`.
"""

from __future__ import annotations

import io
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedlab.config import Experiment
from fedlab.federated import comms, data, evaluate, fedavg, local, pooled
from fedlab.federated.models import initial_weights, make_model_fn, predict
from fedlab.io import atomic_open, write_json
from fedlab.tffctx import init_tff

ALL_METHODS = ("local", "pooled", *fedavg.FEDERATED_METHODS)
POOLED_TEST = "pooled"


def train(
    exp: Experiment, run: str | None = None, methods: list[str] | None = None, progress: bool = True
) -> Path:
    """Train and score every method for every seed; returns the path of `results.json`."""
    started = time.perf_counter()
    cfg = exp.train
    methods = _check_methods(methods or list(cfg.methods))
    sites = data.load_sites(exp, run)
    timings: dict[str, Any] = {"load_seconds": time.perf_counter() - started, "seeds": {}}
    out_dir = exp.report_path(run)
    n_features = len(sites[0].features)
    model_fn = make_model_fn(cfg.model, n_features)
    processes: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    cells: dict[tuple[str, str, str], dict[int, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
    resamples: dict[str, dict[int, list[np.ndarray]]] = defaultdict(dict)
    history: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(dict)
    split_info: dict[str, dict[str, Any]] = {}
    scaling: dict[str, Any] = {}

    for seed in cfg.seeds:
        seed_start = time.perf_counter()
        tff = init_tff(seed)
        splits, scaled_train, tests, scaler = _prepare(tff, exp, sites, seed)
        split_info[str(seed)] = _split_summary(splits)
        scaling[str(seed)] = {"mean": scaler.mean.tolist(), "std": scaler.std.tolist()}
        resamples_of_seed = _resamples(exp.seed, seed, splits, cfg.bootstrap)
        for test_name, reps in resamples_of_seed.items():
            resamples[test_name][seed] = reps
        init = initial_weights(cfg.model, n_features, seed)
        seed_timings: dict[str, float] = {"prepare_seconds": time.perf_counter() - seed_start}
        for method in methods:
            for trained in _run_method(
                tff, method, exp, seed, init, splits, scaled_train, processes, model_fn, seed_timings
            ):
                seed_timings[f"{method}:{trained.train_sites}_seconds"] = trained.seconds
                if trained.round_seconds:
                    seed_timings[f"{method}:mean_round_seconds"] = float(np.mean(trained.round_seconds))
                history[method].setdefault(str(seed), {})[trained.train_sites] = trained.loss_history
                rows += _score_model(cfg.model, trained, seed, tests, cells)
                _save_weights(out_dir, trained, seed)
                if progress:
                    print(
                        f"[train] seed {seed} {method:<10} {trained.train_sites}: {trained.seconds:.1f}s, "
                        f"last round loss {trained.loss_history[-1]:.4f}",
                        flush=True,
                    )
        timings["seeds"][str(seed)] = seed_timings

    eval_start = time.perf_counter()
    summary = _summary(cells, resamples)
    timings["bootstrap_seconds"] = time.perf_counter() - eval_start
    results = {
        "rows": rows,
        "summary": summary,
        "ci_method": evaluate.CI_METHOD,
        "communication": _communication(tff, model_fn, processes, methods, sites, cfg),
        "history": dict(history),
        "sites": _site_summary(sites, split_info),
        "features": sites[0].features,
        "scaling": {
            "method": "federated sum of per-site count/sum/sum of squares; NaN -> 0 after scaling",
            "per_seed": scaling,
        },
        "config": {**cfg.model_dump(mode="json"), "methods_run": methods, "experiment_seed": exp.seed},
        "timings": {**timings, "total_seconds": time.perf_counter() - started},
    }
    return write_json(out_dir / "results.json", results)


def _check_methods(methods: list[str]) -> list[str]:
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown training method(s) {unknown}; choose from {list(ALL_METHODS)}")
    return list(dict.fromkeys(methods))


def _prepare(
    tff: Any, exp: Experiment, sites: list[data.SiteData], seed: int
) -> tuple[list[data.SiteSplit], list[np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]], data.Scaler]:
    splits = [
        data.split_site(s, exp.train.test_fraction, data.stream_rng(exp.seed, seed, "split", s.site))
        for s in sites
    ]
    for split, site in zip(splits, sites, strict=True):
        if len(split.y_train) == 0:
            raise data.FeatureDataError(
                f"{site.path}: site {site.site!r} has no training rows after the split"
            )
    stats = data.federated_statistics(tff, [data.site_statistics(s.x_train) for s in splits])
    scaler = data.scaler_from_statistics(stats)
    scaled_train = [scaler.transform(s.x_train) for s in splits]
    tests = {s.site: (scaler.transform(s.x_test), s.y_test) for s in splits}
    tests[POOLED_TEST] = (
        np.concatenate([t[0] for t in tests.values()]),
        np.concatenate([s.y_test for s in splits]),
    )
    return splits, scaled_train, tests, scaler


def _resamples(exp_seed: int, seed: int, splits: list[data.SiteSplit], n: int) -> dict[str, list[np.ndarray]]:
    per_site = {
        s.site: evaluate.patient_resamples(s.test_patient, n, data.stream_rng(exp_seed, seed, "boot", s.site))
        for s in splits
    }
    per_site[POOLED_TEST] = (
        evaluate.pooled_resamples(list(per_site.values()), [len(s.y_test) for s in splits]) if n else []
    )
    return per_site


def _run_method(
    tff: Any,
    method: str,
    exp: Experiment,
    seed: int,
    init: list[np.ndarray],
    splits: list[data.SiteSplit],
    scaled_train: list[np.ndarray],
    processes: dict[str, Any],
    model_fn: Any,
    seed_timings: dict[str, float],
) -> list[local.Trained]:
    cfg = exp.train
    common = dict(
        exp_seed=exp.seed,
        seed=seed,
        batch_size=cfg.batch_size,
        lr=cfg.client_lr,
        rounds=cfg.rounds,
        local_steps=cfg.local_steps,
    )
    if method == "local":
        return local.train_local(cfg.model, init, splits, scaled_train, **common)
    if method == "pooled":
        return [pooled.train_pooled(cfg.model, init, splits, scaled_train, **common)]
    if method not in processes:
        build_start = time.perf_counter()
        processes[method] = fedavg.build_process(tff, method, model_fn, cfg)
        seed_timings[f"{method}:build_seconds"] = time.perf_counter() - build_start
    return [
        fedavg.train_federated(
            tff, method, processes[method], init, splits, scaled_train, exp.seed, seed, cfg
        )
    ]


def _score_model(
    kind: str,
    trained: local.Trained,
    seed: int,
    tests: dict[str, tuple[np.ndarray, np.ndarray]],
    cells: dict[tuple[str, str, str], dict[int, tuple[np.ndarray, np.ndarray]]],
) -> list[dict[str, Any]]:
    rows = []
    for test_name, (x, y) in tests.items():
        p = predict(kind, trained.weights, x)
        cells[(trained.method, trained.train_sites, test_name)][seed] = (y, p)
        for metric, (value, reason) in evaluate.score(y, p).items():
            row = {
                "method": trained.method,
                "seed": seed,
                "train_sites": trained.train_sites,
                "test_site": test_name,
                "metric": metric,
                "value": value,
            }
            if reason:
                row["reason"] = reason
            rows.append(row)
    return rows


def _summary(
    cells: dict[tuple[str, str, str], dict[int, tuple[np.ndarray, np.ndarray]]],
    resamples: dict[str, dict[int, list[np.ndarray]]],
) -> list[dict[str, Any]]:
    out = []
    for (method, train_sites, test_site), per_seed in cells.items():
        for metric, stats in evaluate.summarize_cell(per_seed, resamples[test_site]).items():
            out.append(
                {
                    "method": method,
                    "train_sites": train_sites,
                    "test_site": test_site,
                    "metric": metric,
                    **stats,
                }
            )
    return out


def _communication(
    tff: Any,
    model_fn: Any,
    processes: dict[str, Any],
    methods: list[str],
    sites: list[data.SiteData],
    cfg: Any,
) -> dict[str, Any]:
    raw = {s.site: s.file_bytes for s in sites}
    federated = [m for m in methods if m in fedavg.FEDERATED_METHODS]
    if not federated:
        return {"methods": [], "raw_data_bytes": int(sum(raw.values())), "raw_data_bytes_per_site": raw}
    weights = initial_weights(cfg.model, len(sites[0].features), 0)
    return comms.communication(
        tff, model_fn, processes[federated[0]], weights, federated, len(sites), cfg.rounds, raw
    )


def _split_summary(splits: list[data.SiteSplit]) -> dict[str, Any]:
    return {
        s.site: {
            "n_train": int(len(s.y_train)),
            "n_test": int(len(s.y_test)),
            "prevalence_train": _prevalence(s.y_train),
            "prevalence_test": _prevalence(s.y_test),
            "stratified": s.stratified,
        }
        for s in splits
    }


def _site_summary(sites: list[data.SiteData], split_info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for site in sites:
        per_seed = {seed: info[site.site] for seed, info in split_info.items()}
        first = next(iter(per_seed.values()))
        out[site.site] = {
            "n_rows": int(len(site.y)),
            "n_patients": int(len(np.unique(site.patient_id))),
            "prevalence": _prevalence(site.y),
            "n_train": first["n_train"],
            "n_test": first["n_test"],
            "features_bytes": site.file_bytes,
            "path": str(site.path),
            "splits": per_seed,
        }
    return out


def _prevalence(y: np.ndarray) -> float | None:
    return float(np.mean(y)) if len(y) else None


def _save_weights(out_dir: Path, trained: local.Trained, seed: int) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, *trained.weights)
    path = out_dir / "train" / f"{trained.method}__{trained.train_sites}__seed{seed}.npz"
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())
