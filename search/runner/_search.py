"""The search adapter: `HonestOptunaSearch` tells Optuna how each trial really ended, and spends
a time budget where the probes point (the samplers and ASHA are in `_schedulers`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from search.runner._records import bound_checkpoints, ended_record, snapshot
from search.runner._ledger import (
    BUDGET_CUT,
    NOT_STARTED,
    SURPLUS,
    EpochTimes,
    _claimed,
    _other_drivers,
    _Tally,
    enqueue_retry,
    fits_budget,
    is_waiting_continuation,
    timing_key,
    trial_outcome,
)
from search.space import (
    CHEAP_PROBE_RECIPE,
    WAIT,
    PlanRole,
    PlanStep,
    SearchSpace,
    StudySnapshot,
    as_probe,
    backbones_in,
    next_step,
)
from search.studies import (
    TrialRecord,
    is_finite,
)


_GO = "go"  # `_gate`: a new trial may be asked


def ot_trial_attrs(ot_trial: Any) -> dict:
    """A live Optuna trial's user_attrs (empty when the storage cannot say)."""
    try:
        return dict(ot_trial.user_attrs)
    except Exception:
        return {}


class HonestOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about how each trial ended.

    Ray's `on_trial_complete` tells COMPLETE with the last rung's score when ASHA stops a trial.
    Here: per-epoch values are reported with step = epoch; a trial that ran its full `epochs`
    is COMPLETE, one ASHA stopped is PRUNED, one that raised / died / reported NaN is FAIL with
    the reason, and one cut short by the driver (Ctrl-C) is FAIL "interrupted" and enqueued
    again. With a time budget (`deadline`), a drawn trial whose estimated duration exceeds the
    time left is not started, and one the budget cuts is PRUNED (`stopped_by` "time budget"),
    which `resume` continues from its checkpoint (or runs again, cut before its first epoch).
    Every user_attr is set before the state is told.

    What runs next in a planned study is `space.next_step`, a pure function of the study's
    snapshot (`_snapshot`); what a trial is to the plan is its `PlanRole`, read and written here
    and in `_ledger` only. This class does the bookkeeping.
    """

    # Draws in a row that did not fit the time left before the search stops drawing.
    MAX_SKIPS = 5

    def __init__(
        self,
        space: SearchSpace,
        *,
        metric: str,
        mode: str,
        sampler: "optuna.samplers.BaseSampler",
        study_name: str,
        storage: "optuna.storages.BaseStorage",
        asha_stopped: set,
        tally: _Tally,
        driver: str = "",
        target: int | None = None,
        keep_checkpoints: int | None = None,
        deadline: float | None = None,
        plan: bool = False,
        plan_cap: int | None = None,
        fine_tune_cpus: float | None = None,
        probe_cpus: float | None = None,
        cpus_per_trial: float = 1.0,
    ) -> None:
        self._search_space = space
        self._deadline = deadline  # unix time the run's time budget ends; None: no budget
        self._times = EpochTimes()
        self._skips = 0
        # Probes first, then fine-tunes of the best-probed backbones (`space.next_step`).
        self._plan = plan
        self._plan_cap = plan_cap  # fine-tuning recipes in all; None: as many as the budget fits
        self._fine_tune_cpus = fine_tune_cpus  # CPUs of a fine-tune the probes chose; None: its share
        self._probe_cpus = probe_cpus  # CPUs of a probe the plan starts with; None: its share
        self._cpus_per_trial = cpus_per_trial  # every other trial's share
        self.out_of_time = False  # drawing stopped because nothing fits the time left
        self._refused: list[tuple[dict, PlanRole]] = []  # enqueued again when the run ends, for a resume
        self._asha_stopped = asha_stopped
        self._tally = tally
        self._driver = driver  # this driver's id, stamped on every trial it runs
        self._target = target  # trials the study should reach, all drivers together; None: no check
        self._keep_checkpoints = keep_checkpoints  # best COMPLETE checkpoints kept per backbone; None: keep all
        self._reseeded = False
        self._configs: dict[str, dict] = {}
        self._curves: dict[str, dict[int, dict]] = {}
        self._last: dict[str, dict] = {}
        super().__init__(
            space=space.define_by_run, metric=metric, mode=mode, sampler=sampler,
            study_name=study_name, storage=storage,
        )

    def suggest(self, trial_id: str) -> dict | str | None:
        if trial_id not in self._ot_trials:
            gate = self._gate()
            if gate != _GO:
                return gate
        params = super().suggest(trial_id)
        if params is None:
            return None
        return self._prepare(trial_id, params)

    def _gate(self) -> str | None:
        """Before a new trial is asked: FINISHED at the trial count, None while the plan waits
        for a probe, `_GO` otherwise (a due fine-tune is enqueued first)."""
        if self._target is not None:
            trials = self._ot_study.get_trials(deepcopy=False)
            if _claimed(trials, driver=self._driver) >= self._target and not any(
                    is_waiting_continuation(t) for t in trials):
                return self.FINISHED  # every trial is done or taken (maybe by another driver)
            if not self._reseeded and _other_drivers(trials, driver=self._driver):
                # Drivers seeded alike would sample the same params: diverge from here on.
                self._ot_study.sampler.reseed_rng()
                self._reseeded = True
        if not self._plan:
            return _GO
        snapshot = self._snapshot()
        step = self._plan_next(snapshot)
        if step == WAIT:
            return None  # a probe still runs: the fine-tunes wait for the ranking
        if step is None and self._held(snapshot):
            return None  # the plan's fine-tunes hold the machine: no draw is asked meanwhile
        return _GO

    def _held(self, snapshot: StudySnapshot) -> bool:
        """Whether the plan's open fine-tunes hold the machine: each is given every CPU, so a draw
        started beside one would make it wait for its cores (seen: a 2-CPU fine-tune pending
        while a 1-CPU draw ran its 6 epochs); else whether they leave less time than the
        quickest trial measured needs."""
        if not any(t.role.is_plan_fine_tune and t.state == "RUNNING" for t in snapshot.trials):
            return False  # (a waiting one is the queue's to start next)
        if self._fine_tune_cpus:
            return True
        free = snapshot.free_time()
        quickest = self._times.quickest(self._search_space.max_epochs)
        return free is not None and (quickest is None or free < quickest)

    def _prepare(self, trial_id: str, params: dict) -> dict | str | None:
        """The asked trial's config as it will run (its role's epochs and CPUs, a continuation's
        checkpoint), or None / FINISHED when it does not start."""
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr("driver", self._driver)
        ot_trial.set_user_attr("heartbeat", time.time())
        if self._target is not None and self._surplus(trial_id):
            return self.FINISHED
        params["_trial_number"] = ot_trial.number
        role = PlanRole.from_attrs(ot_trial_attrs(ot_trial))
        self._apply_role(params, role)
        self._curves[trial_id] = {}
        start_epoch = self._continuation(trial_id, params)
        if not self._fits(trial_id, params, start_epoch, role):
            if self._skips >= self.MAX_SKIPS:
                self.out_of_time = True
                return self.FINISHED
            return None
        self._configs[trial_id] = dict(params)
        self._tally.running += 1
        return params

    def _apply_role(self, params: dict, role: PlanRole) -> None:
        """The epochs the plan gave a trial (its warm-up scaled alike), and the plan's CPUs.

        Only the plan's trials (its probes, the fine-tunes they chose) get every CPU: a fixed
        portfolio's recipes run beside the other trials at their share.
        """
        if role.epochs and role.epochs != self._search_space.max_epochs:
            warmup = params.get("warmup_epochs")
            if is_finite(warmup):
                params["warmup_epochs"] = round(float(warmup) * role.epochs / self._search_space.max_epochs, 3)
            params["epochs"] = role.epochs
        cpus = self._fine_tune_cpus if role.is_plan_fine_tune else self._probe_cpus if role.is_probe else None
        if cpus and self._plan:
            params["_cpus"] = cpus

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials:
            return
        self._record(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if result:
            self._record(trial_id, result)
        self._finish(trial_id, worker_died=error and not (self._last.get(trial_id) or {}).get("error"))

    def _continuation(self, trial_id: str, params: dict) -> int:
        """A trial that continues a budget-cut one starts from its checkpoint and curve.

        Returns:
            Epochs already run (0 for a fresh trial).
        """
        ot_trial = self._ot_trials[trial_id]
        parent_number = PlanRole.from_attrs(ot_trial.user_attrs).continues
        if parent_number is None:
            return 0
        parent = TrialRecord.from_trial(self._ot_study.get_trials(deepcopy=False)[parent_number])
        done = [c for c in parent.curve if isinstance(c.get("epoch"), int)]
        if not parent.checkpoint or not done or not Path(parent.checkpoint).is_file():
            return 0  # nothing to continue from: it runs from scratch
        start = max(c["epoch"] for c in done)
        params["_resume_from"] = parent.checkpoint
        params["_start_epoch"] = start
        for c in done:  # its epochs are this trial's first ones, for Optuna, ASHA's view aside
            self._curves[trial_id][c["epoch"]] = dict(c)
            if is_finite(c.get(self.metric)):
                ot_trial.report(float(c[self.metric]), step=c["epoch"])
        return start

    # ----- the plan -------------------------------------------------------------------------

    def _plan_next(self, snapshot: StudySnapshot) -> PlanStep | str | None:
        """Enqueues the fine-tune `space.next_step` says is due, if any.

        Returns:
            The step enqueued; `WAIT` while a probe runs and none waits to start; otherwise None.
        """
        step = next_step(self._search_space, snapshot, estimate=self._plan_estimate, cap=self._plan_cap)
        if isinstance(step, PlanStep):
            self._ot_study.enqueue_trial(step.params, user_attrs=step.role().to_user_attrs())
        return step

    def _snapshot(self) -> StudySnapshot:
        """The study as the plan sees it (`_records.snapshot`), open plan fine-tunes timed."""
        now = time.time()
        return snapshot(self._ot_study.get_trials(deepcopy=False), only=backbones_in(self._search_space)[0],
                        maximize=self.mode == "max", time_left=None if self._deadline is None else self._deadline - now,
                        remaining=lambda params, role, t: self._remaining(params, role, t, now))

    def _remaining(self, params: dict, role: PlanRole, trial: Any, now: float) -> float | None:
        """Seconds an open plan fine-tune still needs: its estimate, less what it has run."""
        needed = self._plan_estimate(params, role.epochs or self._search_space.max_epochs)
        if needed is None or trial.state != TrialState.RUNNING or trial.datetime_start is None:
            return needed
        return max(0.0, needed - (now - trial.datetime_start.timestamp()))

    def _plan_estimate(self, params: dict, epochs: int) -> float | None:
        """Seconds a plan fine-tune of these params needs for `epochs` epochs, at the plan's CPUs."""
        return self._estimate(params, epochs, cpus=self._fine_tune_cpus or self._cpus_per_trial)

    # ----- the time budget ------------------------------------------------------------------

    def _estimate(self, params: dict, epochs: int | None = None, *, cpus: Any = None,
                  cautious: bool = True) -> float | None:
        """Seconds a trial of these params needs for `epochs` epochs (None: all of its own), from
        alike trials at the same CPUs, else (`cautious`) from its backbone's probe; None: unknown."""
        try:
            cfg = self._search_space.to_trial_config(params).to_dict()
        except Exception:
            return None
        key = timing_key(cfg, threads=cpus or params.get("_cpus") or self._cpus_per_trial)
        n = cfg["epochs"] if epochs is None else epochs
        return self._times.best_estimate(key, n) if cautious else self._times.estimate(key, n)

    def _cheaper(self, params: dict) -> dict | None:
        """The drawn params as a linear probe (`space.as_probe`) when its measured time fits what
        is left; else None."""
        cheap = as_probe(self._search_space, params) if self._deadline is not None else None
        if cheap is None:
            return None
        needed = self._estimate(cheap, cpus=self._cpus_per_trial)
        if needed is None or needed > self._deadline - time.time():
            return None
        return cheap

    def _fits(self, trial_id: str, params: dict, start_epoch: int, role: PlanRole) -> bool:
        """Whether the asked trial may start: measured alike, it reaches its last epoch in the
        time left; unmeasured, a cautious estimate (`EpochTimes.cautious`) reaches its first.
        One that may not is told FAIL (not started; not counted, not retried) and left out."""
        if self._deadline is None:
            return True
        try:
            epochs = self._search_space.to_trial_config(params).epochs - start_epoch
        except Exception:
            return True  # the trial reports its own config error
        left = self._deadline - time.time()
        estimate = self._estimate(params, epochs, cautious=False)
        if estimate is None:
            estimate = self._estimate(params, 1)
        if fits_budget(estimate, left):
            self._skips = 0
            return True
        self._refuse(trial_id, params, role, estimate, left)
        return False

    def _refuse(self, trial_id: str, params: dict, role: PlanRole, estimate: float | None, left: float) -> None:
        """Closes a trial the budget cannot take; an enqueued one (a recipe, a retry, a
        continuation) is enqueued again with its whole role when the run ends."""
        ot_trial = self._ot_trials.pop(trial_id)
        if role.to_user_attrs():
            self._refused.append((dict(ot_trial.params), role))
        cheap = self._cheaper(params)
        if cheap is not None:  # a cheap trial that still fits runs before the run gives up
            self._ot_study.enqueue_trial(cheap, user_attrs=PlanRole(recipe=CHEAP_PROBE_RECIPE).to_user_attrs())
            self._skips -= 1
        ot_trial.set_user_attr("error", f"{NOT_STARTED} (needs ~{estimate or 0:.0f}s, {max(0.0, left):.0f}s left)")
        ot_trial.set_user_attr("interrupted", True)  # does not count toward the trials
        ot_trial.set_user_attr("not_started", True)
        with contextlib.suppress(Exception):
            self._ot_study.tell(ot_trial, state=TrialState.FAIL, skip_if_finished=True)
        self._curves.pop(trial_id, None)
        self._skips += 1

    def requeue_refused(self) -> None:
        """Enqueues again, with their roles, the recipes, retries and continuations the budget
        refused or stopped before their first epoch in this run (a later `resume` with more time
        runs them), once each."""
        for params, role in self._refused:
            with contextlib.suppress(Exception):
                self._ot_study.enqueue_trial(params, user_attrs=role.to_user_attrs())
        self._refused = []

    def learn_times(self) -> None:
        """Reads the epoch times of the study's finished trials (earlier runs, other drivers)."""
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            self._times.add_trial(t)

    def _surplus(self, trial_id: str) -> bool:
        """Closes a trial that another driver's trials crowded out of the count (a race of two asks).

        Trial numbers order the asks of every driver, so the earlier trials win.
        """
        ot_trial = self._ot_trials[trial_id]
        if PlanRole.from_attrs(ot_trial.user_attrs).continues is not None:
            return False  # it finishes a trial already counted
        earlier = [t for t in self._ot_study.get_trials(deepcopy=False) if t.number < ot_trial.number]
        if _claimed(earlier, driver=self._driver) < self._target:
            return False
        ot_trial.set_user_attr("error", SURPLUS)
        ot_trial.set_user_attr("interrupted", True)  # does not count toward the trials
        self._ot_study.tell(ot_trial, state=TrialState.FAIL, skip_if_finished=True)
        del self._ot_trials[trial_id]
        return True

    def heartbeat(self) -> None:
        """Stamps this driver's open trials as alive (called from a timer thread)."""
        for trial_id, ot_trial in list(self._ot_trials.items()):
            if trial_id not in self._completed_trials:
                with contextlib.suppress(Exception):  # finished meanwhile, or a storage hiccup
                    ot_trial.set_user_attr("heartbeat", time.time())

    def finish_leftovers(self, *, budget_cut: bool = False) -> int:
        """Tells every trial still open (the run was stopped under it) as interrupted, or as cut by
        the time budget when `budget_cut`; returns how many."""
        n = 0
        for trial_id in list(self._ot_trials):
            if trial_id not in self._completed_trials:
                self._finish(trial_id, worker_died=False, stopped_by_driver=True, budget_cut=budget_cut)
                n += 1
        return n

    # The experiment checkpoint Ray writes is never restored (the study is the source of truth),
    # and the storage and shared state do not pickle well: keep it empty.
    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_bytes(b"")

    def restore(self, checkpoint_path: str) -> None:
        pass

    # -- internals --

    def _record(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """Keeps a trial's per-epoch metrics and reports val_acc at step = epoch to Optuna."""
        self._last[trial_id] = dict(result)
        if result.get("error") or "epoch" not in result:
            return
        epoch = int(result["epoch"])
        curve = self._curves.setdefault(trial_id, {})
        if epoch in curve:
            return
        curve[epoch] = dict(result)
        key = timing_key(self._trial_config(trial_id), threads=self._threads(trial_id))
        self._times.add_epoch(key, result.get("epoch_seconds"))
        if len(curve) == 1 and is_finite(result.get("train_seconds")) and is_finite(result.get("epoch_seconds")):
            self._times.add_startup(key, result["train_seconds"] - result["epoch_seconds"])
            self._times.add_feature_pass(key, result.get("feature_pass_s"))
        value = result.get(self.metric)
        if is_finite(value):
            self._ot_trials[trial_id].report(float(value), step=epoch)

    def _threads(self, trial_id: str) -> int:
        """The CPU threads a trial trains with (as `_trainable` sets them)."""
        return max(1, int(self._configs.get(trial_id, {}).get("_cpus") or self._cpus_per_trial))

    def _trial_config(self, trial_id: str) -> dict:
        try:
            return self._search_space.to_trial_config(self._configs.get(trial_id, {})).to_dict()
        except Exception:
            return {}

    def _finish(self, trial_id: str, *, worker_died: bool, stopped_by_driver: bool = False,
                budget_cut: bool = False) -> None:
        ot_trial = self._ot_trials[trial_id]
        config = self._configs.get(trial_id, {})
        curve = [self._curves.get(trial_id, {})[e] for e in sorted(self._curves.get(trial_id, {}))]
        last = curve[-1] if curve else {}
        final = self._last.get(trial_id) or {}
        value = last.get(self.metric)
        state, error, interrupted = trial_outcome(
            epochs_planned=int(config.get("epochs", self._search_space.max_epochs)),
            values=[c.get(self.metric) for c in curve],
            error=final.get("error"),
            worker_died=worker_died,
            asha_stopped=trial_id in self._asha_stopped,
            stopped_by_driver=stopped_by_driver,
            metric=self.metric,
            budget_cut=budget_cut or self._past_deadline(trial_id),
        )
        stopped_by = None
        if state == TrialState.PRUNED:
            stopped_by = "asha" if trial_id in self._asha_stopped else BUDGET_CUT
            if not curve:  # the budget ended before its first epoch: it runs again on resume
                self._refused.append((dict(ot_trial.params), PlanRole.from_attrs(ot_trial.user_attrs)))
        self._set_attrs(ot_trial, config, curve, last, final, error, interrupted, stopped_by)
        self._bound_checkpoints(ot_trial, state, value, config, interrupted, final)
        if interrupted:  # before the tell: a driver stopped in between leaves a RUNNING trial, retried once
            enqueue_retry(self._ot_study, ot_trial)
        try:
            self._ot_study.tell(ot_trial, float(value) if state == TrialState.COMPLETE else None, state=state)
        except Exception as e:  # a storage hiccup must not end the search
            print(f"warning: could not record trial {ot_trial.number}: {e}", file=sys.stderr)
        self._completed_trials.add(trial_id)
        self._update_tally(state, interrupted, value, config, final)

    def _past_deadline(self, trial_id: str) -> bool:
        """Tune stops the trials it runs when the budget ends: a trial ending then without ASHA's
        word, short of its epochs, was cut by the budget."""
        return self._deadline is not None and trial_id not in self._asha_stopped and time.time() >= self._deadline - 1.0

    def _set_attrs(
        self, ot_trial: Any, config: dict, curve: list, last: dict, final: dict,
        error: str | None, interrupted: bool, stopped_by: str | None = None,
    ) -> None:
        record = ended_record(self._search_space, config, curve, last, final, error=error, interrupted=interrupted,
                              stopped_by=stopped_by)
        attrs = record.to_user_attrs()  # retry_of, baseline, driver, heartbeat: set by the search, kept
        for key, val in attrs.items():
            try:
                ot_trial.set_user_attr(key, val)
            except Exception as e:  # one odd value must not lose the others
                print(f"warning: trial {ot_trial.number}: user_attr {key}: {e}", file=sys.stderr)

    def _bound_checkpoints(self, ot_trial: Any, state: TrialState, value: Any, config: dict,
                           interrupted: bool, final: dict) -> None:
        """Removes the checkpoints the study no longer keeps (`_records.bound_checkpoints`)."""
        if self._keep_checkpoints is not None:
            bound_checkpoints(self._ot_study, self._search_space, ot_trial, state, value, config, interrupted, final,
                              keep=self._keep_checkpoints)

    def _update_tally(self, state: TrialState, interrupted: bool, value: Any, config: dict, final: dict) -> None:
        t = self._tally
        t.running = max(0, t.running - 1)
        t.compute_seconds += float(final.get("train_seconds") or 0.0)
        if interrupted:
            t.interrupted += 1
        elif state == TrialState.COMPLETE:
            t.complete += 1
            t.offer(float(value), config.get("backbone"))
        elif state == TrialState.PRUNED:
            t.pruned += 1
        else:
            t.failed += 1
