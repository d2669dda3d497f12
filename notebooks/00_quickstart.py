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
# # 00 · Quickstart: from synthetic hospitals to a results table
#
# This notebook runs the whole fedlab method once, at toy size:
#
# ```
# generate ─► serve/export ─► flatten ─► features ─► train ─► report
# (Synthea-   (Bulk Data +    (fhiry +    (Spark)     (TFF       (tables,
#  style FHIR)  SMART auth)    harmonize)              FedAvg vs   figures,
#                                                      baselines)  manifest)
# ```
#
# Each step is one function of the `fedlab` package (and one `fedlab` CLI verb, and one of the
# notebooks 01–06, which show each step in detail). Every step writes files that the next step
# reads, so you can stop here and open any of them.
#
# **Toy size.** By default this runs `configs/toy.yaml`: three small hospitals, one training seed,
# ten federated rounds, so it finishes in a couple of minutes and its numbers only illustrate.
# For the fuller run (four hospitals, three seeds, tighter confidence intervals) set
# `config = "../configs/quickstart.yaml"`, or run `make demo`. Steps whose outputs already exist
# are not redone (set `force = True` to redo them).

# %% tags=["parameters"]
config = "../configs/toy.yaml"  # the experiment (a YAML file)
run = ""  # run name (empty: the name of the experiment)
force = False  # True: redo this stage even if its outputs are complete
# Config changes, written as the CLI's --set takes them: ["train.rounds=3", "sites.0.patients=50"]
overrides = []  # a list of --set strings (or one)

# %%
from fedlab.features import build_features
from fedlab.federated import train
from fedlab.fhir.export import export
from fedlab.flatten import flatten
from fedlab.pipeline import load_for_notebook
from fedlab.report import write_report
from fedlab.synthea import generate

exp = load_for_notebook(config, overrides)
run = run or exp.name
print(f"experiment {exp.name!r}, run {run!r}: sites {exp.site_ids}")

# %% [markdown]
# ## 1. Generate each hospital's patients (FHIR R4, Synthea's shape)

# %%
generated = generate(exp, run, force=force)
generated

# %% [markdown]
# ## 2. Each hospital serves its data by Bulk Data `$export`; its node pulls it with a SMART token

# %%
exported = export(exp, run, force=force)
exported

# %% [markdown]
# ## 3. Flatten with fhiry and harmonize codes and units

# %%
tables = flatten(exp, run, force=force)
tables

# %% [markdown]
# ## 4. Features per hospital with Spark (features known at the index date; label after it)

# %%
features = build_features(exp, run, force=force)
features

# %% [markdown]
# ## 5. Train: Local-k, Pooled and FedAvg (TensorFlow Federated)

# %%
results_path = train(exp, run)
results_path

# %% [markdown]
# ## 6. Report

# %%
from IPython.display import display

from fedlab.report import notebook_view

report_md = write_report(exp, run)
for part in notebook_view(report_md):
    display(part)

# %% [markdown]
# ## Questions
# 1. Which site's Local model generalizes worst to the other sites, and why might that be?
# 2. Re-run with `train.rounds` doubled (`fedlab train --config ../configs/toy.yaml --set train.rounds=20`): does FedAvg close the gap to Pooled?
# 3. Run the same notebook with `config = "../configs/quickstart.yaml"`: which confidence intervals shrink, and why?
