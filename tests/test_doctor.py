"""`fedlab doctor` reports every failing check with how to fix it, and keeps going."""

from __future__ import annotations

import pytest

from fedlab.doctor import check_java, check_kernel, check_python, run_doctor


def test_doctor_reports_failures_and_continues(capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> str:
        raise RuntimeError("java not found; install Java 17")

    ok = run_doctor([("java", broken), ("python", check_python)])
    out = capsys.readouterr().out
    assert not ok
    assert "FAIL java: java not found; install Java 17" in out
    assert "ok   python: 3.11" in out


def test_real_checks_pass_on_this_machine() -> None:
    assert check_python().startswith("3.11")
    assert "17" in check_java()
    assert check_kernel()


def test_doctor_prints_no_known_harmless_noise(tmp_path) -> None:
    """A CPU-only run prints neither TensorFlow's CUDA/TensorRT lines nor Spark's start-up
    warnings: they go to the log folder."""
    import os
    import subprocess
    import sys

    from fedlab.logs import is_harmless

    out, err = tmp_path / "out", tmp_path / "err"
    env = {**os.environ, "FEDLAB_LOG_DIR": str(tmp_path / "logs")}
    with out.open("w") as stdout, err.open("w") as stderr:  # files, not pipes: TFF's worker holds them
        done = subprocess.run([sys.executable, "-m", "fedlab.cli", "doctor"], stdout=stdout, stderr=stderr,
                              stdin=subprocess.DEVNULL, env=env, timeout=600)
    printed = out.read_text() + err.read_text()
    assert done.returncode == 0, printed
    assert not [line for line in printed.splitlines() if is_harmless(line)], printed
    logged = "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
    assert "Unable to register cuDNN factory" in logged and "NativeCodeLoader" in logged
