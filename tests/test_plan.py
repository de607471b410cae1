"""Where the search spends its budget, and how a trial's rate moves: pure decisions on synthetic
scores and timings (no training, no Ray)."""

from __future__ import annotations

import math

import pytest

from search.config import TrialConfig
from search.space import RECIPES, WAIT, Probe, SearchSpace, next_fine_tune, rank_backbones, with_finetune_priors
from search.trial import lr_multiplier

LITE = ["timm/tf_efficientnet_lite0", "timm/tf_efficientnet_lite1", "timm/tf_efficientnet_lite2"]


def _space(backbones: list[str] = LITE) -> SearchSpace:
    return with_finetune_priors(SearchSpace.from_dict({
        "backbone": backbones, "freeze_depth": ["all", 2, 0], "augmentation": ["none", "flip"],
        "lr": {"low": 1e-4, "high": 1e-2, "log": True}, "image_size": 160, "max_epochs": 3,
        "backbone_lr_mult": {"low": 0.01, "high": 0.3, "log": True},
    }))


def _probes(scores: dict[str, float | None], running: tuple[str, ...] = ()) -> list[Probe]:
    return [Probe(b, v, finished=b not in running) for b, v in scores.items()]


def test_backbones_ranked_by_their_probe() -> None:
    probes = _probes({LITE[0]: 0.95, LITE[1]: 0.925, LITE[2]: 0.913})
    assert rank_backbones(probes, maximize=True) == LITE
    assert rank_backbones(probes, maximize=False) == LITE[::-1]  # val_loss: lower first
    assert rank_backbones(_probes({LITE[0]: None, LITE[1]: 0.5}), maximize=True) == [LITE[1]]  # a failed probe


def test_fine_tuning_budget_goes_to_the_best_probed_backbone_first() -> None:
    space = _space()
    # Lite1 probed best: its full fine-tune comes first, whatever the space's order.
    probes = _probes({LITE[0]: 0.90, LITE[1]: 0.95, LITE[2]: 0.80})
    name, params = next_fine_tune(space, probes, set(), maximize=True)
    assert name == "full fine-tune" and params["backbone"] == LITE[1] and params["freeze_depth"] == 0
    # Then the runner-up; the worse half of the backbones (Lite2) never gets a fine-tune.
    planned = {("full fine-tune", LITE[1])}
    name, params = next_fine_tune(space, probes, planned, maximize=True)
    assert (name, params["backbone"]) == ("full fine-tune", LITE[0])
    planned.add(("full fine-tune", LITE[0]))
    name, params = next_fine_tune(space, probes, planned, maximize=True)
    assert (name, params["backbone"]) == ("last stages", LITE[1])
    planned |= {("last stages", LITE[1]), ("last stages", LITE[0])}
    assert next_fine_tune(space, probes, planned, maximize=True) is None
    # A cap on the recipes (a search without a time budget) holds.
    assert next_fine_tune(space, probes, {("full fine-tune", LITE[1])}, maximize=True, cap=1) is None


def test_fine_tunes_wait_for_every_probe() -> None:
    probes = _probes({LITE[0]: 0.9, LITE[1]: None}, running=(LITE[1],))
    assert next_fine_tune(_space(), probes, set(), maximize=True) == WAIT
    assert next_fine_tune(_space(), [], set(), maximize=True) is None  # no probe: nothing to plan


def test_little_time_buys_one_strong_fine_tune_or_a_cheaper_one_that_fits() -> None:
    space = _space()
    probes = _probes({LITE[0]: 0.95, LITE[1]: 0.93, LITE[2]: 0.90})
    cost = {0: 300.0, 2: 120.0}  # measured seconds to the last epoch: full fine-tune, last stages

    def estimate(params: dict) -> float:
        return cost[params["freeze_depth"]]

    name, params = next_fine_tune(space, probes, set(), maximize=True, time_left=400.0, estimate=estimate)
    assert (name, params["backbone"]) == ("full fine-tune", LITE[0])
    # 200 s left: the full fine-tunes do not fit, the best backbone's last stages do.
    name, params = next_fine_tune(space, probes, {("full fine-tune", LITE[0])}, maximize=True, time_left=200.0,
                                  estimate=estimate)
    assert (name, params["backbone"]) == ("last stages", LITE[0])
    assert next_fine_tune(space, probes, set(), maximize=True, time_left=100.0, estimate=estimate) is None


