"""tlsearch's performance, measured side by side in one run on the same data.

This file runs the parts; each part is a module beside it (shared helpers in _common.py, the
table of a run in _table.py): a race.py, b feature_cache.py, c image_cache.py, d overhead.py,
e concurrency.py, f memory.py, g defaults.py, h imbalance.py, i ensembles.py.

    python -m benchmarks.bench                 # everything (~15 min on 2 cores)
    python -m benchmarks.bench --quick         # a smoke run (~3 min)
    python -m benchmarks.bench --only b,c      # some parts

Parts (each on ../shared/data/hymenoptera with ../shared/weights/tf_efficientnet_lite0.pth):

  a. tlsearch (`run_search`) vs a hand-written Optuna + torch loop (benchmarks/handwritten.py), the
     same space and time budget: time to reach a target val_acc, best val_acc within the budget;
  b. a head-only trial on cached frozen features vs the same trial with cache=False;
  c. images/s of the decoded-image cache vs decoding every JPEG with PIL;
  d. orchestration overhead of `run_search` over many short trials, and over a few (the one-off
     start-up's share), with and without Ray reusing trial workers;
  e. on this machine: 1 trial x all CPUs vs one trial per CPU (the default concurrency);
  f. peak memory of a first (cold) head-only trial, which builds the caches, on generated datasets of
     5k, 10k and 20k 400x300 JPEG photos (benchmarks/_memory.py): it must stay flat as the dataset
     grows, apart from the cached features it holds;
  h. on an imbalanced copy of hymenoptera (bees cut to 1 in 6 in train, val unchanged): macro-F1 of
     the best trial of a search with imbalance handling (loss weighting, class-balanced sampler)
     in the space vs the same search without, both ranked by val_macro_f1, same trials, several
     seeds run interleaved (the machine's load falls on both alike).

    python -m benchmarks.bench --defaults      # the search's defaults, old vs new (part g, on its own)

  g. the same search with the defaults as they were (benchmarks/spaces/old_default.yaml, the
     linear probe alone as warm start, no budget-aware scheduling, one ASHA grace for all) and
     with the new ones (the default space at hand, fine-tuning priors, the recipe portfolio,
     budget-aware scheduling, a longer grace for fine-tuning trials), same data, same time budget,
     several seeds, the arms interleaved, every run from cold caches: best value reached, time to
     95% / 99% of the best either arm reached in that seed, and fine-tuning trials started /
     finished / pruned. Writes benchmarks/results/defaults.json and .md (defaults-quick.* with --quick).
     `--arms new,plain` puts the search a user writes beside them (benchmarks/plain.py: Optuna's TPE
     and MedianPruner over the tutorial's loop, one trial at a time on every core), with the time
     each arm took to reach the plain search's best.

    python -m benchmarks.bench --ensembles     # soups and ensembles vs the best trial (part i, on its own)

  i. a real search (Lite0 and Lite1, heads alone and partly fine-tuned) on hymenoptera with a test/
     split made from half of each class of its val/, and on cifar10_mini (its own test/, val drawn
     from train/), then `search.build_ensemble` on the kept trials: test/ accuracy of the best single
     trial, the soups, the ensemble, each with flip TTA, ECE before and after temperature, and a
     paired bootstrap interval for each difference vs the best single. Writes
     benchmarks/results/ensembles.json and .md (ensembles-quick.* with --quick).

Every cache starts empty (a fresh TLSEARCH_CACHE), so one-off builds are paid inside the
benchmark. Writes benchmarks/results/latest.json and latest.md; the documentation's benchmark pages
(docs/benchmarks/, made by docs/_hooks/benchmarks.py) are generated from these files.
Without ../shared it prints why and exits 0 (nothing to measure on).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks._common import DATA, FULL, QUICK, RESULTS, WEIGHTS_DIR, Plan, load_avg
from benchmarks._table import markdown
from benchmarks.concurrency import part_e
from benchmarks.defaults import DEFAULTS_ARMS, run_defaults
from benchmarks.ensembles import run_ensembles
from benchmarks.feature_cache import part_b
from benchmarks.image_cache import part_c
from benchmarks.imbalance import part_h
from benchmarks.memory import part_f
from benchmarks.overhead import part_d
from benchmarks.race import part_a


PARTS: dict[str, tuple[str, Callable[[Plan, Path], dict]]] = {
    "c": ("decoded-image cache vs PIL decoding", part_c),
    "b": ("head-only trial: cached features vs no cache", part_b),
    "d": ("orchestration overhead over short trials", part_d),
    "e": ("concurrency: 1 trial x all CPUs vs 1 trial per CPU", part_e),
    "a": ("tlsearch vs hand-written Optuna loop", part_a),
    "f": ("peak memory of a first head-only trial as the dataset grows", part_f),
    "h": ("imbalanced data: macro-F1 with vs without imbalance handling in the space", part_h),
}


# ----- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a fast smoke run with small budgets")
    ap.add_argument("--budget-s", type=float, default=None, help="part g: seconds per search (default 480)")
    ap.add_argument("--only", default="", help=f"comma-separated parts to run, of {','.join(sorted(PARTS))}")
    ap.add_argument("--out", default=str(RESULTS),
                    help="results folder: latest.json/.md (full run), quick.* (--quick), partial-<parts>.* (--only)")
    ap.add_argument("--defaults", action="store_true", help="part g alone: the search's old vs new defaults")
    ap.add_argument("--data", default=str(DATA), help="part g's dataset (default: ../shared/data/hymenoptera)")
    ap.add_argument("--arms", default="old,new",
                    help=f"part g's arms, two or more of {','.join(DEFAULTS_ARMS)} (new-nograce: the new "
                         "defaults without the fine-tuning grace of ASHA; plain: the search a user writes, "
                         "benchmarks/plain.py)")
    ap.add_argument("--reuse-plain", default=None, metavar="JSON",
                    help="part g: take the plain arm's runs from this earlier result (same data, budget, seeds)")
    ap.add_argument("--ensembles", action="store_true",
                    help="part i alone (also --only i): soups, ensembles, TTA, temperature vs the best trial")
    args = ap.parse_args(argv)
    if args.ensembles or args.only.strip() == "i":
        if not DATA.exists() or not (WEIGHTS_DIR / "tf_efficientnet_lite1.pth").exists():
            print(f"skipped: {DATA} or {WEIGHTS_DIR} is absent (part i needs ../shared)", file=sys.stderr)
            return 0
        return run_ensembles(args.quick, Path(args.out))
    if args.defaults:
        if not Path(args.data).exists() or not (WEIGHTS_DIR / "tf_efficientnet_lite1.pth").exists():
            print(f"skipped: {args.data} or {WEIGHTS_DIR} is absent (part g needs ../shared)", file=sys.stderr)
            return 0
        arms = tuple(a.strip() for a in args.arms.split(","))
        if len(arms) < 2 or not set(arms) <= set(DEFAULTS_ARMS):
            print(f"error: --arms takes two or more of {', '.join(DEFAULTS_ARMS)}", file=sys.stderr)
            return 2
        return run_defaults(args.quick, Path(args.out), Path(args.data), arms, args.budget_s, args.reuse_plain)
    parts = [p.strip() for p in args.only.split(",") if p.strip()] or list(PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"error: unknown part(s) {', '.join(unknown)}; available: {', '.join(sorted(PARTS))}", file=sys.stderr)
        return 2
    missing = [p for p in (DATA, WEIGHTS_DIR / "tf_efficientnet_lite0.pth") if not p.exists()]
    if missing:
        print(f"skipped: {missing[0]} is absent (the benchmark needs ../shared next to the repository)", file=sys.stderr)
        return 0

    import torch

    plan = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="tlsearch-bench-"))
    # Every cache starts empty and lives in the benchmark's folder: one-off builds are measured.
    os.environ["TLSEARCH_CACHE"] = str(work / "cache")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    results: dict[str, Any] = {
        "quick": args.quick,
        "plan": plan.__dict__,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "load_start": load_avg()},
        "data": str(DATA),
        "parts": {},
        "seconds": {},
    }
    t_all = time.time()
    try:
        for key in [k for k in PARTS if k in parts]:
            t = time.time()
            torch.set_num_threads(os.cpu_count() or 1)  # what a plain torch program gets; parts change it
            results["parts"][key] = PARTS[key][1](plan, work)
            results["seconds"][key] = round(time.time() - t, 1)
            results["parts"][key]["title"] = PARTS[key][0]
            results["parts"][key]["load_after"] = load_avg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_end"] = load_avg()
    results["total_s"] = round(time.time() - t_all, 1)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Only a full run of every part is "latest" (the documentation's table); smoke and partial runs
    # never overwrite it.
    full = not args.quick and set(parts) == set(PARTS)
    stem = "latest" if full else ("quick" if args.quick else "partial")
    if not full and set(parts) != set(PARTS):  # e.g. partial-h.json: one part's run keeps another's
        stem += "-" + "".join(sorted(parts))
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    table = markdown(results)
    (out / f"{stem}.md").write_text("# tlsearch benchmark\n\n" + table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
