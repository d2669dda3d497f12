"""A hospital's FHIR endpoint served on loopback: Bulk Data `$export` (system, Patient, Group) behind
SMART Backend Services.

`SiteServer` serves a site's app (`fedlab.fhir.app.make_app`, the routes in `fedlab.fhir.routes`)
with waitress on 127.0.0.1 and a free port; `serve_site` is the `fedlab serve` verb. Export jobs run
in background threads and write their output under a private work folder (`fedlab.fhir.jobs`);
every data request needs a valid bearer token.

Beyond `$export`:
- de-identification (`deid_policy`): the server applies HIPAA Safe Harbor to every exported line, so
  data leaves the hospital de-identified; pseudonymous patient ids are accepted back (the `patient`
  parameter, write-back) because the hospital holds the pseudonym key;
- write-back: a transaction Bundle of RiskAssessments POSTed to the base (scope `.c`), stored and
  served by later exports (also with `_since`);
- R5: `Accept: application/fhir+json; fhirVersion=5.0` (or `_fhirVersion=5.0`) serves R5-mapped
  NDJSON; `metadata` answers in the version asked for;
- topic-based Subscriptions (R5, and the R4 backport shape) for new Observations, fed by
  `add_resources`;
- an audit log (`fedlab.fhir.audit`, JSON lines) of token issuance, kick-off, completion, download,
  DELETE, write-back and subscriptions.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import waitress
from waitress import wasyncore

from fedlab.fhir.app import make_app
from fedlab.fhir.faults import Fault, FaultInjector
from fedlab.fhir.smart import ClientRegistry, TokenIssuer
from fedlab.fhir.state import SiteState

if TYPE_CHECKING:
    from fedlab.config import Experiment

__all__ = ["Fault", "FaultInjector", "SiteServer", "SiteState", "make_app", "serve_site"]


class SiteServer:
    """Serve a site's app with waitress on a free loopback port: `with SiteServer(...) as srv: srv.base_url`."""

    def __init__(self, bulk_dir: str | Path, registry: ClientRegistry, host: str = "127.0.0.1", port: int = 0,
                 threads: int = 4, **app_options: Any) -> None:
        self.app = make_app(bulk_dir, registry, **app_options)
        self.state: SiteState = self.app.extensions["fedlab_site"]
        self.host, self.port, self.threads = host, port, threads
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("SiteServer is not running (use it as a context manager or call start())")
        return f"http://{self.host}:{self._server.effective_port}"

    @property
    def issuer(self) -> TokenIssuer:
        return self.state.issuer

    @property
    def faults(self) -> FaultInjector:
        return self.state.faults

    def add_resources(self, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Simulate new data arriving at the hospital (stamped `meta.lastUpdated` = now; notifies subscribers)."""
        return self.state.add_resources(resources)

    def audit_records(self) -> list[dict[str, Any]]:
        return self.state.audit.records()

    def start(self) -> SiteServer:
        self._server = waitress.create_server(self.app, host=self.host, port=self.port, threads=self.threads,
                                              asyncore_loop_timeout=0.2, clear_untrusted_proxy_headers=True)
        self.state.base_url = self.base_url
        self._thread = threading.Thread(target=self._server.run, name=f"site-server-{self.base_url}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self.state.shutdown()
        server_map = self._server._map
        # Close every socket from inside the server's own loop thread (closing them from here races
        # with its select()); with an empty map the loop returns.
        try:
            self._server.trigger.pull_trigger(lambda: wasyncore.close_all(server_map, ignore_all=True))
        except OSError:  # the loop already closed its trigger (it was exiting): close from here
            wasyncore.close_all(server_map, ignore_all=True)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server.task_dispatcher.shutdown()
        self._server = None

    def __enter__(self) -> SiteServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_site(exp: Experiment, run: str | None, site_id: str, port: int = 0, block: bool = True,
               **app_options: Any) -> SiteServer:
    """Serve one site's generated data with its node's client registered (`fedlab serve`).

    The node may also write predictions back (`system/RiskAssessment.cu`); with
    `exp.export.deidentify` everything served is de-identified; the audit log goes to
    `data/export/<run>/_audit/<site>.jsonl`.
    """
    from fedlab.fhir.site import audit_log_path, node_credentials, site_bulk_dir, site_deid_policy
    from fedlab.fhir.writeback import WRITE_SCOPE

    bulk_dir = site_bulk_dir(exp, run, site_id)
    client_id, key = node_credentials(exp, run, site_id)
    registry = ClientRegistry()
    registry.register(client_id, key.jwks(), f"{exp.export.scope} {WRITE_SCOPE}")
    if exp.export.deidentify:
        app_options.setdefault("deid_policy", site_deid_policy(exp, run, site_id))
    app_options.setdefault("audit_path", audit_log_path(exp, run, site_id))
    server = SiteServer(bulk_dir, registry, host=exp.export.host, port=port, **app_options).start()
    print(f"site {site_id}: FHIR Bulk Data server at {server.base_url} (client_id {client_id})", flush=True)
    if not block:
        return server
    try:
        while server._thread is not None and server._thread.is_alive():
            server._thread.join(timeout=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return server
