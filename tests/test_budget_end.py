"""A search ended by its time budget, end to end through Ray: the probes, then the fine-tune the
plan chose, cut by the budget before its first epoch. Nothing failed, and nothing says so."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest

from conftest import make_image_folder
from reliability.stubs import epoch_metrics
from search.settings import SearchSettings

pytestmark = pytest.mark.ray


def probe_then_endless_fine_tune(config, index, *, report, checkpoint_path=None, **kwargs):
    """A probe's epochs take 0.1 s; a fine-tune's first epoch never ends (the budget cuts it)."""
    for epoch in range(1, config.epochs + 1):
        time.sleep(0.1 if config.freeze_depth == "all" else 3600)
        if checkpoint_path:
            Path(checkpoint_path).write_text(str(epoch))
        report(epoch_metrics(epoch, 0.5 + 0.05 * epoch, seconds=0.1, lr=config.lr))


def test_a_budget_ended_run_leaves_no_failed_trial_and_says_the_budget_stopped_it(
        tmp_path: Path, ray_session, capsys: pytest.CaptureFixture[str]) -> None:
    from search.runner import run_search
    from search.space import PlanRole
    from search.runner import finished_count

    data = make_image_folder(tmp_path / "data")
    space = {"backbone": "resnet18", "freeze_depth": ["all", 0], "lr": {"low": 1e-4, "high": 1e-2, "log": True},
             "image_size": 32, "max_epochs": 3}
    s = SearchSettings(study="ends", data=str(data), space=space, trials=50, time_budget_s=40.0, pretrained=False,
                       cache=False, studies_dir=str(tmp_path / "studies"), reports_dir=str(tmp_path / "reports"),
                       max_concurrent=1)
    summary = run_search(s, trial_fn=probe_then_endless_fine_tune, progress=True)
    err = capsys.readouterr().err
    assert summary.budget_reached and not summary.interrupted
    study = optuna.load_study(study_name="ends", storage=s.storage_url)
    shown = [t for t in study.trials if not t.user_attrs.get("not_started")]
    assert not [t for t in shown if t.state == optuna.trial.TrialState.FAIL], [
        (t.number, t.user_attrs.get("error")) for t in shown]
    [cut] = [t for t in shown if PlanRole.from_attrs(t.user_attrs).is_plan_fine_tune
             and t.state == optuna.trial.TrialState.PRUNED]
    assert cut.user_attrs["stopped_by"] == "time budget" and not cut.intermediate_values
    trial_lines = [line for line in err.splitlines() if line.startswith("trial ")]
    assert "not a finite number" not in err and not [line for line in trial_lines if "failed" in line], trial_lines
    assert [line for line in trial_lines if f"trial {cut.number} " in line and
            line.endswith("stopped by the time budget before its first epoch")], trial_lines
    assert "failed 0" in [line for line in err.splitlines() if line.startswith("[search]")][-1]
    # It does not count, and waits (as the plan's fine-tune it was) for a resume with more time.
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert [PlanRole.from_attrs(t.user_attrs).recipe for t in waiting] == [PlanRole.from_attrs(cut.user_attrs).recipe]
    assert finished_count(study) == len([t for t in shown if t.state == optuna.trial.TrialState.COMPLETE])
