"""Flatten engines and runners live in registries: a user's engine in a file of their own, named in
YAML, runs through the same checks, derivation and accounting as fedlab's; every runner keeps the
same books (`fedlab.flatten.ledger`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fedlab.config import ConfigError, experiment_from_dict, load_experiment
from fedlab.flatten import ENGINES, RUNNERS, SCHEMAS, FlattenError, flatten, flatten_ndjson
from fedlab.flatten.ledger import Ledger, merge_counts, table_counts
from fedlab.flatten.readers import Source
from fedlab.registry import Registry, RegistryError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "docs/examples/plain_engine.py:PlainEngine"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated site's bulk NDJSON (Synthea's R4 shapes, blood-pressure panels included)."""
    from fedlab.synthea import generate

    tmp = tmp_path_factory.mktemp("engines")
    exp = experiment_from_dict({"name": "engines", "data_dir": str(tmp / "data"),
                                "sites": [{"id": "a", "patients": 12, "seed": 3}]})
    return generate(exp, None, progress=False)["a"] / "bulk"


def _config(tmp_path: Path, flatten_section: dict) -> Path:
    path = tmp_path / "configs" / "x.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": "x", "data_dir": str(tmp_path / "data"), "flatten": flatten_section,
                                "sites": [{"id": "a", "patients": 2, "seed": 1}]}))
    return path


def test_the_documented_example_engine_gives_the_views_engines_tables(site: Path) -> None:
    from test_flatten_parity import assert_same_tables

    paths = sorted(site.glob("*.ndjson"))
    views = flatten_ndjson(paths, engine="views")
    plain = flatten_ndjson(paths, engine=f"{ROOT}/{EXAMPLE}")
    assert len(plain.tables["observation"]) > len(plain.tables["patient"]) > 0
    assert_same_tables(views.tables, plain.tables)
    assert plain.harmonization() == views.harmonization()
    assert f"engine: {EXAMPLE}" in (ROOT / "docs" / "flatten-engines.md").read_text()  # the page shows this file


def test_a_users_engine_is_named_in_yaml_relative_to_the_project_root(tmp_path: Path, site: Path) -> None:
    shutil.copytree(ROOT / "docs" / "examples", tmp_path / "docs" / "examples")
    exp = load_experiment(_config(tmp_path, {"engine": EXAMPLE}))
    assert exp.flatten.engine == EXAMPLE and exp.root == tmp_path
    export = exp.data_path("export", None, "a")
    shutil.copytree(site, export)
    out = flatten(exp, progress=False)["a"]
    assert json.loads((out / "_SUCCESS.json").read_text())["engine"] == EXAMPLE
    assert len(pd.read_parquet(out / "observation.parquet")) > 0
    report = json.loads((out / "harmonization.json").read_text())
    assert report["reconciliation"]["balanced"] and report["reconciliation"]["quarantined"] == 0


@pytest.mark.parametrize(("section", "wrong"), [
    ({"engine": "pandas"}, "unknown flatten engine 'pandas'"),
    ({"engine": "nowhere.py:Engine"}, "file not found"),
    ({"engine": "docs/examples/plain_engine.py:Missing"}, "has no 'Missing'"),
    ({"engine": "docs/examples/plain_engine.py:first_coding"}, "is not a subclass of fedlab.flatten.engines.Engine"),
    ({"engine": "json:loads"}, "is not a subclass"),
    ({"runner": "dask"}, "unknown flatten runner 'dask'"),
    ({"runner": "fedlab.flatten.engines.views:ViewsEngine"}, "is not a subclass of fedlab.flatten.runners.Runner"),
])
def test_an_engine_or_runner_the_registry_cannot_resolve_is_a_config_error(tmp_path: Path, section: dict,
                                                                           wrong: str) -> None:
    shutil.copytree(ROOT / "docs" / "examples", tmp_path / "docs" / "examples")
    key = f"flatten.{next(iter(section))}"
    with pytest.raises(ConfigError, match=rf"x\.yaml: invalid configuration\n  {key}: .*{wrong}"):
        load_experiment(_config(tmp_path, section))


def test_a_registered_engine_is_found_by_its_name(tmp_path: Path, site: Path) -> None:
    from fedlab.flatten.engines.views import ViewsEngine

    class Renamed(ViewsEngine):
        name = "renamed"

    ENGINES.register("renamed", Renamed)
    try:
        assert ENGINES.get("renamed") is Renamed and "renamed" in ENGINES.names()
        exp = experiment_from_dict({"name": "r", "flatten": {"engine": "renamed"}, "sites": [{"id": "a", "patients": 1,
                                                                                               "seed": 1}]})
        assert exp.flatten.engine == "renamed"
        result = flatten_ndjson([site / "Patient.ndjson"], engine="renamed")
        assert len(result.tables["patient"]) == 12
    finally:
        ENGINES._entries.pop("renamed")
    with pytest.raises(FlattenError, match="unknown flatten engine 'renamed'"):
        flatten_ndjson([site / "Patient.ndjson"], engine="renamed")


