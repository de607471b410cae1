"""The `tlsearch` command line's parser: every command, its arguments and their help
(`search.cli` parses with it, then calls one function per command)."""

from __future__ import annotations

import argparse

from search.config import TLSearchError


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
    c.add_argument("--seed", type=int, default=0, help="sampler and split seed of a new study (default 0)")
    c.add_argument("--allow-changed-data", action="store_true",
                   help="a study that finished its search on other data with the same classes ships its model, "
                        "scored on DATA's test/")
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
    c.add_argument("--labels", action="store_true",
                   help="also rank the train/val images whose label looks wrong (out-of-fold linear probe on "
                        "one backbone's features, then cleanlab; needs: pip install 'tlsearch[labels]')")
    c.add_argument("--backbone", default=None, metavar="NAME",
                   help="with --labels: whose pretrained features (default timm/tf_efficientnet_lite0)")
    c.add_argument("--image-size", type=int, default=None, metavar="PX", help="with --labels: input side (default 128)")
    c.add_argument("--folds", type=int, default=None, metavar="K", help="with --labels: out-of-fold folds (default 5)")
    c.add_argument("--weights-dir", default=None, metavar="DIR",
                   help="with --labels: folder of <model name>.pth pretrained weights")
    c.add_argument("--no-near-duplicates", action="store_true",
                   help="skip the search for resized, re-encoded or trimmed copies across splits")

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
