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
