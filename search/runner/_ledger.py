"""The study ledger, without Ray: how a trial ended, which trials count toward the target, which
are taken by live drivers, and reconciling trials a stopped driver left RUNNING.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

import optuna
from optuna.trial import TrialState

from search.config import deterministic_input
from search.disk import pid_alive
from search.space import PlanRole
from search.studies import (
    TrialRecord,
    best_trial,
    counts_toward_target,
    is_finite,
)

INTERRUPTED = "interrupted (driver stopped)"
# `stopped_by` of a trial the time budget cut short: PRUNED with its epochs and checkpoint, and
# `resume` continues it (`continue_budget_cut`).
BUDGET_CUT = "time budget"
# A drawn trial that was not started, because the time left could not take its epochs.
NOT_STARTED = "not started: the time left in the budget cannot take its epochs"


# Several drivers may run one study at once (one per machine or terminal). Each stamps the trials
# it runs with its id and a heartbeat; another driver counts a RUNNING trial as taken unless it
# is stale: its driver's process is gone (same host) or its heartbeat is older than STALE_AFTER_S.
HEARTBEAT_S = 15.0


STALE_AFTER_S = 120.0


SURPLUS = "not run: the study reached its trial count (another driver took the last one)"


@dataclass(frozen=True)
class RunSummary:
    """What one `run_search` call did and where the study stands."""

    study: str  # the study's name
    storage: str  # its Optuna storage URL
    counts: dict  # trial state name -> number of trials in the study
    best_value: float | None  # best COMPLETE value; None: none yet
    best_params: dict  # its params
    best_trial: int | None  # its Optuna trial number
    wall_seconds: float  # this call, pre-flight to the end
    compute_seconds: float  # sum of this run's per-trial training seconds
    trials_run: int  # Ray trials started by this call
    interrupted: bool = False  # stopped by Ctrl-C before the count was reached
    budget_reached: bool = False  # stopped by the time budget
    finished: int = 0  # COMPLETE + PRUNED + real FAIL: what counts toward `trials`


@dataclass
class _Tally:
    """Live counts shared by the searcher (which knows states) and the progress view."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    best: float | None = None
    best_backbone: str | None = None
    compute_seconds: float = 0.0
    interrupted: int = 0
    mode: str = "max"

    def offer(self, value: float, backbone: str | None) -> None:
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.best_backbone = value, backbone


def _mean(values: list) -> float | None:
    xs = [float(v) for v in values if is_finite(v)]
    return sum(xs) / len(xs) if xs else None


def _unflatten(result: Mapping[str, Any], key: str) -> dict | None:
    """A dict the trial reported under `key`, which Tune hands on flattened ("key/sub": value)."""
    if isinstance(result.get(key), dict):
        return dict(result[key])
    prefix = key + "/"
    found = {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}
    return found or None


def trial_outcome(
    *,
    epochs_planned: int,
    values: list,
    error: str | None,
    worker_died: bool,
    asha_stopped: bool,
    stopped_by_driver: bool,
    metric: str = "val_acc",
    budget_cut: bool = False,
) -> tuple[TrialState, str | None, bool]:
    """How a trial ended, from what it reported: COMPLETE, PRUNED or FAIL (and whether interrupted).

    COMPLETE: it ran every planned epoch. PRUNED: ASHA stopped it after at least one epoch. FAIL:
    it raised, its worker died, or a reported value is not finite. A trial stopped by the driver
    (Ctrl-C, the time budget, the end of the run) or that reported nothing is FAIL "interrupted":
    it does not count toward the trial count and its params run again. A trial the time budget
    cut is PRUNED (stopped early, not failed): after at least one epoch it keeps its epochs, counts,
    and `resume` continues it from its checkpoint; before its first epoch it does not count, and
    the searcher enqueues its params again for a resume.

    Args:
        epochs_planned: the trial config's `epochs`.
        values: the objective per reported epoch, in order.
        error: the error the trial reported, if any.
        worker_died: its worker process ended without a word (killed, out of memory).
        asha_stopped: ASHA decided to stop it.
        stopped_by_driver: the driver stopped it (the run ended under it).
        metric: the objective's name, for the error text.
        budget_cut: the run's time budget ran out under it.

    Returns:
        (state, error text or None, interrupted).
    """
    if worker_died:
        error = "trial worker died (killed, or out of memory)"
    elif error is None and values and not all(is_finite(v) for v in values):
        error = f"{metric} is not finite ({values[-1]})"
    if error:
        return TrialState.FAIL, error, False
    if len(values) >= epochs_planned:
        return TrialState.COMPLETE, None, False
    if asha_stopped and not stopped_by_driver and values:
        return TrialState.PRUNED, None, False
    if budget_cut:  # stopped early by the budget, before its first epoch too: never a failure
        return TrialState.PRUNED, None, False
    return TrialState.FAIL, INTERRUPTED, True


