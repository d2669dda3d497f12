"""A site's paths and policies, shared by its FHIR server (`fedlab serve`) and the export stage.

Everything here is the hospital side of one site of a run:

- `site_bulk_dir`: the generated `data/synthea/<run>/<site>/bulk/` folder the server serves;
- `node_credentials`: the site node's SMART client id and key pair (`data/export/<run>/_keys/<site>/`);
- `site_deid_policy`: the de-identification policy, whose secret stays in
  `data/export/<run>/_site_secrets/<site>/` (standing in for the hospital's own vault);
- `audit_log_path`: where the site server appends its audit log (`data/export/<run>/_audit/<site>.jsonl`).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from fedlab.errors import FedlabError
from fedlab.fhir.deid import DeidPolicy
from fedlab.fhir.smart import ClientKey
from fedlab.io import atomic_open, is_complete

if TYPE_CHECKING:
    from fedlab.config import Experiment

KEY_ALGORITHM = "ES384"


class ExportStageError(FedlabError):
    """A site cannot be served or exported; the message names the site and what to do."""


def site_bulk_dir(exp: Experiment, run: str | None, site: str) -> Path:
    """The generated `bulk/` folder of a site, checked to be complete and non-empty."""
    exp.site(site)
    site_dir = exp.data_path("synthea", run, site)
    bulk = site_dir / "bulk"
    if not is_complete(site_dir) or not bulk.is_dir() or not any(bulk.glob("*.ndjson")):
        raise ExportStageError(f"site {site!r}: generated data missing or incomplete at {site_dir} "
                               f"(needs bulk/*.ndjson and _SUCCESS.json); run `fedlab generate` first")
    return bulk


def node_client_id(site: str) -> str:
    return f"fedlab-node-{site}"


def node_credentials(exp: Experiment, run: str | None, site: str) -> tuple[str, ClientKey]:
    """The site node's client id and key pair, created once under `data/export/<run>/_keys/<site>/`."""
    key = ClientKey.load_or_create(exp.data_path("export", run) / "_keys" / site, alg=KEY_ALGORITHM)
    return node_client_id(site), key


def site_deid_policy(exp: Experiment, run: str | None, site: str, date_mode: str = "year",
                     shift_seed: int | None = None) -> DeidPolicy:
    """The site's de-identification policy; its secret is created once and kept on the hospital side."""
    path = exp.data_path("export", run) / "_site_secrets" / site / "deid_secret"
    if not path.is_file():
        with atomic_open(path, "w") as handle:  # mkstemp files are 0600
            handle.write(secrets.token_hex(32))
    secret = path.read_text().strip()
    if not secret:
        raise ExportStageError(f"site {site!r}: empty de-identification secret at {path}; delete it to make a new one")
    seed = exp.seed if shift_seed is None else shift_seed
    return DeidPolicy(secret, date_mode=date_mode, shift_seed=seed)  # type: ignore[arg-type]


def audit_log_path(exp: Experiment, run: str | None, site: str) -> Path:
    return exp.data_path("export", run) / "_audit" / f"{site}.jsonl"
