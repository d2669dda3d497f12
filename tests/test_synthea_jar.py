"""`engine: synthea-jar`: the command line fedlab gives Synthea, and the reading of its output.

Real Synthea is a jar on GitHub releases that these machines cannot download, so the run test puts
a stand-in `java` first on PATH: it records its arguments and writes two real Synthea bundles
where the jar would. Everything after that (layout, NDJSON conversion, markers) is real.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedlab.config import experiment_from_dict
from fedlab.errors import FedlabError
from fedlab.io import is_complete, read_json
from fedlab.synthea.java import bundles_to_bulk, generate_with_jar, synthea_command


def _exp(tmp_path: Path):
    return experiment_from_dict({
        "name": "jar", "seed": 5,
        "sites": [{"id": "boston", "patients": 25, "seed": 9, "age_mean": 50, "age_sd": 10,
                   "state": "Massachusetts", "city": "Boston"}],
        "generate": {"engine": "synthea-jar", "reference_date": "2025-06-30", "years_of_history": 10},
    }, root=tmp_path)


def test_command_line_carries_seeds_date_population_and_location(tmp_path: Path) -> None:
    exp = _exp(tmp_path)
    cmd = synthea_command(exp, exp.sites[0], Path("/opt/synthea.jar"), tmp_path / "out")
    assert cmd[:3] == ["java", "-jar", "/opt/synthea.jar"]
    pairs = dict(zip(cmd[3:11:2], cmd[4:12:2], strict=True))
    assert pairs == {"-s": "9", "-cs": "14", "-r": "20250630", "-p": "25"}
    assert cmd[cmd.index("-a") + 1] == "30-70"
    assert f"--exporter.baseDirectory={tmp_path / 'out'}" in cmd
    assert "--exporter.years_of_history=10" in cmd and "--exporter.fhir.export=true" in cmd
    assert cmd[-2:] == ["Massachusetts", "Boston"]


def test_bundles_become_bulk_ndjson_with_type_id_references(tmp_path: Path, reference_dir: Path) -> None:
    counts = bundles_to_bulk(reference_dir / "synthea-sample", tmp_path / "bulk")
    assert counts["Patient"] == 2
    lines = (tmp_path / "bulk" / "Observation.ndjson").read_text().splitlines()
    assert len(lines) == counts["Observation"] > 0
    subject = json.loads(lines[0])["subject"]["reference"]
    assert subject.startswith("Patient/") and "urn:uuid" not in "".join(lines)


def test_missing_jar_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNTHEA_JAR", raising=False)
    exp = _exp(tmp_path)
    with pytest.raises(FedlabError, match="SYNTHEA_JAR is not set"):
        generate_with_jar(exp, "r", exp.sites[0])
    monkeypatch.setenv("SYNTHEA_JAR", str(tmp_path / "nope.jar"))
    with pytest.raises(FedlabError, match="nope.jar: no such file"):
        generate_with_jar(exp, "r", exp.sites[0])


def test_run_reads_the_jar_output_layout(tmp_path: Path, reference_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    args_file = tmp_path / "java-args.json"
    stand_in = bin_dir / "java"
    stand_in.write_text(f"""#!/usr/bin/env python3
import json, pathlib, shutil, sys
json.dump(sys.argv[1:], open({str(args_file)!r}, "w"))
base = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--exporter.baseDirectory="))
out = pathlib.Path(base) / "fhir"
out.mkdir(parents=True)
for bundle in pathlib.Path({str(reference_dir / 'synthea-sample')!r}).glob("*.json"):
    shutil.copy(bundle, out / bundle.name)
""")
    stand_in.chmod(0o755)
    jar = tmp_path / "synthea-with-dependencies.jar"
    jar.write_bytes(b"PK")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SYNTHEA_JAR", str(jar))
    exp = _exp(tmp_path)
    folder = generate_with_jar(exp, "r", exp.sites[0])
    assert is_complete(folder)
    assert json.loads(args_file.read_text())[:2] == ["-jar", str(jar)]
    assert len(list((folder / "fhir").glob("*.json"))) == 2
    marker = read_json(folder / "_SUCCESS.json")
    assert marker["engine"] == "synthea-jar" and marker["counts"]["Patient"] == 2
    assert (folder / "bulk" / "Patient.ndjson").read_text().count("\n") == 2
    assert not (folder / "_synthea_output").exists()
