"""Experiment configuration: typed, validated objects loaded from YAML.

An Experiment names the run, the seed, the simulated hospitals (sites) and the settings of
every stage. Unknown keys (with the closest known key), wrong types, and keys given twice in a
YAML mapping are errors that name the file and the key. Types are strict: `true` is not a
number and `"7"` is not an integer.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedlab.errors import FedlabError

RESOURCE_TYPES_DEFAULT = ["Patient", "Encounter", "Condition", "Observation", "MedicationRequest"]
STAGES = ("generate", "export", "flatten", "features", "train", "report")


class ConfigError(FedlabError, ValueError):
    """A configuration file or value is invalid; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)


class SiteConfig(_Strict):
    """One simulated hospital and how its population and records differ from the others."""

    id: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    patients: int = Field(gt=0)
    seed: int = Field(ge=0)
    female_fraction: float = Field(0.5, ge=0, le=1)
    age_mean: float = Field(50.0, gt=0, lt=110)
    age_sd: float = Field(17.0, gt=0)
    race_mix: dict[Literal["white", "black", "asian", "hispanic", "other"], float] = Field(
        default_factory=lambda: {"white": 0.6, "black": 0.15, "asian": 0.08, "hispanic": 0.15, "other": 0.02}
    )
    bmi_shift: float = Field(0.0, ge=-10, le=10)
    diabetes_risk: float = Field(1.0, gt=0, le=10)
    hypertension_risk: float = Field(1.0, gt=0, le=10)
    visits_per_year: float = Field(1.0, gt=0, le=12)
    lab_missingness: float = Field(0.1, ge=0, lt=1)
    glucose_unit: Literal["mg/dL", "mmol/L"] = "mg/dL"
    condition_system: Literal["snomed", "icd10"] = "snomed"
    # Where the site is, for `generate.engine: synthea-jar` (Synthea's demographics come from it).
    state: str = "Massachusetts"
    city: str | None = None

    @field_validator("race_mix")
    @classmethod
    def _mix_sums_to_one(cls, mix: dict[str, float]) -> dict[str, float]:
        if any(p < 0 for p in mix.values()):
            raise ValueError("race_mix probabilities must be >= 0")
        total = sum(mix.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"race_mix probabilities must sum to 1 (they sum to {total:g})")
        return mix


class GenerateConfig(_Strict):
    # python: the hard-coded lifecycle model; gmf: Generic Module Framework modules on the lifecycle
    # physiology (fedlab's own modules, or `modules_dir`); synthea-jar: a user's Synthea jar.
    engine: Literal["python", "gmf", "synthea-jar"] = "gmf"
    # not strict: an ISO date string (from JSON or a quoted YAML value) is a date too
    reference_date: dt.date = Field(dt.date(2026, 1, 1), strict=False)
    years_of_history: int = Field(12, ge=1, le=100)
    workers: int = Field(1, ge=1, le=64)
    # engine gmf: a folder of module JSON (e.g. Synthea's src/main/resources/modules); default: fedlab's own.
    modules_dir: str | None = None
    # engine gmf: CallSubmodule targets that may be absent from `modules_dir` (they then do nothing).
    allow_missing_submodules: list[str] = Field(default_factory=list)


class ExportConfig(_Strict):
    types: list[str] = Field(default_factory=lambda: list(RESOURCE_TYPES_DEFAULT))
    host: str = "127.0.0.1"
    scope: str = "system/*.rs"
    deidentify: bool = False
    # Safe Harbor keeps only years ("year", the default). "shift" moves each patient's dates by a
    # keyed offset so intervals survive, which the time-windowed features need; that is not strict
    # Safe Harbor (it is the usual "limited data set / expert determination" compromise).
    deid_date_mode: Literal["year", "shift"] = "year"


