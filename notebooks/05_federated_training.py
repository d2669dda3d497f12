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
# # 05 · Federated training with TensorFlow Federated
#
# **What this step does.** Each site splits its feature table into train and test (stratified,
# seeded). Three ways to learn are compared, as in FLamby (NeurIPS 2022):
#
# * **Local-k**: each hospital trains alone;
# * **Pooled**: one model on the union of all training sets (what centralizing the data gives);
# * **FedAvg**: TFF's weighted federated averaging — only model weights travel.
#
# Every model is scored on every site's test set, over several seeds.
#
# **Why.** "Does federated beat single-site?" has no answer until the baseline is named.

# %% tags=["parameters"]
config = "../configs/quickstart.yaml"
run = ""
force = False
overrides = ""

# %%
import matplotlib.pyplot as plt
import pandas as pd

from fedlab.federated import train
from fedlab.io import read_json
from fedlab.pipeline import load_for_notebook

exp = load_for_notebook(config, overrides)
run = run or exp.name
results_path = train(exp, run)
results = read_json(results_path)
rows = pd.DataFrame(results["rows"])

# %% [markdown]
# ## AUROC of every model on every test site (mean over seeds)

# %%
auroc = rows[rows.metric == "auroc"]
auroc.pivot_table(index=["method", "train_sites"], columns="test_site", values="value", aggfunc="mean").round(3)

# %% [markdown]
# ## Local-k models on every site: the K×K matrix

# %%
local = auroc[auroc.method == "local"].pivot_table(index="train_sites", columns="test_site", values="value")
local = local.reindex(index=exp.site_ids, columns=exp.site_ids)
fig, ax = plt.subplots(figsize=(5, 4))
image = ax.imshow(local.values, vmin=0.5, vmax=1.0, cmap="viridis")
ax.set_xticks(range(len(local.columns)), local.columns, rotation=30)
ax.set_yticks(range(len(local.index)), local.index)
ax.set_xlabel("test site")
ax.set_ylabel("trained on")
fig.colorbar(image, ax=ax)

# %% [markdown]
# ## Communication

# %%
results.get("communication", {})

# %% [markdown]
# ## Exercises
# 1. Which baseline makes FedAvg look best, and which makes it look worst?
# 2. Double `train.rounds`: how do the bytes sent change, and does AUROC?
