"""The end of a search (search/outputs.py): the top of the leaderboard and the exact next commands."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from search.outputs import after_search, format_top, next_steps

DIST = {"backbone": CategoricalDistribution(["resnet18", "timm/tf_efficientnet_lite0"]),
        "pretrained": CategoricalDistribution([True, False]),
        "lr": FloatDistribution(1e-4, 1e-1, log=True)}


def _study(tmp_path: Path, name: str, n: int = 7) -> str:
    storage = f"sqlite:///{tmp_path / 'studies' / (name + '.db')}"
    (tmp_path / "studies").mkdir(exist_ok=True)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    for i in range(n):
        params = {"backbone": "timm/tf_efficientnet_lite0" if i % 2 else "resnet18", "pretrained": bool(i % 2),
                  "lr": 10 ** -(1 + i % 3)}
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5 + i / 20, params=params, distributions=DIST,
                                     intermediate_values={1: 0.5}))
    data = tmp_path / "data" / "val" / "cat"
    data.mkdir(parents=True)
    (data / "cat_0.png").write_bytes(b"")
    study.set_user_attr("dataset", str(tmp_path / "data"))
    study.set_user_attr("settings", {"weights_dir": str(tmp_path / "weights")})
    return storage


def test_top_five_shows_pretrained_and_counts(tmp_path: Path) -> None:
    from search.studies import leaderboard, load_study

    df = leaderboard(load_study("pets", storage=_study(tmp_path, "pets")))
    text = format_top(df)
    lines = text.splitlines()
    assert len(lines) == 1 + 5 + 1  # header, the best five, the counts
    assert "pretrained" in lines[0] and "val_acc" in lines[0]
    assert lines[1].split()[1] == "6" and "0.8000" in lines[1]  # the best trial first
    assert lines[-1] == "top 5 of 7 trials: 7 complete"


def test_next_steps_name_the_study_the_data_and_the_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "val" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "val" / "cat" / "cat_0.png").write_bytes(b"")
    text = next_steps("pets", None, {"best": tmp_path / "reports" / "pets" / "best.yaml"},
                      dataset=str(tmp_path / "data"), weights_dir=str(tmp_path / "weights"))
    assert "tlsearch show pets" in text
    assert "tlsearch export pets --trial N" in text
    assert "tlsearch train reports/pets/best.yaml data --out models/pets --weights-dir weights" in text
    assert "tlsearch predict models/pets data/val/cat/cat_0.png" in text
    other = next_steps("x", "postgresql://h/db", {}, dataset=None)
    assert "tlsearch show x --storage postgresql://h/db" in other and "DATA" in other and "IMAGE" in other


def test_after_search_prints_top_report_and_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    storage = _study(tmp_path, "pets")
    monkeypatch.setattr("search.outputs.write_outputs",
                        lambda study, storage, **kw: {"report": tmp_path / "reports" / study / "index.html"})
    assert after_search(SimpleNamespace(interrupted=False), "pets", storage) == 0
    out = capsys.readouterr().out
    assert "top 5 of 7 trials" in out and "next:" in out
    assert "tlsearch train reports/pets/best.yaml data --out models/pets --weights-dir weights" in out
    assert "tlsearch predict models/pets data/val/cat/cat_0.png" in out
    assert after_search(SimpleNamespace(interrupted=True), "pets", storage) == 130
    captured = capsys.readouterr()
    assert "tlsearch resume pets" in captured.err and "next:" not in captured.out