class FlattenConfig(_Strict):
    # A name in `fedlab.flatten.engines.ENGINES` (checked by `experiment_from_dict`): views, fedlab's
    # SQL-on-FHIR ViewDefinitions (fast, R4 and R5); fhiry, fhiry's DataFrame path; or your own engine
    # as `path/to/file.py:Name` (relative to the project root) or `package.module:Name`.
    engine: str = "views"
    # Where the engine runs, a name in `fedlab.flatten.runners.RUNNERS`: "pandas" in this process;
    # "spark": executors of the session from `spark:` parse and flatten, the driver collects the rows
    # (files identical to pandas'); "spark-distributed": rows stay on the executors and tables are
    # written as Parquet datasets (folders), so a cluster can flatten what one machine cannot. The
    # Spark runners run the views engine (a RowEngine); fhiry always runs in pandas.
    runner: str = "pandas"


class TaskConfig(_Strict):
    """The prediction task: who is in the cohort, when the index date is, what the label is."""

    name: str = "incident_t2d"
    outcome: Literal["t2d", "hypertension"] = "t2d"
    min_age: int = Field(18, ge=0, le=120)
    lookback_years: float = Field(3.0, gt=0, le=50)
    horizon_years: float = Field(3.0, gt=0, le=50)
    min_followup_years: float = Field(0.0, ge=0)
    # What the features stage does when one site cannot be built (missing column, empty cohort,
    # single-class label): "raise" stops the run; "skip" records the reason for that site and lets
    # the other sites proceed (training then uses the sites that have features).
    on_site_error: Literal["raise", "skip"] = "raise"


class SparkConfig(_Strict):
    master: str | None = None
    driver_memory: str = "2g"
    shuffle_partitions: int = Field(4, ge=1)
    conf: dict[str, str] = Field(default_factory=dict)


