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

A redone per-site stage first removes its sites' old outputs, so a redo killed midway resumes
without keeping sites built under the previous stamp.

`parallel=N` runs the sites of generate, export and flatten in up to N worker processes (capped
by available memory over a per-site estimate) before the stage's notebook, which then finds every
site complete and only shows the data. Each site's output depends only on its own inputs, so the
files are the same as a serial run's. features stays serial: all sites share one Spark session,
which already uses every core.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from fedlab.config import Experiment, load_experiment, override_strings, parse_overrides
from fedlab.errors import FedlabError
from fedlab.io import read_json, write_json
from fedlab.notebooks import run_notebook
from fedlab.stages import (
    NOTEBOOKS_DIR,
    PIPELINE_NOTEBOOKS,
    STAGE_NAMES,
    STAGES,
    Stage,
    StampBook,
    output_fingerprint,
    site_done,
    stage_stamp,
    staleness,
)

__all__ = ["PIPELINE_NOTEBOOKS", "STAGES", "STAGE_NAMES", "load_for_notebook", "plan", "reproduce",
           "run_notebook"]

# ---------- sites in parallel ----------

# Stage function of each stage whose sites may run in separate processes.
PARALLEL_STAGES: dict[str, tuple[str, str]] = {
    "generate": ("fedlab.synthea", "generate"),
    "export": ("fedlab.fhir.export", "export"),
    "flatten": ("fedlab.flatten", "flatten"),
}
# Peak resident memory of one site's worker, in MB: a fixed part (interpreter, imports) plus a part
# per patient. About twice what was measured on quickstart sites (flatten peaked at 165 MB for 80
# patients and 186 MB for 160; generate streams patients and export streams files, ~60-75 MB flat).
# generate's fixed part counts once per `generate.workers` process.
SITE_MEMORY_MB: dict[str, tuple[float, float]] = {
    "generate": (150.0, 0.05),
    "export": (150.0, 0.2),
    "flatten": (250.0, 0.5),
}
MEMORY_HEADROOM = 0.8  # use at most this share of the memory available now


def available_memory_mb() -> float:
    """Memory available to new processes now (psutil, else /proc/meminfo's MemAvailable)."""
    try:
        import psutil

        return psutil.virtual_memory().available / 2**20
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise FedlabError("cannot tell the available memory (no psutil, no /proc/meminfo); run without --parallel")


def site_memory_mb(stage: str, patients: int, processes: int = 1) -> float:
    """Estimated peak memory of one site of `stage`; `processes`: worker processes that site uses."""
    fixed, per_patient = SITE_MEMORY_MB[stage]
    return fixed * processes + per_patient * patients


def parallel_workers(requested: int, stage: str, patients: list[int], available_mb: float,
                     processes: int = 1) -> int:
    """How many sites of `stage` to run at once: at most `requested`, one per site, and as many as
    fit in the available memory when the largest sites run together (never fewer than one)."""
    if requested < 1:
        raise FedlabError(f"--parallel must be at least 1, not {requested}")
    budget = available_mb * MEMORY_HEADROOM
    needs = sorted((site_memory_mb(stage, n, processes) for n in patients), reverse=True)
    fit = 0
    while fit < len(needs) and sum(needs[:fit + 1]) <= budget:
        fit += 1
    return max(1, min(requested, len(patients), fit))


def _run_site(stage: str, config: str, overrides: dict[str, Any] | None, run: str, site: str) -> str:
    """One site of one stage, in a worker process."""
    import importlib

    module, function = PARALLEL_STAGES[stage]
    exp = load_experiment(config, overrides)
    stage_function = getattr(importlib.import_module(module), function)
    stage_function(exp, run, sites=[site], force=False, progress=False)
    return site


