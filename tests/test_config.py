"""The Experiment config: shipped configs load; bad keys and types are errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlab.config import ConfigError, experiment_from_dict, load_experiment, parse_override

ROOT = Path(__file__).resolve().parents[1]
SITE = {"id": "alpha", "patients": 10, "seed": 1}


@pytest.mark.parametrize("name", ["quickstart", "smoke", "paper", "toy"])
def test_shipped_configs_load(name: str) -> None:
    exp = load_experiment(ROOT / "configs" / f"{name}.yaml")
    assert exp.name == name
    assert exp.root == ROOT
    assert len(set(exp.site_ids)) == len(exp.sites)


def test_quickstart_sites_differ_in_the_ways_the_method_needs() -> None:
    exp = load_experiment(ROOT / "configs" / "quickstart.yaml")
    assert 3 <= len(exp.sites) <= 4
    assert 200 <= sum(s.patients for s in exp.sites) <= 600
    assert {s.glucose_unit for s in exp.sites} == {"mg/dL", "mmol/L"}
    assert {s.condition_system for s in exp.sites} == {"snomed", "icd10"}
    assert len({s.patients for s in exp.sites}) > 1


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"sites\.0\.patiens: unknown key"):
        experiment_from_dict({"name": "x", "sites": [{"id": "a", "patiens": 3, "patients": 1, "seed": 0}]})


def test_unknown_top_level_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        experiment_from_dict({"name": "x", "sites": [SITE], "trian": {}})


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"train\.rounds: .*integer"):
        experiment_from_dict({"name": "x", "sites": [SITE], "train": {"rounds": "many"}})


@pytest.mark.parametrize(("site_patch", "key"), [
    ({"patients": -5}, "sites.0.patients"),
    ({"race_mix": {"white": 0.5, "black": 0.2}}, "sites.0.race_mix"),
    ({"glucose_unit": "g/L"}, "sites.0.glucose_unit"),
    ({"lab_missingness": 1.5}, "sites.0.lab_missingness"),
])
def test_impossible_site_values_are_rejected(site_patch: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        experiment_from_dict({"name": "x", "sites": [{**SITE, **site_patch}]})


def test_duplicate_site_ids_rejected() -> None:
    with pytest.raises(ConfigError, match="duplicate site ids: alpha"):
        experiment_from_dict({"name": "x", "sites": [SITE, SITE]})


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsites:\n  - id: a\n   patients: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+ not valid YAML"):
        load_experiment(bad)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_experiment("/nonexistent/config.yaml")


def test_overrides_apply_dotted_keys() -> None:
    exp = load_experiment(ROOT / "configs" / "smoke.yaml",
                          dict([parse_override("train.rounds=7"), parse_override("sites.0.patients=12")]))
    assert exp.train.rounds == 7
    assert exp.sites[0].patients == 12


def test_paths_follow_the_data_contract(tmp_path: Path) -> None:
    exp = experiment_from_dict({"name": "demo", "sites": [SITE]}, root=tmp_path)
    assert exp.data_path("synthea", None, "alpha") == tmp_path / "data" / "synthea" / "demo" / "alpha"
    assert exp.data_path("features", "r2", "alpha") == tmp_path / "data" / "features" / "r2" / "alpha"
    assert exp.report_path() == tmp_path / "reports" / "demo"
    with pytest.raises(ConfigError, match="no site named 'beta'"):
        exp.site("beta")


def test_more_clients_per_round_than_sites_is_rejected() -> None:
    with pytest.raises(ConfigError, match="clients_per_round is 3 but there are only 1 sites"):
        experiment_from_dict({"name": "x", "sites": [SITE], "train": {"clients_per_round": 3}})


@pytest.mark.parametrize(("patch", "key"), [
    ({"sites": [{**SITE, "patients": True}]}, r"sites\.0\.patients: Input should be a valid integer"),
    ({"seed": "7"}, r"seed: Input should be a valid integer"),
    ({"train": {"rounds": 2.5}}, r"train\.rounds: Input should be a valid integer"),
    ({"export": {"deidentify": "yes"}}, r"export\.deidentify: Input should be a valid boolean"),
    ({"train": {"client_lr": False}}, r"train\.client_lr: Input should be a valid number"),
])
def test_types_are_strict(patch: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        experiment_from_dict({"name": "x", "sites": [SITE], **patch})


def test_a_date_may_be_given_as_an_iso_string() -> None:
    exp = experiment_from_dict({"name": "x", "sites": [SITE], "generate": {"reference_date": "2025-06-01"}})
    assert str(exp.generate.reference_date) == "2025-06-01"


@pytest.mark.parametrize(("data", "message"), [
    ({"name": "x", "sites": [{**SITE, "pateints": 3}]}, r"sites\.0\.pateints: unknown key \(did you mean 'patients'\?\)"),
    ({"name": "x", "sites": [SITE], "trian": {}}, r"trian: unknown key \(did you mean 'train'\?\)"),
    ({"name": "x", "sites": [SITE], "train": {"round": 3}}, r"train\.round: unknown key \(did you mean 'rounds'\?\)"),
    ({"name": "x", "sites": [SITE], "train": {"privacy": {"nois_multiplier": 1}}},
     r"train\.privacy\.nois_multiplier: unknown key \(did you mean 'noise_multiplier'\?\)"),
    ({"name": "x", "sites": [SITE], "zzzz": 1}, r"zzzz: unknown key$"),
])
def test_misspelt_keys_get_a_suggestion(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        experiment_from_dict(data)


def test_duplicate_yaml_key_names_the_key_and_both_lines(tmp_path: Path) -> None:
    config = tmp_path / "dup.yaml"
    config.write_text("name: x\nseed: 1\nsites:\n  - id: a\n    patients: 3\n    seed: 1\n    patients: 4\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: line 7: key 'patients' given twice \(first on line 5\)"):
        load_experiment(config)
    config.write_text("name: x\nseed: 1\nsites:\n  - {id: a, patients: 3, seed: 1}\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: line 5: key 'seed' given twice \(first on line 2\)"):
        load_experiment(config)


def test_notebook_overrides_take_what_the_cli_set_takes() -> None:
    import datetime as dt

    from fedlab.config import override_strings, parse_overrides
    from fedlab.pipeline import load_for_notebook

    config = str(ROOT / "configs" / "smoke.yaml")
    assert load_for_notebook(config, "train.rounds=3").train.rounds == 3
    exp = load_for_notebook(config, ["train.rounds=4", "sites.0.patients=50", "train.seeds=[5, 6]"])
    assert (exp.train.rounds, exp.sites[0].patients, exp.train.seeds) == (4, 50, [5, 6])
    assert load_for_notebook(config, "").train.rounds == load_for_notebook(config, []).train.rounds
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_for_notebook(config, "train.rounds")
    with pytest.raises(ConfigError, match="overrides must be"):
        parse_overrides([3])
    values = {"train.rounds": 3, "name": "a b", "generate.reference_date": dt.date(2025, 6, 1),
              "train.seeds": [0, 1], "spark.master": None, "export.deidentify": True}
    again = parse_overrides(override_strings(values))
    assert {**again, "generate.reference_date": str(again["generate.reference_date"])} == \
        {**values, "generate.reference_date": "2025-06-01"}
