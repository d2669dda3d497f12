"""What a learner sees: report.html opens with its headline and contents, cells do not wrap,
figures neither hide nor distort what they show, and results.md says what to look at next."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fedlab.config import experiment_from_dict  # noqa: E402
from fedlab.io import write_json  # noqa: E402
from fedlab.report import _auroc_bars, _privacy_curve, kxk_figure, notebook_view, write_report  # noqa: E402

SITES = ["a", "b", "c"]


def _rows() -> list[dict]:
    rows = []
    for seed in (0, 1):
        for test in SITES:
            for train in SITES:
                rows.append({"method": "local", "seed": seed, "train_sites": train, "test_site": test,
                             "metric": "auroc", "value": 0.8 if train == test else 0.3})
            for method in ("pooled", "fedavg", "fedprox"):
                rows.append({"method": method, "seed": seed, "train_sites": "a+b+c", "test_site": test,
                             "metric": "auroc", "value": 0.75 + 0.01 * seed})
    return rows


@pytest.fixture()
def report(tmp_path: Path) -> Path:
    exp = experiment_from_dict({"name": "t", "sites": [{"id": s, "patients": 5, "seed": 1} for s in SITES],
                                "train": {"seeds": [0, 1]}}, root=tmp_path)
    write_json(exp.report_path() / "results.json", {"rows": _rows()})
    return write_report(exp)


def test_html_has_contents_before_the_first_section_and_unwrapped_cells(report: Path) -> None:
    html = (report.parent / "report.html").read_text()
    contents, first_section = html.find('<nav class="toc">'), html.find("<h2")
    assert 0 < contents < first_section
    assert html.find("<h1") < contents
    assert "white-space:nowrap" in html
    assert 'href="#what-to-look-at-next"' in html


def test_results_md_names_the_article_and_what_to_look_at_next(report: Path) -> None:
    text = report.read_text()
    assert "医疗数据互操作性与联邦学习的python编程方向研究" in text
    assert "## What to look at next" in text
    assert "fedlab compare reports/t reports/reference" in text


def test_notebook_view_embeds_the_figures(report: Path) -> None:
    from IPython.display import Image, Markdown

    parts = notebook_view(report)
    assert isinstance(parts[0], Markdown) and "](figures/" not in parts[0].data
    assert len([p for p in parts if isinstance(p, Image)]) >= 2


def _table() -> dict:
    from fedlab.report import bootstrap_summary

    return bootstrap_summary({"rows": _rows()})


def test_kxk_heatmap_runs_from_0_to_1_and_separates_0_3_from_0_49() -> None:
    fig = kxk_figure(plt, _table(), SITES)
    image = fig.axes[0].images[0]
    assert (image.norm.vmin, image.norm.vmax) == (0.0, 1.0)
    low, near_chance = np.array(image.cmap(image.norm(0.30))), np.array(image.cmap(image.norm(0.49)))
    assert np.abs(low - near_chance)[:3].sum() > 0.4  # 0.30 does not look like 0.49
    plt.close(fig)


def test_auroc_legend_is_outside_the_axes() -> None:
    fig = _auroc_bars(plt, _table(), [*SITES, "pooled"])
    fig.canvas.draw()
    legend = fig.axes[0].get_legend().get_window_extent()
    assert legend.x0 >= fig.axes[0].get_window_extent().x1
    plt.close(fig)


def test_epsilon_tick_labels_do_not_overlap() -> None:
    curve = [{"noise_multiplier": z, "epsilon": e, "auroc_pooled": a}
             for z, e, a in ((0.5, 388.0, 0.8), (1.0, 61.0, 0.78), (2.0, 13.0, 0.7))]
    fig = _privacy_curve(plt, curve)
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()
              and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
    assert len(boxes) >= 2
    assert all(left.x1 <= right.x0 for left, right in zip(boxes, boxes[1:], strict=False))
    plt.close(fig)


def test_auroc_bars_accept_an_interval_that_misses_the_mean() -> None:
    table = {("fedavg", "a+b", "a"): {"mean": 0.70, "ci_low": 0.72, "ci_high": 0.90, "n": 1},
             ("local", "a", "a"): {"mean": 0.60, "ci_low": 0.40, "ci_high": 0.58, "n": 1}}
    fig = _auroc_bars(plt, table, ["a", "pooled"])
    plt.close(fig)
