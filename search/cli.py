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

from search._parser import build_parser
from search.outputs import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, is_interruption


# ---------------------------------------------------------------------------------------------
# Commands: each takes the parsed args and returns an exit code.


def cmd_check(a: argparse.Namespace) -> int:
    from search.data import format_summary, scan_dataset

    if not a.labels and any(v is not None for v in (a.backbone, a.image_size, a.folds, a.weights_dir)):
        raise TLSearchError("--backbone, --image-size, --folds and --weights-dir only go with --labels")
    if a.labels:
        from search.label_issues import require_cleanlab

        require_cleanlab()  # before any scan: the missing package is said at once
    index = scan_dataset(a.data, val_fraction=a.val_fraction, seed=a.seed, warn=None if not a.json else _quiet)
    summary = index.summary() if a.json else None
    near_lines: list[str] = []
    if not a.no_near_duplicates:
        from search.data import format_near_duplicates, near_duplicates

        near = near_duplicates(index)
        if summary is not None:
            summary["near_duplicates_across_splits"] = [d.to_dict() for d in near]
        near_lines = format_near_duplicates(near, root=index.root)
    lines = [format_summary(index, more_health=near_lines)]
    if a.labels:
        from search import label_issues as li

        result = li.find_label_issues(
            index, backbone=a.backbone or li.DEFAULT_LABEL_BACKBONE, image_size=a.image_size or li.DEFAULT_LABEL_IMAGE_SIZE,
            folds=a.folds or li.DEFAULT_FOLDS, weights_dir=a.weights_dir, seed=a.seed,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
        li.keep(result)
        if summary is not None:
            summary["label_issues"] = result.to_dict()
        lines += ["", *li.format_label_issues(result, root=index.root)]
    if summary is not None:
        _print_json(summary)
    else:
        print("\n".join(lines))
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

    from search.pipeline import process_start

    quiet = a.no_progress or a.json
    summary = fit(a.data, a.time_budget, preset=a.preset, study=a.study, space=a.space,
                  out=a.out, refit=a.refit, weights_dir=a.weights_dir, allow_changed_data=a.allow_changed_data,
                  progress=not quiet, verbose=a.verbose, started_at=process_start(), seed=a.seed)
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
    from search.outputs import forget_run_log

    forget_run_log()  # a search an earlier call in this process ran is not this command's
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
