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
# # 03 · Flattening FHIR into tables: ViewDefinitions, fhiry, and harmonization
#
# **What this step does.** FHIR resources are nested documents; models need flat tables. This
# stage turns each site's Bulk Data export into five tidy tables (patient, encounter, condition,
# observation, medication_request), splits blood-pressure panels into systolic and diastolic rows,
# maps ICD-10-CM and SNOMED CT codes to one concept set, and converts lab units to canonical UCUM
# units (glucose mmol/L → mg/dL).
#
# **Two engines, one result.** `flatten.engine: views` (the default) runs fedlab's
# [SQL-on-FHIR v2](https://build.fhir.org/ig/FHIR/sql-on-fhir-v2/) ViewDefinitions: declarative
# JSON, one per table, portable to any SQL-on-FHIR engine, and fast. `flatten.engine: fhiry` uses
# fhiry, which normalizes every resource into one very wide pandas row; fedlab then picks its
# columns. Both feed the same harmonization, quarantine and `harmonization.json`, and the test
# suite checks that they produce the same rows.
#
# **Why harmonize.** Without it, a federated model would learn that "glucose 6.1" at one hospital
# and "glucose 110" at another are different things.

# %% tags=["parameters"]
config = "../configs/quickstart.yaml"  # the experiment (a YAML file)
run = ""  # run name (empty: the name of the experiment)
force = False  # True: redo this stage even if its outputs are complete
# Config changes, written as the CLI's --set takes them: ["train.rounds=3", "sites.0.patients=50"]
overrides = []  # a list of --set strings (or one)

# %%
import json
from pathlib import Path

import pandas as pd

from fedlab.explore import compact_ids, read_tables
from fedlab.flatten import flatten, flatten_bundles, run_fhiry
from fedlab.io import read_json
from fedlab.pipeline import load_for_notebook
from fedlab.views import load_definitions, run_view_frame
from fedlab.views.outline import view_outline

exp = load_for_notebook(config, overrides)
run = run or exp.name
folders = flatten(exp, run, force=force)
print(f"engine: {exp.flatten.engine}")
{site: str(path) for site, path in folders.items()}

# %% [markdown]
# ## One patient, the fhiry way
#
# Take one patient's Synthea bundle (a median-sized record) from the first site. fhiry flattens every resource of the bundle
# into one row, with a column per leaf path (`code.coding`, `valueQuantity.value`, ...). The frame is
# as wide as the union of all resource shapes, and mostly empty.

# %%
site = exp.site_ids[0]
bundles = sorted((exp.data_path("synthea", run, site) / "fhir").glob("*.json"), key=lambda p: (p.stat().st_size, p.name))
bundle_path = bundles[len(bundles) // 2]  # a patient with a median-sized record
resources = [entry["resource"] for entry in json.loads(Path(bundle_path).read_text())["entry"]]
wide = run_fhiry(resources)
print(f"{bundle_path.name}: {len(resources)} resources -> fhiry frame of {wide.shape[0]} rows x {wide.shape[1]} columns")
print(f"share of empty cells: {wide.isna().mean().mean():.0%}")
wide[wide["resourceType"] == "Observation"].dropna(axis=1, how="all").head(3).T.head(15)

# %% [markdown]
# From that wide frame fedlab derives the tidy `observation` table: references become ids,
# timestamps become UTC instants, panels become one row per component, and each value gets its
# concept, canonical unit and a flag.

# %%
tidy_fhiry = flatten_bundles([bundle_path], engine="fhiry")
compact_ids(tidy_fhiry["observation"].sort_values("effective").head(8))

# %% [markdown]
# ## The same patient through the ViewDefinitions
#
# A ViewDefinition says *which* columns a table has and *where* each comes from, as FHIRPath. This
# is the observation view, one row per column (the JSON itself is
# `fedlab/views/definitions/observation.json`). Two things to notice:
#
# - `unionAll` with `forEach: "where(...)"` branches picks, per resource, the one branch whose
#   condition holds: the own value when there are no components, else one row per component (the
#   blood-pressure split); `effectiveDateTime`, else `effectivePeriod.start`, and so on.
# - Reference paths use `getReferenceKey(Patient)`, which accepts both `Patient/<id>` (bulk export)
#   and `urn:uuid:<id>` (Synthea bundles).
#
# The encounter and medication-request views use the same pattern to read both FHIR R4 and R5
# shapes (`period` or `actualPeriod`; `medicationCodeableConcept` or `medication.concept`).

# %%
views = load_definitions()
view_outline(views["observation"])

# %% [markdown]
# Running the view gives exactly the view's columns, one row per observed value. fedlab compiles
# each view once into Python closures over the resource dicts (anything the compiled subset cannot
# decide goes through the reference runner).

# %%
raw_rows = run_view_frame(views["observation"], resources)
compact_ids(raw_rows.head(8))

# %%
tidy_views = flatten_bundles([bundle_path], engine="views")
key = ["observation_id"]
same = tidy_views["observation"].sort_values(key).reset_index(drop=True).equals(
    tidy_fhiry["observation"].sort_values(key).reset_index(drop=True))
print(f"views and fhiry give the same observation table for this patient: {same}")
panels = tidy_views["observation"][tidy_views["observation"]["loinc"].isin(["8480-6", "8462-4"])]
compact_ids(panels.head(6))

# %% [markdown]
# ## Harmonization per site: flags
#
# Each table's rows carry a `flag`: `ok` (already in the reference code and unit), `converted`
# (unit converted with pint), `mapped` (code cross-walked, e.g. ICD-10-CM → concept),
# `unknown_code` or `unknown_unit` (kept and counted, never dropped). `harmonization.json` also
# reconciles every input line: read = accepted + quarantined.

# %%
report = {site: read_json(path / "harmonization.json") for site, path in folders.items()}
flags = pd.DataFrame({(site, table): entry.get("flags", {})
                      for site, r in report.items() for table, entry in r["tables"].items() if "flags" in entry})
flags.T

# %%
pd.DataFrame({site: r["reconciliation"] for site, r in report.items()}).T

# %% [markdown]
# ## Glucose before and after unit harmonization
#
# Sites that report glucose in mmol/L get `converted` rows: `value` keeps what the site sent,
# `value_canonical` is in mg/dL (× 18.016 for glucose's molar mass).

# %%
obs = read_tables(exp, run, "observation")
glucose = obs[obs.concept == "glucose"]
glucose.groupby(["site", "loinc", "unit", "unit_canonical", "flag"])[["value", "value_canonical"]].median()

# %% [markdown]
# ## Conditions: source code systems mapped to one concept set

# %%
cond = read_tables(exp, run, "condition")
cond.groupby(["site", "system", "concept"], dropna=False).size().unstack(fill_value=0)

# %% [markdown]
# ## Exercises
# 1. Re-run this stage with `--set flatten.engine=fhiry` (or `overrides = ["flatten.engine=fhiry"]`)
#    and compare the run time and the tables with the default `views` engine.
# 2. Add a column `category` (the first `category.coding.code`) to a copy of the observation view and
#    run it with `run_view_frame`. Which resources have none?
# 3. Find the rows flagged `unknown_code` at one site: are they conditions the features need?
# 4. Why is it wrong to drop a value whose unit is unknown instead of flagging it?
# 5. Convert a few resources to R5 with `fedlab.fhir.r5.to_r5` and check that the encounter view still
#    gives the same `class_code`, `start` and `end`. Which branch of its `unionAll` fires now?
