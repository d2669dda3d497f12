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
# ## Exercises
# 1. Start one site by hand with `fedlab serve --config ../configs/quickstart.yaml --site general` and fetch `/.well-known/smart-configuration`.
# 2. Why must the client never infer anything from the output file names?
