"""The `tlsearch` command: parse, call one function, print, exit code.

Exit codes: 0 success; 1 the work failed; 2 bad usage or bad input (one line on stderr, no
traceback); 130 interrupted by Ctrl-C (the study stays resumable). Modules load lazily so that
`tlsearch --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from search.config import TLSearchError

from search.outputs import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, is_interruption


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise TLSearchError(f"{message} (see {self.prog} --help)")


def _add_search_options(p: argparse.ArgumentParser, *, resume: bool = False) -> None:
    d = argparse.SUPPRESS if resume else None
    p.add_argument("--trials", type=int, default=d, help="total trials the study should reach (default 20)")
    p.add_argument("--time-budget", default=d, help="wall-clock limit of this run, e.g. 30m, 2h")
    p.add_argument("--max-epochs", type=int, default=d, help="ASHA's largest rung (epochs of a full trial)")
    p.add_argument("--gpus-per-trial", type=float, default=d, help="GPUs per trial, fractions allowed")
    p.add_argument("--cpus-per-trial", type=float, default=d, help="CPUs per trial (= torch threads)")
    p.add_argument("--max-concurrent", type=int, default=d, help="trials at once (default: fits the machine)")
    p.add_argument("--address", default=d, help="join an existing Ray cluster (HOST:PORT or auto)")
    p.add_argument("--weights-dir", default=d, help="folder of <model name>.pth state dicts")
    p.add_argument("--keep-checkpoints", type=int, default=d, metavar="K",
                   help="checkpoints of the best K COMPLETE trials kept per backbone (default 3); others are removed")
    p.add_argument("--no-progress", action="store_true", help="print nothing while the search runs (the report still refreshes)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's and Optuna's own messages (otherwise in studies/NAME/tlsearch.log)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `tlsearch` and all its commands."""
    p = _Parser(
        prog="tlsearch",
        description="Backbone and hyperparameter search for transfer learning in image classification.",
    )
    from search import __version__

    p.add_argument("--version", action="version", version=f"tlsearch {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("demo", help="make a demo dataset, search it, report and export the best config")
    c.add_argument("--dir", default=".", help="working folder (data/, studies/, reports/ go here)")
    c.add_argument("--weights-dir", default=None, help="folder of <model name>.pth state dicts")
    c.add_argument("--trials", type=int, default=None, help="trials to run (default 10)")
    c.add_argument("--no-progress", action="store_true", help="print nothing while the search runs")
    c.add_argument("--verbose", action="store_true",
                   help="show Ray's and Optuna's own messages (otherwise in studies/demo/tlsearch.log)")

    c = sub.add_parser("run", help="search backbones and hyperparameters on a dataset")
    c.add_argument("data", metavar="DATA",
                   help="ImageFolder: DATA/train + DATA/val, or class folders; or a CSV/TSV of path,label[,split]")
    c.add_argument("--study", required=True, help="study name (an existing study is continued)")
    c.add_argument("--space", default=None, help="search space YAML (default: built-in for this hardware)")
    _add_search_options(c)
    c.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///studies/NAME.db)")
    c.add_argument("--no-pretrained", action="store_true", help="random initialisation for every trial")
    c.add_argument("--no-cache", action="store_true", help="no image or feature cache")
    c.add_argument("--seed", type=int, default=None, help="sampler and data-split seed (default 0)")
    c.add_argument("--sampler", default=None, help="tpe (default) | random | cmaes | qmc")
    c.add_argument("--metric", default=None,
                   help="the objective trials are ranked by: val_acc (default) | val_balanced_acc | val_macro_f1 | "
                        "val_loss (minimised)")
    c.add_argument("--val-fraction", type=float, default=None, help="validation share when DATA has no val/ (default 0.2)")

    c = sub.add_parser("fit", help="search, ship and evaluate within one time budget: a folder of images in, "
                                   "a model folder out")
    c.add_argument("data", metavar="DATA", help="the dataset, as tlsearch run takes it")
    c.add_argument("--time-budget", required=True, help="wall-clock limit of the whole command, e.g. 10m, 1h")
    from search.pipeline import DEFAULT_PRESET, PRESETS

    c.add_argument("--preset", default=DEFAULT_PRESET,
                   help="; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
                   + f" (default {DEFAULT_PRESET})")
    c.add_argument("--study", default=None, help="study name (default: DATA's folder name); an existing one is reused")
    c.add_argument("--space", default=None, help="search space YAML instead of the preset's")
    c.add_argument("--out", default=None, help="model folder (default models/STUDY)")
    c.add_argument("--refit", action="store_true",
                   help="train the shipped config again on train+val, within the budget (skipped, with a note, "
                        "when it does not fit)")
    c.add_argument("--weights-dir", default=None, help="folder of <model name>.pth state dicts")
    c.add_argument("--no-progress", action="store_true", help="print only the summary")
    c.add_argument("--verbose", action="store_true", help="show Ray's and Optuna's own messages")
    c.add_argument("--json", action="store_true", help="the summary as one JSON object on stdout")

    c = sub.add_parser("resume", help="continue an interrupted search with its stored settings")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--storage", default=None, help="the study's storage URL, when not the default")
    _add_search_options(c, resume=True)

    c = sub.add_parser("studies", help="list studies: trials by state, best value, best backbone")
    c.add_argument("--storage", default=None)
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("show", help="the leaderboard of a study")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--top", type=int, default=None)
    c.add_argument("--storage", default=None)
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("report", help="write the HTML report of a study")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--storage", default=None)

    c = sub.add_parser("export", help="write the best (or a chosen) trial's config")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--trial", type=int, default=None)
    c.add_argument("--out", default=None)
    c.add_argument("--format", default="yaml", choices=("yaml", "json"))
    c.add_argument("--pareto", action="store_true", help="export the accuracy/size Pareto set")
    c.add_argument("--storage", default=None)

    c = sub.add_parser("train", help="train one config and save a deployable model")
    c.add_argument("config", metavar="CONFIG")
    c.add_argument("data", metavar="DATA")
    c.add_argument("--out", default=None, help="model folder (default models/<config name>)")
    c.add_argument("--weights-dir", default=None)
    c.add_argument("--no-cache", action="store_true")
    c.add_argument("--full", action="store_true", help="train on train+val (the final fit)")
    c.add_argument("--val-fraction", type=float, default=None,
                   help="validation share of a random split (default: the study's, recorded in CONFIG; else 0.2)")
    c.add_argument("--seed", type=int, default=None,
                   help="seed of a random split, not the training seed (default: the study's; else 0)")
    c.add_argument("--allow-changed-data", action="store_true",
                   help="train even when DATA is not the dataset the study searched")
    c.add_argument("--threads", type=int, default=None, help="CPU threads (default: the trial's own, if recorded)")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("predict", help="classify images with a saved model")
    c.add_argument("model", metavar="MODEL")
    c.add_argument("images", metavar="IMAGE", nargs="+")
    c.add_argument("--top", type=int, default=1)
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("ensemble", help="soups, ensembles, flip TTA and temperature over a study's kept trials; "
                                        "chosen on validation, scored on held-out data; writes the shipped model")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--max-members", type=int, default=5, metavar="K",
                   help="greedy ensemble selection steps, members counted with repetition (default 5)")
    c.add_argument("--max-latency-ms", type=float, default=None, metavar="X",
                   help="ship only a candidate at most this slow (batch 1, this machine); "
                        "trials slower alone are left out")
    c.add_argument("--out", default=None, help="model folder (default models/NAME-ensemble)")
    c.add_argument("--data", default=None, help="the dataset, when not where the study recorded it")
    c.add_argument("--allow-changed-data", action="store_true",
                   help="go on when DATA is not the dataset the study searched")
    c.add_argument("--storage", default=None)
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("evaluate", help="score a saved model on DATA's test split: accuracy, balanced accuracy, "
                                        "per-class precision, recall and F1, confusion matrix")
    c.add_argument("model", metavar="MODEL")
    c.add_argument("data", metavar="DATA")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("check", help="validate a dataset and print what was found: counts, imbalance, "
                                     "image sizes and modes, duplicates across splits, bad files")
    c.add_argument("data", metavar="DATA", help="dataset folder, or a CSV/TSV of path,label[,split]")
    c.add_argument("--val-fraction", type=float, default=0.2)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("cache", help="what the image/feature caches and kept checkpoints hold; frees them")
    c.add_argument("--clear", action="store_true",
                   help="remove cached images and features (rebuilt when needed) and stale temporary files")
    c.add_argument("--checkpoints", action="store_true",
                   help="with --clear: also remove trial checkpoints (never those of a running search)")
    c.add_argument("--study", default=None, help="with --checkpoints: only this study's checkpoints")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("backbones", help="list backbones, their stages, sizes and weights")
    c.add_argument("pattern", nargs="?", default="*")
    c.add_argument("--weights-dir", default=None)
    c.add_argument("--json", action="store_true")
    return p


