"""Spark feature-engineering wall time: 4 synthetic sites of 2,500 patients each.

Writes synthetic flattened tables (the Parquet contract of docs/architecture.md: yearly wellness
visits over 10 years with vitals and labs, some emergency/inpatient stays, conditions and drug
orders), starts the Spark session (timed separately), then, for each size, times `build_features`
for all sites and samples the peak resident memory of this process plus the Spark JVM and their
CPU time. `value` is the first size (the goal); `sizes` holds every size and `scaling` how time grows
with patients. Prints one JSON object and writes `reports/bench/features.json`.

    python benchmarks/bench_features.py [--sites 4] [--sizes 2500 25000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlab.config import experiment_from_dict  # noqa: E402
from fedlab.features import build_features  # noqa: E402
from fedlab.flatten import SCHEMAS  # noqa: E402
from fedlab.io import write_json  # noqa: E402

END = pd.Timestamp("2026-01-01T00:00:00Z")
YEARS = 10
LABS = {"bmi": ("39156-5", 28, 5), "sbp": ("8480-6", 125, 15), "dbp": ("8462-4", 80, 10),
        "glucose": ("2339-0", 100, 20), "hba1c": ("4548-4", 5.6, 0.6), "total_cholesterol": ("2093-3", 190, 30),
        "ldl": ("18262-6", 110, 25), "hdl": ("2085-9", 50, 12), "triglycerides": ("2571-8", 140, 40),
        "egfr": ("33914-3", 85, 15)}


def site_tables(patients: int, seed: int) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    pid = np.array([f"s{seed}-p{i}" for i in range(patients)])
    birth = END - pd.to_timedelta(rng.uniform(20, 85, patients) * 365.25, unit="D")
    patient = pd.DataFrame({"patient_id": pid, "birth_date": birth.date, "gender": rng.choice(["female", "male"], patients),
                            "race": rng.choice(["white", "black", "asian", "other"], patients),
                            "ethnicity": rng.choice(["hispanic", "nonhispanic"], patients, p=[0.15, 0.85]),
                            "deceased": pd.Series([pd.NaT] * patients, dtype="datetime64[us, UTC]")})
    visits = np.repeat(np.arange(patients), YEARS)
    start = (END - pd.to_timedelta((np.tile(np.arange(YEARS), patients) + rng.uniform(0, 1, len(visits))) * 365.25,
                                   unit="D")).astype("datetime64[us, UTC]")
    n_extra = patients
    extra_p = rng.integers(0, patients, n_extra)
    extra_start = (END - pd.to_timedelta(rng.uniform(0, YEARS, n_extra) * 365.25, unit="D")).astype("datetime64[us, UTC]")
    encounter = pd.concat([
        pd.DataFrame({"encounter_id": [f"{pid[p]}-w{k}" for k, p in enumerate(visits)], "patient_id": pid[visits],
                      "class_code": "AMB", "type_code": "185349003", "start": start, "end": start}),
        pd.DataFrame({"encounter_id": [f"{pid[p]}-x{k}" for k, p in enumerate(extra_p)], "patient_id": pid[extra_p],
                      "class_code": rng.choice(["EMER", "IMP"], n_extra), "type_code": "50849002",
                      "start": extra_start, "end": extra_start}),
    ], ignore_index=True)
    obs_parts = []
    for concept, (loinc, mean, sd) in LABS.items():
        taken = rng.uniform(size=len(visits)) > 0.15
        values = rng.normal(mean, sd, len(visits))[taken]
        obs_parts.append(pd.DataFrame({
            "observation_id": [f"{pid[p]}-{concept}-{k}" for k, p in enumerate(visits[taken])],
            "patient_id": pid[visits[taken]], "encounter_id": encounter["encounter_id"][: len(visits)][taken].to_numpy(),
            "effective": start[taken], "loinc": loinc, "value": values, "unit": "u", "concept": concept,
            "value_canonical": values, "unit_canonical": "u", "flag": "ok"}))
    observation = pd.concat(obs_parts, ignore_index=True)
    cond_concepts = ["t2d", "prediabetes", "hypertension", "hyperlipidemia", "obesity", "ckd"]
    n_cond = patients
    cond_p = rng.integers(0, patients, n_cond)
    onset = (END - pd.to_timedelta(rng.uniform(0, YEARS, n_cond) * 365.25, unit="D")).astype("datetime64[us, UTC]")
    condition = pd.DataFrame({"condition_id": [f"c{k}" for k in range(n_cond)], "patient_id": pid[cond_p],
                              "encounter_id": None, "system": "http://snomed.info/sct", "code": "x",
                              "onset": onset, "abatement": pd.Series([pd.NaT] * n_cond, dtype="datetime64[us, UTC]"),
                              "concept": rng.choice(cond_concepts, n_cond), "flag": "ok"})
    n_med = patients // 2
    med_p = rng.integers(0, patients, n_med)
    authored = (END - pd.to_timedelta(rng.uniform(0, YEARS, n_med) * 365.25, unit="D")).astype("datetime64[us, UTC]")
    medication = pd.DataFrame({"medication_request_id": [f"m{k}" for k in range(n_med)], "patient_id": pid[med_p],
                               "encounter_id": None, "authored_on": authored, "rxnorm": "1", "status": "active",
                               "concept": rng.choice(["antidiabetic", "antihypertensive", "statin"], n_med)})
    return {"patient": patient, "encounter": encounter, "condition": condition, "observation": observation,
            "medication_request": medication}


def write_site(folder: Path, tables: dict[str, pd.DataFrame]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        pq.write_table(pa.Table.from_pandas(frame[SCHEMAS[name].names], schema=SCHEMAS[name], preserve_index=False),
                       folder / f"{name}.parquet")


class PeakMemory:
    """Samples the resident memory of this process and its children (the Spark JVM) every 0.2 s."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process(os.getpid())
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # a child may exit between listing and reading
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(process) -> float:
    """User + system CPU time of this process and its children (the Spark JVM)."""
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except Exception:  # a child may exit between listing and reading
            pass
    return total


