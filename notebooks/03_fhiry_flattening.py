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
# # 03 · Flattening with fhiry, and harmonizing codes and units
#
# **What this step does.** FHIR resources are nested; models need tables. fhiry turns each
# resource into one row of a pandas DataFrame; fedlab then selects tidy tables (patient,
# encounter, condition, observation, medication_request), splits blood-pressure panels into
# systolic and diastolic rows, maps ICD-10-CM and SNOMED CT codes to one concept set, and converts
# lab units to canonical UCUM units (glucose mmol/L → mg/dL).
#
# **Why.** Without harmonization, a federated model would learn that "glucose 6.1" at one
# hospital and "glucose 110" at another are different things.

# %% tags=["parameters"]
config = "../configs/quickstart.yaml"
run = ""
force = False
overrides = ""

# %%
import pandas as pd

from fedlab.explore import read_tables
from fedlab.flatten import flatten
from fedlab.io import read_json
from fedlab.pipeline import load_for_notebook

exp = load_for_notebook(config, overrides)
run = run or exp.name
folders = flatten(exp, run, force=force)

# %% [markdown]
# ## Harmonization per site: how many values were converted, mapped or flagged

# %%
report = {site: read_json(path / "harmonization.json") for site, path in folders.items()}
pd.json_normalize([{"site": s, **r} for s, r in report.items()]).set_index("site").T

# %% [markdown]
# ## Glucose before and after unit harmonization

# %%
obs = read_tables(exp, run, "observation")
glucose = obs[obs.concept == "glucose"]
glucose.groupby(["site", "unit", "unit_canonical"])[["value", "value_canonical"]].median()

# %% [markdown]
# ## Conditions: source code systems mapped to one concept set

# %%
cond = read_tables(exp, run, "condition")
cond.groupby(["site", "system", "concept"], dropna=False).size().unstack(fill_value=0)

# %% [markdown]
# ## Exercises
# 1. Find the rows flagged `unknown_code` at one site: are they conditions the features need?
# 2. Why is it wrong to drop a value whose unit is unknown instead of flagging it?
