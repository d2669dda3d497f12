"""The stage graph and its bookkeeping: what each stage reads and writes, and whether it is current.

`reports/<run>/stamps.json` holds, per stage:
- `started` / `done`: the stamp `fedlab reproduce` started and finished the stage under;
- `written`: the stamp of the last run of the stage function itself, from any caller (reproduce,
  the CLI, or a notebook run by hand), with `outputs` (a fingerprint of what it wrote) and
  `inputs` (the fingerprint of the stage before it, as it was then).

A stamp hashes the stage's config section, its code and notebook, the lock file and the stamp of
the stage before it. An output fingerprint hashes the stage's completion markers (per-site
`_SUCCESS.json`) or its result file. With both, `plan` can tell a stage that is current from one
whose outputs were rewritten with other parameters (a notebook run by hand with overrides), and a
stage whose inputs changed after it ran (stale).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlab.config import Experiment
from fedlab.io import is_complete, read_json, write_json

PACKAGE = Path(__file__).resolve().parent
PROJECT = PACKAGE.parent
NOTEBOOKS_DIR = PROJECT / "notebooks"
LOCK_FILE = PROJECT / "requirements" / "lock.txt"
SKIPPED_MARKER = "_SKIPPED.json"  # a site left out under `task.on_site_error: skip`


@dataclass(frozen=True)
class Stage:
    name: str
    notebook: str
    config_keys: tuple[str, ...]
    code: tuple[str, ...]  # files and folders of the package whose content the stamp hashes
    site_dir: str | None = None  # per-site stages: the folder under data/ holding one folder per site
    result: str | None = None  # whole-run stages: the file under reports/<run>/ they write

    def outputs_complete(self, exp: Experiment, run: str) -> bool:
        if self.site_dir is not None:
            return all(site_done(exp.data_path(self.site_dir, run, site)) for site in exp.site_ids)
        return (exp.report_path(run) / str(self.result)).is_file()


def site_done(folder: Path) -> bool:
    return is_complete(folder) or (folder / SKIPPED_MARKER).is_file()


STAGES: tuple[Stage, ...] = (
    Stage("generate", "01_synthea_generation.ipynb", ("seed", "sites", "generate"), ("synthea",), "synthea"),
    Stage("export", "02_bulk_export_smart.ipynb", ("export",), ("fhir",), "export"),
    Stage("flatten", "03_fhiry_flattening.ipynb", ("flatten",), ("flatten", "harmonization", "views", "registry.py"), "tables"),
    Stage("features", "04_spark_features.ipynb", ("seed", "task"), ("features.py", "spark.py"), "features"),
    Stage("train", "05_federated_training.ipynb", ("seed", "train"), ("federated", "tffctx.py"),
          result="results.json"),
    Stage("report", "06_report.ipynb", (), ("report.py",), result="results.md"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
PIPELINE_NOTEBOOKS = tuple(s.notebook for s in STAGES)


def stage_named(name: str) -> Stage:
    return STAGES[STAGE_NAMES.index(name)]


# ---------- stamps ----------

def _hash_paths(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"stage stamp: {path} does not exist (update `fedlab.stages.STAGES`)")
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
            if path.is_dir() else [path]
        for file in files:
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
        "code": _hash_paths([PACKAGE / c for c in stage.code] + [PACKAGE / "config.py", PACKAGE / "io.py"]),
        "notebook": _hash_paths([notebooks_dir / stage.notebook]) if (notebooks_dir / stage.notebook).is_file()
        else "missing",
        "lock": _hash_paths([LOCK_FILE]),
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def stamps(exp: Experiment, notebooks_dir: Path = NOTEBOOKS_DIR) -> dict[str, str]:
    """Every stage's stamp for this experiment, in order (each includes the one before it)."""
    out, upstream = {}, ""
    for stage in STAGES:
        upstream = out[stage.name] = stage_stamp(stage, exp, upstream, notebooks_dir)
    return out


def config_fingerprint(exp: Experiment) -> str:
    payload = json.dumps(exp.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------- outputs ----------

# Fields of a `_SUCCESS.json` that change from one run to the next although the outputs do not.
VOLATILE_MARKER_FIELDS = frozenset({"finished", "started", "seconds", "timings", "write_seconds",
                                    "transactionTime", "sites_built_together"})


def _marker_content(marker: Path) -> bytes:
    try:
        info = read_json(marker)
    except (OSError, ValueError):
        return marker.read_bytes()
    if isinstance(info, dict):
        info = {key: value for key, value in info.items() if key not in VOLATILE_MARKER_FIELDS}
    return json.dumps(info, sort_keys=True, default=str).encode()


def output_fingerprint(stage: Stage, exp: Experiment, run: str) -> str | None:
    """A hash of what the stage last wrote: its per-site markers without timings (a rebuilt site
    that came out the same keeps the fingerprint), or its result file; None if nothing is there."""
    digest = hashlib.sha256()
    if stage.site_dir is not None:
        found = False
        for site in exp.site_ids:
            folder = exp.data_path(stage.site_dir, run, site)
            for marker in (folder / "_SUCCESS.json", folder / SKIPPED_MARKER):
                if marker.is_file():
                    found = True
                    digest.update(f"{site}/{marker.name}".encode())
                    digest.update(_marker_content(marker))
        return digest.hexdigest()[:20] if found else None
    path = exp.report_path(run) / str(stage.result)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:20] if path.is_file() else None


class StampBook:
    """`reports/<run>/stamps.json`, read and updated under a file lock (sites may run in parallel)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = read_json(path) if path.is_file() else {}

    def reload(self) -> StampBook:
        self.entries = read_json(self.path) if self.path.is_file() else {}
        return self

    def get(self, stage: str, field: str) -> Any:
        return self.entries.get(stage, {}).get(field)

    def done(self, stage: str) -> str | None:
        return self.get(stage, "done")

    def started(self, stage: str) -> str | None:
        return self.get(stage, "started")

    def record(self, stage: str, **fields: Any) -> None:
        with self._locked():
            self.entries = read_json(self.path) if self.path.is_file() else {}
            self.entries.setdefault(stage, {}).update(fields)
            write_json(self.path, self.entries)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def record_written(exp: Experiment, run: str | None, stage_name: str) -> None:
    """Called by each stage function when it has written its outputs, whoever called it."""
    run = run or exp.name
    index = STAGE_NAMES.index(stage_name)
    stage = STAGES[index]
    previous = STAGES[index - 1] if index else None
    StampBook(exp.report_path(run) / "stamps.json").record(
        stage_name, written=stamps(exp)[stage_name], outputs=output_fingerprint(stage, exp, run),
        inputs=output_fingerprint(previous, exp, run) if previous else None,
        written_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def staleness(book: StampBook, stage: Stage, previous: Stage | None, stamp: str, exp: Experiment,
              run: str) -> str | None:
    """Why a stage that reproduce finished under `stamp` is no longer current, or None."""
    written = book.get(stage.name, "written")
    if written is not None and written != stamp:
        return "its outputs were rewritten with other parameters or code (a notebook or command run by hand)"
    recorded = book.get(stage.name, "outputs")
    if recorded is not None and recorded != output_fingerprint(stage, exp, run):
        return "its outputs changed since it ran"
    inputs = book.get(stage.name, "inputs")
    if previous is not None and inputs is not None and inputs != output_fingerprint(previous, exp, run):
        return f"stale: the {previous.name} outputs changed since it ran"
    return None