def fits_budget(estimate_s: float | None, time_left_s: float | None) -> bool:
    """Whether a trial may start: its estimated duration fits in the time left.

    Args:
        estimate_s: seconds the trial is expected to take to its last epoch; None: no estimate
            yet (nothing alike has run in this study), and it starts.
        time_left_s: seconds left in the run's time budget; None: no budget.

    Returns:
        True when it may start.
    """
    if time_left_s is None or estimate_s is None:
        return True
    return estimate_s <= time_left_s


def timing_key(config: Mapping[str, Any], *, threads: Any = 1) -> tuple:
    """What a trial's epoch time depends on most: backbone, freeze depth, image size, batch size,
    whether its training input is deterministic (then the frozen stages' output is cached:
    `config.deterministic_input`, false under MixUp/CutMix even without augmentation), and the
    CPU threads it trains with (a fine-tune given every core is not a one-core draw)."""
    n = int(threads) if is_finite(threads) and threads >= 1 else 1
    return (config.get("backbone"), str(config.get("freeze_depth")), config.get("image_size"),
            config.get("batch_size"), deterministic_input(config), n)


def trains_stages(key: tuple) -> bool:
    """Whether a timing key's trial trains backbone stages (its freeze depth is not "all")."""
    return key[1] != "all"


# A cautious epoch of a trial that trains stages, when none alike was measured: this many times
# the forward pass of its backbone over the data, which its probe measured (the feature pass that
# fills the cache: train and val). Measured: 5.9 for a full fine-tune of Lite1 on 600 + 400
# images at 128 px (benchmarks/results/fairness-replay.md, 2 busy cores).
FINE_TUNE_OVER_FEATURE_PASS = 6.0
# The start-up of such a trial when none alike was measured (model, data, latency probe).
CAUTIOUS_STARTUP_S = 10.0


