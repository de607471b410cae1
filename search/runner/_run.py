"""The search: `run_search` and `resume_search`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import zlib
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import optuna
import ray
from ray import tune
from ray.tune import PlacementGroupFactory
from ray.tune.search import ConcurrencyLimiter

from search import studies
from search.config import TLSearchError, check_study_name, default_cache_dir, dump_yaml
from search.imbalance import class_counts
from search.metrics import chance_level
from search.outputs import is_interruption, resume_hint
from search.runner._cluster import (
    _ensure_ray,
    console_log,
    check_nodes_see_data,
    default_concurrency,
)
from search.runner._ledger import (
    HEARTBEAT_S,
    RunSummary,
    _base_tally,
    _claimed,
    _Tally,
    continue_budget_cut,
    finished_count,
    new_driver_id,
    reconcile,
    waiting_continuations,
)
from search.runner._preflight import MARKER, _open_study, preflight
from search.runner._progress import ProgressView, ReportRefresher
from search.runner._schedulers import PruneTrackingASHA, make_sampler
from search.runner._search import HonestOptunaSearch
from search.runner._trainable import TrialFn, _trainable
from search.settings import SearchSettings
from search.space import (
    PROBE_RECIPE,
    PlanRole,
    SearchSpace,
    backbones_in,
    default_space_at_hand,
    for_dataset,
    keep_stored_schedule,
    lr_warnings,
)
from search.studies import (
    best_trial,
)

if TYPE_CHECKING:
    from search.data import DatasetIndex

# Ray keeps a trial's worker process for the next trial instead of starting a fresh one (a fresh
# worker costs seconds: process start, torch import). Safe: `_trainable` sets the torch thread
# count and seeds every trial itself. Measured in benchmarks/bench.py (part d).
REUSE_ACTORS = True


def run_search(
    settings: SearchSettings,
    *,
    space: SearchSpace | None = None,
    trial_fn: TrialFn | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> RunSummary:
    """Runs (or continues) a search until the study holds `settings.trials` finished trials.

    Args:
        settings: how to search; resolved here (`SearchSettings.resolve`) before anything runs.
        space: the search space, instead of `settings.space` (None there too: the default space).
        trial_fn: the per-trial function, `search.trial.fine_tune`'s signature; None: fine_tune.
            Tests swap in a fast stub.
        progress: show the live view on stderr (the report is refreshed during the run either way).
        verbose: let Ray's and Optuna's own log lines through to stderr; otherwise they go to
            studies/<study>/tlsearch.log.

    Returns:
        The summary. Ctrl-C once stops the run cleanly (`interrupted=True`); twice raises
        KeyboardInterrupt after saying how to continue and recording the study as far as its
        storage lets it (an error that Ctrl-C caused in a storage write is raised as one too).
    """
    t0 = time.time()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our live view says what matters
    if space is not None:
        settings = settings.replace(space=space)
    settings, index = _prepared(settings)
    space = settings.space
    storage = studies.get_storage(settings.storage_url)
    study, created = _open_study(settings, storage, index, space)
    if settings.warm_start and created:
        _warm_start(study, settings, space)
    exp = settings.experiment_dir
    (exp / MARKER).write_text(f"tlsearch experiment folder of study {settings.study}\n", encoding="utf-8")
    dump_yaml(settings.to_dict(), exp / "settings.yaml")
    driver = new_driver_id()
    reconcile(study, driver=driver)  # trials of crashed drivers; live ones of other drivers stay
    if not created:  # after the reconcile: a retry it enqueues may already continue a budget-cut trial
        continue_budget_cut(study)
    _bound_disk(settings, study)

    # A budget-cut trial's continuation runs even when the study has its count: it finishes a
    # trial already counted, and would otherwise wait forever.
    remaining = max(settings.trials - finished_count(study), len(waiting_continuations(study)))
    tally = _Tally(mode=settings.mode)
    interrupted = budget_reached = False
    trials_run = 0
    try:
        if remaining > 0:
            with console_log(settings.experiment_dir, verbose=verbose):
                interrupted, budget_reached = _tune(
                    settings, space, index, storage, study, tally, remaining, trial_fn, progress, t0, driver=driver,
                    joined=not created, verbose=verbose,
                )
            trials_run = tally.complete + tally.pruned + tally.failed + tally.interrupted
        reconcile(study, driver=driver)  # none of this call's trials may stay RUNNING once it returns
        return _summary(settings, study, t0, tally, trials_run, interrupted, budget_reached)
    except BaseException as e:
        if not is_interruption(e):
            raise
        _record_interruption(settings, study, driver)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise KeyboardInterrupt from e


def _prepared(settings: SearchSettings) -> tuple[SearchSettings, DatasetIndex]:
    """The settings resolved, the space at hand and fitted to the data, after the pre-flight."""
    default = settings.space is None
    if settings.space is None and settings.pretrained:
        # Offline, the default space keeps the backbones whose weights are here (one line on the rest).
        at_hand, note = default_space_at_hand(gpu=settings.gpus_per_trial > 0, weights_dir=settings.weights_dir)
        settings = settings.replace(space=at_hand)
        if note:
            print(f"note: {note}", file=sys.stderr)
    settings = settings.resolve()
    for line in lr_warnings(settings.space):
        print(f"warning: {line}", file=sys.stderr)
    index = preflight(settings, settings.space)
    if default:  # the default space searches imbalance handling where the training split needs it
        counts = class_counts([label for _, label in index.train], len(index.classes))
        settings = settings.replace(space=for_dataset(
            settings.space, counts, median_side=index.image_stats.median_side if index.image_stats else 0,
            budget_s=settings.time_budget_s, cpus=os.cpu_count() or 1))
    return settings, index


def _warm_start(study: optuna.Study, settings: SearchSettings, space: SearchSpace) -> None:
    """A new study starts from a portfolio of proven recipes (linear probe, last stages, full
    fine-tune), cheapest first: a score to beat within seconds and a strong fine-tune within
    minutes; TPE learns from them as from any trial. Only the driver that created the study
    enqueues them, so two drivers never both do."""
    if not settings.portfolio:
        study.enqueue_trial(space.baseline(), user_attrs=PlanRole(baseline=True).to_user_attrs())
        return
    recipes = warm_start(space, settings.trials)
    for recipe, params in recipes:
        study.enqueue_trial(params, user_attrs=PlanRole(recipe=recipe, baseline=True).to_user_attrs())
    # The fine-tunes follow the probes' ranking, decided as the probes end (every run of this
    # study, resumes included, goes on with that plan).
    study.set_user_attr("probe_plan", any(r == PROBE_RECIPE for r, _ in recipes))


def _record_interruption(settings: SearchSettings, study: optuna.Study, driver: str) -> None:
    """After Ctrl-C: says how to continue, then records this driver's open trials as interrupted.

    The line comes first, as a further Ctrl-C may cut the rest short. A storage write that Ctrl-C
    cut short can make this one fail too (SQLite stays locked until the process ends): the trials
    then stay RUNNING, and the next resume reconciles them (their driver is gone by then).
    """
    print(resume_hint(settings.study, settings.storage), file=sys.stderr)
    with contextlib.suppress(Exception):
        reconcile(study, driver=driver)


def portfolio_size(trials: int) -> int:
    """Warm-start recipes for a search of `trials` trials: about a third of them, at least one."""
    return max(1, round(trials / 3))


def warm_start(space: SearchSpace, trials: int) -> list[tuple[str, dict]]:
    """What a new study enqueues first: every backbone's linear probe where the space has one
    (the fine-tunes come later, in the order the probes rank the backbones); a space without a
    probe gets the fixed portfolio of fine-tuning recipes, cut at `portfolio_size(trials)`."""
    probes = [(r, p) for r, p in space.portfolio(len(backbones_in(space))) if r == PROBE_RECIPE]
    return probes or space.portfolio(portfolio_size(trials))


def _bound_disk(settings: SearchSettings, study: optuna.Study) -> None:
    """Frees what earlier runs left behind: temporary files of killed processes, and checkpoints
    the study no longer keeps (e.g. after `--keep-checkpoints` was lowered)."""
    from search import disk

    cache = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
    disk.clean_stale_tmp([cache / "images", cache / "features", settings.experiment_dir / "checkpoints"])
    try:
        disk.prune_study_checkpoints(study, keep=settings.keep_checkpoints)
    except Exception as e:  # a storage hiccup: trials' ends try again
        print(f"warning: checkpoints not cleaned up: {e}", file=sys.stderr)


def _tune(
    settings: SearchSettings, space: SearchSpace, index: DatasetIndex, storage: Any, study: optuna.Study,
    tally: _Tally, remaining: int, trial_fn: TrialFn | None, progress: bool, t0: float, driver: str = "",
    joined: bool = False, verbose: bool = False,
) -> tuple[bool, bool]:
    """Runs one Ray Tune experiment of `remaining` trials; returns (interrupted, budget_reached)."""
    _ensure_ray(settings, verbose=verbose)
    if settings.address:
        check_nodes_see_data(index, experiment_dir=settings.experiment_dir)
    resources = ray.cluster_resources()
    asha_stopped: set = set()
    # Tune starts its own clock a moment later, so a trial it stops at its budget's end is past this.
    deadline = time.time() + settings.time_budget_s if settings.time_budget_s else None
    searcher = _searcher(settings, space, storage, study, tally, asha_stopped, resources,
                         driver=driver, joined=joined, deadline=deadline)
    scheduler = _scheduler(settings, space, index, study, asha_stopped)
    callbacks: list = [ReportRefresher(settings)]  # the report keeps up, with or without the live view
    if progress:
        callbacks.append(ProgressView(
            tally, base=_base_tally(study, settings.mode), budget_s=settings.time_budget_s, target=settings.trials,
            max_epochs=space.max_epochs, metric=settings.metric,
        ))
    concurrency = settings.max_concurrent or default_concurrency(
        cpus=resources.get("CPU", 1), gpus=resources.get("GPU", 0),
        cpus_per_trial=settings.cpus_per_trial, gpus_per_trial=settings.gpus_per_trial,
    )
    tuner = tune.Tuner(
        _trainable_for(settings, space, index, trial_fn),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency), scheduler=scheduler,
            num_samples=remaining, time_budget_s=settings.time_budget_s, reuse_actors=REUSE_ACTORS,
        ),
        run_config=tune.RunConfig(
            name=f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", storage_path=str(settings.experiment_dir),
            verbose=0, failure_config=tune.FailureConfig(max_failures=0), callbacks=callbacks,
        ),
    )
    return _fit(tuner, searcher, callbacks, settings, study, driver)


def _searcher(settings: SearchSettings, space: SearchSpace, storage: Any, study: optuna.Study, tally: _Tally,
              asha_stopped: set, resources: dict, *, driver: str, joined: bool,
              deadline: float | None) -> HonestOptunaSearch:
    """The study's searcher for this run, its epoch times learnt from the study's trials."""
    seed = settings.seed + len(study.trials)
    if joined:
        # A driver joining a study another may be sampling at this moment (same seed, same trial
        # count) would draw the same params: its own id makes its seed differ. The driver that
        # created the study keeps the plain seed, so a one-driver search stays reproducible.
        seed = zlib.crc32(f"{seed}:{driver}".encode())
    # Every CPU of this machine, for the plan's trials (CPU trials of a Ray of this search's own).
    all_cpus = None if settings.gpus_per_trial or settings.address else resources.get("CPU")
    searcher = HonestOptunaSearch(
        space, metric=settings.metric, mode=settings.mode, sampler=make_sampler(settings.sampler, seed=seed),
        study_name=settings.study, storage=storage, asha_stopped=asha_stopped, tally=tally,
        driver=driver, target=settings.trials, keep_checkpoints=settings.keep_checkpoints,
        deadline=deadline if settings.budget_aware else None,
        plan=bool(study.user_attrs.get("probe_plan")),
        fine_tune_cpus=all_cpus if settings.finetune_all_cpus else None,
        probe_cpus=all_cpus if settings.probes_all_cpus else None,
        cpus_per_trial=settings.cpus_per_trial,
        # With a time budget the plan runs what fits; without one, the portfolio's share of the trials.
        plan_cap=None if settings.time_budget_s else portfolio_size(settings.trials),
    )
    searcher.learn_times()
    return searcher


def _scheduler(settings: SearchSettings, space: SearchSpace, index: DatasetIndex, study: optuna.Study,
               asha_stopped: set) -> PruneTrackingASHA:
    """ASHA with rungs per kind of trial; the study's earlier probes tell it what the frozen
    features reach, against which a diverging fine-tune is stopped."""
    sign = 1.0 if settings.mode == "max" else -1.0
    chance = chance_level(settings.metric, len(index.classes))
    probes = [sign * v for v in _head_only_values(study, space)]
    return PruneTrackingASHA(
        time_attr="training_iteration", metric=settings.metric, mode=settings.mode,
        max_t=space.max_epochs, grace_period=min(settings.grace_period, space.max_epochs),
        reduction_factor=settings.reduction_factor, stopped=asha_stopped,
        finetune_grace=_finetune_grace(settings, space), space=space,
        chance=None if chance is None else sign * chance, best_probe=max(probes) if probes else None,
    )


def _head_only_values(study: optuna.Study, space: SearchSpace) -> list[float]:
    """The objective values the study's finished head-only trials reached (at their last epoch)."""
    from search.runner._schedulers import trial_kind

    values = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)):
        if t.intermediate_values and trial_kind(space, t.params) == "head":
            v = t.intermediate_values[max(t.intermediate_values)]
            if studies.is_finite(v):
                values.append(float(v))
    return values


