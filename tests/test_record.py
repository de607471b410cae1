"""TrialRecord round trips and the rules on trials (best, counts toward the target, Pareto front)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from search.config import TrialConfig
from search.export import export_trial
from search.studies import TrialRecord, best_trial, counts_toward_target, pareto_flags, pareto_front

State = optuna.trial.TrialState
DIST = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)}
CONFIG = TrialConfig(backbone="resnet18", pretrained=False, image_size=32, epochs=2)


def _trial(state: State = State.COMPLETE, value: float | None = 0.5, number: int = 0, **attrs) -> optuna.trial.FrozenTrial:
    t = optuna.trial.create_trial(
        state=state, value=value if state == State.COMPLETE else None, params={"lr": 1e-3}, distributions=DIST,
        user_attrs=attrs, intermediate_values={1: 0.4, 2: value if value is not None else 0.3},
    )
    t.number = number
    return t


def test_record_round_trips_through_user_attrs() -> None:
    rec = TrialRecord(
        config=CONFIG.to_dict(), epochs_run=2, curve=({"epoch": 1, "val_acc": 0.4}, {"epoch": 2, "val_acc": 0.5}),
        confusion_matrix=[[1, 0], [0, 1]], params_total=11, latency_ms=1.5, device="cpu", threads=2,
        weights_id="sha256:abc", versions={"torch": "2"}, checkpoint="/x/trial-0.pt", error=None,
        interrupted=False, retry_of=3,
    )
    back = TrialRecord.from_trial(_trial(**rec.to_user_attrs()))
    assert back.replace(number=-1, state="RUNNING", value=None, params={}, intermediate_values={}) == rec
    assert back.state == "COMPLETE" and back.value == 0.5 and back.params == {"lr": 1e-3}
    assert back.backbone == "resnet18" and back.last_value == 0.5


def test_record_of_an_old_trial_uses_defaults() -> None:
    back = TrialRecord.from_trial(_trial(State.FAIL, None, config="not a dict", curve=[1, {"epoch": 1}], unknown=1))
    assert back.config is None and back.curve == ({"epoch": 1},) and back.value is None
    assert back.interrupted is False and back.versions is None


@pytest.mark.parametrize(("state", "attrs", "counts"), [
    (State.COMPLETE, {}, True),
    (State.PRUNED, {}, True),
    (State.FAIL, {"error": "boom"}, True),
    (State.FAIL, {"error": "interrupted", "interrupted": True}, False),
    (State.RUNNING, {}, False),
    (State.WAITING, {}, False),
])
def test_counts_toward_target(state: State, attrs: dict, counts: bool) -> None:
    t = _trial(state, 0.5 if state == State.COMPLETE else None, **attrs) if state != State.RUNNING else None
    if state in (State.RUNNING, State.WAITING):
        t = optuna.trial.FrozenTrial(number=0, state=state, value=None, datetime_start=None, datetime_complete=None,
                                     params={}, distributions={}, user_attrs=attrs, system_attrs={},
                                     intermediate_values={}, trial_id=0)
    assert counts_toward_target(t) is counts
    assert counts_toward_target(TrialRecord.from_trial(t)) is counts


def test_best_trial_follows_the_direction_and_skips_unfinished() -> None:
    trials = [_trial(value=0.7, number=0), _trial(value=0.9, number=1), _trial(value=0.2, number=2),
              _trial(State.PRUNED, None, number=3), _trial(value=float("inf"), number=4), _trial(value=0.9, number=5)]
    assert best_trial(trials, maximize=True).number == 1  # the earliest on ties
    assert best_trial(trials, maximize=False).number == 2
    assert best_trial([TrialRecord.from_trial(t) for t in trials], maximize=False).number == 2
    assert best_trial(trials[3:5], maximize=True) is None  # an infinite value is never best


def test_pareto_front_in_both_directions() -> None:
    # (value, params): maximising keeps the cheap and the accurate; minimising (a loss) the cheap and the low.
    pts = [(0.9, 10), (0.8, 20), (0.95, 30), (0.5, 40)]
    trials = [_trial(value=v, number=i, params_total=c) for i, (v, c) in enumerate(pts)]
    trials.append(_trial(State.PRUNED, None, number=9, params_total=1))  # never on a front
    assert [t.number for t in pareto_front(trials, maximize=True)] == [0, 2]
    assert [t.number for t in pareto_front(trials, maximize=False)] == [0, 1, 3]
    assert pareto_flags([1, 2, 3, 2], [0.5, 0.7, 0.6, 0.4], maximize=True) == [True, True, False, False]
    assert pareto_flags([1, 2, 3, 2], [0.5, 0.7, 0.6, 0.4], maximize=False) == [True, False, False, True]


def _minimising_study(tmp_path: Path) -> None:
    (tmp_path / "studies").mkdir()
    study = optuna.create_study(study_name="loss", storage=f"sqlite:///{tmp_path / 'studies' / 'loss.db'}",
                                direction="minimize")
    study.set_user_attr("settings", {"metric": "val_loss", "cpus_per_trial": 1})
    for value, params in ((0.3, 10), (0.2, 20), (0.9, 5), (0.25, 30)):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": 1e-3}, distributions=DIST, value=value,
            user_attrs={"config": CONFIG.to_dict(), "params_total": params, "curve": [{"epoch": 1, "val_acc": 1 - value}]},
        ))


def test_export_of_a_minimised_study(tmp_path: Path) -> None:
    _minimising_study(tmp_path)
    kw = dict(studies_dir=tmp_path / "studies", reports_dir=tmp_path / "reports")
    [best] = export_trial("loss", **kw)
    from search.config import load_yaml

    record = load_yaml(best)
    assert record["trial"] == 1 and record["metric"] == "val_loss"
    assert record["metrics"]["val_loss"] == pytest.approx(0.2) and record["metrics"]["val_acc"] == pytest.approx(0.8)
    paths = export_trial("loss", pareto=True, **kw)
    # Lower loss is better: trial 3 (0.25 at 30) is beaten by trial 1 (0.2 at 20); the worst trial
    # (0.9) is on the front only because it is the smallest.
    assert sorted(p.name for p in paths) == ["pareto-0.yaml", "pareto-1.yaml", "pareto-2.yaml"]