def test_lp_ft_fine_tunes_start_from_the_probe_of_the_space() -> None:
    assert _space().to_trial_config({"backbone": LITE[0], "freeze_depth": 0}).lp_epochs == 0  # a random head
    space = with_finetune_priors(SearchSpace.from_dict({**_space().to_dict(), "lp_epochs": 3}))  # LP-FT asked for
    name, params = next_fine_tune(space, _probes({LITE[0]: 0.9, LITE[1]: 0.8, LITE[2]: 0.7}), set(), maximize=True)
    cfg = space.to_trial_config(params)
    assert cfg.lp_epochs == 3 and cfg.lp_lr == pytest.approx(3e-3)  # the portfolio probe's epochs and rate
    probe = space.to_trial_config(space._recipe_params(RECIPES[0], LITE[0]))
    assert probe.lr == pytest.approx(cfg.lp_lr) and probe.epochs == cfg.lp_epochs


def test_a_users_lr_trains_every_layer_and_recipes_keep_their_backbone_rate() -> None:
    # The range a plain loop fine-tunes with: read as every layer's rate, not the head's.
    space = with_finetune_priors(SearchSpace.from_dict({
        "backbone": LITE[0], "freeze_depth": ["all", 0], "lr": {"low": 1e-4, "high": 1e-3, "log": True},
        "max_epochs": 1,
    }))
    full = space._recipe_params(RECIPES[2], LITE[0])
    cfg = space.to_trial_config(full)
    assert cfg.backbone_lr_mult == 1.0 and cfg.lr == pytest.approx(5e-4)  # the recipe's backbone rate


@pytest.mark.parametrize("schedule, expected", [
    # 3 epochs of 10 steps: the cosine holds through each epoch and steps down between them.
    ("cosine", [1.0] * 10 + [0.75] * 10 + [0.25] * 10),
    ("constant", [1.0] * 30),
])
def test_lr_schedule_per_epoch(schedule: str, expected: list[float]) -> None:
    got = [lr_multiplier(s, schedule=schedule, steps_per_epoch=10, warmup_steps=0, epochs=3) for s in range(30)]
    assert got == pytest.approx(expected)


def test_lr_schedule_one_epoch_trains_at_the_full_rate_and_warmup_comes_first() -> None:
    assert all(lr_multiplier(s, schedule="cosine", steps_per_epoch=50, warmup_steps=0, epochs=1) == 1.0
               for s in range(50))
    assert lr_multiplier(0, schedule="cosine", steps_per_epoch=10, warmup_steps=5, epochs=3) == pytest.approx(0.2)
    # The per-batch cosine of earlier trials: half of a one-epoch trial's steps below half the rate.
    steps = [lr_multiplier(s, schedule="cosine_steps", steps_per_epoch=50, warmup_steps=0, epochs=1) for s in range(50)]
    assert sum(steps) / 50 == pytest.approx(0.5, abs=0.02) and steps[-1] < 0.01


def test_configs_exported_before_the_schedule_existed_retrain_with_theirs() -> None:
    assert TrialConfig.from_dict({"lr": 1e-3}).lr_schedule == "cosine"  # a new, hand-written config
    exported = {"lr": 1e-3, "study": "s", "trial": 3, "dataset_fingerprint": "abc"}
    assert TrialConfig.from_dict(exported).lr_schedule == "cosine_steps"  # exported before it: as it trained
    assert TrialConfig.from_dict({**exported, "lr_schedule": "cosine"}).lr_schedule == "cosine"
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'; available: cosine, cosine_steps, constant"):
        TrialConfig(lr_schedule="step")
    assert math.isfinite(TrialConfig(lp_epochs=2).lp_lr)


# ----- what runs next, on synthetic studies (`next_step`) -------------------------------------------

from search.space import PROBE_RECIPE, PlanRole, PlanStep, StudySnapshot, TrialView, next_step  # noqa: E402

PROBE = PlanRole(recipe=PROBE_RECIPE, baseline=True)


def _probe_views(scores: dict[str, float]) -> list[TrialView]:
    return [TrialView(i, PROBE, "COMPLETE", b, v) for i, (b, v) in enumerate(scores.items())]


def _per_epoch(seconds: dict[int, float]):
    """An estimate: start-up 10 s plus `seconds[freeze_depth]` per epoch."""
    return lambda params, epochs: 10.0 + epochs * seconds[params["freeze_depth"]]


