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
# # 06 · Report: results with confidence intervals, figures, claims, manifest
#
# **What this step does.** Collects the training results into `reports/<run>/results.md` with
# 95% confidence intervals, figures (PNG and SVG), the source article's claims next to what this
# run measured, and `manifest.json` (config, seeds, package versions, git commit, machine,
# timings) so that anyone can rerun it exactly.

# %% tags=["parameters"]
config = "../configs/quickstart.yaml"  # the experiment (a YAML file)
run = ""  # run name (empty: the name of the experiment)
force = False  # True: redo this stage even if its outputs are complete
# Config changes, written as the CLI's --set takes them: ["train.rounds=3", "sites.0.patients=50"]
overrides = []  # a list of --set strings (or one)

# %%
from IPython.display import display

from fedlab.pipeline import load_for_notebook
from fedlab.report import notebook_view, write_report

exp = load_for_notebook(config, overrides)
run = run or exp.name
results_md = write_report(exp, run)
print(results_md)

# %%
for part in notebook_view(results_md):
    display(part)

# %% [markdown]
# ## Questions
# 1. Read the claims table: under which baseline would "+19.3%" be true for this run, if any?
# 2. Which numbers in `manifest.json` would you need to rerun this exactly on another machine?
