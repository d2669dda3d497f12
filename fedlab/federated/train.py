"""The train stage: Local-k, Pooled and federated strategies on the sites' feature tables.

Protocol (FLamby-style, one simulated TFF client per site):
1. per site, a stratified train/test split by patient (seeded by experiment seed, training seed
   and site id; `train.test_fraction` of patients go to test);
2. feature scaling (`train.scaling`): from federated sufficient statistics (per-site counts,
   sums, sums of squares of the training split, summed by a `tff.federated_sum`), or per site;
   missing values -> 0 after scaling (see `fedlab.federated.runner`);
3. with a non-empty `train.lr_grid`, the client LR of every method is tuned on validation rows
   carved out of the training split, on the first seed (see `fedlab.federated.tuning`);
4. every method starts from the same seeded initial weights. Budget: each federated client
   takes `local_steps` batches of `batch_size` per round for `rounds` rounds (Cyclic: each site
   visit takes `local_steps` batches); Local-k and Pooled take the same total, `rounds *
   local_steps` SGD steps (the work of one client over the whole run), with the client LR;
5. every model is scored on every site's test set and on the pooled test set; federated and
   Cyclic global models are also scored on the pooled test set after every round (for the
   bytes-vs-AUROC curve only; nothing is selected on it);
6. optional: client-level DP (with epsilon accounting), a DP noise sweep, quantized updates.
Results go to `reports/<run>/results.json`, final weights to `reports/<run>/train/*.npz`.
"""

from __future__ import annotations

import io
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from fedlab.config import Experiment
from fedlab.federated import comms, data, evaluate, fedavg, local, privacy, quantize, tuning
from fedlab.federated.fedavg import RoundCallback
from fedlab.federated.models import forward_numpy, initial_weights, make_model_fn, predict
from fedlab.federated.runner import (
    CONTROL_VARIATE_METHODS,
    POOLED_TEST,
    SEQUENTIAL_METHODS,
    Runner,
    Scaled,
    scale,
)
from fedlab.io import atomic_open, write_json
from fedlab.stages import record_written
from fedlab.tffctx import init_tff

ALL_METHODS = ("local", "pooled", *SEQUENTIAL_METHODS, *fedavg.FEDERATED_METHODS, *CONTROL_VARIATE_METHODS)
CURVE_METHODS = (*SEQUENTIAL_METHODS, *fedavg.FEDERATED_METHODS, *CONTROL_VARIATE_METHODS)
SECURE_AGGREGATION_NOTE = (
    "not applied: TFF's secure_aggregator runs only in TFF's test execution context; the simulation "
    "runtime sums client updates in the clear"
)


