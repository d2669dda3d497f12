"""The site server's Flask app factory: one hospital's FHIR endpoint over its `bulk/` folder.

`make_app` builds the site's state (`fedlab.fhir.state.SiteState`: token issuer, job store, audit
log, added resources, Subscriptions) and registers the blueprints of `fedlab.fhir.routes`; every
data request needs a valid bearer token, and every error is answered as an OperationOutcome.
`fedlab.fhir.server.SiteServer` serves the app with waitress.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from flask import Flask, Response, request

from fedlab.fhir.deid import DeidPolicy
from fedlab.fhir.faults import FaultInjector
from fedlab.fhir.http import FhirError, fhir_json, operation_outcome
from fedlab.fhir.routes import BLUEPRINTS
from fedlab.fhir.smart import ClientRegistry, TokenIssuer
from fedlab.fhir.state import SiteOptions, SiteState


def make_app(bulk_dir: str | Path, registry: ClientRegistry, *, issuer: TokenIssuer | None = None,
             job_delay_s: float = 0.0, retry_after_s: int = 1, max_concurrent_jobs: int = 4,
             max_lines_per_file: int | None = None, work_dir: str | Path | None = None,
             faults: FaultInjector | None = None, base_url: str | None = None,
             deid_policy: DeidPolicy | None = None, audit_path: str | Path | None = None) -> Flask:
    """The site's Flask app. `app.extensions["fedlab_site"]` holds its SiteState (tokens, jobs, faults).

    `deid_policy` de-identifies everything served; `audit_path` defaults to `<work_dir>/audit.jsonl`
    (a temporary work folder, and its audit log, are removed when the server stops).
    """
    bulk_dir = Path(bulk_dir)
    if not bulk_dir.is_dir():
        raise FileNotFoundError(f"{bulk_dir}: bulk data folder not found")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="fedlab-export-jobs-"))
    options = SiteOptions(job_delay_s, retry_after_s, max_concurrent_jobs, max_lines_per_file)
    state = SiteState(bulk_dir, issuer or TokenIssuer(registry), options, work, faults or FaultInjector(),
                      deid=deid_policy, audit_path=Path(audit_path) if audit_path else None,
                      owns_work_dir=work_dir is None)
    state.base_url = base_url.rstrip("/") if base_url else None
    app = Flask(__name__)
    app.extensions["fedlab_site"] = state
    app.register_error_handler(FhirError, _fhir_error)

    @app.before_request
    def _remember_base() -> None:
        state.base_url = state.base_url or request.host_url.rstrip("/")

    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    return app


def _fhir_error(err: FhirError) -> Response:
    return fhir_json(operation_outcome(err.code, err.diagnostics), err.status, err.headers)
