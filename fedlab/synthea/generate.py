"""Generate each site's population into `data/synthea/<run>/<site>/` (see docs/architecture.md).

Every patient has its own random stream seeded from (experiment seed, site seed, patient index),
so the output is byte-identical for the same configuration whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import multiprocessing
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from fedlab.config import Experiment, SiteConfig
from fedlab.errors import FedlabError
from fedlab.io import SUCCESS, is_complete, mark_complete, read_json, staging_dir
from fedlab.stages import record_written
from fedlab.synthea import codes
from fedlab.synthea.export import (
    BulkRewriter,
    Practitioner,
    Providers,
    dumps,
    organization_resource,
    patient_resources,
    practitioner_resource,
    provider_bundles,
    transaction_bundle_json,
)
from fedlab.synthea.gmf_life import (
    BUILTIN_MODULES,
    cached_modules,
    modules_digest,
    simulate_life_gmf,
    unknown_code_systems,
)
from fedlab.synthea.lifecycle import Rng, exported_encounters, simulate_life

GENERATOR = "fedlab.synthea/python-1"
GMF_GENERATOR = "fedlab.synthea/gmf-2"  # bumped when the same config gives other data
PRACTITIONERS_PER_SITE = 8
_PATIENT_STREAM, _PROVIDER_STREAM = 1, 2
POOL_CHUNK = 8


@dataclass(frozen=True)
class SiteJob:
    """Everything a worker needs to build any patient of one site."""

    site: SiteConfig
    experiment_seed: int
    reference: dt.date
    years_of_history: int
    providers: Providers
    engine: str = "python"  # or "gmf"
    modules_dir: str | None = None  # engine gmf: the modules folder (absolute)
    allow_missing_submodules: tuple[str, ...] = ()
    modules_digest: str = ""


@dataclass(frozen=True)
class PatientRecord:
    file_name: str
    bundle_json: str  # empty once a worker has written the bundle file itself
    ndjson: dict[str, str]  # resource type -> its NDJSON lines, newline-terminated
    counts: dict[str, int]
    conditions: frozenset[str]  # concepts diagnosed in the exported record
    deceased: bool


def _seed(*words: int) -> int:
    state = np.random.SeedSequence(list(words)).generate_state(2, np.uint64)
    return (int(state[0]) << 64) | int(state[1])


def patient_seed(experiment_seed: int, site_seed: int, index: int) -> int:
    return _seed(experiment_seed, site_seed, _PATIENT_STREAM, index)


def site_providers(experiment_seed: int, site: SiteConfig) -> Providers:
    """The site's hospital and clinicians, drawn from the site's own provider stream."""
    rng = Rng(_seed(experiment_seed, site.seed, _PROVIDER_STREAM))
    city = rng.r.choice(codes.CITIES)
    practitioners = []
    for _ in range(PRACTITIONERS_PER_SITE):
        female = rng.chance(0.5)
        given = rng.r.choice(codes.GIVEN_FEMALE if female else codes.GIVEN_MALE) + str(rng.r.randint(10, 999))
        practitioners.append(Practitioner(
            resource_id=rng.uuid(), npi=f"9999{rng.r.randint(100000, 999999)}",
            given=given, family=rng.r.choice(codes.FAMILY) + str(rng.r.randint(10, 999)),
            gender="female" if female else "male"))
    return Providers(
        organization_id=rng.uuid(),
        name=f"{city.name.upper()} {site.id.upper().replace('_', ' ')} HOSPITAL",
        city=city, phone=f"{rng.r.randint(200, 999)}-555-{rng.r.randint(1000, 9999)}",
        practitioners=tuple(practitioners),
    )


def build_patient(job: SiteJob, index: int) -> PatientRecord:
    """Simulate patient `index` of a site and render its bundle and bulk lines."""
    seed = patient_seed(job.experiment_seed, job.site.seed, index)
    if job.engine == "gmf":
        modules = cached_modules(job.modules_dir or str(BUILTIN_MODULES), job.allow_missing_submodules,
                                 job.modules_digest)
        life = simulate_life_gmf(seed, job.site, job.reference, job.years_of_history, PRACTITIONERS_PER_SITE,
                                 modules)
    else:
        life = simulate_life(seed, job.site, job.reference, job.years_of_history, PRACTITIONERS_PER_SITE)
    demo = life.demographics
    mother = f"{codes.GIVEN_FEMALE[seed % len(codes.GIVEN_FEMALE)]}{seed % 997} {demo.family}"
    resources = patient_resources(life, job.site, job.providers, mother)
    resource_json = [dumps(r) for r in resources]
    bundle_json = transaction_bundle_json(resources, resource_json)
    by_type: dict[str, list[str]] = {}
    for resource_type, line in BulkRewriter(job.providers).lines(resources, resource_json):
        by_type.setdefault(resource_type, []).append(line)
    concepts = frozenset(c.concept for enc in exported_encounters(life) for c in enc.conditions)
    return PatientRecord(
        file_name=f"{demo.given}_{demo.family}_{demo.patient_id}.json",
        bundle_json=bundle_json, ndjson={t: "\n".join(lines) + "\n" for t, lines in by_type.items()},
        counts={t: len(lines) for t, lines in by_type.items()}, conditions=concepts,
        deceased=life.death is not None,
    )


# ---- worker-process plumbing (spawned workers: safe beside Spark/TF threads in the parent)
_WORKER_JOB: SiteJob | None = None
_WORKER_FHIR_DIR: Path | None = None


def _init_worker(job: SiteJob, fhir_dir: Path) -> None:
    global _WORKER_JOB, _WORKER_FHIR_DIR
    _WORKER_JOB, _WORKER_FHIR_DIR = job, fhir_dir


def _build_in_worker(index: int) -> PatientRecord:
    assert _WORKER_JOB is not None and _WORKER_FHIR_DIR is not None
    record = build_patient(_WORKER_JOB, index)
    # The worker writes the (large) bundle itself; only the bulk lines travel back, in order.
    (_WORKER_FHIR_DIR / record.file_name).write_text(record.bundle_json, encoding="utf-8")
    return dataclasses.replace(record, bundle_json="")


def _records(job: SiteJob, workers: int, fhir_dir: Path) -> Iterator[PatientRecord]:
    indices = range(job.site.patients)
    if workers <= 1 or job.site.patients < 2 * POOL_CHUNK:
        for i in indices:
            yield build_patient(job, i)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=workers, initializer=_init_worker, initargs=(job, fhir_dir)) as pool:
        # imap keeps patient order, so files are identical to the serial run.
        yield from pool.imap(_build_in_worker, indices, chunksize=POOL_CHUNK)


# ---- the stage

def _modules_dir(exp: Experiment) -> Path:
    """`generate.modules_dir` (relative to the project root) or fedlab's own modules."""
    configured = exp.generate.modules_dir
    if configured is None:
        return BUILTIN_MODULES
    folder = Path(configured).expanduser()
    folder = folder if folder.is_absolute() else exp.root / folder
    if not folder.is_dir():
        raise FedlabError(f"generate.modules_dir: {folder} is not a folder of module JSON files")
    return folder.resolve()


