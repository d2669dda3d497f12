"""`fedlab compare RUN REFERENCE`: which numbers of a run agree with a reference run within CIs.

Both folders hold a `results.json` written by the train stage. For every (method, train sites,
test site, metric) present in both, the run's mean is compared with the reference's 95% CI and
vice versa: `agree` when each mean lies inside the other's interval, `overlap` when only the
intervals overlap, `differs` otherwise, `no-ci` when either side has no interval (one seed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedlab.errors import FedlabError
from fedlab.io import read_json
from fedlab.report import bootstrap_summary

METRICS = ("auroc", "auprc", "brier", "accuracy")


def _results(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    if not path.is_file():
        raise FedlabError(f"{path} not found: compare needs the train stage's results.json in both folders")
    return read_json(path)


def _verdict(a: dict[str, float], b: dict[str, float]) -> str:
    bounds = (a["ci_low"], a["ci_high"], b["ci_low"], b["ci_high"])
    if any(math.isnan(x) for x in bounds):
        return "no-ci"
    if b["ci_low"] <= a["mean"] <= b["ci_high"] and a["ci_low"] <= b["mean"] <= a["ci_high"]:
        return "agree"
    if a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]:
        return "overlap"
    return "differs"


def compare(run_dir: str | Path, reference_dir: str | Path, metrics: tuple[str, ...] = METRICS) -> dict[str, Any]:
    run, reference = _results(Path(run_dir)), _results(Path(reference_dir))
    rows = []
    for metric in metrics:
        ours, theirs = bootstrap_summary(run, metric), bootstrap_summary(reference, metric)
        for key in sorted(set(ours) & set(theirs)):
            a, b = ours[key], theirs[key]
            rows.append({"method": key[0], "train_sites": key[1], "test_site": key[2], "metric": metric,
                         "run": a["mean"], "run_ci": [a["ci_low"], a["ci_high"]], "reference": b["mean"],
                         "reference_ci": [b["ci_low"], b["ci_high"]], "verdict": _verdict(a, b)})
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    return {"run": str(run_dir), "reference": str(reference_dir), "compared": len(rows), "verdicts": counts,
            "rows": rows}


def comparison_markdown(result: dict[str, Any], metric: str = "auroc") -> str:
    lines = [f"Compared {result['compared']} numbers: " +
             ", ".join(f"{v} {k}" for k, v in sorted(result["verdicts"].items())), "",
             "| method | trained on | test site | run | reference [95% CI] | verdict |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["metric"] == metric:
            lo, hi = r["reference_ci"]
            lines.append(f"| {r['method']} | {r['train_sites']} | {r['test_site']} | {r['run']:.3f} | "
                         f"{r['reference']:.3f} [{lo:.3f}, {hi:.3f}] | {r['verdict']} |")
    return "\n".join(lines)