class EpochTimes:
    """Measured epoch and start-up times per `timing_key`, from this study's trials and this run's."""

    def __init__(self) -> None:
        self._epochs: dict[tuple, list[float]] = {}
        self._startup: dict[tuple, list[float]] = {}
        self._feature_pass: dict[tuple, list[float]] = {}  # probes: computing the cached features alone

    def add_epoch(self, key: tuple, seconds: Any) -> None:
        if is_finite(seconds) and seconds > 0:
            self._epochs.setdefault(key, []).append(float(seconds))

    def add_startup(self, key: tuple, seconds: Any) -> None:
        if is_finite(seconds) and seconds >= 0:
            self._startup.setdefault(key, []).append(float(seconds))

    def add_feature_pass(self, key: tuple, seconds: Any) -> None:
        if is_finite(seconds) and seconds > 0:
            self._feature_pass.setdefault(key, []).append(float(seconds))

    def add_trial(self, trial: Any) -> None:
        """Learns from a finished trial's record (its config, threads and per-epoch curve)."""
        rec = TrialRecord.from_trial(trial)
        if not rec.config or not rec.curve:
            return
        key = timing_key(rec.config, threads=rec.threads)
        self.add_feature_pass(key, rec.curve[0].get("feature_pass_s"))
        epochs = [c.get("epoch_seconds") for c in rec.curve]
        for e in epochs:
            self.add_epoch(key, e)
        if is_finite(rec.train_seconds) and all(is_finite(e) for e in epochs) and not rec.retry_of:
            self.add_startup(key, rec.train_seconds - sum(epochs))

    def estimate(self, key: tuple, epochs: int) -> float | None:
        """Seconds to run `epochs` epochs (plus start-up) of a trial alike; None: never measured.

        The start-up is the shortest seen: the first trial of a kind also builds the image and
        feature caches, once, and the trials after it do not pay that again.
        """
        times = self._epochs.get(key)
        if not times:
            return None
        startup = min(self._startup.get(key) or [0.0])
        return startup + epochs * sum(times) / len(times)

    def cautious(self, key: tuple, epochs: int) -> float | None:
        """A cautious estimate for a trial that trains stages when nothing alike was measured, at
        the same backbone, image size and batch size: from the slowest measured trial that trains
        stages (any depth or input; one at more threads scaled to these), else from its backbone's
        probe (any threads):
        `FINE_TUNE_OVER_FEATURE_PASS` times the probe's feature pass per epoch, the pass timed
        alone where the trial reported it (`feature_pass_s`), else its whole start-up.

        Returns:
            Seconds; None for a probe, or when neither was measured.
        """
        if not trains_stages(key):
            return None
        alike = [k for k in self._epochs if k[0] == key[0] and k[2:4] == key[2:4]]
        # One measured at more threads than this trial gets would run slower here: scaled up.
        stages = [sum(self._epochs[k]) / len(self._epochs[k]) * max(1.0, k[5] / key[5])
                  for k in alike if trains_stages(k)]
        probes = [k for k in [*self._startup, *self._feature_pass]
                  if k[0] == key[0] and k[1] == "all" and k[2:4] == key[2:4]]
        passes = [min(self._feature_pass[k]) for k in probes if self._feature_pass.get(k)]
        passes = passes or [min(self._startup[k]) for k in probes if self._startup.get(k)]
        if not stages and not passes:
            return None
        feature_pass = max(passes) if passes else 0.0
        epoch = max(stages) if stages else FINE_TUNE_OVER_FEATURE_PASS * feature_pass
        # A partial fine-tune fills a cache of its frozen stages' output first: one more pass.
        startup = CAUTIOUS_STARTUP_S + (feature_pass if key[1] != "0" else 0.0)
        return startup + epochs * epoch

    def quickest(self, epochs: int) -> float | None:
        """The shortest estimate for `epochs` epochs of any kind measured; None: none measured."""
        found = [self.estimate(k, epochs) for k in self._epochs]
        return min((f for f in found if f is not None), default=None)

    def best_estimate(self, key: tuple, epochs: int) -> float | None:
        """`estimate` where a trial alike was measured, else `cautious`."""
        found = self.estimate(key, epochs)
        return found if found is not None else self.cautious(key, epochs)


