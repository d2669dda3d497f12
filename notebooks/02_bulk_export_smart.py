# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (fedlab)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Bulk Data `$export` behind SMART Backend Services
#
# **What this step does.** Each hospital runs a FHIR server on 127.0.0.1 that offers
# `$export` (FHIR Bulk Data v2). Its training node is a *backend service*: it holds a private
# key, signs a JWT assertion, trades it for a short-lived access token (`system/*.rs`), kicks off
# an export, polls until the server is done, downloads the NDJSON files, checks their line counts
# against the manifest, and deletes the job.
#
# **Why.** This is how a real EHR hands data to an analytics node, and the data never leaves
# the hospital: only the model will.

# %% tags=["parameters"]
config = "../configs/quickstart.yaml"  # the experiment (a YAML file)
run = ""  # run name (empty: the name of the experiment)
force = False  # True: redo this stage even if its outputs are complete
# Config changes, written as the CLI's --set takes them: ["train.rounds=3", "sites.0.patients=50"]
overrides = []  # a list of --set strings (or one)

# %%
import json

import pandas as pd

from fedlab.fhir.export import export
from fedlab.io import read_json
from fedlab.pipeline import load_for_notebook

exp = load_for_notebook(config, overrides)
run = run or exp.name
folders = export(exp, run, force=force)

# %% [markdown]
# ## The manifest each site's server returned

# %%
site = exp.site_ids[0]
manifest = read_json(folders[site] / "manifest.json")
print(json.dumps({k: manifest[k] for k in ("transactionTime", "requiresAccessToken", "request") if k in manifest}, indent=2))
pd.DataFrame(manifest.get("files", manifest.get("output", [])))

# %% [markdown]
# ## Resources exported per site and type

# %%
counts = {s: {f["type"]: f.get("count") for f in read_json(p / "manifest.json").get("files", [])}
          for s, p in folders.items()}
pd.DataFrame(counts).fillna(0).astype(int)

# %% [markdown]
# ## SMART Backend Services up close: a signed assertion gets a token, a forged one does not
#
# We start one site's server by hand, register a node's public key (JWKS), and ask for a token
# twice: once with an assertion signed by the registered private key, once with an assertion
# signed by a key the server has never seen.

# %%
import requests

from fedlab.fhir.export import site_bulk_dir
from fedlab.fhir.server import SiteServer
from fedlab.fhir.smart import ClientKey, ClientRegistry, make_client_assertion

node_key, intruder_key = ClientKey.generate("ES384"), ClientKey.generate("ES384")
registry = ClientRegistry()
registry.register("demo-node", node_key.jwks(), "system/*.rs")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

with SiteServer(site_bulk_dir(exp, run, site), registry) as server:
    smart = requests.get(f"{server.base_url}/.well-known/smart-configuration", timeout=10).json()
    token_url = smart["token_endpoint"]
    answers = {}
    for who, key in (("registered key", node_key), ("forged key", intruder_key)):
        form = {"grant_type": "client_credentials", "scope": "system/*.rs",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": make_client_assertion("demo-node", token_url, key)}
        reply = requests.post(token_url, data=form, timeout=10)
        answers[who] = {"status": reply.status_code,
                        **{k: v for k, v in reply.json().items() if k != "access_token"}}
    no_token = requests.get(f"{server.base_url}/$export", headers={"Prefer": "respond-async",
                            "Accept": "application/fhir+json"}, timeout=10)
print(json.dumps({k: smart[k] for k in ("token_endpoint", "token_endpoint_auth_methods_supported",
                                        "capabilities")}, indent=2))
pd.DataFrame(answers).T

# %%
print("kick-off without a token:", no_token.status_code, no_token.json()["issue"][0]["diagnostics"])

# %% [markdown]
# ## HIPAA Safe Harbor de-identification
#
# With `export.deidentify: true` in the config, each hospital's server de-identifies every
# resource *before* it leaves: names, identifiers, contact details, addresses below the state
# (ZIP cut to 3 digits), free text and photos are removed; dates keep only the year, or are shifted
# by a per-patient keyed offset (`export.deid_date_mode`); ages over 89 are grouped; resource ids
# become keyed pseudonyms so references still link. Here is one patient before and after.

# %%
from fedlab.explore import iter_ndjson
from fedlab.fhir.deid import DeidPolicy, deidentify_resource

patient = next(iter_ndjson(site_bulk_dir(exp, run, site) / "Patient.ndjson"))
policy = DeidPolicy(secret="demo-secret-kept-by-the-hospital", date_mode="shift", shift_seed=exp.seed)
after = deidentify_resource(patient, policy)
fields = ("id", "name", "birthDate", "address", "telecom", "identifier")
pd.DataFrame({"before": {k: json.dumps(patient.get(k))[:70] for k in fields},
              "after": {k: json.dumps(after.get(k))[:70] for k in fields}})

# %% [markdown]
# ## Write-back: predictions return to the hospital as FHIR `RiskAssessment`
#
# After training (notebook 05) each node writes its patients' predicted risk back to its own
# hospital as `RiskAssessment` resources in one transaction Bundle, with a token that carries
# `system/RiskAssessment.cu`. The probabilities below are **illustrative placeholders** to show
# the mechanism; the server validates the Bundle, stores it, and a re-export returns it.

# %%
import tempfile
from pathlib import Path

from fedlab.fhir.bulk import BulkDataClient
from fedlab.fhir.writeback import write_back

writer_registry = ClientRegistry()
writer_registry.register("demo-node", node_key.jwks(), "system/*.rs system/RiskAssessment.cu")
patients = [p["id"] for p in iter_ndjson(site_bulk_dir(exp, run, site) / "Patient.ndjson", limit=3)]
with SiteServer(site_bulk_dir(exp, run, site), writer_registry) as server:
    response = write_back(server.base_url, "demo-node", node_key,
                          [{"patient_id": pid, "probability": p} for pid, p in zip(patients, (0.12, 0.34, 0.56))],
                          model_name="illustration", run=run, scope="system/*.rs system/RiskAssessment.cu")
    with BulkDataClient(server.base_url, "demo-node", node_key, "system/*.rs", progress=False) as client:
        again = client.export(Path(tempfile.mkdtemp()), "system", types=["RiskAssessment"])
print([entry["response"]["status"] for entry in response["entry"]])
print({f["type"]: f.get("count") for f in again.manifest["output"]})

# %% [markdown]
# ## Exercises
# 1. Start one site by hand with `fedlab serve --config ../configs/quickstart.yaml --site general` and fetch `/.well-known/smart-configuration`.
# 2. Why must the client never infer anything from the output file names?
