"""The two flatten engines agree: fhiry's DataFrame path and fedlab's ViewDefinitions give the same
rows, on real Synthea bundles, on fedlab-generated sites (NDJSON and bundles, R4 and R5, gzip)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fedlab.config import experiment_from_dict
from fedlab.fhir.r5 import to_r5
from fedlab.flatten import SCHEMAS, TABLE_OF_TYPE, ViewRows, flatten_bundles_result, flatten_ndjson
from fedlab.views import load_definitions, run_view

ID_COLUMNS = {table: [schema.names[0]] for table, schema in SCHEMAS.items()}


def assert_same_tables(left: dict[str, pd.DataFrame], right: dict[str, pd.DataFrame]) -> None:
    """Same rows per table after sorting by id; timestamps as UTC instants, floats within 1e-9."""
    assert set(left) == set(right)
    for table, schema in SCHEMAS.items():
        a = left[table].sort_values(ID_COLUMNS[table]).reset_index(drop=True)
        b = right[table].sort_values(ID_COLUMNS[table]).reset_index(drop=True)
        assert list(a.columns) == list(b.columns) == schema.names, table
        assert len(a) == len(b), f"{table}: {len(a)} rows vs {len(b)}"
        for column in schema.names:
            x, y = a[column], b[column]
            if pd.api.types.is_float_dtype(x) or pd.api.types.is_float_dtype(y):
                np.testing.assert_allclose(x.to_numpy(float), y.to_numpy(float), rtol=1e-12, atol=1e-9,
                                           err_msg=f"{table}.{column}")
            elif pd.api.types.is_datetime64_any_dtype(x):
                assert str(x.dt.tz) == str(y.dt.tz) == "UTC", f"{table}.{column}"
                assert x.equals(y), f"{table}.{column}: {_first_difference(x, y)}"
            else:
                xs = [None if v is None or v is pd.NaT else v for v in x]
                ys = [None if v is None or v is pd.NaT else v for v in y]
                assert xs == ys, f"{table}.{column}: {_first_difference(x, y)}"


def _first_difference(x: pd.Series, y: pd.Series) -> str:
    for i, (u, v) in enumerate(zip(x, y, strict=True)):
        if not (u == v or (pd.isna(u) and pd.isna(v))):
            return f"row {i}: {u!r} != {v!r}"
    return "no difference"


def both_engines_ndjson(paths: list[Path]) -> tuple:
    fhiry_result = flatten_ndjson(paths, engine="fhiry")
    views_result = flatten_ndjson(paths, engine="views")
    return fhiry_result, views_result


def test_real_synthea_bundles_same_rows(reference_dir: Path) -> None:
    paths = sorted((reference_dir / "synthea-sample").glob("*.json"))
    fhiry_result = flatten_bundles_result(paths, engine="fhiry")
    views_result = flatten_bundles_result(paths, engine="views")
    assert len(views_result.tables["observation"]) > 100
    assert_same_tables(fhiry_result.tables, views_result.tables)
    assert fhiry_result.harmonization() == views_result.harmonization()


# ---- fedlab-generated sites ------------------------------------------------------------------

@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    from fedlab.synthea import generate

    root = tmp_path_factory.mktemp("parity")
    exp = experiment_from_dict({
        "name": "parity", "seed": 3, "generate": {"years_of_history": 6},
        "sites": [{"id": "snomed_mg", "patients": 20, "seed": 5, "diabetes_risk": 3.0},
                  {"id": "icd_mmol", "patients": 20, "seed": 6, "diabetes_risk": 3.0,
                   "condition_system": "icd10", "glucose_unit": "mmol/L"}],
    }, root=root)
    return generate(exp, progress=False)


def _table_files(folder: Path) -> list[Path]:
    return [folder / "bulk" / f"{rtype}.ndjson" for rtype in TABLE_OF_TYPE]


@pytest.mark.parametrize("site", ["snomed_mg", "icd_mmol"])
def test_generated_site_same_rows_ndjson_and_bundles(generated: dict[str, Path], site: str) -> None:
    folder = generated[site]
    fhiry_result, views_result = both_engines_ndjson(_table_files(folder))
    assert_same_tables(fhiry_result.tables, views_result.tables)
    assert fhiry_result.harmonization() == views_result.harmonization()
    obs = views_result.tables["observation"]
    glucose = obs[obs["concept"] == "glucose"]
    assert len(glucose) > 0
    expected_unit, expected_flag = ("mg/dL", "ok") if site == "snomed_mg" else ("mmol/L", "converted")
    assert set(glucose["unit"]) == {expected_unit} and set(glucose["flag"]) <= {expected_flag, "mapped"}
    cond = views_result.tables["condition"]
    mapped = cond[cond["concept"].notna()]
    assert set(mapped["flag"]) == ({"ok"} if site == "snomed_mg" else {"mapped"})
    # The same patients as Synthea transaction bundles (`urn:uuid:` references) give the same tables.
    bundles = sorted((folder / "fhir").glob("*.json"))
    from_bundles = flatten_bundles_result(bundles, engine="views").tables
    assert_same_tables(views_result.tables, from_bundles)


def _write_r5(source: Path, target: Path, gzipped: bool) -> Path:
    lines = [json.dumps(to_r5(json.loads(line))) + "\n" for line in source.read_text().splitlines() if line]
    if gzipped:
        path = target / (source.name + ".gz")
        path.write_bytes(gzip.compress("".join(lines).encode()))
    else:
        path = target / source.name
        path.write_text("".join(lines))
    return path


@pytest.mark.parametrize("engine", ["views", "fhiry"])
def test_r5_input_gives_the_r4_tables(generated: dict[str, Path], tmp_path: Path, engine: str) -> None:
    r4_paths = _table_files(generated["icd_mmol"])
    r5_paths = [_write_r5(p, tmp_path, gzipped=index % 2 == 0) for index, p in enumerate(r4_paths)]
    assert {p.name for p in r5_paths} >= {"Patient.ndjson.gz", "Encounter.ndjson"}
    encounter = json.loads((tmp_path / "Encounter.ndjson").read_text().splitlines()[0])
    assert "actualPeriod" in encounter and isinstance(encounter["class"], list)
    r4 = flatten_ndjson(r4_paths, engine=engine)
    r5 = flatten_ndjson(r5_paths, engine=engine)
    assert not r5.quarantine
    assert r5.tables["encounter"]["class_code"].notna().all()
    assert r5.tables["medication_request"]["rxnorm"].notna().all()
    assert_same_tables(r4.tables, r5.tables)


def test_compiled_views_match_the_reference_runner(generated: dict[str, Path], reference_dir: Path) -> None:
    resources = []
    for path in _table_files(generated["icd_mmol"]):
        resources += [json.loads(line) for line in path.read_text().splitlines() if line]
    resources += [to_r5(r) for r in resources[::3]]
    for path in sorted((reference_dir / "synthea-sample").glob("*.json")):
        resources += [e["resource"] for e in json.loads(path.read_text())["entry"]]
    for table, view in load_definitions().items():
        compiled = ViewRows(view)
        assert compiled.plan is not None, f"{table}: view left the compiled subset"
        rows = [row for resource in resources for row in compiled.rows(resource)]
        expected = [tuple(r[c] for c in compiled.columns) for r in run_view(view, resources)]
        assert rows == expected, table
        assert len(rows) > 0, table


# ---- runners: the views engine in pandas and on Spark ------------------------------------------

def _spark_export(source: Path, folder: Path) -> int:
    """The site's bulk files as an export folder, with bad lines of each kind, one gzip file, a blank
    line, and a malformed last line without a final newline."""
    import shutil

    folder.mkdir(parents=True)
    for path in _table_files(source):
        shutil.copy(path, folder / path.name)
    condition = folder / "Condition.ndjson"
    (folder / "Condition.ndjson.gz").write_bytes(gzip.compress(condition.read_bytes()))
    condition.unlink()
    lines = (folder / "Observation.ndjson").read_text().splitlines()
    first = json.loads(lines[0])
    unknown_unit = {**json.loads(lines[1]), "id": "odd-unit", "valueQuantity": {"value": 3, "code": "furlong"}}
    bad = ["{not json", '{"resourceType": "Patient", "id": "stray"}', lines[0], "",
           json.dumps({**first, "id": "no-date", "effectiveDateTime": "yesterday"}), json.dumps(unknown_unit)]
    (folder / "Observation.ndjson").write_text("\n".join(lines[:5] + bad + lines[5:]) + '\n{"resourceType": "Observation"')
    return len(lines) + len(bad) + 1


def test_spark_runner_writes_the_same_site(generated: dict[str, Path], tmp_path: Path, spark) -> None:
    from fedlab.flatten import FlattenError, flatten

    runs = {}
    for runner in ("pandas", "spark"):
        exp = experiment_from_dict({"name": "runners", "data_dir": str(tmp_path / runner),
                                    "flatten": {"runner": runner},
                                    "sites": [{"id": "a", "patients": 20, "seed": 6}]})
        last_line = _spark_export(generated["icd_mmol"], exp.data_path("export", None, "a"))
        runs[runner] = flatten(exp, progress=False)["a"]
    pandas_out, spark_out = runs["pandas"], runs["spark"]
    assert json.loads((spark_out / "_SUCCESS.json").read_text())["runner"] == "spark"
    for table in SCHEMAS:
        left, right = pq.read_table(pandas_out / f"{table}.parquet"), pq.read_table(spark_out / f"{table}.parquet")
        assert left.num_rows > 0 and left.equals(right), table
    for name in ("harmonization.json", "quarantine.ndjson"):
        assert (pandas_out / name).read_text() == (spark_out / name).read_text(), name
    quarantine = [json.loads(line) for line in (spark_out / "quarantine.ndjson").read_text().splitlines()]
    assert [(q["file"], q["line"]) for q in quarantine] == [("Observation.ndjson", n) for n in (6, 7, 8, 10, last_line)]
    # Without a final newline the error is at the end of the line, not at the start of the next.
    assert quarantine[-1]["reason"] == "malformed JSON: Expecting ',' delimiter at column 31"
    report = json.loads((spark_out / "harmonization.json").read_text())
    assert report["reconciliation"]["balanced"] and report["tables"]["observation"]["flags"]["unknown_unit"] >= 1

    # Bad input on the Spark runner: clear errors naming the file or the setting.
    with pytest.raises(FlattenError, match="views engine only"):
        flatten(experiment_from_dict({"name": "runners", "data_dir": str(tmp_path / "spark"),
                                      "flatten": {"runner": "spark", "engine": "fhiry"},
                                      "sites": [{"id": "a", "patients": 2, "seed": 1}]}), progress=False)
    from fedlab.flatten import flatten_ndjson_spark

    with pytest.raises(FlattenError, match="not found: .*Missing.ndjson"):
        flatten_ndjson_spark(spark, [tmp_path / "Missing.ndjson"])


def _add_duplicates(folder: Path) -> list[tuple[str, int, str]]:
    """Duplicate ids across partitions and across files: (file, line, reason) expected in quarantine."""
    encounter = folder / "Encounter.ndjson"
    lines = encounter.read_text().splitlines()
    first = json.loads(lines[0])
    encounter.write_text("\n".join([*lines, lines[0]]) + "\n")  # same id in the file's first and last split
    observations = [line for line in (folder / "Observation.ndjson").read_text().splitlines()[-20:-2]
                    if line.startswith("{") and '"component"' not in line]
    taken = json.loads(observations[-1])
    # Sorted before Observation.ndjson, so its copy of `taken` is the first occurrence.
    (folder / "Observation.extra.ndjson").write_text("\n".join([
        observations[-1], json.dumps({**taken, "id": "extra-only"}), json.dumps({"resourceType": "Patient"})]) + "\n")
    taken_line = (folder / "Observation.ndjson").read_text().splitlines().index(observations[-1]) + 1
    return [("Encounter.ndjson", len(lines) + 1, f"duplicate Encounter id {first['id']}"),
            ("Observation.ndjson", taken_line, f"duplicate Observation id {taken['id']}")]


def test_spark_distributed_runner_same_rows_as_pandas(generated: dict[str, Path], tmp_path: Path, spark) -> None:
    from fedlab.flatten import FlattenError, flatten

    runs, expected = {}, []
    for runner in ("pandas", "spark-distributed"):
        exp = experiment_from_dict({"name": "runners", "data_dir": str(tmp_path / runner),
                                    "flatten": {"runner": runner},
                                    "sites": [{"id": "a", "patients": 20, "seed": 6}]})
        export = exp.data_path("export", None, "a")
        _spark_export(generated["icd_mmol"], export)
        expected = _add_duplicates(export)
        runs[runner] = flatten(exp, progress=False)["a"]
    pandas_out, spark_out = runs["pandas"], runs["spark-distributed"]
    assert json.loads((spark_out / "_SUCCESS.json").read_text())["runner"] == "spark-distributed"
    left, right = {}, {}
    for table, schema in SCHEMAS.items():
        dataset = spark_out / f"{table}.parquet"
        assert dataset.is_dir() and list(dataset.glob("part-*.parquet")), table
        assert pq.read_table(dataset).schema.equals(schema, check_metadata=False), table
        left[table], right[table] = pd.read_parquet(pandas_out / f"{table}.parquet"), pd.read_parquet(dataset)
        assert len(left[table]) > 0 and dict(left[table].dtypes) == dict(right[table].dtypes), table
    assert_same_tables(left, right)  # the same rows as multisets, in any order
    from fedlab.features import read_tables as feature_tables

    for name, frame in feature_tables(spark, spark_out, "a").items():  # the next stage reads the folders
        assert frame.count() == len(left[name]), name
    for name in ("harmonization.json", "quarantine.ndjson"):
        assert (pandas_out / name).read_text() == (spark_out / name).read_text(), name
    quarantine = [json.loads(line) for line in (spark_out / "quarantine.ndjson").read_text().splitlines()]
    assert {(q["file"], q["line"], q["reason"]) for q in quarantine} >= set(expected)
    assert {q["file"] for q in quarantine} == {"Encounter.ndjson", "Observation.ndjson", "Observation.extra.ndjson"}
    report = json.loads((spark_out / "harmonization.json").read_text())
    assert report["reconciliation"]["balanced"] and report["reconciliation"]["quarantined"] == len(quarantine) == 8
    assert "extra-only" in set(right["observation"]["observation_id"])

    with pytest.raises(FlattenError, match="'spark-distributed' runs the views engine only"):
        flatten(experiment_from_dict({"name": "runners", "data_dir": str(tmp_path / "spark-distributed"),
                                      "flatten": {"runner": "spark-distributed", "engine": "fhiry"},
                                      "sites": [{"id": "a", "patients": 2, "seed": 1}]}), progress=False)
    from fedlab.flatten import flatten_ndjson_spark_distributed

    with pytest.raises(FlattenError, match="not found: .*Missing.ndjson"):
        flatten_ndjson_spark_distributed(spark, [tmp_path / "Missing.ndjson"], None, tmp_path / "out")


def test_a_byte_order_mark_is_not_a_malformed_line_in_any_runner(tmp_path: Path, spark) -> None:
    from fedlab.flatten import flatten_ndjson_spark

    lines = [json.dumps({"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1970-01-01"})
             for pid in ("a", "b")]
    plain, marked = tmp_path / "plain" / "Patient.ndjson", tmp_path / "marked" / "Patient.ndjson"
    for path, text in ((plain, "\n".join(lines) + "\n"), (marked, "\ufeff" + "\n".join(lines) + "\n")):
        path.parent.mkdir()
        path.write_text(text, encoding="utf-8")
    gz = marked.with_name("Patient.ndjson.gz")
    gz.write_bytes(gzip.compress(marked.read_bytes()))
    expected = flatten_ndjson([plain]).tables["patient"]
    for result in (flatten_ndjson([marked]), flatten_ndjson([gz]), flatten_ndjson_spark(spark, [marked])):
        assert result.harmonization()["reconciliation"]["quarantined"] == 0
        pd.testing.assert_frame_equal(result.tables["patient"], expected)
