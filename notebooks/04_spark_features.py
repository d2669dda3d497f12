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
# # 04 · Feature engineering per hospital with Apache Spark
#
# **What this step does.** Each hospital builds its own feature table, in place, with Spark:
# a cohort of adults without diabetes at an **index date** (one wellness visit per patient,
# chosen by a seeded rule), features known **at** the index date (look-back window), and a
# label that comes strictly **after** it (incident type 2 diabetes within the horizon).
#
# **Why.** Anything recorded after the index date would leak the answer. Every hospital computes
# the same columns in the same order, so the federated model sees the same inputs everywhere.

# %% tags=["parameters"]
config = "../configs/quickstart.yaml"  # the experiment (a YAML file)
run = ""  # run name (empty: the name of the experiment)
force = False  # True: redo this stage even if its outputs are complete
# Config changes, written as the CLI's --set takes them: ["train.rounds=3", "sites.0.patients=50"]
overrides = []  # a list of --set strings (or one)

# %%
import matplotlib.pyplot as plt
import pandas as pd

from fedlab.explore import read_features, site_axes
from fedlab.features import build_features
from fedlab.io import read_json
from fedlab.pipeline import load_for_notebook
from fedlab.spark import get_spark

exp = load_for_notebook(config, overrides)
run = run or exp.name
spark = get_spark(exp)
folders = build_features(exp, run, spark=spark, force=force)

# %% [markdown]
# ## Cohort funnel and label prevalence per site

# %%
quality = {site: read_json(path / "quality.json") for site, path in folders.items()}
pd.json_normalize([{"site": s, **{k: v for k, v in q.items() if not isinstance(v, dict) or k == "funnel"}}
                   for s, q in quality.items()]).set_index("site").T

# %% [markdown]
# ## Feature distributions differ by site (the heterogeneity FL must cope with)

# %%
features = read_features(exp, run)
columns = [c for c in ("age", "bmi_last", "hba1c_last", "glucose_last") if c in features.columns]
fig, axes = site_axes(plt, len(columns), size=(3.5, 3.0))
for ax, column in zip(axes, columns):
    for site, sub in features.groupby("site"):
        ax.hist(sub[column].dropna(), bins=20, alpha=0.45, density=True, label=site)
    ax.set_title(column)
axes[0].legend(fontsize=7, ncols=1 + len(exp.site_ids) // 6)
plt.tight_layout()

# %%
features.groupby("site").label.agg(["count", "mean"]).rename(columns={"mean": "prevalence"})

# %%
spark.stop()

# %% [markdown]
# ## Exercises
# 1. Set `task.outcome: hypertension` in a copy of the config: which features matter now?
# 2. Where in `fedlab/features.py` is the look-back window enforced?
