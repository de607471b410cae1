"""`fit`: one command, one budget, one shipped model.

The search (`run_search` with the preset's space and what is left of the budget once the steps
after it are provided for), the report and best config as `run` writes them, the ship step (no
retraining), `--refit` when asked and when it fits, and the evaluation on test/. A search that
finished is recorded in the study (user_attrs["fit"]), so `fit` again on the same study ships
without searching again, once DATA is checked to be the dataset it searched (its fingerprint); an
interrupted one is continued. Every phase's time comes out of one budget (`_budget`): the
process's start, downloads and Ray's start are measured before the search's share is set, and Ray's
shutdown is the last phase.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.config import TLSearchError, parse_duration
from search.pipeline._budget import (
    EXIT_S,
    RAY_START_S,
    PhaseClock,
    ensemble_members,
    ensemble_seconds,
    evaluate_seconds,
    fits,
    per_image_seconds,
    plan_reserve,
    refit_seconds,
    search_budget,
)
from search.pipeline._presets import DEFAULT_PRESET, Preset, get_preset, more_backbones_at_hand, preset_space
from search.pipeline._ship import Shipped, ship_ensemble, ship_trial, stamp

if TYPE_CHECKING:
    import optuna

    from search.data import DatasetIndex
    from search.pipeline._budget import Reserve
    from search.settings import SearchSettings
    from search.space import SearchSpace

# The search runs until the budget ends it, not until a trial count: a count it never reaches.
FIT_TRIALS = 10_000


@dataclass(frozen=True)
class FitSummary:
    """What `fit` did, for the one-screen summary and `--json`."""

    study: str  # the study searched (studies/<study>.db)
    preset: str  # the preset's name
    budget_s: float  # --time-budget
    model_dir: str  # the shipped model folder
    shipped: str  # what ships: a trial (backbone, freeze depth) or an ensemble candidate
    kind: str  # "trial" or "ensemble"
    trials: tuple[int, ...]  # the trials whose weights it holds
    metric: str  # the study's objective
    val_score: float | None  # on validation; a trial's is the study's value for it
    heldout: dict[str, Any] | None  # accuracy, balanced_accuracy, macro_f1, images on test/; None: no test/
    latency_ms: float | None  # batch-1, as measured where it was chosen
    size_mb: float  # model.pt on disk
    report: str | None  # reports/<study>/index.html
    best_config: str | None  # reports/<study>/best.yaml
    # (phase, seconds), in order; they add up to wall_seconds. "start" begins at the process's start
    # under the CLI (the interpreter, the imports, scanning, downloads, Ray); "exit" is Ray's shutdown.
    phases: tuple[tuple[str, float], ...]
    wall_seconds: float  # from the process's start (the CLI; else the call's) to the summary
    searched: bool  # False: the study's search had finished before, this call shipped only
    refit: bool = False  # the shipped weights were trained again on train+val
    notes: tuple[str, ...] = field(default_factory=tuple)  # what the summary should say besides

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trials"], d["phases"], d["notes"] = list(self.trials), dict(self.phases), list(self.notes)
        return d


def fit(
    data: str | os.PathLike,
    time_budget: str | float,
    *,
    preset: str = DEFAULT_PRESET,
    study: str | None = None,
    space: str | os.PathLike | SearchSpace | None = None,
    out: str | os.PathLike | None = None,
    refit: bool = False,
    weights_dir: str | None = None,
    allow_changed_data: bool = False,
    progress: bool = True,
    verbose: bool = False,
    trial_fn: Any = None,
    started_at: float | None = None,
    **options: Any,
) -> FitSummary:
    """Searches, ships and evaluates within one time budget; ends with a model folder.

    Args:
        data: the dataset (as `tlsearch run` takes it).
        time_budget: the whole command's wall-clock budget: seconds, or "90s", "30m", "2h".
        preset: a `PRESETS` name: fast, good (default) or best.
        study: the study's name; None: the dataset folder's name.
        space: a search space (file or `SearchSpace`) instead of the preset's.
        out: the model folder; None: models/<study>.
        refit: train the shipped trial's config again on train+val, when that fits in the budget.
        weights_dir: folder of `<model name>.pth` state dicts.
        allow_changed_data: a study whose search has finished on other data with the same classes
            ships its model anyway, scored on DATA's test/ (a warning line).
        progress: the search's live view and one line per step on stderr.
        verbose: Ray's and Optuna's own messages on stderr.
        trial_fn: the per-trial function (tests); None: `search.trial.fine_tune`.
        started_at: when the command began, on `time.monotonic`'s clock (the CLI passes the
            process's start, so that the phases cover the interpreter's start too); None: now.
        **options: other `SearchSettings` fields (trials, pretrained, cache, seed, storage, ...).

    Returns:
        The summary. Ctrl-C during the search raises KeyboardInterrupt and leaves a study that
        `tlsearch resume` finishes and `fit` continues.
    """
    clock = PhaseClock(start=started_at)
    chosen = get_preset(preset)
    budget_s = parse_duration(time_budget)
    settings, index = _settings(data, chosen, study=study, space=space, weights_dir=weights_dir, options=options,
                                budget_s=budget_s)
    name, storage = settings.study, settings.storage_url
    say = _say if progress else (lambda _m: None)
    out_dir = Path(out) if out is not None else Path("models", name)
    notes: list[str] = []

    existing = _existing_study(settings)
    done = (existing.user_attrs.get("fit") or {}) if existing is not None else {}
    searched = not done.get("searched")
    gpu = settings.gpus_per_trial > 0
    started_ray = False
    if searched:
        reserve = fit_reserve(settings, index, budget_s=budget_s, preset=chosen, refit=refit, study=existing)
        # Too short: said before Ray starts (allowing for its start, so the budget it names holds after).
        search_budget(budget_s, elapsed_s=clock.elapsed_s + RAY_START_S, reserve=reserve)
        _fetch_weights(settings)  # downloads, if any, are part of the start, before the search's budget is set
        started_ray = _start_ray(settings, verbose=verbose)
        clock.lap("start")
        search_s = search_budget(budget_s, elapsed_s=clock.elapsed_s, reserve=reserve)
        say(f"fit: searching for {search_s:.0f}s of {budget_s:.0f}s ({reserve.total_s:.0f}s kept for shipping "
            f"and evaluating{', and the refit' if refit else ''})")
        _search(settings.replace(time_budget_s=search_s), trial_fn=trial_fn, progress=progress, verbose=verbose,
                preset=chosen.name)
        clock.lap("search")
    else:
        assert existing is not None
        changed = _check_same_data(existing, index, allow_changed_data=allow_changed_data)
        if changed:
            say(f"warning: {changed}")
            notes.append(changed)
        clock.lap("start")
        unused = _unused_options(done, preset=chosen, space=space)
        say(f"fit: study {name!r} has finished its search; shipping what it kept"
            + (f" ({unused})" if unused else "") + f" (search more with: tlsearch resume {name} --time-budget T)")
        if unused:
            notes.append(f"study {name!r} had finished its search: {unused}")

    from search.outputs import write_outputs
    from search.studies import load_study, objective_of

    paths = write_outputs(name, storage) if progress else _quietly(write_outputs, name, storage)
    clock.lap("report")

    st = load_study(name, storage=storage)
    metric, _ = objective_of(st)
    shipped = _ship(st, chosen, out_dir, data=settings.data, left_s=clock.left_s(budget_s) - EXIT_S, index=index, gpu=gpu,
                    progress=progress, notes=notes, allow_changed_data=allow_changed_data)
    fit_record = {"preset": chosen.name, "budget_s": budget_s, "shipped": shipped.name}
    stamp(shipped.model_dir, {"study": name, "trials": list(shipped.trials), "fit": fit_record})
    clock.lap("ship")

    did_refit = False
    if refit:
        did_refit = _refit(st, shipped, settings, clock=clock, budget_s=budget_s, index=index, notes=notes,
                           progress=progress, fit_record=fit_record)
        clock.lap("refit")

    heldout = None
    if index.test:
        from search.ensemble import evaluate_model

        say(f"fit: evaluating on test/ ({len(index.test)} images)")
        result = evaluate_model(shipped.model_dir, settings.data)
        heldout = {k: result[k] for k in ("accuracy", "balanced_accuracy", "macro_f1") if k in result}
        heldout["images"] = len(index.test)
    else:
        notes.append("no test/: no held-out score (add DATA/test/ to get one)")
    clock.lap("evaluate")
    if started_ray:  # its shutdown is this command's time too (the shared session of tests is left alone)
        _stop_ray()
        clock.lap("exit")

    return FitSummary(
        study=name, preset=chosen.name, budget_s=budget_s, model_dir=str(shipped.model_dir), shipped=shipped.name,
        kind=shipped.kind, trials=shipped.trials, metric=metric, val_score=shipped.val_score, heldout=heldout,
        latency_ms=shipped.latency_ms, size_mb=round((shipped.model_dir / "model.pt").stat().st_size / 2**20, 2),
        report=str(paths["report"]) if "report" in paths else None,
        best_config=str(paths["best"]) if "best" in paths else None,
        phases=tuple((k, round(v, 3)) for k, v in clock.phases.items()), wall_seconds=round(clock.total_s, 3),
        searched=searched, refit=did_refit, notes=tuple([*([shipped.note] if shipped.note else []), *notes]),
    )


def default_study_name(data: str | os.PathLike) -> str:
    """The study `fit` uses when none is named: the dataset folder's (or label file's) name.

    Characters a study name may not hold become '-', runs of dots one dot; a name changed that way
    gets a short hash of the original, so that "фото" and "照片" (or "a...b" and "a.b") are not
    one study.
    """
    p = Path(os.path.abspath(data))
    stem = p.stem if p.suffix.lower() in (".csv", ".tsv") else p.name
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "-", stem)).strip("-.")[:180]
    if name == stem:
        return name
    suffix = hashlib.sha256(stem.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{name or 'fit'}-{suffix}"


def _check_same_data(study: optuna.Study, index: DatasetIndex, *, allow_changed_data: bool) -> str | None:
    """Refuses to ship a finished study's model for a dataset that is not the one it searched.

    Returns:
        None when DATA is the study's dataset; with `allow_changed_data` and the same classes, the
        warning to give; otherwise a `TLSearchError` naming both datasets and the ways on.
    """
    from search.config import printable

    attrs = study.user_attrs
    recorded = attrs.get("dataset_fingerprint")
    if not recorded or recorded == index.fingerprint:
        return None
    name = study.study_name
    was = f"{printable(attrs.get('dataset') or 'another dataset')} (fingerprint {recorded})"
    now = f"{printable(index.source)} (fingerprint {index.fingerprint})"
    same_classes = list(attrs.get("class_names") or []) == list(index.classes)
    if same_classes and allow_changed_data:
        return f"study {name!r} searched {was}; its model ships for {now} as --allow-changed-data asks"
    how = f"give a new --study NAME to search {index.source}" + (
        ", or --allow-changed-data to ship the study's model and score it on this data" if same_classes else "")
    raise TLSearchError(f"study {name!r} was searched on {was}, not on {now}: {how}")


def _unused_options(done: dict[str, Any], *, preset: Preset, space: Any) -> str | None:
    """What a finished study cannot take, in one phrase; None: nothing given is left unused."""
    unused = []
    if space is not None:
        unused.append("--space is not used")
    searched_with = done.get("preset")
    if searched_with and searched_with != preset.name:
        unused.append(f"it searched the {searched_with!r} preset's space ({preset.name!r} sets how it ships only)")
    unused.append("--time-budget covers shipping and evaluating only")
    return "; ".join(unused)


def _settings(data: str | os.PathLike, preset: Preset, *, study: str | None, space: Any, weights_dir: str | None,
              options: dict[str, Any], budget_s: float | None = None) -> tuple[SearchSettings, DatasetIndex]:
    """The search's settings (the preset's space, or the user's) and the dataset on its split."""
    from search.data import scan_dataset
    from search.settings import SearchSettings
    from search.space import SearchSpace, default_space_at_hand, for_dataset, load_space

    opts = dict(options)
    opts.setdefault("trials", FIT_TRIALS)
    if "gpus_per_trial" not in opts:
        import torch

        opts["gpus_per_trial"] = 1.0 if torch.cuda.is_available() else 0.0
    settings = SearchSettings(study=study or default_study_name(data), data=str(data), weights_dir=weights_dir, **opts)
    index = scan_dataset(settings.data, val_fraction=settings.val_fraction, seed=settings.seed)
    if space is not None:  # --space overrides the preset's space; its ship policy stays
        settings = settings.replace(space=space if isinstance(space, SearchSpace) else load_space(space))
    else:  # the preset's space, built here so that its backbones' weights and pool size are known
        base = None
        if settings.pretrained:
            base, note = default_space_at_hand(gpu=settings.gpus_per_trial > 0, weights_dir=weights_dir)
            if note:
                print(f"note: {note}", file=sys.stderr)
        from search.imbalance import class_counts
        from search.space import default_space

        base = base or default_space(gpu=settings.gpus_per_trial > 0)
        counts = class_counts([label for _, label in index.train], len(index.classes))
        more = (more_backbones_at_hand(weights_dir=weights_dir, image_size=_image_size(base))
                if preset.more_backbones and settings.pretrained else [])
        settings = settings.replace(space=for_dataset(
            preset_space(preset, base, more=more), counts, budget_s=budget_s,
            median_side=index.image_stats.median_side if index.image_stats else 0, cpus=os.cpu_count() or 1))
    return settings, index