def run_sites_parallel(stage: str, config: Path, overrides: dict[str, Any] | None, run: str,
                       sites: list[str], workers: int) -> None:
    """Run `stage` for `sites` in `workers` spawned processes; the first failure stops the stage."""
    context = multiprocessing.get_context("spawn")  # no inherited threads or open sessions
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_run_site, stage, str(config), overrides, run, site): site for site in sites}
        for future in as_completed(futures):
            try:
                future.result()
            except Exception as err:  # noqa: BLE001 - re-raised with the site named
                for other in futures:
                    other.cancel()
                raise FedlabError(f"stage {stage}, site {futures[future]}: {type(err).__name__}: {err}") from err


def _parallel_sites(stage: Stage, exp: Experiment, run: str, config: Path, overrides: dict[str, Any] | None,
                    requested: int, echo: Callable[[str], None]) -> None:
    todo = [s for s in exp.site_ids if not site_done(exp.data_path(stage.site_dir or "", run, s))]
    if not todo:
        return
    available = available_memory_mb()
    patients = [exp.site(s).patients for s in todo]
    processes = exp.generate.workers if stage.name == "generate" else 1
    workers = parallel_workers(requested, stage.name, patients, available, processes)
    largest = max(site_memory_mb(stage.name, n, processes) for n in patients)
    echo(f"[fedlab reproduce] {stage.name}: {len(todo)} site(s) on {workers} worker(s) (--parallel {requested}; "
         f"{available:.0f} MB available, up to ~{largest:.0f} MB per site)")
    run_sites_parallel(stage.name, config, overrides, run, todo, workers)


def _clear_site_outputs(stage: Stage, exp: Experiment, run: str) -> None:
    """Before a redo: remove the old per-site outputs, so that if the redo is killed, resuming it
    rebuilds every site instead of keeping those made under the previous stamp."""
    if stage.site_dir is None:
        return
    for site in exp.site_ids:
        shutil.rmtree(exp.data_path(stage.site_dir, run, site), ignore_errors=True)


# ---------- the graph ----------

def _stage_names(names: list[str] | None, what: str) -> list[str]:
    chosen = []
    for wanted in names or []:
        match = [s.name for s in STAGES if wanted in (s.name, s.notebook) or s.notebook.startswith(wanted)]
        if not match:
            raise FedlabError(f"{what}: no stage named {wanted!r} (stages: {', '.join(STAGE_NAMES)})")
        chosen.extend(match)
    return chosen


def _previous(stage: Stage) -> Stage | None:
    index = STAGES.index(stage)
    return STAGES[index - 1] if index else None


def plan(exp: Experiment, run: str, force: list[str], start_from: str | None,
         notebooks_dir: Path = NOTEBOOKS_DIR) -> list[dict[str, Any]]:
    """Decide, per stage, whether to skip, resume or redo it, and why."""
    book = StampBook(exp.report_path(run) / "stamps.json")
    redo_from = STAGE_NAMES.index(start_from) if start_from else len(STAGES)
    upstream, redone = "", start_from or ""
    steps = []
    for index, stage in enumerate(STAGES):
        stamp = stage_stamp(stage, exp, upstream, notebooks_dir)
        upstream = stamp
        executed = exp.report_path(run) / "notebooks" / stage.notebook
        complete = stage.outputs_complete(exp, run)
        # after a resumed stage, whether its outputs came out the same is checked when it has run
        upstream_resumes = bool(steps) and steps[-1]["action"] == "resume"
        stale = staleness(book, stage, None if upstream_resumes else _previous(stage), stamp, exp, run)
        if stage.name in force or (start_from and index >= redo_from):
            action, why = "redo", "asked for"
        elif index >= redo_from:
            action, why = "redo", f"after {redone} is redone"
        elif book.done(stage.name) == stamp and complete and executed.is_file() and stale:
            action, why = "redo", stale
        elif book.done(stage.name) == stamp and complete and executed.is_file():
            action, why = "skip", "stamp matches and outputs are complete"
        elif book.done(stage.name) == stamp or book.started(stage.name) == stamp:
            action, why = "resume", "outputs incomplete (deleted or interrupted) under the same stamp"
        elif book.done(stage.name) or book.started(stage.name):
            action, why = "redo", "parameters, code or inputs changed"
        else:
            action, why = "resume", "first run"
        if action == "redo" and index < redo_from:
            redo_from, redone = index + 1, stage.name  # what a redone stage feeds is redone too
        steps.append({"stage": stage.name, "notebook": stage.notebook, "stamp": stamp, "action": action,
                      "why": why})
    return steps


