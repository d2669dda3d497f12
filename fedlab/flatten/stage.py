"""The flatten stage: each site's export folder into `data/tables/<run>/<site>/`.

`flatten(exp, run)` is the `fedlab flatten` verb and notebook 03's call: for every site whose
tables are missing, made by another engine, or `force`d, `flatten_site` lists the export's files
(`readers.export_files`), has the configured runner read, check and flatten them with the
configured engine and write the tables into a staging folder, then writes `harmonization.json`,
`quarantine.ndjson` and `_SUCCESS.json` and renames the folder into place.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from fedlab.flatten.contract import FlattenError
from fedlab.flatten.engines import Engine, engine_class
from fedlab.flatten.readers import export_files, ndjson_sources
from fedlab.flatten.runners import Runner, make_runner
from fedlab.flatten.write import write_reports
from fedlab.io import SUCCESS, is_complete, read_json, staging_dir
from fedlab.stages import record_written

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from fedlab.config import Experiment


def flatten_site(folder: Path, out: Path, site: str | None = None, engine: str = "views",
                 spark: SparkSession | None = None, runner: str | None = None, root: Path | None = None) -> Path:
    """Flatten one export folder into `out`; with `spark`, the engine runs on that session
    (`runner` "spark", the default then, or "spark-distributed")."""
    runner = runner or ("spark" if spark is not None else "pandas")
    if not folder.is_dir():
        raise FlattenError(f"export folder not found: {folder}" + (f" (site {site})" if site else "")
                           + "; run `fedlab export` first")
    chosen, engine_type = _runner_for(runner, engine, root)
    if chosen.needs_spark and spark is None:
        raise FlattenError(f"flatten.runner {runner!r} needs a Spark session")
    started = time.perf_counter()
    paths, types = export_files(folder)
    info = {"site": site, "engine": engine, "runner": runner, "source": str(folder)}
    with staging_dir(out) as tmp:
        written = chosen.run(ndjson_sources(paths, types), engine_type, tmp, spark)
        info["seconds"] = round(time.perf_counter() - started - written.write_seconds, 3)
        write_reports(tmp, written, info)
    return out


def _runner_for(runner: str, engine: str, root: Path | None) -> tuple[Runner, type[Engine]]:
    chosen, engine_type = make_runner(runner, root), engine_class(engine, root)
    if not chosen.supports(engine_type):
        raise FlattenError(f"flatten.runner {runner!r} runs the views engine only (or another RowEngine); "
                           f"flatten.engine is {engine!r}")
    return chosen, engine_type


def flatten(exp: Experiment, run: str | None = None, sites: list[str] | None = None, force: bool = False,
            progress: bool = True) -> dict[str, Path]:
    """Flatten each site's export into `data/tables/<run>/<site>/` with `exp.flatten.engine` on
    `exp.flatten.runner`; complete folders made by the same engine are kept unless `force`."""
    site_ids = sites or exp.site_ids
    for site in site_ids:
        exp.site(site)  # unknown site -> ConfigError naming the config
    engine, runner = exp.flatten.engine, exp.flatten.runner
    chosen, _ = _runner_for(runner, engine, exp.root)
    missing = [s for s in site_ids if not exp.data_path("export", run, s).is_dir()]
    if missing:
        raise FlattenError(f"export folder not found for site(s) {', '.join(missing)} in {exp.data_path('export', run)}; "
                           f"run `fedlab export --config {exp.source or 'CONFIG'}` first")
    spark = None
    outputs: dict[str, Path] = {}
    iterator: Iterable[str] = site_ids
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(site_ids, desc=f"flatten ({engine})", unit="site")
    for site in iterator:
        out = exp.data_path("tables", run, site)
        if is_complete(out) and not force and _made_by(out, engine):
            outputs[site] = out
            continue
        if chosen.needs_spark and spark is None:
            from fedlab.spark import get_spark

            spark = get_spark(exp)  # one session for every site
        outputs[site] = flatten_site(exp.data_path("export", run, site), out, site, engine, spark, runner, exp.root)
    record_written(exp, run, "flatten")
    return outputs


def _made_by(out: Path, engine: str) -> bool:
    """Whether a complete tables folder was written by `engine` (older folders name none: fhiry)."""
    try:
        return read_json(out / SUCCESS).get("engine", "fhiry") == engine
    except (OSError, ValueError):
        return False
