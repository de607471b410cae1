"""The search: Ray Tune runs trials, ASHA stops the weak ones, Optuna samples and records them.

The only module that imports ray. One search is `run_search(settings)`:

1. pre-flight (seconds, before any trial): dataset, space, weights, writable folders, and, for an
   existing study, the same dataset and a compatible space;
2. reconcile the study: trials a crashed driver left RUNNING become FAIL ("interrupted") and
   their params are enqueued again, so they are retried;
3. a `ray.tune.Tuner` runs the trials still missing: `HonestOptunaSearch` (define-by-run space on
   the study's storage), ASHA with one rung per epoch, each trial calling `trial.fine_tune`.

The Optuna study is the source of truth: a resumed search counts what the study holds, never what
Ray's experiment folder says, so every run gets a fresh Ray run folder under studies/<study>/.

Honest states: COMPLETE means the trial ran its config's full `epochs`; a trial ASHA stopped is
PRUNED with every per-epoch value; a trial that raised (or whose metric is NaN/inf, or whose
worker died) is FAIL with the reason in user_attrs["error"]; a trial cut short by Ctrl-C, the time
budget or a crash is FAIL with user_attrs["interrupted"] = True and its params are retried; it
does not count toward `settings.trials`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import optuna
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from search import studies
from search.config import SearchSettings, TLSearchError, check_study_name, dump_yaml
from search.space import Constant, SearchSpace, backbones_in, default_space

MARKER = ".tlsearch"  # marks an experiment folder this tool created (resume refuses others)
INTERRUPTED = "interrupted (driver stopped)"
REPORT_EVERY_S = 30.0  # how often the live report is rewritten while trials finish
PROGRESS_EVERY_S = 5.0
# Several drivers may run one study at once (one per machine or terminal). Each stamps the trials
# it runs with its id and a heartbeat; another driver counts a RUNNING trial as taken unless it
# is stale: its driver's process is gone (same host) or its heartbeat is older than STALE_AFTER_S.
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0
SURPLUS = "not run: the study reached its trial count (another driver took the last one)"
NODE_CHECK_FILES = 1000  # dataset files each Ray node stats before a cluster search
NODE_CHECK_TIMEOUT_S = 120.0
# Ray keeps a trial's worker process for the next trial instead of starting a fresh one (a fresh
# worker costs seconds: process start, torch import). Safe: `_trainable` sets the torch thread
# count and seeds every trial itself. Measured in benchmarks/bench.py (part d).
REUSE_ACTORS = True
TrialFn = Callable[..., Any]


# ----- samplers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerEntry:
    """One Optuna sampler a search can use."""

    description: str  # one line for --help and errors
    make: Callable[[int], "optuna.samplers.BaseSampler"]  # seed -> sampler


SAMPLERS: dict[str, SamplerEntry] = {
    "tpe": SamplerEntry("Tree-structured Parzen Estimator (default)", lambda s: optuna.samplers.TPESampler(seed=s)),
    "random": SamplerEntry("uniform random sampling", lambda s: optuna.samplers.RandomSampler(seed=s)),
    "cmaes": SamplerEntry("CMA-ES (numeric params; needs the cmaes package)", lambda s: optuna.samplers.CmaEsSampler(seed=s)),
    "qmc": SamplerEntry("quasi-Monte Carlo (Sobol)", lambda s: optuna.samplers.QMCSampler(seed=s)),
}


def make_sampler(name: str, *, seed: int) -> "optuna.samplers.BaseSampler":
    """Builds a seeded sampler by name.

    Args:
        name: a key of `SAMPLERS`.
        seed: the sampler's seed.

    Returns:
        The sampler.
    """
    if name not in SAMPLERS:
        raise TLSearchError(f"unknown sampler {name!r}; available: {', '.join(SAMPLERS)}")
    return SAMPLERS[name].make(seed)


def default_concurrency(*, cpus: float, gpus: float, cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials run at once on a machine: as many as its CPUs (and GPUs) hold.

    Args:
        cpus: CPUs Ray can use.
        gpus: GPUs Ray can use.
        cpus_per_trial: CPUs each trial reserves.
        gpus_per_trial: GPUs (or a fraction) each trial reserves.

    Returns:
        The number of concurrent trials, >= 1.
    """
    n = math.floor(cpus / cpus_per_trial) if cpus_per_trial > 0 else int(cpus) or 1
    if gpus_per_trial > 0:
        n = min(n, math.floor(gpus / gpus_per_trial + 1e-9))
    return max(1, n)