def reproduce(config: str | os.PathLike[str], run: str | None = None, overrides: dict[str, Any] | None = None,
              force: bool | list[str] = False, start_from: str | None = None, notebooks: list[str] | None = None,
              notebooks_dir: Path = NOTEBOOKS_DIR, echo: Callable[[str], None] = print,
              parallel: int = 1) -> Path:
    """Run the cached stage graph for `config`; return the run's report folder.

    `force=True` redoes every stage; a list redoes the named stages. `notebooks` limits the run
    to the named stages (by stage name or notebook prefix). `parallel` > 1 runs the sites of
    generate, export and flatten in that many processes, fewer if memory is short.
    """
    if parallel < 1:
        raise FedlabError(f"--parallel must be at least 1, not {parallel}")
    config_path = Path(config).resolve()
    exp = load_experiment(config_path, overrides)
    run = run or exp.name
    forced = list(STAGE_NAMES) if force is True else _stage_names(force or [], "--force")
    start = _stage_names([start_from], "--from")[0] if start_from else None
    only = set(_stage_names(notebooks, "--notebook")) if notebooks else set(STAGE_NAMES)
    out_dir = exp.report_path(run) / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    book = StampBook(exp.report_path(run) / "stamps.json")
    timings = []
    for step in plan(exp, run, forced, start, notebooks_dir):
        name, notebook = step["stage"], step["notebook"]
        if name not in only:
            continue
        stage = STAGES[STAGE_NAMES.index(name)]
        if step["action"] == "skip":
            stale = staleness(book.reload(), stage, _previous(stage), step["stamp"], exp, run)  # after a stage ran
            if stale is None:
                echo(f"[fedlab reproduce] {name}: cached ({step['why']})")
                continue
            step = {**step, "action": "redo", "why": stale}
        echo(f"[fedlab reproduce] {name}: {step['action']} ({step['why']}) -> {notebook}")
        source = notebooks_dir / notebook
        if not source.is_file():
            raise FedlabError(f"notebook {source} not found")
        book.record(name, started=step["stamp"])
        if step["action"] == "redo":
            _clear_site_outputs(stage, exp, run)
        started = time.perf_counter()
        if parallel > 1 and name in PARALLEL_STAGES:
            _parallel_sites(stage, exp, run, config_path, overrides, parallel, echo)
        # after a redo, the stage's sites are rebuilt from scratch anyway (their outputs were removed)
        redo = step["action"] == "redo" and stage.site_dir is None
        params = {"config": str(config_path), "run": run, "force": redo, "overrides": override_strings(overrides)}
        run_notebook(source, out_dir / notebook, params, notebooks_dir, label=name)
        seconds = time.perf_counter() - started
        if not stage.outputs_complete(exp, run):
            raise FedlabError(f"stage {name}: {notebook} finished but its outputs are incomplete")
        previous = _previous(stage)
        book.record(name, done=step["stamp"], finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    outputs=output_fingerprint(stage, exp, run),
                    inputs=output_fingerprint(previous, exp, run) if previous else None)
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


def load_for_notebook(config: str, overrides: str | list[str] | dict[str, Any] | None = None) -> Experiment:
    """What a notebook's first code cell calls: the config plus its `overrides` parameter, which
    takes what the CLI's `--set` takes (`"train.rounds=3"`, or a list of such strings)."""
    return load_experiment(config, parse_overrides(overrides))