def train(
    exp: Experiment, run: str | None = None, methods: list[str] | None = None, progress: bool = True
) -> Path:
    """Train and score every method for every seed; returns the path of `results.json`."""
    started = time.perf_counter()
    cfg = exp.train
    methods = _check_methods(methods or list(cfg.methods))
    sites = data.load_sites(exp, run, methods)
    timings: dict[str, Any] = {"load_seconds": time.perf_counter() - started, "seeds": {}}
    out_dir = exp.report_path(run)
    n_features = len(sites[0].features)
    tff = init_tff(cfg.seeds[0])
    runner = Runner(tff, exp, make_model_fn(cfg.model, n_features), len(sites))
    rows: list[dict[str, Any]] = []
    cells: dict[tuple[str, str, str], dict[int, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
    resamples: dict[str, dict[int, list[np.ndarray]]] = defaultdict(dict)
    history: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(dict)
    round_auroc: dict[str, dict[int, list[float | None]]] = defaultdict(dict)
    split_info: dict[str, dict[str, Any]] = {}
    scaling: dict[str, Any] = {}
    tuning_result: dict[str, Any] | None = None
    chosen: dict[str, float] = {}
    first: tuple[list[data.SiteSplit], Scaled] | None = None

    for seed in cfg.seeds:
        seed_start = time.perf_counter()
        tff = init_tff(seed)
        splits = _split(exp, sites, seed)
        seed_timings: dict[str, float] = {}
        if cfg.lr_grid and tuning_result is None:
            tune_start = time.perf_counter()
            tuning_result = tuning.tune_learning_rates(runner, methods, splits, seed, list(cfg.lr_grid))
            chosen = tuning_result["chosen"]
            seed_timings["tuning_seconds"] = time.perf_counter() - tune_start
            if progress:
                print(
                    f"[train] tuned client LR on validation ({tuning_result['criterion']}): {chosen}",
                    flush=True,
                )
            init_tff(seed)
        scaled = scale(tff, splits, cfg.scaling)
        first = first or (splits, scaled)
        split_info[str(seed)] = _split_summary(splits)
        scaling[str(seed)] = scaled.info
        for test_name, reps in _resamples(exp.seed, seed, splits, cfg.bootstrap).items():
            resamples[test_name][seed] = reps
        init = initial_weights(cfg.model, n_features, seed)
        seed_timings["prepare_seconds"] = time.perf_counter() - seed_start
        for method in methods:
            lr = chosen.get(method, cfg.client_lr)
            per_round: list[float | None] = []
            tracker = (
                _round_tracker(scaled.tests[POOLED_TEST], per_round) if method in CURVE_METHODS else None
            )
            for trained in runner.run(method, seed, init, splits, scaled.train, lr, on_round=tracker):
                seed_timings[f"{method}:{trained.train_sites}_seconds"] = trained.seconds
                if trained.round_seconds:
                    seed_timings[f"{method}:mean_round_seconds"] = float(np.mean(trained.round_seconds))
                history[method].setdefault(str(seed), {})[trained.train_sites] = trained.loss_history
                rows += _score_model(cfg.model, trained, seed, scaled.tests, cells)
                _save_weights(out_dir, trained, seed)
                if progress:
                    print(
                        f"[train] seed {seed} {method:<10} {trained.train_sites}: {trained.seconds:.1f}s, "
                        f"last round loss {trained.loss_history[-1]:.4f}",
                        flush=True,
                    )
            if tracker is not None:
                round_auroc[method][seed] = per_round
        timings["seeds"][str(seed)] = seed_timings

    eval_start = time.perf_counter()
    summary = _summary(cells, resamples)
    timings["bootstrap_seconds"] = time.perf_counter() - eval_start
    communication = _communication(exp, run, runner, methods, sites, n_features)
    results: dict[str, Any] = {
        "rows": rows,
        "summary": summary,
        "ci_method": evaluate.CI_METHOD,
        "communication": communication,
        "comm_curve": _comm_curve(communication, methods, round_auroc, runner, cfg),
        "history": dict(history),
        "sites": _site_summary(sites, split_info),
        "features": sites[0].features,
        "scaling": {
            "mode": cfg.scaling,
            "method": next(iter(scaling.values()))["method"],
            "per_seed": scaling,
        },
        "client_lr": {m: chosen.get(m, cfg.client_lr) for m in methods},
        "server_lr": {
            m: cfg.server_lrs.get(m, cfg.server_lr) for m in methods if m in fedavg.FEDERATED_METHODS
        },
        "secure_aggregation": SECURE_AGGREGATION_NOTE,
        "config": {**cfg.model_dump(mode="json"), "methods_run": methods, "experiment_seed": exp.seed},
    }
    if tuning_result is not None:
        results["tuning"] = tuning_result
    if cfg.privacy.enabled:
        results["privacy"] = _privacy_records(runner, methods)
    if cfg.privacy.sweep and first is not None:
        sweep_start = time.perf_counter()
        results["privacy_curve"] = _privacy_sweep(runner, first, chosen, progress)
        timings["privacy_sweep_seconds"] = time.perf_counter() - sweep_start
    timings["build_seconds"] = dict(runner.build_seconds)
    results["timings"] = {**timings, "total_seconds": time.perf_counter() - started}
    path = write_json(out_dir / "results.json", results)
    record_written(exp, run, "train")
    return path


def _check_methods(methods: list[str]) -> list[str]:
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown training method(s) {unknown}; choose from {list(ALL_METHODS)}")
    return list(dict.fromkeys(methods))


def _split(exp: Experiment, sites: list[data.SiteData], seed: int) -> list[data.SiteSplit]:
    splits = [
        data.split_site(s, exp.train.test_fraction, data.stream_rng(exp.seed, seed, "split", s.site))
        for s in sites
    ]
    for split, site in zip(splits, sites, strict=True):
        if len(split.y_train) == 0:
            raise data.FeatureDataError(
                f"{site.path}: site {site.site!r} has no training rows after the split"
            )
    return splits


def _round_tracker(pooled_test: tuple[np.ndarray, np.ndarray], sink: list[float | None]) -> RoundCallback:
    """Scores the global model on the pooled test set after every round (reporting only)."""
    x, y = pooled_test

    def on_round(_: int, weights: list[np.ndarray], __: float) -> None:
        sink.append(float(roc_auc_score(y, forward_numpy(weights, x))) if len(np.unique(y)) == 2 else None)

    return on_round


def _resamples(exp_seed: int, seed: int, splits: list[data.SiteSplit], n: int) -> dict[str, list[np.ndarray]]:
    per_site = {
        s.site: evaluate.patient_resamples(s.test_patient, n, data.stream_rng(exp_seed, seed, "boot", s.site))
        for s in splits
    }
    per_site[POOLED_TEST] = (
        evaluate.pooled_resamples(list(per_site.values()), [len(s.y_test) for s in splits]) if n else []
    )
    return per_site


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
    exp: Experiment,
    run: str | None,
    runner: Runner,
    methods: list[str],
    sites: list[data.SiteData],
    n_features: int,
) -> dict[str, Any]:
    cfg = exp.train
    raw = {s.site: s.file_bytes for s in sites}
    weights = initial_weights(cfg.model, n_features, 0)
    federated = [m for m in methods if m in fedavg.FEDERATED_METHODS or m in CONTROL_VARIATE_METHODS]
    if federated:
        process = runner.any_process() or runner.process("fedavg", cfg.client_lr, runner.aggregation(0))
        out = comms.communication(
            runner.tff,
            runner.model_fn,
            process,
            weights,
            federated + [m for m in methods if m in SEQUENTIAL_METHODS],
            len(sites),
            cfg.rounds,
            raw,
            runner.clients_per_round,
        )
    elif "cyclic" in methods:
        out = comms.sequential_communication(weights, len(sites), runner.clients_per_round, cfg.rounds, raw)
    else:
        return {"methods": [], "raw_data_bytes": int(sum(raw.values())), "raw_data_bytes_per_site": raw}
    out["per_method"] = {
        m: _method_bytes(out, m, weights, cfg.quantize_bits, runner) for m in methods if m in CURVE_METHODS
    }
    if cfg.quantize_bits:
        out["quantization"] = _quantization_summary(out, weights, cfg.quantize_bits)
    export_dirs = {s.site: exp.data_path("export", run, s.site) for s in sites}
    centralized = comms.centralized_bytes(export_dirs, raw)
    n_patients = int(sum(len(np.unique(s.patient_id)) for s in sites))
    out["centralized"] = {**centralized, "n_patients": n_patients}
    out["crossover_patients"] = {
        alternative: {
            m: comms.crossover_patients(info["total_bytes"], size, n_patients)
            for m, info in out["per_method"].items()
        }
        for alternative, size in centralized.items()
    }
    return out


def _method_bytes(
    base: dict[str, Any], method: str, weights: list[np.ndarray], bits: int | None, runner: Runner
) -> dict[str, Any]:
    participants = base["clients_per_round"]
    if method == "cyclic":
        down, up = int(sum(w.nbytes for w in weights)), 0
        counting = "one model transfer per site visit"
    elif method == "scaffold":
        process = next(iter(runner.scaffolds.values()), None) or runner.scaffold_process(runner.cfg.client_lr)
        down, up = comms.scaffold_round_bytes(runner.tff, process.process, runner.model_fn)
        counting = "model and server control variate down; model delta + control delta + metrics up"
    else:
        down, up = base["bytes_down_per_client_per_round"], base["bytes_up_per_client_per_round"]
        counting = "broadcast weights down; delta + client weight + metrics up"
        if bits:
            up += quantize.encoded_bytes([w.shape for w in weights], bits) - int(
                sum(w.nbytes for w in weights)
            )
            counting += f"; delta quantized to {bits} bits"
    per_round = participants * (down + up)
    return {
        "bytes_down_per_client_per_round": down,
        "bytes_up_per_client_per_round": up,
        "clients_per_round": participants,
        "bytes_per_round": per_round,
        "total_bytes": per_round * base["rounds"],
        "counting": counting,
    }


def _quantization_summary(base: dict[str, Any], weights: list[np.ndarray], bits: int) -> dict[str, Any]:
    raw_delta = int(sum(w.nbytes for w in weights))
    encoded = quantize.encoded_bytes([w.shape for w in weights], bits)
    up = base["bytes_up_per_client_per_round"]
    return {
        "bits": bits,
        "delta_bytes_float32": raw_delta,
        "delta_bytes_quantized": encoded,
        "delta_ratio": encoded / raw_delta,
        "bytes_up_per_client_per_round_unquantized": up,
        "bytes_up_per_client_per_round_quantized": up - raw_delta + encoded,
        "encoding": "per tensor: ceil(n*bits/32) int32 words + float32 min and max; deterministic rounding",
    }


def _comm_curve(
    communication: dict[str, Any],
    methods: list[str],
    round_auroc: dict[str, dict[int, list[float | None]]],
    runner: Runner,
    cfg: Any,
) -> dict[str, list[dict[str, Any]]]:
    """Per method and round: cumulative bytes and the pooled-test AUROC (mean over seeds)."""
    curves = {}
    for method in methods:
        if method not in round_auroc:
            continue
        per_round = communication["per_method"][method]["bytes_per_round"]
        points = []
        for r in range(cfg.rounds):
            values = [v[r] for v in round_auroc[method].values() if v[r] is not None]
            points.append(
                {
                    "round": r + 1,
                    "cumulative_bytes": per_round * (r + 1),
                    "auroc_pooled": float(np.mean(values)) if values else None,
                    "n_seeds": len(values),
                }
            )
        curves[method] = points
    return curves


def _privacy_records(runner: Runner, methods: list[str]) -> dict[str, Any]:
    cfg, dp = runner.cfg, runner.cfg.privacy
    clipping = "fixed"
    note = None
    if dp.adaptive_clipping:
        reason = privacy.adaptive_clipping_builds(
            runner.tff, dp.noise_multiplier, runner.clients_per_round, dp.clip
        )
        note = (
            f"adaptive clipping unavailable ({reason}); fixed clipping used"
            if reason
            else "adaptive clipping builds here but fedlab runs fixed clipping with seeded noise"
        )
    record = privacy.privacy_record(
        dp.noise_multiplier,
        dp.clip,
        runner.clients_per_round,
        runner.n_sites,
        cfg.rounds,
        dp.target_delta,
        clipping,
    )
    if note:
        record["adaptive_clipping"] = note
    out: dict[str, Any] = {m: record for m in methods if m in fedavg.FEDERATED_METHODS}
    for m in methods:
        if m not in fedavg.FEDERATED_METHODS:
            out[m] = {
                "applied": False,
                "reason": "differential privacy applies to the TFF aggregation methods only",
            }
    return out


def _privacy_sweep(
    runner: Runner, first: tuple[list[data.SiteSplit], Scaled], chosen: dict[str, float], progress: bool
) -> list[dict[str, Any]]:
    """FedAvg at every noise multiplier of `privacy.sweep`, first seed: pooled AUROC vs epsilon."""
    cfg, dp = runner.cfg, runner.cfg.privacy
    seed = cfg.seeds[0]
    splits, scaled = first
    x, y = scaled.tests[POOLED_TEST]
    init = initial_weights(cfg.model, scaled.train[0].shape[1], seed)
    curve = []
    for noise in dp.sweep:
        init_tff(seed)
        trained = runner.run(
            "fedavg",
            seed,
            init,
            splits,
            scaled.train,
            chosen.get("fedavg", cfg.client_lr),
            aggregation=runner.aggregation(seed, noise_multiplier=float(noise)),
        )[0]
        auroc = float(roc_auc_score(y, forward_numpy(trained.weights, x))) if len(np.unique(y)) == 2 else None
        eps = privacy.epsilon(
            float(noise), runner.clients_per_round / runner.n_sites, cfg.rounds, dp.target_delta
        )
        curve.append(
            {
                "noise_multiplier": float(noise),
                "epsilon": eps,
                "auroc_pooled": auroc,
                "delta": dp.target_delta,
                "rounds": cfg.rounds,
                "seed": seed,
            }
        )
        if progress:
            print(f"[train] DP sweep noise {noise:g}: epsilon {eps}, pooled AUROC {auroc}", flush=True)
    return curve


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