def test_a_running_plan_fine_tune_holds_its_time_and_the_next_gets_the_epochs_that_remain() -> None:
    space = _space()  # 3 epochs at most
    views = _probe_views({LITE[0]: 0.95, LITE[1]: 0.93, LITE[2]: 0.90})
    estimate = _per_epoch({0: 50.0, 2: 30.0})
    # Nothing else runs: the best backbone's full fine-tune gets all 3 epochs (160 s of 300).
    step = next_step(space, StudySnapshot(tuple(views), maximize=True, time_left=300.0), estimate=estimate)
    assert isinstance(step, PlanStep) and step.recipe == "full fine-tune" and step.params["backbone"] == LITE[0]
    assert step.epochs == 3 and step.role() == PlanRole(recipe="full fine-tune", baseline=True, epochs=3)
    # It runs, with 160 s still to go: the runner-up's full fine-tune gets what is left after it
    # (140 s: two epochs), not the 300 s the clock shows.
    running = TrialView(3, step.role(), "RUNNING", LITE[0], remaining_s=160.0)
    snap = StudySnapshot((*views, running), maximize=True, time_left=300.0)
    nxt = next_step(space, snap, estimate=estimate)
    assert isinstance(nxt, PlanStep) and (nxt.recipe, nxt.params["backbone"], nxt.epochs) == ("full fine-tune", LITE[1], 2)
    # A waiting one holds its time too; with 60 s free only a cheaper recipe fits, for one epoch.
    waiting = TrialView(4, nxt.role(), "WAITING", LITE[1], remaining_s=110.0)
    snap = StudySnapshot((*views, running, waiting), maximize=True, time_left=330.0)
    last = next_step(space, snap, estimate=estimate)
    assert isinstance(last, PlanStep) and (last.recipe, last.params["backbone"], last.epochs) == ("last stages", LITE[0], 1)
    # A running fine-tune whose time nobody can estimate holds it all: nothing more is planned yet.
    unknown = TrialView(3, step.role(), "RUNNING", LITE[0], remaining_s=None)
    assert next_step(space, StudySnapshot((*views, unknown), maximize=True, time_left=300.0), estimate=estimate) is None


def test_a_retried_probe_keeps_its_backbones_place_in_the_ranking() -> None:
    from search.runner._ledger import plan_roles

    space = _space(LITE[:2])
    # Lite1's probe was interrupted (Ctrl-C) and its retry waits: no fine-tune from Lite0's alone.
    interrupted = TrialView(1, PROBE, "FAIL", LITE[1])
    retry = TrialView(2, PROBE.retry(1), "WAITING", LITE[1])
    snap = StudySnapshot((TrialView(0, PROBE, "COMPLETE", LITE[0], 0.90), interrupted, retry), maximize=True)
    assert next_step(space, snap, estimate=lambda p, e: None) is None  # the queue starts the retry
    running = TrialView(2, PROBE.retry(1), "RUNNING", LITE[1])
    snap = StudySnapshot((snap.trials[0], interrupted, running), maximize=True)
    assert next_step(space, snap, estimate=lambda p, e: None) == WAIT
    done = TrialView(2, PROBE.retry(1), "COMPLETE", LITE[1], 0.95)
    step = next_step(space, StudySnapshot((snap.trials[0], interrupted, done), maximize=True),
                     estimate=lambda p, e: None)
    assert isinstance(step, PlanStep) and step.params["backbone"] == LITE[1]  # the retried probe ranked first
    # A retry enqueued by an older version names only `retry_of`: it takes its trial's role.
    from types import SimpleNamespace

    old = [SimpleNamespace(number=1, user_attrs={"recipe": PROBE_RECIPE, "baseline": True}),
           SimpleNamespace(number=2, user_attrs={"retry_of": 1})]
    assert plan_roles(old)[2] == PROBE.retry(1)


def test_a_retry_and_a_continuation_copy_the_whole_role(tmp_path) -> None:
    import optuna

    from search.runner._ledger import continue_budget_cut, enqueue_retry

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    role = PlanRole(recipe="full fine-tune", baseline=True, epochs=2)
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)}
    study.add_trial(optuna.trial.create_trial(params={"lr": 1e-3}, distributions=dist, state=optuna.trial.TrialState.FAIL,
                                              user_attrs={**role.to_user_attrs(), "interrupted": True}))
    assert enqueue_retry(study, study.trials[0])
    assert PlanRole.from_attrs(study.trials[-1].user_attrs) == role.retry(0)
    ckpt = tmp_path / "c.pt"
    ckpt.write_text("1")
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 2e-3}, distributions=dist, state=optuna.trial.TrialState.PRUNED, intermediate_values={1: 0.5},
        user_attrs={**role.to_user_attrs(), "stopped_by": "time budget", "checkpoint": str(ckpt)}))
    assert continue_budget_cut(study) == 1
    cont = PlanRole.from_attrs(study.trials[-1].user_attrs)
    assert cont == PlanRole(recipe="full fine-tune", baseline=True, epochs=2, continues=2)
