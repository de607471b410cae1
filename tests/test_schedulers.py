"""Early stopping on synthetic curves: fine-tunes are compared with fine-tunes, probes with probes,
and a diverging fine-tune still stops early (no training, no Ray session)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from search.runner._schedulers import PruneTrackingASHA, diverged, trial_kind
from search.space import SearchSpace

SPACE = SearchSpace.from_dict({"backbone": "resnet18", "freeze_depth": ["all", 0], "lr": 1e-3, "image_size": 32,
                               "max_epochs": 6})
PROBE = {"backbone": "resnet18", "freeze_depth": "all"}
FULL = {"backbone": "resnet18", "freeze_depth": 0}


def _asha(**kw) -> PruneTrackingASHA:
    return PruneTrackingASHA(time_attr="training_iteration", metric="val_acc", mode="max", max_t=6, grace_period=1,
                             reduction_factor=3, finetune_grace=2, space=SPACE, chance=0.1, **kw)


def replay(asha: PruneTrackingASHA, curves: list[tuple[dict, list[float]]]) -> list[int]:
    """Feeds the curves to ASHA in turn (each trial to its end or its stop); returns the epochs each ran."""
    ran = []
    for i, (config, curve) in enumerate(curves):
        trial = SimpleNamespace(trial_id=f"t{i}", config=config)
        asha.on_trial_add(None, trial)
        epochs = 0
        for epoch, value in enumerate(curve, start=1):
            epochs = epoch
            if asha.on_trial_result(None, trial, {"training_iteration": epoch, "val_acc": value}) == "STOP":
                break
        asha.on_trial_complete(None, trial, {"training_iteration": epochs, "val_acc": curve[epochs - 1]})
        ran.append(epochs)
    return ran


# Aerial tiles, from a new user's run: probes flat at 0.93, the full fine-tune of the best-probed
# backbone at 0.870, 0.902, 0.916 and rising (it went on to pass them).
PROBES = [(PROBE, [0.925, 0.93, 0.93, 0.93, 0.93, 0.93]), (PROBE, [0.92, 0.928, 0.93, 0.931, 0.93, 0.93])]
RISING = (FULL, [0.870, 0.902, 0.916, 0.935, 0.945, 0.948])


def test_a_rising_fine_tune_is_not_stopped_by_probes_at_its_rung() -> None:
    assert replay(_asha(), [*PROBES, RISING])[-1] == 6
    # One set of rungs for every trial (the rule before) stops it at epoch 3, still rising.
    assert replay(_asha(per_kind=False), [*PROBES, RISING])[-1] == 3


def test_fine_tunes_still_compete_with_each_other_and_a_diverging_rate_stops_at_once() -> None:
    weak = (FULL, [0.80, 0.82, 0.83, 0.84, 0.84, 0.84])
    ran = replay(_asha(), [*PROBES, RISING, weak])
    assert ran[2] == 6 and ran[3] == 3  # below the first fine-tune at rung 3: stopped there
    diverging = (FULL, [0.11, 0.10, 0.10, 0.10, 0.10, 0.10])  # chance on 10 classes
    assert replay(_asha(), [*PROBES, diverging])[-1] == 1
    # A worse probe is stopped by the probes, as before.
    assert replay(_asha(), [*PROBES, (PROBE, [0.5, 0.5, 0.5, 0.5, 0.5, 0.5])])[-1] == 1


def test_the_studys_earlier_probes_tell_asha_what_diverged_means() -> None:
    assert replay(_asha(best_probe=0.93), [(FULL, [0.15] * 6)]) == [1]
    assert replay(_asha(), [(FULL, [0.15] * 6)]) == [6]  # no probe known: nothing to compare with


@pytest.mark.parametrize("value, chance, best, expected", [
    (0.10, 0.1, 0.93, True), (0.38, 0.1, 0.93, False), (0.36, 0.1, 0.93, True),
    (0.9, None, 0.93, False), (0.2, 0.1, None, False), (0.2, 0.5, 0.4, False),
    (-2.2, -2.3, -0.3, True), (-1.0, -2.3, -0.3, False),  # val_loss, negated: ln 10 at chance
])
def test_diverged(value: float, chance: float | None, best: float | None, expected: bool) -> None:
    assert diverged(value, chance=chance, best_probe=best) is expected


def test_trial_kind() -> None:
    assert trial_kind(SPACE, PROBE) == "head" and trial_kind(SPACE, FULL) == "stages"
    assert trial_kind(SPACE, {**FULL, "freeze_depth": 3}) == "stages" and trial_kind(None, FULL) == "head"
