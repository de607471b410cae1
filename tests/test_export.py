from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from search.config import TLSearchError, TrialConfig, load_trial_config, load_yaml
from search.export import export_trial

CONFIG = TrialConfig(backbone="resnet18", pretrained=False, image_size=32, batch_size=8, epochs=2, lr=1e-3)


def _study(tmp_path: Path, name: str = "exp") -> optuna.Study:
    storage = f"sqlite:///{tmp_path / 'studies' / (name + '.db')}"
    (tmp_path / "studies").mkdir(exist_ok=True)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    study.set_user_attr("dataset_fingerprint", "abc123")
    study.set_user_attr("class_names", ["circle", "square", "triangle"])
    study.set_user_attr("settings", {"cpus_per_trial": 2})
    dist = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)}
    for value, params_total, lr in ((0.8, 11_000_000, 1e-3), (0.9, 20_000_000, 2e-3), (0.7, 1_000_000, 3e-3)):
        cfg = CONFIG.replace(lr=lr).to_dict()
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr}, distributions=dist, value=value,
            user_attrs={"config": cfg, "params_total": params_total, "epochs_run": 2, "device": "cpu",
                        "threads": 3, "versions": {"torch": "2.0.0-when-the-trial-ran"}, "weights_id": "random"},
            intermediate_values={1: value - 0.1, 2: value},
        ))
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 1e-2}, distributions=dist, state=optuna.trial.TrialState.PRUNED,
        user_attrs={"config": CONFIG.replace(lr=1e-2).to_dict()}, intermediate_values={1: 0.99},
    ))
    return study


def test_export_best_writes_a_config_train_accepts(tmp_path: Path) -> None:
    _study(tmp_path)
    [path] = export_trial("exp", studies_dir=tmp_path / "studies", reports_dir=tmp_path / "reports")
    assert path == tmp_path / "reports" / "exp" / "best.yaml"
    record = load_yaml(path)
    # The pruned trial's 0.99 after one epoch is not a full-budget score: the best is trial 1.
    assert record["trial"] == 1 and record["metrics"]["val_acc"] == pytest.approx(0.9)
    assert record["dataset_fingerprint"] == "abc123" and record["class_names"][0] == "circle"
    # What the trial ran with, as it recorded it then, not this machine's versions today.
    assert record["threads"] == 3 and record["versions"] == {"torch": "2.0.0-when-the-trial-ran"}
    assert record["device"] == "cpu" and record["weights_id"] == "random"
    assert load_trial_config(path) == CONFIG.replace(lr=2e-3)


def test_export_chosen_trial_json_and_pareto(tmp_path: Path) -> None:
    _study(tmp_path)
    kw = dict(studies_dir=tmp_path / "studies", reports_dir=tmp_path / "reports")
    [path] = export_trial("exp", trial=2, fmt="json", out=tmp_path / "t2.json", **kw)
    assert json.loads(path.read_text())["trial"] == 2
    paths = export_trial("exp", pareto=True, **kw)
    # (0.9, 20M) and (0.7, 1M) are not dominated; (0.8, 11M) is not dominated either.
    assert sorted(p.name for p in paths) == ["pareto-0.yaml", "pareto-1.yaml", "pareto-2.yaml"]
    with pytest.raises(TLSearchError, match="no trial 42"):
        export_trial("exp", trial=42, **kw)


def test_export_without_complete_trial_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "studies").mkdir()
    optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path / 'studies' / 'empty.db'}")
    with pytest.raises(TLSearchError, match="no COMPLETE trial"):
        export_trial("empty", studies_dir=tmp_path / "studies", reports_dir=tmp_path / "reports")
    with pytest.raises(TLSearchError, match="no study named 'nope'"):
        export_trial("nope", studies_dir=tmp_path / "studies")


def test_export_train_predict_round_trip_through_the_cli(tmp_path: Path, tiny_dataset: Path) -> None:
    _study(tmp_path)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "search", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)

    r = cli("export", "exp")
    assert r.returncode == 0, r.stderr
    r = cli("train", "reports/exp/best.yaml", str(tiny_dataset), "--out", "model", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["epochs"] == 2 and Path(summary["model_dir"]).is_dir()
    images = sorted((tiny_dataset / "val" / "circle").iterdir())[:3]
    r = cli("predict", "model", *map(str, images), "--top", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.split("\t")[0] == str(img) for line, img in zip(lines, images))


def test_study_names_from_storage_are_untrusted(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    for name in ("../../escape", "evil\x1b[31m"):
        study = optuna.create_study(study_name=name, storage=storage)
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5,
                                                  user_attrs={"config": CONFIG.to_dict()}))
    for name in ("../../escape", "evil\x1b[31m"):
        with pytest.raises(TLSearchError, match="study name"):
            export_trial(name, storage=storage, reports_dir=tmp_path / "reports")
    assert not (tmp_path.parent / "escape").exists()
    r = subprocess.run([sys.executable, "-m", "search", "studies", "--storage", storage], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "evil?[31m" in r.stdout and "\x1b" not in r.stdout


def test_a_trial_of_a_study_made_before_lr_schedule_exports_the_schedule_it_ran(tmp_path: Path) -> None:
    from search.export import trial_record

    storage = f"sqlite:///{tmp_path / 'old.db'}"
    study = optuna.create_study(study_name="old", storage=storage, direction="maximize")
    study.set_user_attr("class_names", ["circle", "square", "triangle"])
    before = {k: v for k, v in CONFIG.to_dict().items() if k != "lr_schedule"}  # stored before the field
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.8, user_attrs={"config": before}))
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.7,
                                              user_attrs={"config": CONFIG.to_dict()}))
    old, new = study.trials
    assert trial_record(study, old)["lr_schedule"] == "cosine_steps"  # the per-batch cosine it trained with
    assert trial_record(study, new)["lr_schedule"] == CONFIG.lr_schedule  # a recorded schedule is kept
    [path] = export_trial("old", storage=storage, reports_dir=tmp_path / "reports")
    assert load_yaml(path)["lr_schedule"] == "cosine_steps"
    assert load_trial_config(path).lr_schedule == "cosine_steps"  # what `train` and `fit --refit` retrain with