# ----- summary ------------------------------------------------------------------------------------


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


# ----- the honest searcher -----------------------------------------------------------------------


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


class PruneTrackingASHA(ASHAScheduler):
    """ASHA that remembers which trials it stopped, so the searcher can tell PRUNED from the rest."""

    def __init__(self, *args: Any, stopped: set | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopped: set = stopped if stopped is not None else set()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        with _nan_rungs_quiet():
            action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            self.stopped.add(trial.trial_id)
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        with _nan_rungs_quiet():
            super().on_trial_complete(tune_controller, trial, result)


@contextlib.contextmanager
def _nan_rungs_quiet() -> Iterator[None]:
    """A failed trial reports NaN (ASHA ignores it); numpy's warning about a rung holding only
    NaN so far is noise in the user's terminal."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All-NaN slice encountered", category=RuntimeWarning)
        yield


class HonestOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about how each trial ended.

    Ray's `on_trial_complete` tells COMPLETE with the last rung's score when ASHA stops a trial.
    Here: per-epoch values are reported with step = epoch; a trial that ran its full `epochs`
    is COMPLETE, one ASHA stopped is PRUNED, one that raised / died / reported NaN is FAIL with
    the reason, and one cut short by the driver (Ctrl-C, time budget) is FAIL "interrupted" and
    enqueued again. Every user_attr is set before the state is told.
    """

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
        pretrained: bool = True,
        driver: str = "",
        target: int | None = None,
        keep_checkpoints: int | None = None,
    ) -> None:
        self._search_space = space
        self._asha_stopped = asha_stopped
        self._tally = tally
        self._pretrained = pretrained
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
        if self._target is not None and trial_id not in self._ot_trials:
            trials = self._ot_study.get_trials(deepcopy=False)
            if _claimed(trials, driver=self._driver) >= self._target:
                return self.FINISHED  # every trial is done or taken (maybe by another driver)
            if not self._reseeded and _other_drivers(trials, driver=self._driver):
                # Drivers seeded alike would sample the same params: diverge from here on.
                self._ot_study.sampler.reseed_rng()
                self._reseeded = True
        params = super().suggest(trial_id)
        if params is None:
            return None
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr("driver", self._driver)
        ot_trial.set_user_attr("heartbeat", time.time())
        if self._target is not None and self._surplus(trial_id):
            return self.FINISHED
        params["_trial_number"] = self._ot_trials[trial_id].number
        self._configs[trial_id] = dict(params)
        self._curves[trial_id] = {}
        self._tally.running += 1
        return params

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

    def _surplus(self, trial_id: str) -> bool:
        """Closes a trial that another driver's trials crowded out of the count (a race of two asks).

        Trial numbers order the asks of every driver, so the earlier trials win.
        """
        ot_trial = self._ot_trials[trial_id]
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

    def finish_leftovers(self) -> int:
        """Tells every trial still open (the run was stopped under it) as interrupted; returns how many."""
        n = 0
        for trial_id in list(self._ot_trials):
            if trial_id not in self._completed_trials:
                self._finish(trial_id, worker_died=False, stopped_by_driver=True)
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
        value = result.get(self.metric)
        if _finite(value):
            self._ot_trials[trial_id].report(float(value), step=epoch)

    def _finish(self, trial_id: str, *, worker_died: bool, stopped_by_driver: bool = False) -> None:
        ot_trial = self._ot_trials[trial_id]
        config = self._configs.get(trial_id, {})
        curve = [self._curves.get(trial_id, {})[e] for e in sorted(self._curves.get(trial_id, {}))]
        last = curve[-1] if curve else {}
        final = self._last.get(trial_id) or {}
        epochs = int(config.get("epochs", self._search_space.max_epochs))
        epochs_run = int(last.get("epoch", 0))
        value = last.get(self.metric)
        error = final.get("error")
        if worker_died:
            error = "trial worker died (killed, or out of memory)"
        elif error is None and curve and not all(_finite(c.get(self.metric)) for c in curve):
            error = f"{self.metric} is not finite ({value})"

        interrupted = False
        if error:
            state = TrialState.FAIL
        elif epochs_run >= epochs:
            state = TrialState.COMPLETE
        elif trial_id in self._asha_stopped and not stopped_by_driver and epochs_run > 0:
            state = TrialState.PRUNED
        else:
            state, interrupted, error = TrialState.FAIL, True, INTERRUPTED

        self._set_attrs(ot_trial, config, curve, last, final, epochs_run, error, interrupted)
        self._bound_checkpoints(ot_trial, state, value, config, interrupted, final)
        try:
            self._ot_study.tell(ot_trial, float(value) if state == TrialState.COMPLETE else None, state=state)
        except Exception as e:  # a storage hiccup must not end the search
            print(f"warning: could not record trial {ot_trial.number}: {e}", file=sys.stderr)
        if interrupted:
            params = ot_trial.params
            if params:
                self._ot_study.enqueue_trial(params, user_attrs={"retry_of": ot_trial.number})
        self._completed_trials.add(trial_id)
        self._update_tally(state, interrupted, value, config, final)

    def _set_attrs(
        self, ot_trial: Any, config: dict, curve: list, last: dict, final: dict,
        epochs_run: int, error: str | None, interrupted: bool,
    ) -> None:
        try:
            cfg = self._search_space.to_trial_config(config)
            if not self._pretrained:
                cfg = cfg.replace(pretrained=False)
            cfg_dict: dict | None = cfg.to_dict()
        except Exception:
            cfg_dict = {k: v for k, v in config.items() if not k.startswith("_")}
        src = last or final
        attrs: dict[str, Any] = {
            "config": cfg_dict,
            "epochs_run": epochs_run,
            "params_total": src.get("params_total"),
            "params_trainable": src.get("params_trainable"),
            "train_seconds": final.get("train_seconds", src.get("train_seconds")),
            "images_per_s": _mean([c.get("images_per_s") for c in curve]),
            "latency_ms": src.get("latency_ms"),
            "node_id": final.get("node_id"),
            "hostname": final.get("hostname"),
            "worker": final.get("worker"),
            "started_at": final.get("started_at"),
            "finished_at": time.time(),
            "checkpoint": final.get("checkpoint"),
            "curve": [
                {k: c.get(k) for k in ("epoch", "val_acc", "val_loss", "val_balanced_acc",
                                       "train_loss", "epoch_seconds", "images_per_s")}
                for c in curve
            ],
            "confusion_matrix": last.get("confusion_matrix"),
            "val_loss": last.get("val_loss"),
            "val_balanced_acc": last.get("val_balanced_acc"),
            "best_val_acc": last.get("best_val_acc"),
        }
        if error:
            attrs["error"] = error[:2000]
        if final.get("traceback"):
            attrs["traceback"] = str(final["traceback"])[-4000:]
        if interrupted:
            attrs["interrupted"] = True
        for key, val in attrs.items():
            try:
                ot_trial.set_user_attr(key, val)
            except Exception as e:  # one odd value must not lose the others
                print(f"warning: trial {ot_trial.number}: user_attr {key}: {e}", file=sys.stderr)

    def _bound_checkpoints(self, ot_trial: Any, state: TrialState, value: Any, config: dict,
                           interrupted: bool, final: dict) -> None:
        """Removes the checkpoints the study no longer keeps, this ending trial's among them
        (`disk.checkpoints_to_remove`); this trial's attributes say so before its state is told."""
        if self._keep_checkpoints is None:
            return
        from search import disk

        try:
            backbone = self._search_space.to_trial_config(config).backbone
        except Exception:
            backbone = config.get("backbone")
        retry_of = ot_trial.user_attrs.get("retry_of")
        ending = disk.CheckpointTrial(
            number=ot_trial.number, state=state.name,
            value=float(value) if state == TrialState.COMPLETE and _finite(value) else None,
            backbone=backbone, interrupted=interrupted, retry_of=retry_of if isinstance(retry_of, int) else None,
            has_checkpoint=bool(final.get("checkpoint")),
        )
        try:
            _, own = disk.prune_study_checkpoints(self._ot_study, keep=self._keep_checkpoints, ending=ending)
            if own:
                disk.remove_file(final.get("checkpoint"))
                ot_trial.set_user_attr("checkpoint", None)
                ot_trial.set_user_attr("checkpoint_removed", True)
        except Exception as e:  # disk space is not worth a trial: the next trial's end tries again
            print(f"warning: trial {ot_trial.number}: checkpoints not cleaned up: {e}", file=sys.stderr)

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


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _mean(values: list) -> float | None:
    xs = [float(v) for v in values if _finite(v)]
    return sum(xs) / len(xs) if xs else None