Method = Literal["local", "pooled", "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "cyclic", "scaffold"]


class PrivacyConfig(_Strict):
    """Client-level differential privacy (DP-FedAvg) for the federated methods."""

    enabled: bool = False
    noise_multiplier: float = Field(0.5, ge=0)
    clip: float = Field(1.0, gt=0)
    adaptive_clipping: bool = False
    target_delta: float = Field(1e-5, gt=0, lt=1)
    # noise multipliers for the AUROC-vs-epsilon curve (empty: no sweep)
    sweep: list[float] = Field(default_factory=list)


class TrainConfig(_Strict):
    methods: list[Method] = Field(default_factory=lambda: ["local", "pooled", "fedavg"])
    model: Literal["logreg", "mlp"] = "logreg"
    rounds: int = Field(20, ge=1)
    local_steps: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    client_lr: float = Field(0.1, gt=0)
    server_lr: float = Field(1.0, gt=0)
    prox_mu: float = Field(0.01, ge=0)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    test_fraction: float = Field(0.3, gt=0, lt=1)
    val_fraction: float = Field(0.2, ge=0, lt=1)
    # client learning rates tried per method on validation data (never test); empty: use client_lr
    lr_grid: list[float] = Field(default_factory=list)
    # server learning rate per method where it differs from server_lr (adaptive server optimizers)
    server_lrs: dict[str, float] = Field(default_factory=lambda: {"fedadam": 0.05, "fedyogi": 0.05,
                                                                  "fedadagrad": 0.1})
    clients_per_round: int | None = Field(None, ge=1)
    quantize_bits: int | None = Field(None, ge=1, le=16)
    scaling: Literal["federated", "per_site"] = "federated"
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    bootstrap: int = Field(200, ge=0)


class Experiment(_Strict):
    """A whole study: sites plus the settings of each stage."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seed: int = Field(0, ge=0)
    data_dir: str = "data"
    reports_dir: str = "reports"
    sites: list[SiteConfig] = Field(min_length=1)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    flatten: FlattenConfig = Field(default_factory=FlattenConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    spark: SparkConfig = Field(default_factory=SparkConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    # Set by the loader: the project root that relative paths are resolved against.
    root: Path = Field(default_factory=Path.cwd, exclude=True)
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _unique_site_ids(self) -> Experiment:
        ids = [s.id for s in self.sites]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate site ids: {', '.join(dupes)}")
        per_round = self.train.clients_per_round
        if per_round is not None and per_round > len(ids):
            raise ValueError(f"train.clients_per_round is {per_round} but there are only {len(ids)} sites")
        return self

    # ---- paths (the on-disk data contract, see docs/architecture.md) ----
    def site(self, site_id: str) -> SiteConfig:
        for s in self.sites:
            if s.id == site_id:
                return s
        raise ConfigError(f"{self.source or self.name}: no site named {site_id!r} "
                          f"(sites: {', '.join(s.id for s in self.sites)})")

    @property
    def site_ids(self) -> list[str]:
        return [s.id for s in self.sites]

    def data_path(self, stage: str, run: str | None = None, site: str | None = None) -> Path:
        """`data/<stage>/<run>/<site>`; stage is synthea, export, tables or features."""
        base = _resolve(self.root, self.data_dir) / stage / (run or self.name)
        return base / site if site else base

    def report_path(self, run: str | None = None) -> Path:
        return _resolve(self.root, self.reports_dir) / (run or self.name)


def _resolve(root: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def project_root_for(config_path: Path) -> Path:
    """The folder holding `configs/`, so notebooks and the CLI agree on where data goes."""
    env = os.environ.get("FEDLAB_ROOT")
    if env:
        return Path(env).resolve()
    folder = config_path.resolve().parent
    return folder.parent if folder.name == "configs" else folder


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = tree
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _model_at(location: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config model that holds the last key of `location` (for "did you mean")."""
    model: Any = Experiment
    for part in location[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = _inner_model(model.model_fields[part].annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    """`SiteConfig` from `list[SiteConfig]`, `SiteConfig | None` and the like."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _inner_model(arg)
            if found is not None:
                return found
    return None


def _unknown_key_message(location: tuple[Any, ...]) -> str:
    model = _model_at(location)
    known = list(model.model_fields) if model else []
    close = difflib.get_close_matches(str(location[-1]), known, n=1, cutoff=0.6)
    return f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key"


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = _unknown_key_message(e["loc"]) if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"line {line}: key {key!r} given twice (first on line {first})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKeyError(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def experiment_from_dict(data: dict[str, Any], source: str = "<dict>", root: Path | None = None) -> Experiment:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None
    exp = exp.model_copy(update={"root": root or Path.cwd(), "source": Path(source) if source != "<dict>" else None})
    _check_registered(exp, source)
    return exp


def _check_registered(exp: Experiment, source: str) -> None:
    """Names the registries resolve (engines, runners): a built-in name, or a user's `module:Name`
    or `file.py:Name` (loaded here, relative to the project root)."""
    from fedlab.flatten.engines import ENGINES
    from fedlab.flatten.runners import RUNNERS

    problems = [f"  {key}: {problem}" for key, registry, value in (
        ("flatten.engine", ENGINES, exp.flatten.engine), ("flatten.runner", RUNNERS, exp.flatten.runner))
        if (problem := registry.problem(value, exp.root))]
    if problems:
        raise ConfigError("\n".join([f"{source}: invalid configuration", *problems]))


def load_experiment(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Experiment:
    """Load and validate an Experiment YAML; `overrides` maps dotted keys to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {err}") from None
    for key, value in (overrides or {}).items():
        try:
            _set_dotted(data, key, value)
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise ConfigError(f"{path}: cannot override {key!r}: {err}") from None
    return experiment_from_dict(data, str(path), project_root_for(path))


def parse_overrides(items: str | list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`--set`-style overrides as a dict: one `key.path=value` string, a list of them, or a dict."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise ConfigError(f"overrides must be `key.path=value` strings (or a list of them), not {items!r}")
    return dict(parse_override(item) for item in items)


def override_strings(overrides: dict[str, Any] | None) -> list[str]:
    """The inverse of `parse_overrides`: values written so that YAML reads them back the same."""
    return [f"{key}={json.dumps(value, default=str)}" for key, value in (overrides or {}).items()]


def parse_override(text: str) -> tuple[str, Any]:
    """`train.rounds=3` -> ("train.rounds", 3); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)
