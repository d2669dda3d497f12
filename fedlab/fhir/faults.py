"""Injected faults for tests and demos: the next request of one kind answers with an error, a
truncated file, or a connection dropped mid-download."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from flask import Response

from fedlab.fhir.http import fhir_json, operation_outcome


@dataclass
class Fault:
    """An injected answer for the next request of one kind: an error status or a truncated file."""

    status: int = 503
    retry_after: str | None = None
    transient: bool = True
    truncate_lines: int | None = None
    reset_after_lines: int | None = None  # download: send this many lines, then drop the connection


class FaultInjector:
    """Queues of faults per request kind (`token`, `kickoff`, `status`, `download`), consumed in order."""

    def __init__(self) -> None:
        self._queues: dict[str, list[Fault]] = {}
        self._lock = threading.Lock()
        self.served: dict[str, int] = {}

    def add(self, kind: str, fault: Fault, times: int = 1) -> None:
        with self._lock:
            self._queues.setdefault(kind, []).extend([fault] * times)

    def take(self, kind: str) -> Fault | None:
        with self._lock:
            queue = self._queues.get(kind)
            if not queue:
                return None
            self.served[kind] = self.served.get(kind, 0) + 1
            return queue.pop(0)


def fault_response(fault: Fault) -> Response:
    code = "transient" if fault.transient else "exception"
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
    return fhir_json(operation_outcome(code, f"injected fault: HTTP {fault.status}"), fault.status, headers)
