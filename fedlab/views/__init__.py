"""SQL-on-FHIR v2 ViewDefinitions: a pure-Python runner, a Spark engine, the official test suite.

    from fedlab.views import load_definitions, run_view_frame
    frame = run_view_frame(load_definitions()["observation"], resources)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlab.views.runner import ViewDefinitionError, compile_view, run_view, run_view_frame

DEFINITIONS_DIR = Path(__file__).resolve().parent / "definitions"

__all__ = ["DEFINITIONS_DIR", "ViewDefinitionError", "compile_view", "load_definitions", "run_view", "run_view_frame"]


def load_definitions(folder: Path | str = DEFINITIONS_DIR) -> dict[str, dict[str, Any]]:
    """fedlab's ViewDefinitions by table name (file stem), each validated."""
    views: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            view = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ViewDefinitionError(f"{path}: line {error.lineno}: invalid JSON ({error.msg})") from None
        try:
            compile_view(view)
        except ViewDefinitionError as error:
            raise ViewDefinitionError(f"{path}: {error}") from None
        views[path.stem] = view
    return views
