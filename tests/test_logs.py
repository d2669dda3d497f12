"""Quiet by default, loud in the log: known-harmless start-up lines leave the terminal and the
notebooks and land in the run's log folder; everything else is shown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat

from fedlab.logs import split_harmless
from fedlab.notebooks import move_harmless_output

TF_LINE = ("2026-12-08 00:53:47.834416: E tensorflow/compiler/xla/stream_executor/cuda/cuda_dnn.cc:9342] "
           "Unable to register cuDNN factory: Attempting to register factory for plugin cuDNN when one has "
           "already been registered\n")
SPARK_LINE = ("26/12/08 01:06:46 WARN NativeCodeLoader: Unable to load native-hadoop library for your "
              "platform... using builtin-java classes where applicable\n")


def test_split_keeps_everything_that_is_not_known_harmless() -> None:
    real = "26/12/08 01:06:46 WARN TaskSetManager: Lost task 0.0 in stage 3.0\nValueError: bad\n"
    kept, harmless = split_harmless(TF_LINE + real + SPARK_LINE)
    assert kept == real
    assert harmless == TF_LINE + SPARK_LINE


def test_native_stderr_lines_are_filtered_into_the_log(tmp_path: Path) -> None:
    code = ("import os\nfrom fedlab.logs import native_stderr_filtered\n"
            "with native_stderr_filtered():\n"
            f"    os.write(2, {TF_LINE.encode()!r})\n"
            "    os.write(2, b'a real problem\\n')\n")
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as stdout, err.open("w") as stderr:
        subprocess.run([sys.executable, "-c", code], stdout=stdout, stderr=stderr, check=True, timeout=120,
                       env={"FEDLAB_LOG_DIR": str(tmp_path / "logs"), "PATH": "/usr/bin:/bin"})
    assert err.read_text() == "a real problem\n"
    assert (tmp_path / "logs" / "noise.log").read_text() == TF_LINE


def test_harmless_lines_leave_an_executed_notebook(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text=TF_LINE + SPARK_LINE),
        nbformat.v4.new_output("stream", name="stderr", text="UserWarning: something real\n" + SPARK_LINE),
        nbformat.v4.new_output("execute_result", data={"text/plain": "1"}, execution_count=1)])]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    assert move_harmless_output(path, tmp_path / "nb.log") == 3
    outputs = nbformat.read(path, as_version=4).cells[0].outputs
    assert [o.get("text") for o in outputs] == ["UserWarning: something real\n", None]
    assert (tmp_path / "nb.log").read_text() == TF_LINE + SPARK_LINE + SPARK_LINE


def test_spark_warnings_go_to_the_log_file(spark) -> None:
    options = spark.sparkContext.getConf().get("spark.driver.extraJavaOptions")
    folder = Path(options.split('-Dfedlab.logdir="')[1].split('"')[0])
    assert "spark-log4j2.properties" in options
    assert "NativeCodeLoader" in (folder / "spark.log").read_text()