def _trainable_for(settings: SearchSettings, space: SearchSpace, index: DatasetIndex,
                   trial_fn: TrialFn | None) -> Any:
    """The trainable with its data and resources bound."""
    trainable = tune.with_parameters(
        _trainable, index=index, space=space, trial_fn=trial_fn, metric=settings.metric,
        weights_dir=settings.weights_dir, cache=settings.cache, cache_dir=settings.cache_dir,
        checkpoint_dir=str(settings.experiment_dir / "checkpoints"),
        threads=max(1, int(settings.cpus_per_trial)),
    )
    return tune.with_resources(trainable, partial(
        _trial_resources, cpus=settings.cpus_per_trial, gpus=settings.gpus_per_trial))


def _fit(tuner: Any, searcher: HonestOptunaSearch, callbacks: list, settings: SearchSettings,
         study: optuna.Study, driver: str) -> tuple[bool, bool]:
    """Runs the tuner, then records what it left open; returns (interrupted, budget_reached)."""
    start = time.time()
    beating = threading.Event()
    threading.Thread(target=_heartbeats, args=(searcher, beating), daemon=True, name="tlsearch-heartbeat").start()
    try:
        with _quiet_tune():
            tuner.fit()
    finally:
        beating.set()
        for callback in callbacks:  # a live display gives the terminal back even on Ctrl-C
            getattr(callback, "close", lambda: None)()
        # Ended by the budget: its time ran out, or nothing more fitted in what was left of it.
        budget_reached = bool(settings.time_budget_s) and (
            time.time() - start >= settings.time_budget_s * 0.98 or searcher.out_of_time)
        left = searcher.finish_leftovers(budget_cut=budget_reached and settings.budget_aware)
        searcher.requeue_refused()
    # Trials other drivers still run count as done here: the study reaches its count through them.
    claimed = _claimed(study.get_trials(deepcopy=False), driver=driver)
    interrupted = (left > 0 or claimed < settings.trials) and not budget_reached
    return interrupted, budget_reached


