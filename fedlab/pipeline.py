"""`fedlab reproduce`: the cached stage graph, executed as notebooks with papermill.

Stages run in order (generate → export → flatten → features → train → report), each as its
notebook in its own kernel, with the config path and run name injected into the `parameters`
cell; executed copies (and HTML) are saved under `reports/<run>/notebooks/`.

Each stage has a stamp: a hash of its parameters, its code, the lock file and the stamp of the
stage before it. A stage whose stamp matches its last successful run and whose outputs are
complete is skipped. A stage that was interrupted under the same stamp resumes (its finished
sites are kept); a stage whose stamp changed is redone from scratch. `force` names stages to redo,
`start_from` redoes a stage and everything after it. A failing notebook stops the run with the
notebook, the cell and the error named.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlab.config import Experiment, load_experiment
from fedlab.errors import FedlabError
from fedlab.io import is_complete, read_json, write_json

PACKAGE = Path(__file__).resolve().parent
PROJECT = PACKAGE.parent
NOTEBOOKS_DIR = PROJECT / "notebooks"
LOCK_FILE = PROJECT / "requirements" / "lock.txt"
KERNEL = "python3"


@dataclass(frozen=True)
class Stage:
    name: str
    notebook: str
    config_keys: tuple[str, ...]
    code: tuple[str, ...]
    outputs_complete: Callable[[Experiment, str], bool]


def _sites_complete(stage_dir: str) -> Callable[[Experiment, str], bool]:
    def check(exp: Experiment, run: str) -> bool:
        return all(is_complete(exp.data_path(stage_dir, run, site)) for site in exp.site_ids)
    return check


def _report_file(name: str) -> Callable[[Experiment, str], bool]:
    return lambda exp, run: (exp.report_path(run) / name).is_file()


STAGES: tuple[Stage, ...] = (
    Stage("generate", "01_synthea_generation.ipynb", ("seed", "sites", "generate"), ("synthea",),
          _sites_complete("synthea")),
    Stage("export", "02_bulk_export_smart.ipynb", ("export",), ("fhir",), _sites_complete("export")),
    Stage("flatten", "03_fhiry_flattening.ipynb", ("flatten",), ("flatten.py", "harmonization", "views"),
          _sites_complete("tables")),
    Stage("features", "04_spark_features.ipynb", ("seed", "task"), ("features.py", "spark.py"),
          _sites_complete("features")),
    Stage("train", "05_federated_training.ipynb", ("seed", "train"), ("federated", "tffctx.py"),
          _report_file("results.json")),
    Stage("report", "06_report.ipynb", (), ("report.py",), _report_file("results.md")),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
PIPELINE_NOTEBOOKS = tuple(s.notebook for s in STAGES)


# ---------- stamps ----------

def _hash_paths(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
            if path.is_dir() else [path]
        for file in files:
            if file.exists():
                name = file.relative_to(PROJECT) if file.is_relative_to(PROJECT) else file.name
                digest.update(str(name).encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()


def stage_stamp(stage: Stage, exp: Experiment, upstream: str, notebooks_dir: Path = NOTEBOOKS_DIR) -> str:
    config = exp.model_dump(mode="json")
    params = {key: config.get(key) for key in stage.config_keys}
    parts = {
        "stage": stage.name,
        "params": params,
        "code": _hash_paths([PACKAGE / c for c in stage.code] + [PACKAGE / "config.py", PACKAGE / "io.py",
                                                                 notebooks_dir / stage.notebook]),
        "lock": _hash_paths([LOCK_FILE]),
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def config_fingerprint(exp: Experiment) -> str:
    payload = json.dumps(exp.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class StampBook:
    """`reports/<run>/stamps.json`: per stage, the stamp of the last started and finished run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = read_json(path) if path.is_file() else {}

    def done(self, stage: str) -> str | None:
        return self.entries.get(stage, {}).get("done")

    def started(self, stage: str) -> str | None:
        return self.entries.get(stage, {}).get("started")

    def record(self, stage: str, **fields: Any) -> None:
        self.entries.setdefault(stage, {}).update(fields)
        write_json(self.path, self.entries)


# ---------- running notebooks ----------

def _failure_message(notebook: str, err: Exception) -> str:
    cell = getattr(err, "exec_count", None)
    ename = getattr(err, "ename", type(err).__name__)
    evalue = getattr(err, "evalue", str(err))
    where = f"cell [{cell}]" if cell is not None else "a cell"
    return f"notebook {notebook} failed in {where}: {ename}: {evalue}"


