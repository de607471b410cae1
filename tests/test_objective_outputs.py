"""A study ranked by another metric than val_acc, and the best trial's per-class results, in every
output: the leaderboard, `show --json`, export, the report page and `per_class.csv`."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from search import report
from search.export import export_trial
from search.metrics import per_class_table
from search.studies import get_storage, leaderboard, study_summary

optuna.logging.set_verbosity(optuna.logging.WARNING)
CLASSES = ["ants", "bees", "<wasps>"]


def _trial(number: int, acc: float, f1: float, confusion: list[list[int]], *, per_class: bool = True,
           top5: bool = False) -> optuna.trial.FrozenTrial:
    curve = [{"epoch": e, "val_acc": acc - 0.1 * (2 - e), "val_macro_f1": f1 - 0.1 * (2 - e), "val_loss": 1 - acc,
              "val_balanced_acc": f1, "train_loss": 0.5, **({"val_top5_acc": 1.0} if top5 else {})}
             for e in (1, 2)]
    attrs = {"config": {"backbone": "resnet18", "lr": 1e-3 * (number + 1), "epochs": 2}, "epochs_run": 2,
             "curve": curve, "confusion_matrix": confusion, "val_macro_f1": f1, "val_loss": 1 - acc}
    if per_class:
        attrs["per_class"] = per_class_table(confusion, CLASSES)
    return create_trial(state=TrialState.COMPLETE, value=f1, params={"lr": 1e-3 * (number + 1)},
                        distributions={"lr": FloatDistribution(1e-4, 1e-1, log=True)}, user_attrs=attrs,
                        intermediate_values={1: f1 - 0.1, 2: f1})


def make_study(tmp_path: Path, *, per_class: bool = True, top5: bool = False) -> optuna.Study:
    """Three trials: #0 has the best accuracy, #1 the best macro-F1 (the objective)."""
    study = optuna.create_study(study_name="f1", storage=get_storage(f"sqlite:///{tmp_path / 'f1.db'}"),
                                direction="maximize")
    study.set_user_attr("class_names", CLASSES)
    study.set_user_attr("settings", {"metric": "val_macro_f1", "mode": "max"})
    study.add_trial(_trial(0, 0.90, 0.50, [[50, 0, 0], [0, 40, 0], [0, 10, 0]], per_class=per_class, top5=top5))
    study.add_trial(_trial(1, 0.85, 0.80, [[45, 5, 0], [0, 38, 2], [0, 3, 7]], per_class=per_class, top5=top5))
    study.add_trial(_trial(2, 0.70, 0.60, [[40, 10, 0], [5, 30, 5], [0, 5, 5]], per_class=per_class, top5=top5))
    return study


def test_leaderboard_ranks_by_the_studys_metric_and_shows_every_metric(tmp_path: Path) -> None:
    df = leaderboard(make_study(tmp_path))
    assert df.attrs["metric"] == "val_macro_f1"
    assert list(df["trial"]) == [1, 2, 0]  # by macro-F1, not by accuracy
    assert list(df["val_macro_f1"]) == pytest.approx([0.80, 0.60, 0.50])
    assert list(df["val_acc"]) == pytest.approx([0.85, 0.70, 0.90])  # read from each trial's curve
    assert "val_top5_acc" not in df.columns  # recorded only with 10 classes or more
    assert list(leaderboard(make_study(tmp_path / "t5", top5=True))["val_top5_acc"]) == [1.0, 1.0, 1.0]


def test_show_json_and_export_carry_the_best_trials_per_class_table(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    summary = study_summary(study)
    assert summary["metric"] == "val_macro_f1" and summary["best"]["trial"] == 1
    rows = summary["best"]["per_class"]
    assert [r["class"] for r in rows] == CLASSES and [r["support"] for r in rows] == [50, 40, 10]
    assert rows[2]["recall"] == pytest.approx(0.7) and rows[2]["precision"] == pytest.approx(7 / 9)
    json.dumps(summary)  # JSON-ready
    # A trial from before per-class results were recorded: computed from its confusion matrix.
    old = study_summary(make_study(tmp_path / "old", per_class=False))["best"]["per_class"]
    assert old == rows

    [path] = export_trial("f1", storage=f"sqlite:///{tmp_path / 'f1.db'}", reports_dir=tmp_path / "reports")
    import yaml

    record = yaml.safe_load(path.read_text())
    assert record["trial"] == 1 and record["metric"] == "val_macro_f1"
    assert record["metrics"]["val_macro_f1"] == pytest.approx(0.80)
    assert record["metrics"]["val_acc"] == pytest.approx(0.85)


def test_report_writes_per_class_csv_and_a_sortable_table_beside_the_confusion_matrix(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    page = report.write_report(study, out_dir=tmp_path / "out")
    with open(tmp_path / "out" / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == CLASSES
    assert set(rows[0]) == {"trial", "class", "precision", "recall", "f1", "support"}
    assert {r["trial"] for r in rows} == {"1"} and [int(r["support"]) for r in rows] == [50, 40, 10]
    assert float(rows[2]["f1"]) == pytest.approx(per_class_table([[45, 5, 0], [0, 38, 2], [0, 3, 7]])[2]["f1"])
    html = page.read_text()
    table = re.search(r'<table id="per-class" class="sortable">.*?</table>', html, re.S).group(0)
    assert "&lt;wasps&gt;" in table and "<wasps>" not in table  # class names are escaped
    assert table.count("<tr>") == 1 + len(CLASSES)
    # The table sits right before the confusion matrix.
    assert html.index('id="per-class-section"') < html.index('id="confusion"')
    # The learning curves offer every recorded metric, the objective first.
    data = report.collect(study)
    assert {"val_acc", "val_macro_f1", "val_loss"} <= set(data.curves.columns)
    fig = report.curves_figure(data.curves, metric=data.metric, best_trial=data.best_trial)
    labels = [b.label for b in fig.layout.updatemenus[0].buttons]
    assert labels[0] == "val_macro_f1 (objective)" and "val_acc" in labels and "val_loss" in labels


def test_report_without_a_best_trial_writes_an_empty_per_class_csv(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="empty", storage=get_storage(f"sqlite:///{tmp_path / 'e.db'}"))
    report.write_report(study, out_dir=tmp_path / "out")
    assert (tmp_path / "out" / "per_class.csv").read_text().strip() == "trial,class,precision,recall,f1,support"


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium")
def test_browser_sorts_the_per_class_table(tmp_path: Path) -> None:
    from test_report import _chromium

    page = report.write_report(make_study(tmp_path), out_dir=tmp_path / "out")
    dom = _chromium(tmp_path, page.as_uri() + "#per-class.sort=recall&per-class.dir=asc", "--dump-dom")
    table = re.search(r'<table id="per-class".*?</table>', dom, re.S).group(0)
    order = re.findall(r'<tr><td data-v="([^"]*)"', table)
    # Recalls of the best trial (#1): ants 0.9, bees 0.95, wasps 0.7.
    assert order == ["&lt;wasps&gt;", "ants", "bees"], order
    assert 'aria-sort="ascending"' in table