def _image_size(space: SearchSpace) -> int | None:
    """The space's image size when it is one constant (the default spaces'), else None."""
    from search.space import Constant

    p = space.param_dict.get("image_size")
    return int(p.value) if isinstance(p, Constant) else None


def _existing_study(settings: SearchSettings) -> optuna.Study | None:
    from search.studies import load_study

    try:
        return load_study(settings.study, storage=settings.storage_url)
    except TLSearchError:
        return None


def _latencies(study: optuna.Study) -> list[float | None]:
    return [t.user_attrs.get("latency_ms") for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]


def _fetch_weights(settings: SearchSettings) -> None:
    """The space's pretrained weights, fetched now where they are not at hand (the search's own
    pre-flight then finds them), so that a download is measured before the search's budget is set."""
    from search.runner import check_space_weights

    if settings.space is not None:
        check_space_weights(settings.space, settings.weights_dir)


def _start_ray(settings: SearchSettings, *, verbose: bool) -> bool:
    """Starts Ray before the search's budget is set, so its start-up is measured, not guessed.

    Returns:
        Whether this call started it (a session already running, as in tests, is not this fit's).
    """
    import logging

    from search.runner import start_ray

    # Ray's start-up lines stay off the terminal as in a search (the study's folder, where the
    # search logs them, may not exist yet). ray.init sets its loggers' levels itself, hence the
    # process-wide switch, for the few seconds of the start only.
    if not verbose:
        logging.disable(logging.WARNING)
    try:
        return start_ray(settings, verbose=verbose)
    finally:
        logging.disable(logging.NOTSET)


