"""`fedlab VERB --config PATH [--run NAME] [--set key.path=value ...]`: one verb per stage."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlab import __version__
from fedlab.config import Experiment, load_experiment, parse_overrides
from fedlab.errors import FedlabError
from fedlab.logs import LOG_DIR_ENV

STAGE_VERBS = ("generate", "export", "flatten", "features", "train", "report")


def _load(args: argparse.Namespace) -> Experiment:
    overrides = parse_overrides(args.set)
    exp = load_experiment(args.config, overrides)
    os.environ.setdefault(LOG_DIR_ENV, str(exp.report_path(args.run) / "logs"))
    return exp


def _sites(args: argparse.Namespace) -> list[str] | None:
    return args.site or None


def cmd_generate(args: argparse.Namespace) -> Any:
    exp = _load(args)
    from fedlab.synthea import generate

    return generate(exp, args.run, sites=_sites(args), force=args.force)


def cmd_serve(args: argparse.Namespace) -> Any:
    exp = _load(args)
    from fedlab.fhir.server import serve_site

    site = args.site[0] if args.site else exp.site_ids[0]
    return serve_site(exp, args.run, site, port=args.port)


def cmd_export(args: argparse.Namespace) -> Any:
    exp = _load(args)
    from fedlab.fhir.export import export

    return export(exp, args.run, sites=_sites(args), force=args.force)


def cmd_flatten(args: argparse.Namespace) -> Any:
    exp = _load(args)
    from fedlab.flatten import flatten

    return flatten(exp, args.run, sites=_sites(args), force=args.force)


def cmd_features(args: argparse.Namespace) -> Any:
    exp = _load(args)
    from fedlab.features import build_features

    return build_features(exp, args.run, sites=_sites(args), force=args.force)


def cmd_train(args: argparse.Namespace) -> Any:
    exp = _load(args)
    from fedlab.federated import train

    return train(exp, args.run)


def cmd_report(args: argparse.Namespace) -> Any:
    exp = _load(args)
    from fedlab.report import write_report

    return write_report(exp, args.run)


def cmd_reproduce(args: argparse.Namespace) -> Any:
    from fedlab.pipeline import reproduce

    overrides = parse_overrides(args.set)
    forced = args.force or []
    force: bool | list[str] = True if "all" in forced else forced
    if args.dry_run:
        from fedlab.pipeline import STAGE_NAMES, _stage_names, plan

        exp = load_experiment(args.config, overrides)
        start = _stage_names([args.start_from], "--from")[0] if args.start_from else None
        forced = list(STAGE_NAMES) if force is True else _stage_names(force, "--force")
        steps = plan(exp, args.run or exp.name, forced, start)
        return "\n".join(f"{s['stage']:<9} {s['action']:<7} {s['why']}" for s in steps)
    return reproduce(args.config, run=args.run, overrides=overrides, force=force,
                     start_from=args.start_from, notebooks=args.notebook or None, parallel=args.parallel)


def cmd_doctor(args: argparse.Namespace) -> Any:
    from fedlab.doctor import run_doctor

    ok = run_doctor()
    if not ok:
        raise FedlabError("doctor found problems (see above)")
    return "all checks passed"


def cmd_compare(args: argparse.Namespace) -> Any:
    from fedlab.compare import compare, comparison_markdown

    result = compare(args.run_dir, args.reference_dir)
    if args.json:
        return json.dumps(result, indent=2, default=str)
    if args.strict and result["verdicts"].get("differs"):
        print(comparison_markdown(result))
        raise FedlabError(f"{result['verdicts']['differs']} numbers differ from the reference beyond their CIs")
    return comparison_markdown(result)


def cmd_views(args: argparse.Namespace) -> Any:
    from fedlab.views.suite import run_suite

    report = run_suite(args.folder)
    print(json.dumps(report, indent=2, default=str))
    rate = float(report["pass_rate"])
    if args.min_pass_rate is not None and rate < args.min_pass_rate:
        raise FedlabError(f"pass rate {rate:.3f} below --min-pass-rate {args.min_pass_rate}")
    return None


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], Any], str]] = {
    "generate": (cmd_generate, "generate each site's synthetic FHIR R4 population"),
    "serve": (cmd_serve, "serve one site's data over FHIR Bulk Data + SMART Backend Services"),
    "export": (cmd_export, "pull each site's data with a Bulk Data $export client"),
    "flatten": (cmd_flatten, "flatten exported FHIR into harmonized Parquet tables (SQL-on-FHIR views or fhiry)"),
    "features": (cmd_features, "build each site's feature table with Spark"),
    "train": (cmd_train, "train federated and baseline models with TensorFlow Federated"),
    "report": (cmd_report, "write results.md, figures and manifest.json"),
    "reproduce": (cmd_reproduce, "run every notebook in order with papermill"),
    "compare": (cmd_compare, "say which numbers of a run agree with a reference run within their CIs"),
    "views": (cmd_views, "SQL-on-FHIR v2 ViewDefinitions: `fedlab views test DIR` runs a test-suite folder"),
    "doctor": (cmd_doctor, "check Python, Java, Spark, TFF and the Jupyter kernel"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlab", description=__doc__)
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"fedlab {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if verb == "doctor":
            continue
        if verb == "compare":
            p.add_argument("run_dir", type=Path, help="a run's report folder, e.g. reports/paper")
            p.add_argument("reference_dir", type=Path, help="e.g. reports/reference")
            p.add_argument("--json", action="store_true", help="print every comparison as JSON")
            p.add_argument("--strict", action="store_true", help="exit non-zero when a number differs")
            continue
        if verb == "views":
            views = p.add_subparsers(dest="action", required=True, metavar="ACTION")
            test = views.add_parser("test", help="run every SQL-on-FHIR test file in a folder; print pass rates")
            test.add_argument("folder", type=Path)
            test.add_argument("--min-pass-rate", type=float, default=None, help="fail below this pass rate")
            continue
        p.add_argument("--config", required=True, type=Path, help="experiment YAML, e.g. configs/quickstart.yaml")
        p.add_argument("--run", default=None, help="run name (default: the experiment's name)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.rounds=3 (repeatable)")
        if verb == "reproduce":
            p.add_argument("--force", action="append", nargs="?", const="all", metavar="STAGE",
                           help="redo STAGE even if cached (repeatable); without STAGE, redo every stage")
            p.add_argument("--from", dest="start_from", metavar="STAGE", help="redo STAGE and every stage after it")
            p.add_argument("--dry-run", action="store_true", help="print what would run, and why, then stop")
            p.add_argument("--parallel", type=int, default=1, metavar="N",
                           help="run the sites of generate, export and flatten in up to N processes "
                                "(fewer if memory is short; features stays in one Spark session)")
        else:
            p.add_argument("--force", action="store_true", help="redo work even if outputs are complete")
        if verb in ("generate", "export", "flatten", "features", "serve"):
            p.add_argument("--site", action="append", help="only this site (repeatable)")
        if verb == "serve":
            p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
        if verb == "reproduce":
            p.add_argument("--notebook", action="append", help="only this notebook (repeatable)")
    return parser


def _show(result: Any) -> None:
    if result is None:
        return
    if isinstance(result, dict):
        print(json.dumps({str(k): str(v) for k, v in result.items()}, indent=2))
    else:
        print(result)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = COMMANDS[args.verb][0]
    try:
        _show(handler(args))
    except (FedlabError, FileNotFoundError) as err:
        if args.traceback:
            raise
        print(f"fedlab {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedlab {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