def continue_budget_cut(study: optuna.Study) -> int:
    """Enqueues a continuation of every trial the time budget cut short whose checkpoint is kept.

    The new trial runs the same params from the checkpoint (user_attr `continues`: the trial it
    continues). Skipped: a trial with a continuation waiting, running or run to an end; the retry
    of an interrupted continuation is one (`enqueue_retry`), so run `reconcile` first. A
    continuation that was never started or was interrupted does not count.

    Args:
        study: the study.

    Returns:
        How many continuations were enqueued.
    """
    from pathlib import Path

    trials = study.get_trials(deepcopy=False)
    taken = {t.user_attrs.get("continues") for t in trials
             if not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted"))}
    n = 0
    for t in trials:
        attrs = t.user_attrs
        if t.state != TrialState.PRUNED or attrs.get("stopped_by") != BUDGET_CUT or t.number in taken:
            continue
        if not attrs.get("checkpoint") or attrs.get("checkpoint_removed") or not Path(attrs["checkpoint"]).is_file():
            continue
        # Its role goes with it: a plan's fine-tune continues as one, with the epochs it was given.
        role = dataclasses.replace(PlanRole.from_attrs(attrs), continues=t.number, retry_of=None)
        study.enqueue_trial(dict(t.params), user_attrs=role.to_user_attrs())
        n += 1
    return n


def plan_roles(trials: list) -> dict[int, PlanRole]:
    """Each trial's `PlanRole`, by trial number. A retry enqueued before roles were copied whole
    (it names only `retry_of`) takes the role of the trial it retries."""
    roles: dict[int, PlanRole] = {}
    for t in sorted(trials, key=lambda t: t.number):
        role = PlanRole.from_attrs(t.user_attrs)
        if role.recipe is None and role.retry_of in roles:
            base = roles[role.retry_of]
            role = dataclasses.replace(base, retry_of=role.retry_of, continues=role.continues or base.continues)
        roles[t.number] = role
    return roles


def is_waiting_continuation(trial: Any) -> bool:
    """Whether a trial is a continuation of a budget-cut trial that waits to run (`continue_budget_cut`)."""
    return trial.state == TrialState.WAITING and isinstance(trial.user_attrs.get("continues"), int)


def waiting_continuations(study: optuna.Study) -> list:
    """The study's continuations of budget-cut trials that wait to run."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) if is_waiting_continuation(t)]


def enqueue_retry(study: optuna.Study, trial: Any, *, retried: set | None = None) -> bool:
    """Enqueues a retry of an interrupted trial (same params, user_attr `retry_of`) unless one exists.

    The retry of an interrupted continuation continues the same budget-cut trial (user_attr
    `continues`), from that trial's checkpoint. A retry that never ran (not started, crowded out)
    does not count as one: the trial gets another. Idempotent, so that a driver stopped between
    telling a trial and enqueuing its retry (a second Ctrl-C, kill -9) loses nothing: the next
    `reconcile` enqueues what is missing, once.

    Args:
        study: the study.
        trial: the interrupted trial (frozen or live); one without params is not retried.
        retried: the trial numbers that already have a retry (`retried_trials`), when the caller
            has read them; None: read from the study.

    Returns:
        Whether a retry was enqueued.
    """
    if not trial.params:
        return False
    if retried is None:
        retried = retried_trials(study.get_trials(deepcopy=False))
    if trial.number in retried:
        return False
    # The whole role: a retried probe stays its backbone's probe, a retried continuation
    # continues the same budget-cut trial, a recipe keeps the epochs the plan gave it.
    role = PlanRole.from_attrs(trial.user_attrs).retry(trial.number)
    study.enqueue_trial(dict(trial.params), user_attrs=role.to_user_attrs())
    retried.add(trial.number)
    return True


def retried_trials(trials: list) -> set:
    """The trials that have a retry: one waiting, running, or that ran (an interrupted retry has its
    own retry, which carries on); a retry that never ran does not count."""
    return {t.user_attrs.get("retry_of") for t in trials if not _never_ran(t)}


def _never_ran(t: Any) -> bool:
    """A trial closed before it started: refused by the time budget, or crowded out of the count."""
    a = t.user_attrs
    return t.state == TrialState.FAIL and (a.get("error") == SURPLUS or bool(a.get("not_started")))


def _needs_retry(t: Any) -> bool:
    """An interrupted trial that ran or was about to run (not crowded out, not refused by the budget)."""
    a = t.user_attrs
    return t.state == TrialState.FAIL and bool(a.get("interrupted")) and bool(t.params) and not _never_ran(t)


def reconcile(study: optuna.Study, *, driver: str | None = None) -> int:
    """Marks trials left RUNNING by a stopped driver FAIL ("interrupted") and enqueues their params.

    Other drivers may be running on the study: their live trials are left alone; only stale
    trials (see `is_stale`) and this driver's own are reconciled. An interrupted trial whose retry
    was never enqueued (its driver stopped in between) gets it now.

    Args:
        study: the study.
        driver: this driver's id; None: only stale trials.

    Returns:
        How many trials were reconciled.
    """
    n = 0
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        own = driver is not None and t.user_attrs.get("driver") == driver
        if not own and not is_stale(t, driver=driver, now=now):
            continue
        trial = optuna.Trial(study, t._trial_id)
        trial.set_user_attr("error", INTERRUPTED)
        trial.set_user_attr("interrupted", True)
        trial.set_user_attr("epochs_run", len(t.intermediate_values))
        enqueue_retry(study, t)  # before the tell: a stop in between leaves it RUNNING, retried once
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        n += 1
    # Live drivers enqueue before they tell (see HonestOptunaSearch._finish), so a retry missing
    # here belongs to a driver that stopped in between.
    trials = study.get_trials(deepcopy=False)
    retried = retried_trials(trials)
    for t in trials:
        if _needs_retry(t):
            enqueue_retry(study, t, retried=retried)
    return n


def finished_count(study: optuna.Study) -> int:
    """Trials that count toward `settings.trials` (see `studies.counts_toward_target`)."""
    return sum(counts_toward_target(t) for t in study.get_trials(deepcopy=False))


def new_driver_id() -> str:
    """A unique id of one search call: host:pid:token (the token tells two calls of one process apart)."""
    return f"{_process_host()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _process_host() -> str:
    """This host's name plus its pid namespace: containers sharing a hostname see different pids."""
    try:
        ns = "".join(c for c in os.readlink("/proc/self/ns/pid") if c.isdigit())
    except OSError:
        ns = ""
    return f"{socket.gethostname()}/{ns}" if ns else socket.gethostname()


def is_stale(trial: Any, *, driver: str | None, now: float | None = None) -> bool:
    """Whether a RUNNING trial of another driver is abandoned (that driver crashed or was killed).

    On this host the driver's process is checked directly, so a resume right after a crash
    retries its trials at once; on another host, the trial is stale when its heartbeat is older
    than `STALE_AFTER_S`.

    Args:
        trial: a frozen trial.
        driver: the asking driver's id (its own trials are never stale); None: no driver.
        now: the time (unix seconds); None: now.

    Returns:
        True when the trial is RUNNING and nobody runs it any more.
    """
    if trial.state != TrialState.RUNNING:
        return False
    owner = trial.user_attrs.get("driver")
    if driver is not None and owner == driver:
        return False
    now = time.time() if now is None else now
    beat = trial.user_attrs.get("heartbeat")
    if not is_finite(beat):
        beat = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    if now - beat > STALE_AFTER_S:
        return True
    if isinstance(owner, str) and owner.count(":") >= 2:
        host, pid, _ = owner.rsplit(":", 2)
        if host == _process_host() and pid.isdigit():
            # Same pid, another token: an earlier search call of this process, which has ended.
            return int(pid) == os.getpid() or not pid_alive(int(pid))
    return False


def _claimed(trials: list, *, driver: str | None) -> int:
    """Trials that count toward `settings.trials` plus those live drivers are running now."""
    now = time.time()
    return sum(
        counts_toward_target(t) or (t.state == TrialState.RUNNING and not is_stale(t, driver=driver, now=now))
        for t in trials
    )


def _other_drivers(trials: list, *, driver: str) -> bool:
    """Whether another live driver is running trials of the study."""
    now = time.time()
    return any(
        t.state == TrialState.RUNNING and t.user_attrs.get("driver") not in (None, driver)
        and not is_stale(t, driver=driver, now=now)
        for t in trials
    )


def _base_tally(study: optuna.Study, mode: str) -> dict:
    trials = study.get_trials(deepcopy=False)
    best = best_trial(trials, maximize=mode == "max")
    return {
        "complete": sum(t.state == TrialState.COMPLETE and is_finite(t.value) for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL and counts_toward_target(t) for t in trials),
        "best": best.value if best else None,
        "best_backbone": TrialRecord.from_trial(best).backbone if best else None,
    }