# ---------------------------------------------------------------------------------------------
# Commands: each takes the parsed args and returns an exit code.


def cmd_check(a: argparse.Namespace) -> int:
    from search.data import format_summary, scan_dataset

    index = scan_dataset(a.data, val_fraction=a.val_fraction, seed=a.seed, warn=None if not a.json else _quiet)
    if a.json:
        _print_json(index.summary())
    else:
        print(format_summary(index))
    return EXIT_OK


def cmd_backbones(a: argparse.Namespace) -> int:
    from search.backbones import backbones_table

    rows = backbones_table(pattern=a.pattern, weights_dir=a.weights_dir)
    if a.json:
        _print_json(rows)
        return EXIT_OK
    print(f"{'backbone':<26} {'params':>8}  {'weights':<10} stages")
    for r in rows:
        params = f"{r['params'] / 1e6:.1f}M" if r.get("params") else "?"
        weights = str(r.get("weights", "?")).split(" ", 1)[0]  # "file <path>": the path is in --json
        print(f"{r['name']:<26} {params:>8}  {weights:<10} {len(r['stages'])}: {', '.join(r['stages'])}")
    print("\nAny timm model works too, as timm/<name> (e.g. timm/tf_efficientnet_lite0).")
    return EXIT_OK


def cmd_cache(a: argparse.Namespace) -> int:
    from search import disk
    from search.config import check_study_name
    from search.data import default_cache_dir

    if (a.checkpoints or a.study) and not a.clear:
        raise TLSearchError("--checkpoints and --study only go with --clear (tlsearch cache --clear --checkpoints)")
    if a.study is not None:
        check_study_name(a.study)
    cache_dir, studies_dir = default_cache_dir(), Path("studies")
    cleared = None
    if a.clear:
        cleared = disk.clear(cache_dir, studies_dir, checkpoints=a.checkpoints, study=a.study)
    usage = disk.cache_usage(cache_dir, studies_dir)
    if a.json:
        _print_json({**usage, "cleared": cleared} if cleared is not None else usage)
        return EXIT_OK
    size = disk.format_bytes
    source = " ($TLSEARCH_CACHE)" if os.environ.get("TLSEARCH_CACHE") else ""
    rows = [("images", usage["images"], "arrays", f"budget {size(usage['images']['budget_bytes'])}"),
            ("features", usage["features"], "files", f"budget {size(usage['features']['budget_bytes'])}"),
            ("temporary", usage["temporary"], "files", "left by stopped processes; --clear removes them")]
    print(f"cache folder {usage['cache_dir']}{source}")
    for name, u, unit, note in rows:
        print(f"  {name:<12} {u['files']:>6} {unit:<7} {size(u['bytes']):>10}  ({note})")
    print(f"checkpoints under {studies_dir.resolve()}" + ("" if usage["checkpoints"] else ": none"))
    for c in usage["checkpoints"]:
        print(f"  {c['study']:<12} {c['files']:>6} {'files':<7} {size(c['bytes']):>10}")
    print(f"total {size(usage['total_bytes'])}")
    if cleared is not None:
        print(f"cleared {cleared['files']} files, freed {size(cleared['bytes'])}")
        kept = sum(c["files"] for c in usage["checkpoints"])
        if kept and not a.checkpoints:
            print(f"checkpoints kept ({kept} files); add --checkpoints to remove them too")
    return EXIT_OK