def test_registry_loads_module_and_file_names_and_checks_their_kind(tmp_path: Path) -> None:
    (tmp_path / "things.py").write_text("class Good(int):\n    pass\n\nBAD = 'text'\n")
    registry: Registry[type] = Registry("thing", {"builtin": "collections:OrderedDict"},
                                        check=lambda found: None if isinstance(found, type) else "not a class")
    assert registry.get("builtin").__name__ == "OrderedDict"
    assert registry.get("things.py:Good", root=tmp_path).__name__ == "Good"
    assert registry.get(f"{tmp_path}/things.py:Good") is registry.get("things.py:Good", root=tmp_path)
    assert registry.problem("builtin") is None and registry.problem("decimal:Decimal") is None
    with pytest.raises(RegistryError, match="not a class"):
        registry.get("things.py:BAD", root=tmp_path)
    with pytest.raises(RegistryError, match="cannot import 'no_such_module'"):
        registry.get("no_such_module:X")
    assert "unknown thing 'other'" in registry.problem("other")
    assert set(RUNNERS.names()) == {"pandas", "spark", "spark-distributed"}
    assert set(ENGINES.names()) >= {"views", "fhiry"}


# ---- one accounting model -----------------------------------------------------------------------

LINES = [  # (line, reason of a failed check or None, resourceType, id)
    (1, None, "Observation", "o1"), (2, "malformed JSON: x", None, None), (3, None, "Observation", "o2"),
    (5, None, "Observation", "o1"), (6, None, "Procedure", "p1"), (7, None, "Observation", "o3"),
    (8, "Observation o4: missing required field code.coding", None, None), (9, None, "Observation", "o2"),
]


def test_a_file_settled_at_once_gives_the_accounts_of_admitting_it_line_by_line(tmp_path: Path) -> None:
    """The spark-distributed runner settles each file from counts made on executors; the other runners
    admit line by line: the same accounts and quarantine."""
    source = Source(tmp_path / "Observation.ndjson", "Observation")
    by_line = Ledger()
    stats = by_line.open(source)
    admitted = [rid for lineno, reason, rtype, rid in LINES if by_line.admit(stats, lineno, reason, rtype, rid)]
    assert admitted == ["o1", "o2", "o3"]
    seen: set[tuple] = set()
    rejected = []
    for lineno, reason, rtype, rid in LINES:  # what the executors' checks and the shuffle find
        if reason is None and rtype == "Observation" and (rtype, rid) in seen:
            reason = f"duplicate {rtype} id {rid}"
        seen.add((rtype, rid))
        if reason:
            rejected.append((lineno, reason))
    at_once = Ledger()
    at_once.settle(at_once.open(source), len(LINES), rejected, ignored=1)
    assert at_once.files == by_line.files == [{"file": "Observation.ndjson", "type": "Observation", "lines": 8,
                                               "resources": 4, "quarantined": 4, "ignored_types": 1}]
    assert at_once.quarantine == by_line.quarantine
    assert [q["line"] for q in by_line.quarantine] == [2, 5, 8, 9]


def test_counts_of_a_tables_parts_add_up_to_the_counts_of_the_table(site: Path) -> None:
    tables = flatten_ndjson(sorted(site.glob("*.ndjson"))).tables
    for name, frame in tables.items():
        parts = [table_counts(name, frame.iloc[start:start + 7]) for start in range(0, len(frame), 7)]
        empty = table_counts(name, frame.iloc[:0])
        assert merge_counts([empty, *parts]) == table_counts(name, frame), name
    assert set(table_counts("observation", tables["observation"])) == {"rows", "flags", "units_seen"}
    assert set(SCHEMAS) == set(tables)


def test_a_users_row_engine_runs_on_the_spark_runners(spark, site: Path, tmp_path: Path) -> None:
    """A class from a user's file travels to the executors by value (no import there)."""
    from test_flatten_parity import assert_same_tables

    from fedlab.flatten import flatten_ndjson_spark, flatten_ndjson_spark_distributed

    paths = [site / "Patient.ndjson", site / "Observation.ndjson"]
    local = flatten_ndjson(paths, engine=f"{ROOT}/{EXAMPLE}")
    on_spark = flatten_ndjson_spark(spark, paths, engine=f"{ROOT}/{EXAMPLE}")
    assert_same_tables(local.tables, on_spark.tables)
    written = flatten_ndjson_spark_distributed(spark, paths, None, tmp_path / "out", engine=f"{ROOT}/{EXAMPLE}")
    assert written.report == local.harmonization()
    assert_same_tables(local.tables, {table: pd.read_parquet(tmp_path / "out" / f"{table}.parquet") for table in SCHEMAS})
    with pytest.raises(FlattenError, match="Spark runners run a RowEngine"):
        flatten_ndjson_spark(spark, paths, engine="fhiry")
