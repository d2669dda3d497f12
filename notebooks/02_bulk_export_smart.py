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
config = "../configs/quickstart.yaml"
run = ""
force = False
overrides = ""

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
# ## Exercises
# 1. Start one site by hand with `fedlab serve --config ../configs/quickstart.yaml --site general` and fetch `/.well-known/smart-configuration`.
# 2. Why must the client never infer anything from the output file names?