def _fingerprint(exp: Experiment, site: SiteConfig) -> dict[str, Any]:
    """What determines the output; a complete folder with another fingerprint is rebuilt."""
    fingerprint: dict[str, Any] = {
        "generator": GMF_GENERATOR if exp.generate.engine == "gmf" else GENERATOR,
        "seed": exp.seed,
        "site": site.model_dump(mode="json"),
        "reference_date": exp.generate.reference_date.isoformat(),
        "years_of_history": exp.generate.years_of_history,
    }
    if exp.generate.engine == "gmf":
        folder = _modules_dir(exp)
        fingerprint["modules"] = {"dir": "builtin" if folder == BUILTIN_MODULES else str(folder),
                                  "digest": modules_digest(folder),
                                  "allow_missing_submodules": sorted(exp.generate.allow_missing_submodules)}
    return fingerprint


def _provider_file_suffix(exp: Experiment, site: SiteConfig) -> int:
    """A Synthea-like millisecond stamp, derived from the reference date and seeds (no clock)."""
    midnight = dt.datetime.combine(exp.generate.reference_date, dt.time(), tzinfo=dt.UTC)
    return int(midnight.timestamp() * 1000) + _seed(exp.seed, site.seed, 3) % 86_400_000


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise FedlabError(f"cannot write generated data to {folder}: {err.strerror or err}") from None