def _stop_ray() -> None:
    from search.runner import stop_ray

    stop_ray()


def _search(settings: SearchSettings, *, trial_fn: Any, progress: bool, verbose: bool, preset: str) -> None:
    """The search; a finished one (not interrupted) is recorded in the study for the next `fit`."""
    from search.runner import run_search
    from search.studies import load_study

    summary = run_search(settings, trial_fn=trial_fn, progress=progress, verbose=verbose)
    if summary.interrupted:
        print(f"interrupted; run the same tlsearch fit again, or tlsearch resume {settings.study}", file=sys.stderr)
        raise KeyboardInterrupt
    if summary.best_trial is None:  # nothing to ship: the next fit searches again
        return
    load_study(settings.study, storage=settings.storage_url).set_user_attr(
        "fit", {"searched": True, "budget_s": settings.time_budget_s, "finished": summary.finished, "preset": preset})


def fit_reserve(settings: SearchSettings, index: DatasetIndex, *, budget_s: float, preset: Preset, refit: bool,
                study: optuna.Study | None = None) -> Reserve:
    """What `fit` keeps from the search, from the data, the space and what the study measured.

    Before any trial, the ensemble's pool is the one the search will keep: `keep_checkpoints`
    trials of each backbone of the space, at the allowance per image.
    """
    gpu = settings.gpus_per_trial > 0
    latencies = _latencies(study) if study is not None else []
    ensemble_s = 0.0
    if preset.ensemble:
        from search.space import backbones_in

        kept = _kept(study) if study is not None else []
        if not kept and settings.space is not None:
            kept = [(b, None) for b in backbones_in(settings.space) for _ in range(max(1, settings.keep_checkpoints))]
        ensemble_s = ensemble_seconds(val_images=len(index.val), test_images=len(index.test),
                                      members=ensemble_members(kept), gpu=gpu)
    return plan_reserve(budget_s=budget_s, test_images=len(index.test),
                        per_image_s=per_image_seconds(latencies, gpu=gpu), ensemble_s=ensemble_s, refit=refit)