# ----- the trainable (runs in a Ray worker) -------------------------------------------------------


def _trainable(
    config: dict,
    *,
    index: Any,
    space: SearchSpace,
    trial_fn: TrialFn | None,
    metric: str,
    pretrained: bool,
    weights_dir: str | None,
    cache: bool,
    checkpoint_dir: str,
    threads: int,
) -> None:
    """One Ray trial: run the trial function, forwarding its per-epoch metrics to Tune.

    An exception from the trial becomes a final result with an "error" key (and the metric as
    NaN, which ASHA ignores), so the driver records the reason; the search goes on.
    """
    import torch

    torch.set_num_threads(threads)
    if trial_fn is None:
        from search.trial import fine_tune as trial_fn
    number = config.get("_trial_number")
    checkpoint = str(Path(checkpoint_dir, f"trial-{number}.pt"))
    host = socket.gethostname()
    started = time.time()
    extras = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": host,
        "worker": f"{host}:{os.getpid()}",
        "started_at": started,
        "checkpoint": checkpoint,
    }
    state = {"epoch": 0, "in_report": False}

    def report(metrics: dict) -> None:
        state["epoch"] = int(metrics.get("epoch", state["epoch"] + 1))
        state["in_report"] = True
        tune.report({**metrics, **extras, "train_seconds": time.time() - started})
        state["in_report"] = False

    try:
        cfg = space.to_trial_config(config)
        if not pretrained:
            cfg = cfg.replace(pretrained=False)
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        trial_fn(cfg, index, report=report, weights_dir=weights_dir, cache=cache,
                 checkpoint_path=checkpoint, threads=threads)
    except Exception as e:
        if state["in_report"]:
            raise  # Tune stopping the trial, not the trial failing
        _free_memory()
        text = f"{type(e).__name__}: {e}".strip().splitlines()
        tune.report({
            metric: float("nan"),
            "epoch": state["epoch"],
            "error": text[0] if text else type(e).__name__,
            "traceback": "".join(traceback.format_exception(e))[-4000:],
            **extras,
            "train_seconds": time.time() - started,
        })


