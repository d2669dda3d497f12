"""The installed environment matches the lock: `pip check` shows only the documented TFF pins."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Deliberate, documented in README.md and requirements/overrides.txt.
KNOWN_MISMATCHES = {
    ("tensorflow-federated", "jaxlib"),
    ("tensorflow-federated", "typing-extensions"),
    ("tensorflow-privacy", "packaging"),
}


def test_pip_check_reports_only_known_tff_pins() -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.strip() and not line.startswith("WARNING")]
    found = set()
    for line in lines:
        match = re.match(r"(\S+) [\d.]+\S* has requirement (\S+?)[=~<>!]", line)
        assert match, f"unexpected pip check line: {line}"
        found.add((match.group(1).lower(), match.group(2).lower()))
    assert found <= KNOWN_MISMATCHES, f"new dependency mismatches: {found - KNOWN_MISMATCHES}"


def test_lock_is_fully_hashed_and_pins_the_stack() -> None:
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    pins = dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+) \\$", lock, flags=re.M))
    assert pins["tensorflow-federated"] == "0.87.0"
    assert pins["jaxlib"] == "0.4.13"
    assert pins["pyspark"].startswith("3.5")
    assert "fhiry" in pins and "papermill" in pins
    blocks = re.split(r"^(?=[a-z0-9])", lock, flags=re.M)
    unhashed = [b.split("==")[0] for b in blocks if "==" in b and "--hash=sha256:" not in b]
    assert not unhashed


def test_tff_is_not_a_declared_dependency() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "tensorflow" not in deps