def _kept(study: optuna.Study) -> list[tuple[str, float | None]]:
    """(backbone, latency_ms) of each trial the ensemble procedure keeps (`kept_trials`)."""
    from search.ensemble import kept_trials

    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    return [(t.config.backbone, trials[t.number].user_attrs.get("latency_ms")) for t in kept_trials(study)]


def _ship(study: optuna.Study, preset: Preset, out: Path, *, data: str, left_s: float, index: DatasetIndex, gpu: bool,
          progress: bool, notes: list[str], allow_changed_data: bool = False) -> Shipped:
    """The ensemble procedure when the preset tries it and its estimate fits; else the best trial."""
    if preset.ensemble:
        kept = _kept(study)
        need = ensemble_seconds(val_images=len(index.val), test_images=len(index.test),
                                members=ensemble_members(kept), gpu=gpu)
        # The slowest kept member bounds what ships, and so the evaluation after it.
        evaluate = evaluate_seconds(test_images=len(index.test),
                                    per_image_s=per_image_seconds([lat for _, lat in kept], gpu=gpu))
        if fits(need, left_s=left_s - evaluate):
            return ship_ensemble(study, out, data=data, progress=progress, allow_changed_data=allow_changed_data)
        notes.append(f"ensembles not tried: about {need:.0f}s needed for {len(kept)} kept trials, "
                     f"{max(0.0, left_s - evaluate):.0f}s left")
    return ship_trial(study, out)