def _trial_resources(config: dict, *, cpus: float, gpus: float) -> PlacementGroupFactory:
    """What a trial asks Ray for: its share, or the CPUs the searcher gave it (`_cpus`)."""
    return PlacementGroupFactory([{"CPU": float(config.get("_cpus") or cpus), "GPU": float(gpus)}])


def _finetune_grace(settings: SearchSettings, space: SearchSpace) -> int:
    """Epochs a fine-tuning trial runs before ASHA may stop it (`SearchSettings.finetune_grace`)."""
    g = settings.finetune_grace
    if g is None:
        g = max(settings.grace_period, 2)
    return max(1, min(g, space.max_epochs))


def _heartbeats(searcher: HonestOptunaSearch, stop: threading.Event) -> None:
    """Stamps the driver's running trials every HEARTBEAT_S until `stop` is set."""
    while not stop.wait(HEARTBEAT_S):
        searcher.heartbeat()


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Keeps Tune's own tables and INFO logs off the terminal: the live view says what matters."""
    old_env = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the legacy reporter honours verbose=0
    log = logging.getLogger("ray.tune")
    old_level = log.level
    # CRITICAL: also hides "Resume with Tuner.restore" (we resume from the study) and the traceback
    # Tune logs when a worker dies; the study records that trial as FAIL with the reason.
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(old_level)
        if old_env is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old_env