def measure(spark, n_sites: int, patients: int, tmp: Path) -> dict:
    """Write the input tables of one size, then time `build_features` over all sites."""
    import psutil

    sites = [{"id": f"s{k}", "patients": patients, "seed": k + 1} for k in range(n_sites)]
    exp = experiment_from_dict({"name": f"bench_features_{patients}", "seed": 1,
                                "data_dir": str(tmp / f"data_{patients}"), "sites": sites})
    started, rows_in = time.perf_counter(), 0
    for k, site in enumerate(exp.site_ids):
        tables = site_tables(patients, seed=k + 1)
        rows_in += sum(len(f) for f in tables.values())
        write_site(exp.data_path("tables", None, site), tables)
        del tables
    input_seconds = time.perf_counter() - started
    process = psutil.Process(os.getpid())
    with PeakMemory() as memory:
        cpu_before, started = cpu_seconds(process), time.perf_counter()
        outputs = build_features(exp, spark=spark, force=True)
        seconds = time.perf_counter() - started
        cpu = cpu_seconds(process) - cpu_before
    rows_out = sum(len(pd.read_parquet(p / "features.parquet", columns=["patient_id"])) for p in outputs.values())
    return {
        "patients_per_site": patients,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "seconds_per_1000_patients": round(seconds / (n_sites * patients / 1000), 3),
        "per_site_seconds": round(seconds / n_sites, 2),
        "input_rows": rows_in,
        "feature_rows": rows_out,
        "input_write_seconds": round(input_seconds, 2),
        "peak_rss_mb": round(memory.peak / 2**20, 1),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 25000],
                        help="patients per site; each size is measured in turn (the first is the goal size)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exp = experiment_from_dict({"name": "bench_features", "seed": 1, "data_dir": str(Path(tmp) / "data"),
                                    "sites": [{"id": "s0", "patients": 1, "seed": 1}]})
        with PeakMemory() as session_memory:
            from fedlab.spark import get_spark

            started = time.perf_counter()
            spark = get_spark(exp)
            spark.range(1).count()
            session_seconds = time.perf_counter() - started
        runs = [measure(spark, args.sites, patients, Path(tmp)) for patients in args.sizes]
        spark.stop()
    first = runs[0]
    result = {
        "name": "features",
        "value": first["seconds"],
        "unit": "s",
        "goal": f"< 60 s for {args.sites} sites x {first['patients_per_site']} patients on 2 cores, session already up",
        "sites": args.sites,
        "patients_per_site": first["patients_per_site"],
        "input_rows": first["input_rows"],
        "feature_rows": first["feature_rows"],
        "per_site_seconds": first["per_site_seconds"],
        "session_start_seconds": round(session_seconds, 2),
        "session_peak_rss_mb": round(session_memory.peak / 2**20, 1),
        "peak_rss_mb": first["peak_rss_mb"],
        "peak_rss_scope": "python process + Spark JVM (children), sampled every 0.2 s during build_features",
        "sizes": runs,
        "scaling": _scaling(runs),
        "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(result, indent=2))
    write_json(ROOT / "reports" / "bench" / "features.json", result)


def _scaling(runs: list[dict]) -> dict | None:
    """How time grows with patients between the smallest and the largest size measured."""
    if len(runs) < 2:
        return None
    small, large = min(runs, key=lambda r: r["patients_per_site"]), max(runs, key=lambda r: r["patients_per_site"])
    size_ratio = large["patients_per_site"] / small["patients_per_site"]
    time_ratio = large["seconds"] / small["seconds"]
    return {"patients_ratio": round(size_ratio, 2), "seconds_ratio": round(time_ratio, 2),
            "seconds_per_1000_patients": {str(r["patients_per_site"]): r["seconds_per_1000_patients"] for r in runs},
            "growth": "sublinear (a fixed planning/scheduling cost weighs on the small size)"
            if time_ratio < size_ratio else "linear or worse"}


if __name__ == "__main__":
    main()