def cmd_train(a: argparse.Namespace) -> int:
    from search.trial import train

    out = a.out or str(Path("models", Path(a.config).stem))
    summary = train(
        a.config, a.data, out=out, weights_dir=a.weights_dir, cache=not a.no_cache, full=a.full,
        val_fraction=a.val_fraction, seed=a.seed, allow_changed_data=a.allow_changed_data, progress=True,
        threads=a.threads,
    )
    if a.json:
        _print_json(summary)
    else:
        print(
            f"val_acc {summary['val_acc']:.4f}  val_loss {summary['val_loss']:.4f}  "
            f"{summary['epochs']} epochs in {summary['seconds']:.1f}s\nmodel saved to {summary['model_dir']}"
        )
    return EXIT_OK


def cmd_predict(a: argparse.Namespace) -> int:
    from search.export import predict

    rows = predict(a.model, a.images, top=a.top)
    if a.json:
        _print_json(rows)
    else:
        for r in rows:
            if "error" in r:
                print(f"{r['image']}\terror: {r['error']}")
            else:
                print(f"{r['image']}\t" + "\t".join(f"{c} {p:.3f}" for c, p in r["top"]))
    return EXIT_FAILED if any("error" in r for r in rows) else EXIT_OK


def cmd_ensemble(a: argparse.Namespace) -> int:
    from search.config import check_study_name
    from search.ensemble import build_ensemble, format_ensemble
    from search.report import write_report

    check_study_name(a.name)
    summary = build_ensemble(a.name, max_members=a.max_members, max_latency_ms=a.max_latency_ms, out=a.out,
                             data=a.data, storage=a.storage, allow_changed_data=a.allow_changed_data,
                             progress=not a.json)
    # The study's report gets its ensembles section from the summary just written next to the study.
    page = write_report(a.name, storage=a.storage)
    if a.json:
        _print_json(summary)
    else:
        print(format_ensemble(summary))
        print(f"report: {page}")
    return EXIT_OK