def _check_parameters_cell(source: Path) -> None:
    import nbformat

    nb = nbformat.read(source, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise FedlabError(f"{source}: expected exactly one cell tagged `parameters`, found {len(tagged)}; "
                          "restore it (see the notebook's .py twin) so parameters can be injected")


def run_notebook(source: Path, output: Path, parameters: dict[str, Any], cwd: Path) -> float:
    """Execute one notebook with papermill in its own kernel; return the seconds it took."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    _check_parameters_cell(source)
    started = time.perf_counter()
    saved = {k: os.environ.get(k) for k in ("MPLBACKEND", "TQDM_DISABLE")}
    os.environ["MPLBACKEND"] = "Agg"  # batch mode: no GUI backend in the kernels
    os.environ["TQDM_DISABLE"] = "1"  # progress bars would be saved stuck at 0%
    try:
        pm.execute_notebook(str(source), str(output), parameters=parameters, kernel_name=KERNEL,
                            cwd=str(cwd), progress_bar=False, log_output=False)
    except PapermillExecutionError as err:
        raise FedlabError(_failure_message(source.name, err) + f"\n  executed copy: {output}") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    _write_html(output)
    return time.perf_counter() - started


def _write_html(notebook: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    from fedlab.io import atomic_open

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    with atomic_open(notebook.with_suffix(".html"), "w", encoding="utf-8") as handle:
        handle.write(body)


# ---------- the graph ----------

def _stage_names(names: list[str] | None, what: str) -> list[str]:
    chosen = []
    for wanted in names or []:
        match = [s.name for s in STAGES if wanted in (s.name, s.notebook) or s.notebook.startswith(wanted)]
        if not match:
            raise FedlabError(f"{what}: no stage named {wanted!r} (stages: {', '.join(STAGE_NAMES)})")
        chosen.extend(match)
    return chosen


def plan(exp: Experiment, run: str, force: list[str], start_from: str | None,
         notebooks_dir: Path = NOTEBOOKS_DIR) -> list[dict[str, Any]]:
    """Decide, per stage, whether to skip, resume or redo it, and why."""
    book = StampBook(exp.report_path(run) / "stamps.json")
    redo_from = STAGE_NAMES.index(start_from) if start_from else len(STAGES)
    upstream = ""
    steps = []
    for index, stage in enumerate(STAGES):
        stamp = stage_stamp(stage, exp, upstream, notebooks_dir)
        upstream = stamp
        executed = exp.report_path(run) / "notebooks" / stage.notebook
        complete = stage.outputs_complete(exp, run)
        if index >= redo_from or stage.name in force:
            action, why = "redo", "asked for"
        elif book.done(stage.name) == stamp and complete and executed.is_file():
            action, why = "skip", "stamp matches and outputs are complete"
        elif book.done(stage.name) == stamp or book.started(stage.name) == stamp:
            action, why = "resume", "outputs incomplete (deleted or interrupted) under the same stamp"
        elif book.done(stage.name) or book.started(stage.name):
            action, why = "redo", "parameters, code or inputs changed"
        else:
            action, why = "resume", "first run"
        steps.append({"stage": stage.name, "notebook": stage.notebook, "stamp": stamp, "action": action,
                      "why": why})
    return steps


def reproduce(config: str | os.PathLike[str], run: str | None = None, overrides: dict[str, Any] | None = None,
              force: bool | list[str] = False, start_from: str | None = None, notebooks: list[str] | None = None,
              notebooks_dir: Path = NOTEBOOKS_DIR, echo: Callable[[str], None] = print) -> Path:
    """Run the cached stage graph for `config`; return the run's report folder.

    `force=True` redoes every stage; a list redoes the named stages. `notebooks` limits the run
    to the named stages (by stage name or notebook prefix).
    """
    config_path = Path(config).resolve()
    exp = load_experiment(config_path, overrides)
    run = run or exp.name
    forced = list(STAGE_NAMES) if force is True else _stage_names(force or [], "--force")
    start = _stage_names([start_from], "--from")[0] if start_from else None
    only = set(_stage_names(notebooks, "--notebook")) if notebooks else set(STAGE_NAMES)
    out_dir = exp.report_path(run) / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides_path = write_json(out_dir.parent / "overrides.json", overrides) if overrides else None
    book = StampBook(exp.report_path(run) / "stamps.json")
    timings = []
    for step in plan(exp, run, forced, start, notebooks_dir):
        name, notebook = step["stage"], step["notebook"]
        if name not in only:
            continue
        if step["action"] == "skip":
            echo(f"[fedlab reproduce] {name}: cached ({step['why']})")
            continue
        echo(f"[fedlab reproduce] {name}: {step['action']} ({step['why']}) -> {notebook}")
        book.record(name, started=step["stamp"])
        params = {"config": str(config_path), "run": run, "force": step["action"] == "redo",
                  "overrides": str(overrides_path) if overrides_path else ""}
        source = notebooks_dir / notebook
        if not source.is_file():
            raise FedlabError(f"notebook {source} not found")
        seconds = run_notebook(source, out_dir / notebook, params, notebooks_dir)
        if not STAGES[STAGE_NAMES.index(name)].outputs_complete(exp, run):
            raise FedlabError(f"stage {name}: {notebook} finished but its outputs are incomplete")
        book.record(name, done=step["stamp"], finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        timings.append({"stage": name, "notebook": notebook, "seconds": round(seconds, 2)})
        echo(f"[fedlab reproduce] {name}: done in {seconds:.1f} s")
    _record_timings(exp, run, timings)
    report = exp.report_path(run)
    echo(f"[fedlab reproduce] report: {report / 'results.md'}")
    return report


def _record_timings(exp: Experiment, run: str, timings: list[dict[str, Any]]) -> None:
    manifest_path = exp.report_path(run) / "manifest.json"
    if not manifest_path.is_file() or not timings:
        return
    manifest = read_json(manifest_path)
    previous = {t["stage"]: t for t in manifest.get("notebook_timings") or [] if "stage" in t}
    previous.update({t["stage"]: t for t in timings})
    manifest["notebook_timings"] = [previous[s] for s in STAGE_NAMES if s in previous]
    write_json(manifest_path, manifest)


def load_for_notebook(config: str, overrides: str = "") -> Experiment:
    """What a notebook's first code cell calls: the config plus the overrides reproduce passed."""
    extra = read_json(overrides) if overrides else None
    return load_experiment(config, extra)
