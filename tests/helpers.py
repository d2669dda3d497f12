"""Small builders shared by several test modules (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def smoke_experiment_in(folder: Path, overrides: dict[str, Any] | None = None):
    """configs/smoke.yaml copied into `folder`, so its data and reports land there."""
    from fedlab.config import load_experiment

    configs = folder / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "configs" / "smoke.yaml", configs / "smoke.yaml")
    return load_experiment(configs / "smoke.yaml", overrides)


def linear_split(site: str, n_rows: int, seed: int, n_features: int = 3):
    """A training split with a linear signal on the first two features and no test rows."""
    from fedlab.federated.data import SiteSplit

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_rows, n_features)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] + rng.normal(scale=0.3, size=n_rows) > 0).astype(np.float32)
    return SiteSplit(site, x, y, x[:0], y[:0], np.array([], dtype=str), True)


def write_bulk(folder: Path, resources: dict[str, list[dict[str, Any]]], compact: bool = True) -> Path:
    """`folder/bulk/<Type>.ndjson`. Compact lines (as generated) take the server's no-parse fast path."""
    bulk = folder / "bulk"
    bulk.mkdir(parents=True, exist_ok=True)
    separators = (",", ":") if compact else (", ", ": ")
    for name, rows in resources.items():
        (bulk / f"{name}.ndjson").write_text("".join(json.dumps(r, separators=separators) + "\n" for r in rows))
    return bulk