def cmd_evaluate(a: argparse.Namespace) -> int:
    from search.ensemble import evaluate_model, format_evaluation

    result = evaluate_model(a.model, a.data)
    if a.json:
        _print_json(result)
    else:
        print(format_evaluation(result))
    return EXIT_OK


def cmd_run(a: argparse.Namespace) -> int:
    from search.outputs import after_search
    from search.runner import run_search
    from search.settings import SearchSettings
    from search.space import load_space

    # Options the user gave; the rest keep SearchSettings' defaults (written there, once).
    options = {**_search_options(a), "seed": a.seed, "sampler": a.sampler, "val_fraction": a.val_fraction,
               "metric": a.metric}
    settings = SearchSettings(
        study=a.study,
        data=a.data,
        storage=a.storage,
        space=load_space(a.space) if a.space else None,
        pretrained=not a.no_pretrained,
        cache=not a.no_cache,
        **{k: v for k, v in options.items() if v is not None},
    )
    summary = run_search(settings, progress=not a.no_progress, verbose=a.verbose)
    return after_search(summary, settings.study, settings.storage)


def cmd_fit(a: argparse.Namespace) -> int:
    from search.outputs import _short
    from search.pipeline import fit, format_fit

    quiet = a.no_progress or a.json
    summary = fit(a.data, a.time_budget, preset=a.preset, study=a.study, space=a.space,
                  out=a.out, refit=a.refit, weights_dir=a.weights_dir, progress=not quiet, verbose=a.verbose)
    if a.json:
        _print_json(summary.to_dict())
    else:
        print(format_fit(summary, short=_short))
    return EXIT_OK