class _NdjsonSink:
    """One append-only NDJSON file per resource type, opened on first use."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        self.folder, self.stack = folder, stack
        self.handles: dict[str, IO[str]] = {}
        self.counts: Counter[str] = Counter()

    def write(self, resource_type: str, text: str, lines: int = 1) -> None:
        """Append `lines` complete lines (`text` ends with a newline)."""
        handle = self.handles.get(resource_type)
        if handle is None:
            path = self.folder / f"{resource_type}.ndjson"
            handle = self.stack.enter_context(open(path, "w", encoding="utf-8", newline="\n"))
            self.handles[resource_type] = handle
        handle.write(text)
        self.counts[resource_type] += lines


def _write_providers(job: SiteJob, fhir_dir: Path, sink: _NdjsonSink, stamp: int) -> list[str]:
    hospital, practitioners = provider_bundles(job.providers)
    names = [f"hospitalInformation{stamp}.json", f"practitionerInformation{stamp}.json"]
    for name, bundle in zip(names, (hospital, practitioners), strict=True):
        (fhir_dir / name).write_text(dumps(bundle), encoding="utf-8")
    sink.write("Organization", dumps(organization_resource(job.providers)) + "\n")
    for p in job.providers.practitioners:
        sink.write("Practitioner", dumps(practitioner_resource(p, job.providers)) + "\n")
    return names


def _generate_site(exp: Experiment, site: SiteConfig, folder: Path, progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    gmf = exp.generate.engine == "gmf"
    job = SiteJob(site=site, experiment_seed=exp.seed, reference=exp.generate.reference_date,
                  years_of_history=exp.generate.years_of_history, providers=site_providers(exp.seed, site),
                  engine=exp.generate.engine, modules_dir=str(_modules_dir(exp)) if gmf else None,
                  allow_missing_submodules=tuple(sorted(exp.generate.allow_missing_submodules)),
                  modules_digest=modules_digest(_modules_dir(exp)) if gmf else "")
    unknown_systems: list[str] = []
    if gmf:  # load (and validate) the modules before any work, so a bad file fails fast and clearly
        modules = cached_modules(job.modules_dir, job.allow_missing_submodules, job.modules_digest)
        unknown_systems = unknown_code_systems(modules)
        if unknown_systems:
            warnings.warn(f"site {site.id}: the modules in {job.modules_dir} use code systems with no known "
                          f"FHIR URI, written as named: {', '.join(unknown_systems)}", stacklevel=2)
    prevalence: Counter[str] = Counter()
    deaths = 0
    with staging_dir(folder) as staging, ExitStack() as stack:
        fhir_dir, bulk_dir = staging / "fhir", staging / "bulk"
        fhir_dir.mkdir()
        bulk_dir.mkdir()
        sink = _NdjsonSink(bulk_dir, stack)
        provider_files = _write_providers(job, fhir_dir, sink, _provider_file_suffix(exp, site))
        from tqdm.auto import tqdm  # here, not at the top: pool workers never import it

        bar = stack.enter_context(tqdm(total=site.patients, desc=f"generate {site.id}", unit="patient",
                                       disable=not progress))
        for record in _records(job, exp.generate.workers, fhir_dir):
            if record.bundle_json:
                (fhir_dir / record.file_name).write_text(record.bundle_json, encoding="utf-8")
            for resource_type, lines in record.ndjson.items():
                sink.write(resource_type, lines, record.counts[resource_type])
            prevalence.update(record.conditions)
            deaths += record.deceased
            bar.update(1)
        stack.close()  # flush and close the NDJSON files before the completion marker
        info = {
            "stage": "generate",
            "engine": exp.generate.engine,
            **_fingerprint(exp, site),
            "patients": site.patients,
            "counts": dict(sorted(sink.counts.items())),
            "files": {"bundles": site.patients, "providers": provider_files,
                      "bulk": sorted(f"{t}.ndjson" for t in sink.counts)},
            "summary": {"deceased": deaths,
                        "patients_with_condition": dict(sorted(prevalence.items()))},
            "timings": {"seconds": round(time.perf_counter() - started, 3)},
        }
        if gmf:
            info["unknown_code_systems"] = unknown_systems
        mark_complete(staging, info)
    return info


def _is_current(folder: Path, fingerprint: dict[str, Any]) -> bool:
    if not is_complete(folder):
        return False
    try:
        info = read_json(folder / SUCCESS)
    except (OSError, ValueError):
        return False
    return all(info.get(key) == value for key, value in fingerprint.items())


def generate(exp: Experiment, run: str | None = None, sites: list[str] | None = None,
             force: bool = False, progress: bool = True) -> dict[str, Path]:
    """Write each selected site's population (all sites by default); returns {site id: folder}.

    A site whose folder is complete and was made from the same settings is skipped unless `force`.
    """
    selected = [exp.site(s) for s in sites] if sites else list(exp.sites)
    _check_writable(exp.data_path("synthea", run))
    folders: dict[str, Path] = {}
    for site in selected:
        folder = exp.data_path("synthea", run, site.id)
        if exp.generate.engine == "synthea-jar":
            folders[site.id] = _generate_with_jar(exp, run, site, folder, force)
            continue
        if force or not _is_current(folder, _fingerprint(exp, site)):
            _generate_site(exp, site, folder, progress)
        folders[site.id] = folder
    record_written(exp, run, "generate")
    return folders


def _generate_with_jar(exp: Experiment, run: str | None, site: SiteConfig, folder: Path, force: bool) -> Path:
    """`generate.engine: synthea-jar`: a user's own Synthea jar (`SYNTHEA_JAR`), see `java.py`."""
    from fedlab.synthea.java import generate_with_jar

    current = {"engine": "synthea-jar", "site": site.model_dump(mode="json")}
    if not force and _is_current(folder, current):
        return folder
    return generate_with_jar(exp, run or exp.name, site)
