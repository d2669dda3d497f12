"""`fedlab reproduce`: run the stage notebooks in order with papermill, one kernel each.

Each notebook gets the config path and run name injected into its `parameters` cell and is
saved, executed, under `reports/<run>/notebooks/`. A failing notebook stops the run with the
notebook, the cell and the error named. Stages skip outputs that are already complete, so a
rerun after an interruption resumes; a changed configuration forces every stage to redo its work.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlab.config import Experiment, load_experiment
from fedlab.errors import FedlabError
from fedlab.io import read_json, write_json

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
PIPELINE_NOTEBOOKS = (
    "01_synthea_generation.ipynb",
    "02_bulk_export_smart.ipynb",
    "03_fhiry_flattening.ipynb",
    "04_spark_features.ipynb",
    "05_federated_training.ipynb",
    "06_report.ipynb",
)
KERNEL = "python3"


@dataclass(frozen=True)
class NotebookRun:
    name: str
    output: Path
    seconds: float


def config_fingerprint(exp: Experiment) -> str:
    payload = json.dumps(exp.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _config_changed(exp: Experiment, run: str) -> bool:
    stamp = exp.report_path(run) / "config_fingerprint.json"
    if not stamp.is_file():
        return False
    return read_json(stamp).get("fingerprint") != config_fingerprint(exp)


def _failure_message(notebook: str, err: Exception) -> str:
    cell = getattr(err, "exec_count", None)
    ename = getattr(err, "ename", type(err).__name__)
    evalue = getattr(err, "evalue", str(err))
    where = f"cell [{cell}]" if cell is not None else "a cell"
    return f"notebook {notebook} failed in {where}: {ename}: {evalue}"


def run_notebook(source: Path, output: Path, parameters: dict[str, Any], cwd: Path) -> float:
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    started = time.perf_counter()
    env_backup = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "Agg"  # batch mode: no GUI backend in the kernels
    try:
        pm.execute_notebook(str(source), str(output), parameters=parameters, kernel_name=KERNEL,
                            cwd=str(cwd), progress_bar=False, log_output=False)
    except PapermillExecutionError as err:
        raise FedlabError(_failure_message(source.name, err) + f"\n  executed copy: {output}") from None
    finally:
        if env_backup is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = env_backup
    return time.perf_counter() - started


def reproduce(config: str | os.PathLike[str], run: str | None = None, overrides: dict[str, Any] | None = None,
              force: bool = False, notebooks: list[str] | None = None,
              notebooks_dir: Path = NOTEBOOKS_DIR) -> Path:
    """Run the pipeline notebooks for `config`; return the run's report folder."""
    config_path = Path(config).resolve()
    exp = load_experiment(config_path, overrides)
    run = run or exp.name
    force = force or _config_changed(exp, run)
    out_dir = exp.report_path(run) / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides_path = None
    if overrides:
        overrides_path = write_json(out_dir.parent / "overrides.json", overrides)
    selected = _select(notebooks)
    timings: list[dict[str, Any]] = []
    for name in selected:
        source = notebooks_dir / name
        if not source.is_file():
            raise FedlabError(f"notebook {source} not found")
        params = {"config": str(config_path), "run": run, "force": force,
                  "overrides": str(overrides_path) if overrides_path else ""}
        print(f"[fedlab reproduce] {name} ...", flush=True)
        seconds = run_notebook(source, out_dir / name, params, notebooks_dir)
        timings.append({"notebook": name, "seconds": round(seconds, 2)})
        print(f"[fedlab reproduce] {name} done in {seconds:.1f} s", flush=True)
    write_json(exp.report_path(run) / "config_fingerprint.json", {"fingerprint": config_fingerprint(exp)})
    _record_timings(exp, run, timings)
    report = exp.report_path(run)
    print(f"[fedlab reproduce] report: {report / 'results.md'}")
    return report


def _select(notebooks: list[str] | None) -> list[str]:
    if not notebooks:
        return list(PIPELINE_NOTEBOOKS)
    chosen = []
    for wanted in notebooks:
        match = [n for n in PIPELINE_NOTEBOOKS if n == wanted or n.startswith(wanted)]
        if not match:
            raise FedlabError(f"no pipeline notebook matches {wanted!r} (have: {', '.join(PIPELINE_NOTEBOOKS)})")
        chosen.extend(m for m in match if m not in chosen)
    return chosen


def _record_timings(exp: Experiment, run: str, timings: list[dict[str, Any]]) -> None:
    manifest_path = exp.report_path(run) / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    manifest["notebook_timings"] = timings
    write_json(manifest_path, manifest)


def load_for_notebook(config: str, overrides: str = "") -> Experiment:
    """What a notebook's first code cell calls: the config plus the overrides reproduce passed."""
    extra = read_json(overrides) if overrides else None
    return load_experiment(config, extra)