def _free_memory() -> None:
    """Gives memory back after a failed trial (out-of-memory) before the worker ends."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


# ----- live view ----------------------------------------------------------------------------------


class ProgressView(tune.Callback):
    """Prints one line to stderr at most every few seconds: states, best so far, time left."""

    def __init__(self, tally: _Tally, *, base: dict, budget_s: float | None, every_s: float = PROGRESS_EVERY_S) -> None:
        self.tally, self.base, self.budget_s, self.every_s = tally, base, budget_s, every_s
        self.start = time.time()
        self.last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.time()
        if now - self.last >= self.every_s:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        print(self.line(time.time()), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        t, b = self.tally, self.base
        text = (
            f"[search] done {b['complete'] + t.complete}  running {t.running}  "
            f"pruned {b['pruned'] + t.pruned}  failed {b['failed'] + t.failed}"
        )
        best, backbone = t.best, t.best_backbone
        if b.get("best") is not None and (best is None or (b["best"] > best if t.mode == "max" else b["best"] < best)):
            best, backbone = b["best"], b.get("best_backbone")
        if best is not None:
            text += f"  best {best:.4f} ({backbone})"
        if self.budget_s:
            text += f"  time left {max(0.0, self.budget_s - (now - self.start)):.0f}s"
        return text


class ReportRefresher(tune.Callback):
    """Rewrites reports/<study>/index.html while the search runs, when trials have finished."""

    def __init__(self, settings: SearchSettings, *, every_s: float = REPORT_EVERY_S) -> None:
        self.settings, self.every_s = settings, every_s
        self.last, self.seen, self.warned = time.time(), 0, False

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.time()
        finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        if finished == self.seen or now - self.last < self.every_s:
            return
        self.seen, self.last = finished, now
        try:
            from search.report import write_report

            s = self.settings
            write_report(s.study, storage=s.storage_url, studies_dir=s.studies_dir, reports_dir=s.reports_dir)
        except Exception as e:  # a report is a view; it never stops the search
            if not self.warned:
                self.warned = True
                print(f"warning: report not refreshed: {e}", file=sys.stderr)


# ----- pre-flight ---------------------------------------------------------------------------------


def _writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TLSearchError(f"{what} folder {folder} is not writable: {e.strerror or e}") from None


def _check_experiment_dir(exp: Path, study: str) -> None:
    """Refuses an existing studies/<study>/ folder this tool did not create."""
    if exp.exists() and any(exp.iterdir()) and not (exp / MARKER).is_file():
        raise TLSearchError(
            f"{exp} exists but was not created by tlsearch (no {MARKER} file); "
            f"move it away or choose another study name than {study!r}"
        )


def _uses_pretrained(settings: SearchSettings, space: SearchSpace) -> bool:
    p = space.param_dict.get("pretrained")
    return settings.pretrained and not (isinstance(p, Constant) and p.value is False)


def preflight(settings: SearchSettings, space: SearchSpace) -> Any:
    """Checks everything a search needs before any trial starts (seconds, one clear line each).

    Args:
        settings: the search settings.
        space: the validated search space.

    Returns:
        The scanned dataset (`search.data.DatasetIndex`).
    """
    from search import backbones
    from search.data import scan_dataset

    check_study_name(settings.study)
    if settings.sampler not in SAMPLERS:
        raise TLSearchError(f"unknown sampler {settings.sampler!r}; available: {', '.join(SAMPLERS)}")
    _writable(Path(settings.studies_dir).resolve(), "studies")
    _check_experiment_dir(settings.experiment_dir, settings.study)
    _writable(settings.experiment_dir, "experiment")
    _writable(Path(settings.reports_dir).resolve(), "reports")
    index = scan_dataset(settings.data, val_fraction=settings.val_fraction, seed=settings.seed)
    if _uses_pretrained(settings, space):
        for name in backbones_in(space):
            backbones.check_weights(name, settings.weights_dir)
    return index


# ----- the study ----------------------------------------------------------------------------------


def _open_study(
    settings: SearchSettings, storage: Any, index: Any, space: SearchSpace
) -> tuple[optuna.Study, bool]:
    """Creates the study, or checks that an existing one matches this dataset and space.

    Returns:
        (the study, whether this call created it): of several drivers starting on one new study,
        exactly one creates it.
    """
    direction = "maximize" if settings.mode == "max" else "minimize"
    try:
        study = optuna.create_study(study_name=settings.study, storage=storage, direction=direction)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=settings.study, storage=storage)
        created = False
    attrs = study.user_attrs
    if attrs.get("dataset_fingerprint") and attrs["dataset_fingerprint"] != index.fingerprint:
        raise TLSearchError(
            f"study {settings.study!r} was searched on a different dataset (fingerprint "
            f"{attrs['dataset_fingerprint']}, now {index.fingerprint} for {index.root}); "
            "use a new --study name"
        )
    if attrs.get("class_names") is not None and list(attrs["class_names"]) != list(index.classes):
        raise TLSearchError(
            f"study {settings.study!r} has classes {attrs['class_names']}, the dataset now has "
            f"{list(index.classes)}; use a new --study name"
        )
    if attrs.get("space"):
        why = SearchSpace.from_dict(attrs["space"], source="stored space").incompatibility(space)
        if why:
            raise TLSearchError(f"study {settings.study!r} cannot continue with this space: {why}; use a new --study name")
    if study.direction != optuna.study.StudyDirection[direction.upper()]:
        raise TLSearchError(f"study {settings.study!r} was created to {study.direction.name.lower()}, not to {direction}")
    with warnings.catch_warnings():  # experimental in Optuna, but what optuna-dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([settings.metric])
    study.set_user_attr("dataset", index.root)
    study.set_user_attr("dataset_fingerprint", index.fingerprint)
    study.set_user_attr("class_names", list(index.classes))
    study.set_user_attr("split", index.split)
    study.set_user_attr("settings", settings.to_dict())
    study.set_user_attr("space", space.to_dict())
    return study, created


def reconcile(study: optuna.Study, *, driver: str | None = None) -> int:
    """Marks trials left RUNNING by a stopped driver FAIL ("interrupted") and enqueues their params.

    Other drivers may be running on the study: their live trials are left alone; only stale
    trials (see `is_stale`) and this driver's own are reconciled.

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
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        n += 1
    return n


