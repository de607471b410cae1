from __future__ import annotations

from pathlib import Path

import pytest

from search.config import (
    ConfigError,
    TrialConfig,
    check_study_name,
    dump_yaml,
    load_trial_config,
    load_yaml,
    parse_duration,
)
from search.settings import SearchSettings


def test_trial_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = TrialConfig(backbone="resnet50", freeze_depth="all", lr=1e-3, augmentation="randaugment")
    path = dump_yaml(cfg.to_dict(), tmp_path / "c.yaml")
    assert load_trial_config(path) == cfg


def test_yaml_scalars_are_coerced(tmp_path: Path) -> None:
    # PyYAML reads 3e-4 (no dot) as a string; a user writes it all the time.
    (tmp_path / "c.yaml").write_text("backbone: resnet18\nlr: 3e-4\nfreeze_depth: '2'\nepochs: 4.0\n")
    cfg = load_trial_config(tmp_path / "c.yaml")
    assert cfg.lr == pytest.approx(3e-4) and cfg.freeze_depth == 2 and cfg.epochs == 4


def test_record_keys_are_accepted_and_unknown_keys_refused() -> None:
    cfg = TrialConfig.from_dict({"backbone": "resnet18", "study": "s", "metrics": {"val_acc": 0.9}})
    assert cfg.backbone == "resnet18"
    with pytest.raises(ConfigError, match="unknown key.*lerning_rate"):
        TrialConfig.from_dict({"lerning_rate": 0.1})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"augmentation": "rotate"}, "unknown augmentation 'rotate'; available: none, flip"),
        ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'"),
        ({"freeze_depth": -1}, "freeze_depth must be an integer >= 0 or 'all', got -1"),
        ({"lr": 0}, "lr must be > 0, got 0"),
        ({"batch_size": 0}, "batch_size must be between 1"),
        ({"label_smoothing": 1.5}, "label_smoothing must be between"),
    ],
)
def test_invalid_trial_config_names_the_rule(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TrialConfig(**changes)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("backbone: resnet18\nlr: [0.1, 0.2\nfreeze_depth: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: malformed YAML"):
        load_yaml(p)


@pytest.mark.parametrize("text, seconds", [("90", 90), ("30s", 30), ("30m", 1800), ("1.5h", 5400), (45, 45)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10 parsecs", "-5m", "0", "m"])
def test_bad_duration(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


@pytest.mark.parametrize("name", ["a/b", "..", "../x", "x\x00y", "a" * 201, "", ".hidden", "a b"])
def test_hostile_study_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError):
        check_study_name(name)


def test_settings_paths_stay_under_studies_and_reports() -> None:
    s = SearchSettings(study="pets-v1.2", data="/d")
    assert s.storage_url.endswith("/studies/pets-v1.2.db")
    assert s.experiment_dir.parent.name == "studies" and s.report_dir.parent.name == "reports"
    assert SearchSettings.from_dict(s.to_dict()) == s


def test_settings_resolve_paths_once(tmp_path, monkeypatch) -> None:
    from search.settings import SearchSettings

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TLSEARCH_CACHE", "rel-cache")
    s = SearchSettings(study="x", data="~/data", weights_dir="~/w", studies_dir="st", reports_dir="~/rep").resolve()
    assert s.data == str(tmp_path / "home" / "data")
    assert s.weights_dir == str(tmp_path / "home" / "w")  # not <cwd>/~/w
    assert s.reports_dir == str(tmp_path / "home" / "rep") and s.studies_dir == str(tmp_path / "st")
    assert s.cache_dir == str(tmp_path / "rel-cache")
    monkeypatch.chdir(tmp_path / "..")
    assert s.resolve() == s  # resolved settings mean the same files from any folder
    monkeypatch.delenv("TLSEARCH_CACHE")
    assert SearchSettings(study="x", data="d").resolve().cache_dir == str(tmp_path / "home" / ".cache" / "tlsearch")


def test_printable_drops_control_characters() -> None:
    from search.config import printable

    assert printable("evil\x1b[31mred\x07") == "evil?[31mred?"


def test_settings_hold_the_typed_space_and_resolve_folds_every_option(tmp_path) -> None:
    from search.settings import SearchSettings
    from search.space import SearchSpace

    s = SearchSettings(study="x", data=str(tmp_path), space={"backbone": "resnet18", "max_epochs": 3},
                       max_epochs=5, pretrained=False)
    assert isinstance(s.space, SearchSpace)
    r = s.resolve()
    assert r.space.max_epochs == 5 and r.space.to_trial_config({}).pretrained is False
    assert r.resolve() == r and SearchSettings.from_dict(r.to_dict()) == r
    assert SearchSettings.from_dict({**r.to_dict(), "space": {}}).space is None  # stored by an older version
    default = SearchSettings(study="x", data=str(tmp_path)).resolve()
    assert default.space is not None and default.space.max_epochs == 6
    with pytest.raises(Exception, match="unknown key"):
        SearchSettings(study="x", data="d", space={"colour": ["red"]})