def refit_estimate(trial: optuna.trial.FrozenTrial, index: DatasetIndex, *, cache: bool) -> float:
    """`refit_seconds` of a trial, from what it measured: its images/s and its batch-1 latency."""
    from search.config import TrialConfig
    from search.studies import TrialRecord

    rec = TrialRecord.from_trial(trial)
    cfg = TrialConfig.from_dict(rec.config or {})
    rates = [c.get("images_per_s") for c in rec.curve if isinstance(c.get("images_per_s"), (int, float))]
    rate = rec.images_per_s or (sum(rates) / len(rates) if rates else None)
    from search.backbones import num_stages, resolve_depth

    try:
        frozen = resolve_depth(cfg.backbone, cfg.freeze_depth)
        probe = cfg.lp_epochs if cfg.lp_epochs > 0 and frozen < num_stages(cfg.backbone) else 0
    except TLSearchError:
        frozen, probe = 0, 0
    return refit_seconds(
        train_images=len(index.train), val_images=len(index.val), epochs=cfg.epochs, probe_epochs=probe,
        train_s_per_image=1.0 / rate if rate and rate > 0 else None,
        forward_s_per_image=(rec.latency_ms or 0.0) / 1000.0,
        cached=bool(cache and cfg.deterministic_input and frozen > 0),
    )


def _refit(study: optuna.Study, shipped: Shipped, settings: SearchSettings, *, clock: PhaseClock, budget_s: float,
           index: DatasetIndex, notes: list[str], progress: bool, fit_record: dict[str, Any]) -> bool:
    """Trains the shipped trial's config on train+val into the model folder, when it fits."""
    from search.config import dump_yaml
    from search.export import trial_record
    from search.trial import train

    if shipped.kind != "trial":
        notes.append("--refit: an ensemble shipped; it is kept as chosen (a refit trains one trial's config)")
        return False
    trial = study.trials[shipped.trials[0]]
    need = refit_estimate(trial, index, cache=settings.cache)
    left = clock.left_s(budget_s) - EXIT_S - evaluate_seconds(
        test_images=len(index.test), per_image_s=per_image_seconds([shipped.latency_ms], gpu=settings.gpus_per_trial > 0))
    if not fits(need, left_s=left):
        notes.append(f"--refit skipped: about {need:.0f}s needed, {max(0.0, left):.0f}s left; "
                     "the trial's own weights ship")
        return False
    if progress:
        _say(f"fit: refitting trial {trial.number}'s config on train+val (about {need:.0f}s)")
    target = shipped.model_dir
    with tempfile.TemporaryDirectory(prefix=".refit-", dir=target.parent) as tmp:
        config = dump_yaml(trial_record(study, trial), Path(tmp, "config.yaml"))
        folder = Path(tmp, "model")
        # The machine's CPUs, not the trial's own thread count: a refit is the only work left, and
        # exact reproduction of the trial is not its point (it trains on more images).
        train(config, settings.data, out=folder, weights_dir=settings.weights_dir, cache=settings.cache, full=True,
              progress=progress, threads=_cpus())
        stamp(folder, {"study": study.study_name, "trials": [trial.number], "refit_of": trial.number,
                       "fit": fit_record})
        # The trial's folder is replaced only once the refit one is whole.
        shutil.rmtree(target)
        folder.rename(target)
    notes.append(f"--refit: trial {trial.number}'s config trained again on train+val; its validation score is "
                 "the trial's (the refit saw val)")
    return True


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _quietly(fn: Any, *args: Any) -> Any:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