def finished_count(study: optuna.Study) -> int:
    """Trials that count toward `settings.trials`: COMPLETE, PRUNED and FAIL not caused by a stop."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            n += 1
        elif t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"):
            n += 1
    return n


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
    if not _finite(beat):
        beat = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    if now - beat > STALE_AFTER_S:
        return True
    if isinstance(owner, str) and owner.count(":") >= 2:
        host, pid, _ = owner.rsplit(":", 2)
        if host == _process_host() and pid.isdigit():
            # Same pid, another token: an earlier search call of this process, which has ended.
            return int(pid) == os.getpid() or not _pid_alive(int(pid))
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _claimed(trials: list, *, driver: str | None) -> int:
    """Trials that count toward `settings.trials` plus those live drivers are running now."""
    now = time.time()
    n = 0
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            n += 1
        elif t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"):
            n += 1
        elif t.state == TrialState.RUNNING and not is_stale(t, driver=driver, now=now):
            n += 1
    return n


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
    complete = [t for t in trials if t.state == TrialState.COMPLETE and _finite(t.value)]
    best = None
    if complete:
        pick = max if mode == "max" else min
        best = pick(complete, key=lambda t: t.value)
    return {
        "complete": len(complete),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL and not t.user_attrs.get("interrupted") for t in trials),
        "best": best.value if best else None,
        "best_backbone": best.params.get("backbone", (best.user_attrs.get("config") or {}).get("backbone")) if best else None,
    }


# ----- Ray ----------------------------------------------------------------------------------------


def _ensure_ray(settings: SearchSettings) -> None:
    """Starts Ray once per process (or joins --address); reuses a running session."""
    if ray.is_initialized():
        return
    # Workers must import `search` even when it is not installed (a checkout on PYTHONPATH).
    root = str(Path(__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if settings.address:
        ray.init(address=settings.address, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)


def check_nodes_see_data(index: Any, *, experiment_dir: Path | None = None,
                         timeout_s: float = NODE_CHECK_TIMEOUT_S) -> dict[str, dict]:
    """Checks, on every alive Ray node, that the dataset is there at the same path.

    A tiny task pinned to each node stats up to NODE_CHECK_FILES of the dataset's images (evenly
    spread) and compares their sizes with the driver's; a node that cannot run it (tlsearch not
    installed there) fails too. A node that does not see the experiment folder only gets a
    warning: its trials keep their checkpoints on that node.

    Args:
        index: the scanned dataset (`search.data.DatasetIndex`).
        experiment_dir: studies/<study>/, checked for the warning; None: not checked.
        timeout_s: how long to wait for every node's answer.

    Returns:
        {node id: {"address", "missing", "checked", "experiment_dir"}} for every alive node.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    samples = [path for path, _ in (*index.train, *index.val)]
    step = max(1, math.ceil(len(samples) / NODE_CHECK_FILES))
    probe = [(path, os.path.getsize(path)) for path in samples[::step]]
    exp = str(experiment_dir) if experiment_dir is not None else None
    task = ray.remote(num_cpus=0, max_retries=0)(_node_sees)
    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
    refs = {
        node: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(index.root, probe, exp)
        for node in nodes
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    found: dict[str, dict] = {}
    problems: list[str] = []
    for node, ref in refs.items():
        where = f"{nodes[node]} (node {node[:8]})"
        if ref not in ready:
            ray.cancel(ref, force=True)
            problems.append(f"{where}: no answer within {timeout_s:.0f}s")
            continue
        try:
            found[node] = {"address": nodes[node], **ray.get(ref)}
        except Exception as e:  # e.g. tlsearch not installed on that node
            problems.append(f"{where}: {str(getattr(e, 'cause', None) or e).strip().splitlines()[-1]}")
            continue
        r = found[node]
        if not r["root"]:
            problems.append(f"{where}: no folder {index.root}")
        elif r["missing"]:
            problems.append(f"{where}: {r['missing']} of {r['checked']} checked images missing or of another size")
    if problems:
        raise TLSearchError(
            f"dataset {index.root} is not the same on every Ray node ({len(problems)} of {len(refs)}): "
            + "; ".join(problems)
            + "; put it on storage every node mounts at the same path (or copy it there) and retry"
        )
    blind = [f"{r['address']} (node {n[:8]})" for n, r in found.items() if exp and not r["experiment_dir"]]
    if blind:
        print(f"warning: {exp} is not visible on {', '.join(blind)}: checkpoints of trials there stay on "
              "those nodes; run from a folder on shared storage to keep them together", file=sys.stderr)
    return found


def _node_sees(root: str, probe: list[tuple[str, int]], experiment_dir: str | None) -> dict:
    """Runs on one node: is the dataset folder there, and are the probed files the same size?"""
    if not os.path.isdir(root):
        return {"root": False, "missing": len(probe), "checked": len(probe), "experiment_dir": False}
    missing = 0
    for path, size in probe:
        try:
            missing += os.path.getsize(path) != size
        except OSError:
            missing += 1
    seen = bool(experiment_dir) and os.path.isdir(experiment_dir)
    return {"root": True, "missing": missing, "checked": len(probe), "experiment_dir": seen}


# ----- the search ---------------------------------------------------------------------------------


def run_search(
    settings: SearchSettings,
    *,
    space: SearchSpace | None = None,
    trial_fn: TrialFn | None = None,
    progress: bool = True,
) -> RunSummary:
    """Runs (or continues) a search until the study holds `settings.trials` finished trials.

    Args:
        settings: how to search; `settings.space` is used when `space` is None (empty: the
            default space for the hardware).
        space: the search space.
        trial_fn: the per-trial function, `search.trial.fine_tune`'s signature; None: fine_tune.
            Tests swap in a fast stub.
        progress: print a live status line to stderr.

    Returns:
        The summary. Ctrl-C once stops the run cleanly (`interrupted=True`); twice raises
        KeyboardInterrupt after recording the study.
    """
    t0 = time.time()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our live view says what matters
    if space is None:
        space = SearchSpace.from_dict(settings.space) if settings.space else default_space(gpu=settings.gpus_per_trial > 0)
    if settings.max_epochs is not None and settings.max_epochs != space.max_epochs:
        space = space.with_max_epochs(settings.max_epochs)
    settings = settings.replace(
        space=space.to_dict(),
        studies_dir=str(Path(settings.studies_dir).resolve()),
        reports_dir=str(Path(settings.reports_dir).resolve()),
        data=str(Path(settings.data).resolve()),
    )
    index = preflight(settings, space)
    storage = studies.get_storage(settings.storage_url)
    study, created = _open_study(settings, storage, index, space)
    if settings.warm_start and created:
        # A new study starts from the linear probe: seconds on cached features, a score to beat.
        # Only the driver that created the study enqueues it, so two drivers never both do.
        study.enqueue_trial(space.baseline(), user_attrs={"baseline": True})
    exp = settings.experiment_dir
    (exp / MARKER).write_text(f"tlsearch experiment folder of study {settings.study}\n", encoding="utf-8")
    dump_yaml(settings.to_dict(), exp / "settings.yaml")
    driver = new_driver_id()
    reconcile(study, driver=driver)  # trials of crashed drivers; live ones of other drivers stay
    _bound_disk(settings, study)

    remaining = settings.trials - finished_count(study)
    tally = _Tally(mode=settings.mode)
    interrupted = budget_reached = False
    trials_run = 0
    if remaining > 0:
        try:
            interrupted, budget_reached = _tune(
                settings, space, index, storage, study, tally, remaining, trial_fn, progress, t0, driver=driver
            )
        except KeyboardInterrupt:
            reconcile(study, driver=driver)
            print(f"interrupted; continue with: tlsearch resume {settings.study}", file=sys.stderr)
            raise
        trials_run = tally.complete + tally.pruned + tally.failed + tally.interrupted
    reconcile(study, driver=driver)  # none of this call's trials may stay RUNNING once it returns
    return _summary(settings, study, t0, tally, trials_run, interrupted, budget_reached)


def _bound_disk(settings: SearchSettings, study: optuna.Study) -> None:
    """Frees what earlier runs left behind: temporary files of killed processes, and checkpoints
    the study no longer keeps (e.g. after `--keep-checkpoints` was lowered)."""
    from search import disk
    from search.data import default_cache_dir

    cache = default_cache_dir()
    disk.clean_stale_tmp([cache / "images", cache / "features", settings.experiment_dir / "checkpoints"])
    try:
        disk.prune_study_checkpoints(study, keep=settings.keep_checkpoints)
    except Exception as e:  # a storage hiccup: trials' ends try again
        print(f"warning: checkpoints not cleaned up: {e}", file=sys.stderr)


def _tune(
    settings: SearchSettings, space: SearchSpace, index: Any, storage: Any, study: optuna.Study,
    tally: _Tally, remaining: int, trial_fn: TrialFn | None, progress: bool, t0: float, driver: str = "",
) -> tuple[bool, bool]:
    """Runs one Ray Tune experiment of `remaining` trials; returns (interrupted, budget_reached)."""
    _ensure_ray(settings)
    if settings.address:
        check_nodes_see_data(index, experiment_dir=settings.experiment_dir)
    resources = ray.cluster_resources()
    asha_stopped: set = set()
    sampler = make_sampler(settings.sampler, seed=settings.seed + len(study.trials))
    searcher = HonestOptunaSearch(
        space, metric=settings.metric, mode=settings.mode, sampler=sampler,
        study_name=settings.study, storage=storage, asha_stopped=asha_stopped, tally=tally,
        pretrained=settings.pretrained, driver=driver, target=settings.trials,
        keep_checkpoints=settings.keep_checkpoints,
    )
    concurrency = settings.max_concurrent or default_concurrency(
        cpus=resources.get("CPU", 1), gpus=resources.get("GPU", 0),
        cpus_per_trial=settings.cpus_per_trial, gpus_per_trial=settings.gpus_per_trial,
    )
    scheduler = PruneTrackingASHA(
        time_attr="training_iteration", metric=settings.metric, mode=settings.mode,
        max_t=space.max_epochs, grace_period=min(settings.grace_period, space.max_epochs),
        reduction_factor=settings.reduction_factor, stopped=asha_stopped,
    )
    trainable = tune.with_parameters(
        _trainable, index=index, space=space, trial_fn=trial_fn, metric=settings.metric,
        pretrained=settings.pretrained, weights_dir=settings.weights_dir, cache=settings.cache,
        checkpoint_dir=str(settings.experiment_dir / "checkpoints"),
        threads=max(1, int(settings.cpus_per_trial)),
    )
    trainable = tune.with_resources(trainable, {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial})
    callbacks = []
    if progress:
        callbacks.append(ProgressView(tally, base=_base_tally(study, settings.mode), budget_s=settings.time_budget_s))
        callbacks.append(ReportRefresher(settings))
    run_name = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency),
            scheduler=scheduler,
            num_samples=remaining,
            time_budget_s=settings.time_budget_s,
            reuse_actors=REUSE_ACTORS,
        ),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=str(settings.experiment_dir),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=callbacks,
        ),
    )
    start = time.time()
    beating = threading.Event()
    threading.Thread(target=_heartbeats, args=(searcher, beating), daemon=True, name="tlsearch-heartbeat").start()
    try:
        with _quiet_tune():
            tuner.fit()
    finally:
        beating.set()
        left = searcher.finish_leftovers()
    budget_reached = bool(settings.time_budget_s) and time.time() - start >= settings.time_budget_s * 0.98
    # Trials other drivers still run count as done here: the study reaches its count through them.
    claimed = _claimed(study.get_trials(deepcopy=False), driver=driver)
    interrupted = (left > 0 or claimed < settings.trials) and not budget_reached
    return interrupted, budget_reached


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
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE and _finite(t.value)]
    best = None
    if complete:
        best = (max if settings.mode == "max" else min)(complete, key=lambda t: t.value)
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
    **overrides: Any,
) -> RunSummary:
    """Continues a study with the settings stored in it (after a crash, kill -9 or Ctrl-C).

    Args:
        name: the study name.
        studies_dir: where default SQLite studies live.
        storage: the study's storage URL; None: studies/<name>.db.
        progress: print a live status line.
        trial_fn: the per-trial function (tests); None: fine_tune.
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
    if storage:
        settings = settings.replace(storage=storage)
    exp = settings.experiment_dir
    if not (exp / MARKER).is_file():
        raise TLSearchError(f"{exp} was not created by tlsearch (no {MARKER} file); refusing to resume into it")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if changes:
        settings = settings.replace(**changes)
    return run_search(settings, trial_fn=trial_fn, progress=progress)
