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
# seeded). Ways to learn are compared, as in FLamby (NeurIPS 2022):
#
# * **Local-k**: each hospital trains alone;
# * **Pooled**: one model on the union of all training sets (what centralizing the data gives);
# * **FedAvg** (and FedProx, FedAdam, …): TFF's weighted federated averaging — only model updates travel;
# * **Cyclic**: one model visits the hospitals in turn.
#
# Every model is scored on every site's test set, over several seeds. Optional extras, all set in
# the config's `train:` block: client learning rates tuned on validation data (`lr_grid`),
# 8-bit quantized updates (`quantize_bits`), client-level differential privacy (`privacy`).
#
# **Why.** "Does federated beat single-site?" has no answer until the baseline is named.

# %% tags=["parameters"]
config = "../configs/quickstart.yaml"  # the experiment (a YAML file)
run = ""  # run name (empty: the name of the experiment)
force = False  # True: redo this stage even if its outputs are complete
# Config changes, written as the CLI's --set takes them: ["train.rounds=3", "sites.0.patients=50"]
overrides = []  # a list of --set strings (or one)

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
from fedlab.report import bootstrap_summary, kxk_figure, trained_sites

if (auroc.method == "local").any():
    kxk_figure(plt, bootstrap_summary(results), trained_sites(exp, results))
    plt.show()

# %% [markdown]
# ## Communication
#
# Bytes a federated run sends, against what centralizing would ship (the raw NDJSON export and
# the Parquet feature tables). Centralizing grows with the number of patients, federated
# training does not: `crossover_patients` is the population above which federated is cheaper.

# %%
communication = results.get("communication", {})
{key: communication.get(key) for key in ("total_bytes", "raw_data_bytes", "centralized", "crossover_patients",
                                         "quantization")}

# %%
curves = results.get("comm_curve", {})
if curves:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in curves.items():
        ax.plot([p["cumulative_bytes"] for p in points], [p["auroc_pooled"] for p in points], marker="o",
                label=method)
    for name, size in communication.get("centralized", {}).items():
        if name != "n_patients":
            ax.axvline(size, linestyle="--", color="grey")
            ax.annotate(f"centralize: {name}", (size, 0.5), rotation=90, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes sent")
    ax.set_ylabel("pooled-test AUROC")
    ax.legend()

# %% [markdown]
# ## Privacy: AUROC against epsilon
#
# With `train.privacy.sweep`, FedAvg is trained at several noise multipliers. Client-level DP
# protects a whole hospital; with a handful of sites it is nearly meaningless (see the warning).

# %%
privacy_curve = pd.DataFrame(results.get("privacy_curve", []))
if not privacy_curve.empty:
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(privacy_curve["epsilon"], privacy_curve["auroc_pooled"], marker="o")
    for _, point in privacy_curve.iterrows():
        ax.annotate(f"z={point['noise_multiplier']:g}", (point["epsilon"], point["auroc_pooled"]), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon (delta = {privacy_curve['delta'].iloc[0]:g})")
    ax.set_ylabel("pooled-test AUROC")
{method: record.get("warning") for method, record in results.get("privacy", {}).items()}

# %% [markdown]
# ## Tuned learning rates (validation data, never test)

# %%
results.get("tuning", {}).get("chosen", "no lr_grid in the config: client_lr used for every method")

# %% [markdown]
# ## Try it yourself
#
# Pick sites, a method, a model, rounds and DP noise (0 = no DP), then press **train**: the loss
# and pooled-test AUROC of the global model are drawn after every round. Nothing is written to
# disk. (In a batch run the widgets are only displayed; training starts on a click.)

# %%
import ipywidgets as widgets
from IPython.display import display

from fedlab.federated.interactive import INTERACTIVE_METHODS, train_interactive

site_box = widgets.SelectMultiple(options=exp.site_ids, value=tuple(exp.site_ids), description="sites")
method_box = widgets.Dropdown(options=INTERACTIVE_METHODS, value="fedavg", description="method")
model_box = widgets.Dropdown(options=["logreg", "mlp"], value=exp.train.model, description="model")
rounds_box = widgets.IntSlider(value=exp.train.rounds, min=1, max=100, description="rounds")
noise_box = widgets.FloatSlider(value=0.0, min=0.0, max=3.0, step=0.1, description="DP noise")
button = widgets.Button(description="train", button_style="primary")
plot_area = widgets.Output()


def _on_click(_: widgets.Button) -> None:
    losses, aurocs = [], []

    def redraw(round_number: int, loss: float, auc: float | None) -> None:
        losses.append(loss)
        aurocs.append(auc)
        with plot_area:
            plot_area.clear_output(wait=True)
            fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
            left.plot(range(1, len(losses) + 1), losses, marker=".")
            left.set_title("training loss")
            right.plot(range(1, len(aurocs) + 1), aurocs, marker=".")
            right.set_title("pooled-test AUROC")
            right.set_xlabel(f"round {round_number} of {rounds_box.value}")
            plt.show()

    out = train_interactive(exp, run, list(site_box.value), method_box.value, model_box.value,
                            rounds_box.value, noise_box.value or None, on_round=redraw)
    with plot_area:
        print(f"final pooled AUROC {out['auroc_pooled']}, epsilon {out['epsilon']}")


button.on_click(_on_click)
display(widgets.VBox([site_box, method_box, model_box, rounds_box, noise_box, button, plot_area]))

# %% [markdown]
# ## Exercises
# 1. Which baseline makes FedAvg look best, and which makes it look worst?
# 2. Double `train.rounds`: how do the bytes sent change, and does AUROC?
# 3. Raise the DP noise until AUROC falls to 0.5. What epsilon is that, and would it protect a hospital?
