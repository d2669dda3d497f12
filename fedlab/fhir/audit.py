"""A site server's audit trail: one JSON object per line, appended and flushed at once, never rewritten.

Records token issuance and denial, export kick-off, completion, failure, download and DELETE,
write-back (stored, denied, rejected) and Subscriptions, each with the client id and scopes.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from fedlab.fhir.http import iso, utc_now


class AuditLog:
    """Append-only JSON-lines audit trail (one record per line, flushed at once; never rewritten)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> None:
        entry = {"time": iso(utc_now()), "event": event, **fields}
        line = json.dumps(entry, default=str, separators=(",", ":")) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with self._lock:
            return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
