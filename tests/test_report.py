"""The report stage: CIs, baselines and claims computed from a results.json we control."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedlab.config import experiment_from_dict
from fedlab.io import read_json, write_json
from fedlab.report import comparisons, own_and_off_site, summarize, write_report

SITES = ["a", "b"]


def _rows() -> list[dict]:
    # local model of site s scores 0.8 at home, 0.6 away; pooled 0.85; fedavg 0.82 (+/- seed noise)
    rows = []
    for seed, noise in ((0, -0.01), (1, 0.0), (2, 0.01)):
        for test in SITES:
            for train in SITES:
                rows.append({"method": "local", "seed": seed, "train_sites": train, "test_site": test,
                             "metric": "auroc", "value": (0.8 if train == test else 0.6) + noise})
            rows.append({"method": "pooled", "seed": seed, "train_sites": "a+b", "test_site": test,
                         "metric": "auroc", "value": 0.85 + noise})
            rows.append({"method": "fedavg", "seed": seed, "train_sites": "a+b", "test_site": test,
                         "metric": "auroc", "value": 0.82 + noise})
    return rows


def test_summary_mean_and_t_interval() -> None:
    table = summarize(_rows())
    cell = table[("fedavg", "a+b", "a")]
    assert cell["mean"] == pytest.approx(0.82)
    # t(0.975, 2) = 4.303; sd = 0.01; n = 3
    assert cell["ci_high"] - cell["mean"] == pytest.approx(4.303 * 0.01 / math.sqrt(3), rel=1e-3)


def test_baselines_and_deltas() -> None:
    table = summarize(_rows())
    base = own_and_off_site(table, SITES)
    assert base["local_own_site"] == pytest.approx(0.8)
    assert base["local_off_site"] == pytest.approx(0.6)
    deltas = {c["baseline"]: c for c in comparisons(table, SITES) if c["method"] == "fedavg"}
    assert deltas["local (own site)"]["delta_abs"] == pytest.approx(0.02)
    assert deltas["local (own site)"]["delta_rel_pct"] == pytest.approx(2.5)
    assert deltas["pooled"]["delta_abs"] == pytest.approx(-0.03)
    assert deltas["fraction of pooled gain recovered"]["delta_rel_pct"] == pytest.approx(40.0)


def test_write_report_files(tmp_path: Path) -> None:
    exp = experiment_from_dict({"name": "t", "sites": [{"id": s, "patients": 5, "seed": 1} for s in SITES],
                                "train": {"seeds": [0, 1, 2]}}, root=tmp_path)
    write_json(exp.report_path() / "results.json",
               {"rows": _rows(), "communication": {"federated_total_bytes": 220, "centralized_bytes": 1000}})
    md = write_report(exp).read_text()
    assert "| fedavg | a+b | 0.820 [" in md
    assert "+19.3%" in md and "78% less communication" in md
    assert "78.0% less" in md  # 1 - 220/1000 measured
    assert "+2.5% relative" in md
    figures = exp.report_path() / "figures"
    assert {p.name for p in figures.iterdir()} >= {"auroc_by_site.png", "auroc_by_site.svg",
                                                   "local_kxk_auroc.png", "local_kxk_auroc.svg"}
    page = (exp.report_path() / "report.html").read_text()
    assert "data:image/png;base64," in page and "<table>" in page and "manifest.json" in page
    manifest = read_json(exp.report_path() / "manifest.json")
    assert manifest["config"]["name"] == "t"
    assert "tensorflow-federated" in manifest["packages"]
    assert manifest["machine"]["cpus"] >= 1


def test_figures_are_byte_identical_on_rerun(tmp_path: Path) -> None:
    exp = experiment_from_dict({"name": "t", "sites": [{"id": s, "patients": 5, "seed": 1} for s in SITES]},
                               root=tmp_path)
    write_json(exp.report_path() / "results.json", {"rows": _rows()})
    write_report(exp)
    first = (exp.report_path() / "figures" / "auroc_by_site.png").read_bytes()
    write_report(exp)
    assert (exp.report_path() / "figures" / "auroc_by_site.png").read_bytes() == first


def test_privacy_communication_curves_are_rendered(tmp_path: Path) -> None:
    exp = experiment_from_dict({"name": "t", "sites": [{"id": s, "patients": 5, "seed": 1} for s in SITES]},
                               root=tmp_path)
    results = {
        "rows": _rows(),
        "communication": {"total_bytes": 500, "raw_data_bytes": 2000,
                          "per_method": {"fedavg": {"bytes_down_per_client_per_round": 28,
                                                    "bytes_up_per_client_per_round": 32, "total_bytes": 500}},
                          "crossover_patients": {"parquet_features": {"fedavg": 12.4}}},
        "privacy": {"fedavg": {"noise_multiplier": 1.0, "clip": 1.0, "rounds": 4, "delta": 1e-5, "epsilon": 10.7,
                               "warning": "only 2 sites: client-level DP protects little"}},
        "privacy_curve": [{"noise_multiplier": 0.0, "epsilon": None, "auroc_pooled": 0.9},
                          {"noise_multiplier": 1.0, "epsilon": 10.7, "auroc_pooled": 0.7}],
        "comm_curve": {"fedavg": [{"round": 1, "cumulative_bytes": 120, "auroc_pooled": 0.7},
                                  {"round": 2, "cumulative_bytes": 240, "auroc_pooled": 0.8}]},
        "secure_aggregation": "not used: the simulation runtime sums updates in the clear",
    }
    write_json(exp.report_path() / "results.json", results)
    md = write_report(exp).read_text()
    assert "| fedavg | 1.0 | 1.0 | 4 | 1e-05 | 10.70 |" in md
    assert "only 2 sites" in md and "∞ (no noise)" in md and "sums updates in the clear" in md
    assert "centralizing `parquet_features` (fedavg: 12 patients)" in md
    assert "75.0% less" in md
    figures = {p.name for p in (exp.report_path() / "figures").iterdir()}
    assert {"bytes_to_auroc.png", "auroc_vs_epsilon.png"} <= figures


def test_a_site_skipped_by_the_features_stage_is_named_and_left_out_of_the_tables(tmp_path: Path) -> None:
    sites = [*SITES, "c"]
    exp = experiment_from_dict({"name": "t", "sites": [{"id": s, "patients": 5, "seed": 1} for s in sites],
                                "train": {"seeds": [0, 1, 2]}}, root=tmp_path)
    write_json(exp.data_path("features", None, "c") / "_SKIPPED.json",
               {"site": "c", "reason": "site c: the label has a single class (0)"})
    write_json(exp.report_path() / "results.json",
               {"rows": _rows(), "sites": {s: {} for s in SITES},
                "communication": {"federated_total_bytes": 220, "centralized_bytes": 1000}})
    md = write_report(exp).read_text()
    assert "- `c`: site c: the label has a single class (0)" in md
    assert "| fedavg | a+b | 0.820 [" in md
    assert "0.800" in md and "nan" not in md.lower()