def _summary(
    settings: SearchSettings, study: optuna.Study, t0: float, tally: _Tally,
    trials_run: int, interrupted: bool, budget_reached: bool,
) -> RunSummary:
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in studies.shown_trials(trials):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    best = best_trial(trials, maximize=settings.mode == "max")
    return RunSummary(
        study=settings.study,
        storage=settings.storage_url,
        counts=counts,
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
        best_trial=best.number if best else None,
        wall_seconds=time.time() - t0,
        compute_seconds=tally.compute_seconds,
        trials_run=trials_run,
        interrupted=interrupted,
        budget_reached=budget_reached,
        finished=finished_count(study),
    )


def resume_search(
    name: str,
    *,
    studies_dir: str = "studies",
    storage: str | None = None,
    progress: bool = True,
    trial_fn: TrialFn | None = None,
    verbose: bool = False,
    **overrides: Any,
) -> RunSummary:
    """Continues a study with the settings stored in it (after a crash, kill -9 or Ctrl-C).

    Args:
        name: the study name.
        studies_dir: where default SQLite studies live.
        storage: the study's storage URL; None: studies/<name>.db.
        progress: show the live view.
        trial_fn: the per-trial function (tests); None: fine_tune.
        verbose: let Ray's and Optuna's own log lines through to stderr.
        **overrides: SearchSettings fields to change (trials, time_budget_s, ...); None values
            are ignored.

    Returns:
        The run's summary.
    """
    check_study_name(name)
    study = studies.load_study(name, storage=storage, studies_dir=studies_dir)
    stored = study.user_attrs.get("settings")
    if not stored:
        raise TLSearchError(f"study {name!r} has no stored search settings (not made by tlsearch run); cannot resume it")
    settings = SearchSettings.from_dict(stored)
    if settings.space is not None:
        # The space as the study's trials ran it: priors added since (a second learning rate,
        # warm-up) would change the schedule half-way through the study.
        settings = settings.replace(space=keep_stored_schedule(settings.space))
    if storage:
        settings = settings.replace(storage=storage)
    exp = settings.experiment_dir
    if not (exp / MARKER).is_file():
        raise TLSearchError(f"{exp} was not created by tlsearch (no {MARKER} file); refusing to resume into it")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if changes:
        settings = settings.replace(**changes)
    return run_search(settings, trial_fn=trial_fn, progress=progress, verbose=verbose)
