"""Shared machinery of the train stage, LR tuning and interactive training: feature scaling,
one dispatcher that trains any method, and the cache of built TFF processes.

Scaling (`train.scaling`): `federated` standardizes with the mean and standard deviation of the
union of the training splits, computed from per-site sufficient statistics summed by a
`tff.federated_sum`; `per_site` standardizes each site with its own training statistics (its
test set too), so nothing leaves a site. NaN -> 0 after scaling in both cases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from fedlab.config import Experiment, TrainConfig
from fedlab.federated import cyclic, data, fedavg, local, pooled, scaffold
from fedlab.federated.fedavg import Aggregation, RoundCallback

POOLED_TEST = "pooled"
SEQUENTIAL_METHODS = ("cyclic",)
CONTROL_VARIATE_METHODS = ("scaffold",)  # stateful clients: not a tff.learning LearningProcess


@dataclass(frozen=True)
class Scaled:
    train: list[np.ndarray]
    tests: dict[str, tuple[np.ndarray, np.ndarray]]  # site id or "pooled" -> (x, y)
    info: dict[str, Any]


def scale(tff: ModuleType, splits: list[data.SiteSplit], scaling: str) -> Scaled:
    """Scale training and test features (test rows with the statistics of training rows only)."""
    if scaling == "per_site":
        scalers = [data.scaler_from_statistics(data.site_statistics(s.x_train)) for s in splits]
        info = {
            "method": "per-site mean/sd of each site's own training split; NaN -> 0 after scaling",
            "per_site": {
                s.site: {"mean": sc.mean.tolist(), "std": sc.std.tolist()}
                for s, sc in zip(splits, scalers, strict=True)
            },
        }
    elif scaling == "federated":
        stats = data.federated_statistics(tff, [data.site_statistics(s.x_train) for s in splits])
        scaler = data.scaler_from_statistics(stats)
        scalers = [scaler] * len(splits)
        info = {
            "method": "federated sum of per-site count/sum/sum of squares; NaN -> 0 after scaling",
            "mean": scaler.mean.tolist(),
            "std": scaler.std.tolist(),
        }
    else:
        raise ValueError(f"train.scaling must be 'federated' or 'per_site', got {scaling!r}")
    train = [sc.transform(s.x_train) for s, sc in zip(splits, scalers, strict=True)]
    tests = {s.site: (sc.transform(s.x_test), s.y_test) for s, sc in zip(splits, scalers, strict=True)}
    tests[POOLED_TEST] = (
        np.concatenate([t[0] for t in tests.values()]),
        np.concatenate([s.y_test for s in splits]),
    )
    return Scaled(train, tests, info)


def noise_seed(exp_seed: int, seed: int) -> int:
    return int(data.stream_rng(exp_seed, seed, "dp-noise").integers(2**31 - 1))


@dataclass
class Runner:
    """Trains any method; TFF processes are built once per (method, LR, aggregation) and reused."""

    tff: ModuleType
    exp: Experiment
    model_fn: Any
    n_sites: int
    processes: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    scaffolds: dict[tuple[float, float], scaffold.ScaffoldProcess] = field(default_factory=dict)
    build_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def cfg(self) -> TrainConfig:
        return self.exp.train

    @property
    def clients_per_round(self) -> int:
        return min(self.cfg.clients_per_round or self.n_sites, self.n_sites)

    def aggregation(self, seed: int, noise_multiplier: float | None = None) -> Aggregation:
        """The configured aggregation; `noise_multiplier` overrides (and enables) privacy."""
        dp = self.cfg.privacy
        noise = (
            noise_multiplier
            if noise_multiplier is not None
            else (dp.noise_multiplier if dp.enabled else None)
        )
        return Aggregation(
            quantize_bits=self.cfg.quantize_bits,
            noise_multiplier=noise,
            clip=dp.clip,
            clients_per_round=self.clients_per_round,
            noise_seed=noise_seed(self.exp.seed, seed) if noise is not None else 0,
        )

    def process(self, method: str, lr: float, aggregation: Aggregation) -> Any:
        key = (method, lr, aggregation)
        if key not in self.processes:
            start = time.perf_counter()
            self.processes[key] = fedavg.build_process(
                self.tff, method, self.model_fn, self.cfg, client_lr=lr, aggregation=aggregation
            )
            self.build_seconds[f"{method}:lr={lr:g}"] = time.perf_counter() - start
        return self.processes[key]

    def scaffold_process(self, lr: float) -> scaffold.ScaffoldProcess:
        server_lr = self.cfg.server_lrs.get("scaffold", self.cfg.server_lr)
        key = (lr, server_lr)
        if key not in self.scaffolds:
            start = time.perf_counter()
            self.scaffolds[key] = scaffold.build_scaffold(self.tff, self.model_fn, lr, server_lr, self.n_sites)
            self.build_seconds[f"scaffold:lr={lr:g}"] = time.perf_counter() - start
        return self.scaffolds[key]

    def any_process(self) -> Any:
        return next(iter(self.processes.values())) if self.processes else None

    def run(
        self,
        method: str,
        seed: int,
        init: list[np.ndarray],
        splits: list[data.SiteSplit],
        scaled_train: list[np.ndarray],
        lr: float,
        aggregation: Aggregation | None = None,
        on_round: RoundCallback | None = None,
    ) -> list[local.Trained]:
        cfg, exp_seed = self.cfg, self.exp.seed
        common = dict(
            exp_seed=exp_seed,
            seed=seed,
            batch_size=cfg.batch_size,
            lr=lr,
            rounds=cfg.rounds,
            local_steps=cfg.local_steps,
        )
        if method == "local":
            return local.train_local(cfg.model, init, splits, scaled_train, **common)
        if method == "pooled":
            return [pooled.train_pooled(cfg.model, init, splits, scaled_train, **common)]
        if method == "cyclic":
            return [
                cyclic.train_cyclic(cfg.model, init, splits, scaled_train, exp_seed, seed, cfg, lr, on_round)
            ]
        if method in fedavg.FEDERATED_METHODS:
            process = self.process(method, lr, aggregation or self.aggregation(seed))
            return [
                fedavg.train_federated(
                    self.tff, method, process, init, splits, scaled_train, exp_seed, seed, cfg, on_round
                )
            ]
        if method == "scaffold":
            requested = aggregation or self.aggregation(seed)
            if requested.private or requested.quantize_bits:
                raise ValueError(
                    "scaffold runs with exact aggregation only: turn off train.privacy.enabled and "
                    "train.quantize_bits, or leave scaffold out of train.methods"
                )
            process = self.scaffold_process(lr)
            return [
                scaffold.train_scaffold(
                    self.tff, process, init, splits, scaled_train, exp_seed, seed, cfg, on_round
                )
            ]
        raise ValueError(f"unknown training method {method!r}")
