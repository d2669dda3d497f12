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
# # 01 · Synthetic hospitals (Synthea-style FHIR R4)
#
# **What this step does.** For every site in the experiment config, fedlab simulates a
# population's life histories (growth, blood pressure, glucose and HbA1c, diagnoses, drugs,
# wellness visits) and writes them as FHIR R4 in the shape Synthea uses: one transaction Bundle
# per patient (`fhir/`) and one NDJSON file per resource type (`bulk/`).
#
# **Why.** Federated learning only has something to show when hospitals differ. The sites below
# differ in size, age and race mix, obesity and diabetes risk, visit frequency, lab
# missingness, **glucose units** (mg/dL vs mmol/L) and **condition code systems**
# (SNOMED CT vs ICD-10-CM), as real hospitals do.

# %% tags=["parameters"]
config = "../configs/quickstart.yaml"  # the experiment (a YAML file)
run = ""  # run name (empty: the name of the experiment)
force = False  # True: redo this stage even if its outputs are complete
# Config changes, written as the CLI's --set takes them: ["train.rounds=3", "sites.0.patients=50"]
overrides = []  # a list of --set strings (or one)

# %%
import matplotlib.pyplot as plt

from fedlab.explore import (
    site_axes,
    site_condition_codes,
    site_condition_prevalence,
    site_observations,
    site_patients,
)
from fedlab.pipeline import load_for_notebook
from fedlab.synthea import generate

exp = load_for_notebook(config, overrides)
run = run or exp.name
folders = generate(exp, run, force=force)
{site: str(path) for site, path in folders.items()}

# %% [markdown]
# ## Who lives at each site: age and sex

# %%
patients = site_patients(exp, run)
fig, axes = site_axes(plt, len(exp.site_ids), sharey=True)
for ax, site in zip(axes, exp.site_ids):
    sub = patients[patients.site == site]
    for gender, colour in (("female", "tab:red"), ("male", "tab:blue")):
        ax.hist(sub[sub.gender == gender].age, bins=range(0, 101, 10), alpha=0.5, color=colour, label=gender)
    ax.set_title(f"{site} (n={len(sub)})")
    ax.set_xlabel("age")
axes[0].legend()
plt.tight_layout()

# %% [markdown]
# ## Disease prevalence differs by site (ever diagnosed, as each site codes it)

# %%
prevalence = site_condition_prevalence(exp, run)
top = prevalence.groupby("display").prevalence.max().nlargest(8).index
table = prevalence[prevalence.display.isin(top)].pivot_table(index="display", columns="site", values="prevalence")
table.plot.barh(figsize=(8, 4), title="share of patients ever diagnosed")
table.round(3)

# %% [markdown]
# ## BMI and HbA1c by site

# %%
labs = site_observations(exp, run, {"39156-5", "4548-4"})
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for ax, (loinc, name) in zip(axes, (("39156-5", "BMI (kg/m2)"), ("4548-4", "HbA1c (%)"))):
    sub = labs[labs.loinc == loinc]
    ax.boxplot([sub[sub.site == s].value for s in exp.site_ids], tick_labels=exp.site_ids, showfliers=False)
    ax.tick_params(axis="x", labelrotation=45 if len(exp.site_ids) > 4 else 0)
    ax.set_title(name)
plt.tight_layout()

# %% [markdown]
# ## Lab values as each site records them: glucose units differ

# %%
glucose = site_observations(exp, run, {"2339-0", "15074-8"})
glucose.groupby(["site", "loinc", "unit"]).value.describe()[["count", "mean", "50%"]]

# %% [markdown]
# ## Condition coding: SNOMED CT at most sites, ICD-10-CM at one

# %%
codes = site_condition_codes(exp, run)
codes.groupby(["site", "system"]).n.sum().unstack(fill_value=0)

# %% [markdown]
# ## Exercises
# 1. Add a fifth site to a copy of `configs/quickstart.yaml` with `diabetes_risk: 2.0`: how does its HbA1c distribution change?
# 2. Open one bundle in `data/synthea/<run>/<site>/fhir/` and find the blood-pressure panel (LOINC 85354-9): where are systolic and diastolic?