def _search_options(a: argparse.Namespace) -> dict[str, Any]:
    """The options `run` and `resume` share, as SearchSettings fields (None or absent: not given)."""
    from search.config import parse_duration

    keys = ("trials", "max_epochs", "cpus_per_trial", "gpus_per_trial", "max_concurrent", "address", "weights_dir",
            "keep_checkpoints")
    out = {k: getattr(a, k) for k in keys if hasattr(a, k)}
    if getattr(a, "time_budget", None) is not None:
        out["time_budget_s"] = parse_duration(a.time_budget)
    return out


def cmd_resume(a: argparse.Namespace) -> int:
    from search.outputs import after_search
    from search.runner import resume_search

    summary = resume_search(a.name, storage=a.storage, progress=not a.no_progress, verbose=a.verbose,
                            **_search_options(a))
    return after_search(summary, a.name, a.storage)


def cmd_demo(a: argparse.Namespace) -> int:
    from search.demo import run_demo

    return run_demo(Path(a.dir), weights_dir=a.weights_dir, trials=a.trials, progress=not a.no_progress,
                    verbose=a.verbose)


def cmd_studies(a: argparse.Namespace) -> int:
    from search.config import printable
    from search.studies import list_studies

    rows = list_studies(storage=a.storage)
    if a.json:
        _print_json(rows)
        return EXIT_OK
    if not rows:
        print("no studies (run one with: tlsearch run DATA --study NAME)")
    for r in rows:
        counts = ", ".join(f"{k.lower()} {v}" for k, v in r.get("states", {}).items())
        best = f"{r['best_value']:.4f} ({r.get('best_backbone')})" if r.get("best_value") is not None else "-"
        # Names come from the storage, which another user may have written: no control characters.
        print(printable(f"{r['name']:<24} {counts:<40} best {best}"))
    return EXIT_OK


def cmd_show(a: argparse.Namespace) -> int:
    from search.studies import (
        format_leaderboard,
        leaderboard,
        load_study,
        study_summary,
    )

    study = load_study(a.name, storage=a.storage)
    if a.json:
        summary = study_summary(study)  # it takes no `top`: cut its leaderboard (best first) here
        if a.top is not None:
            summary["leaderboard"] = summary["leaderboard"][: max(0, a.top)]
        _print_json(summary)
    else:
        print(format_leaderboard(leaderboard(study), top=a.top))
    return EXIT_OK


def cmd_report(a: argparse.Namespace) -> int:
    from search.report import write_report

    print(write_report(a.name, storage=a.storage))
    return EXIT_OK


def cmd_export(a: argparse.Namespace) -> int:
    from search.export import export_trial

    for path in export_trial(a.name, trial=a.trial, out=a.out, fmt=a.format, pareto=a.pareto, storage=a.storage):
        print(path)
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": cmd_demo,
    "run": cmd_run,
    "fit": cmd_fit,
    "resume": cmd_resume,
    "studies": cmd_studies,
    "show": cmd_show,
    "report": cmd_report,
    "export": cmd_export,
    "train": cmd_train,
    "predict": cmd_predict,
    "check": cmd_check,
    "ensemble": cmd_ensemble,
    "evaluate": cmd_evaluate,
    "backbones": cmd_backbones,
    "cache": cmd_cache,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `tlsearch`; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except TLSearchError as e:
        print(f"tlsearch: error: {_one_line(e)}", file=sys.stderr)
        _print_run_log()
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tlsearch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:  # the work failed: one line, the traceback only on request
        if is_interruption(e):  # e.g. a storage write that Ctrl-C cut short
            print("tlsearch: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if os.environ.get("TLSEARCH_DEBUG"):
            raise
        print(f"tlsearch: failed: {type(e).__name__}: {_one_line(e)} (TLSEARCH_DEBUG=1 shows the traceback)", file=sys.stderr)
        _print_run_log()
        return EXIT_FAILED


def _print_run_log() -> None:
    """After a failed search's error line: where Ray's and Optuna's messages of that run are."""
    from search.outputs import run_log

    path = run_log()
    if path is not None:
        print(f"log: {path}", file=sys.stderr)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _quiet(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
