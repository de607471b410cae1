"""tlsearch's performance, measured side by side in one run on the same data.

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
benchmark. Writes benchmarks/results/latest.json and latest.md, and the README's Performance table.
Without ../shared it prints why and exits 0 (nothing to measure on).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "hymenoptera"
WEIGHTS_DIR = SHARED / "weights"
BACKBONE = "timm/tf_efficientnet_lite0"
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run (full or --quick)."""

    budget_s: float  # part a: time budget of each search
    target: float  # part a: the val_acc both searches race to
    epochs: int  # part a/b: epochs per trial (ASHA's max rung)
    image_size: int  # every part: the backbone's input side
    stub_trials: int  # part d: trials per run
    stub_epoch_s: float  # part d: seconds of work per stub epoch
    conc_trials: int  # part e: identical real trials per setting
    memory_sizes: tuple[int, ...]  # part f: dataset sizes (images) measured


PARTIAL_FREEZE_DEPTH = 5  # part b: a partially frozen Lite0 (stem + 4 of its 7 block stages frozen)
FEW_STUB_TRIALS = 12  # part d: also measured with this many trials (the one-off start-up's share)

FULL = Plan(budget_s=240, target=0.93, epochs=5, image_size=160, stub_trials=60, stub_epoch_s=2.0, conc_trials=2,
            memory_sizes=(5000, 10000, 20000))
QUICK = Plan(budget_s=45, target=0.90, epochs=2, image_size=128, stub_trials=8, stub_epoch_s=0.5, conc_trials=2,
             memory_sizes=(500, 1000))
MEMORY_IMAGE_SIZE = 128  # part f: the backbone's input side
MEMORY_THREADS = 1  # part f: torch threads of the trial (a trial's default: one CPU)


def space(plan: Plan) -> dict:
    """The search space of part a (tlsearch's YAML format; the hand-written loop reads it too)."""
    return {
        "backbone": BACKBONE,
        "freeze_depth": ["all", 6, 3, 0],
        "augmentation": ["none", "flip", "trivialaugment"],
        "lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
        "image_size": plan.image_size,
        "batch_size": 32,
        "optimizer": "adamw",
        "max_epochs": plan.epochs,
    }


# ----- helpers --------------------------------------------------------------------------------------


def settings(work: Path, study: str, **changes: Any) -> Any:
    """SearchSettings for a benchmark search, its study and Ray folders under `work`."""
    from search.settings import SearchSettings

    base = dict(study=study, data=str(DATA), weights_dir=str(WEIGHTS_DIR), studies_dir=str(work / "studies"),
                reports_dir=str(work / "reports"), seed=0)
    return SearchSettings(**{**base, **changes})


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def first_reach(log: list[dict], target: float, budget_s: float) -> tuple[float | None, float]:
    """(seconds until val_acc >= target first, best val_acc within the budget) from per-epoch records."""
    inside = [r for r in log if r["t"] <= budget_s]
    hits = [r["t"] for r in inside if r["val_acc"] >= target]
    return (min(hits) if hits else None), max((r["val_acc"] for r in inside), default=0.0)


# ----- a: tlsearch vs the hand-written loop ----------------------------------------------------------


def part_a(plan: Plan, work: Path) -> dict:
    from benchmarks import _trials, handwritten
    from search.runner import run_search

    sp = space(plan)
    print(f"[a] hand-written Optuna loop, {plan.budget_s:.0f} s budget ...", file=sys.stderr, flush=True)
    hand = handwritten.run(data=str(DATA), weights=str(WEIGHTS_DIR / "tf_efficientnet_lite0.pth"),
                           space=sp, budget_s=plan.budget_s, seed=0,
                           threads=os.cpu_count())  # torch's default: every core
    hand_t, hand_best = first_reach(hand["log"], plan.target, plan.budget_s)

    print(f"[a] tlsearch run_search, {plan.budget_s:.0f} s budget ...", file=sys.stderr, flush=True)
    log_path = work / "tlsearch-epochs.jsonl"
    t0 = time.time()
    summary = run_search(
        settings(work, "bench-a", space=sp, trials=1000, time_budget_s=plan.budget_s),
        trial_fn=partial(_trials.timed_fine_tune, log_path=str(log_path)), progress=False,
    )
    records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    tl_log = [{**r, "t": r["t"] - t0} for r in records]
    tl_t, tl_best = first_reach(tl_log, plan.target, plan.budget_s)
    ratio = tl_t / hand_t if tl_t is not None and hand_t else None
    # The hand-written loop missing the target within the budget still bounds the ratio: its time
    # to target is more than the budget.
    bound = tl_t / plan.budget_s if tl_t is not None and not hand_t else None
    return {
        "target_val_acc": plan.target,
        "budget_s": plan.budget_s,
        "space": sp,
        "handwritten": {"time_to_target_s": hand_t, "best_val_acc": hand_best, "trials": hand["trials"],
                        "states": hand["states"], "epochs_run": len(hand["log"])},
        "tlsearch": {"time_to_target_s": tl_t, "best_val_acc": tl_best, "trials": len({r["trial"] for r in tl_log}),
                     "states": summary.counts, "epochs_run": len(tl_log),
                     "wall_s": round(summary.wall_seconds, 1)},
        "ratio": ratio,
        "ratio_upper_bound": bound,
        "goal": "tlsearch time to target <= 0.3 x hand-written",
        "met": (ratio is not None and ratio <= 0.3) if hand_t else (bound is not None and bound <= 0.3 or None),
        "note": None if hand_t else "the hand-written loop never reached the target within the budget: "
                                    "ratio < tlsearch time / budget",
    }


# ----- b: cached features vs no cache ----------------------------------------------------------------


def part_b(plan: Plan, work: Path) -> dict:
    from search.config import TrialConfig
    from search.data import scan_dataset
    from search.trial import fine_tune

    index = scan_dataset(DATA, warn=lambda m: None)
    cfg = TrialConfig(backbone=BACKBONE, freeze_depth="all", augmentation="none", image_size=plan.image_size,
                      epochs=plan.epochs, batch_size=32, lr=1e-3, optimizer="adamw")
    runs = {}
    for name, cache in (("first trial (builds caches)", True), ("later trial (cache warm)", True),
                        ("no cache", False)):
        print(f"[b] head-only trial: {name} ...", file=sys.stderr, flush=True)
        # threads=1: what a trial gets by default (one CPU per trial, see part e).
        r = fine_tune(cfg, index, weights_dir=str(WEIGHTS_DIR), cache=cache, cache_dir=str(work / "cache-b"),
                      threads=1)
        runs[name] = {"trial_s": round(r.seconds, 3),
                      "train_s": round(sum(h["epoch_seconds"] for h in r.history), 3),
                      "val_acc": r.final["val_acc"]}
    warm, first, cold = runs["later trial (cache warm)"], runs["first trial (builds caches)"], runs["no cache"]
    ratio = cold["train_s"] / warm["train_s"]
    acc_diff = abs(warm["val_acc"] - cold["val_acc"])
    # Partial freezing: the frozen stages' output cached at the freeze boundary (no goal of its own).
    partial_cfg = cfg.replace(freeze_depth=PARTIAL_FREEZE_DEPTH, lr=3e-3)
    partial = {}
    for name, cache in (("first trial (builds caches)", True), ("no cache", False)):
        print(f"[b] freeze_depth {PARTIAL_FREEZE_DEPTH} trial: {name} ...", file=sys.stderr, flush=True)
        r = fine_tune(partial_cfg, index, weights_dir=str(WEIGHTS_DIR), cache=cache, cache_dir=str(work / "cache-b"),
                      threads=1)
        partial[name] = {"trial_s": round(r.seconds, 3), "val_acc": r.final["val_acc"]}
    return {
        "config": cfg.to_dict(),
        "runs": runs,
        "partial_freeze": {"freeze_depth": PARTIAL_FREEZE_DEPTH, "runs": partial,
                           "ratio_trial_wall": partial["no cache"]["trial_s"] / partial["first trial (builds caches)"]["trial_s"]},
        "ratio": ratio,
        "ratio_uses": "training time (sum of epoch seconds) of a later trial (cache warm) vs no cache",
        "ratio_trial_wall_warm": cold["trial_s"] / warm["trial_s"],
        "ratio_trial_wall_first": cold["trial_s"] / first["trial_s"],
        "acc_diff": acc_diff,
        "goal": ">= 10x less training time, |val_acc difference| <= 0.02",
        "met": ratio >= 10 and acc_diff <= 0.02,
    }


# ----- c: decoded-image cache vs PIL decoding ---------------------------------------------------------


def part_c(plan: Plan, work: Path) -> dict:
    import torch

    from search import augment
    from search.data import dataset_splits, scan_dataset

    index = scan_dataset(DATA, warn=lambda m: None)
    tf = augment.eval_transform(plan.image_size, mean=(0.5,) * 3, std=(0.5,) * 3)

    def images_per_s(cache: bool) -> float:
        ds = dataset_splits(index, image_size=plan.image_size, train_transform=tf, eval_transform=tf,
                            cache=cache, cache_dir=str(work / "cache-c"))[0]
        n, t = 0, time.perf_counter()
        for x, _ in torch.utils.data.DataLoader(ds, batch_size=32):
            n += len(x)
        return n / (time.perf_counter() - t)

    print("[c] image loading: cache build, cached, PIL ...", file=sys.stderr, flush=True)
    # One thread, as in a trial with one CPU (the default): per-image tensor ops gain nothing from
    # more, and on a busy machine a second thread makes every small op wait for it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = time.perf_counter()
    build_rate = images_per_s(True)  # the first pass builds the cache file
    build_s = time.perf_counter() - t
    cached = statistics.median(images_per_s(True) for _ in range(3))
    pil = statistics.median(images_per_s(False) for _ in range(3))
    torch.set_num_threads(threads)
    return {
        "images": len(index.train),
        "cache_build_s": round(build_s, 2),
        "first_pass_images_per_s": build_rate,
        "cached_images_per_s": cached,
        "pil_images_per_s": pil,
        "ratio": cached / pil,
        "note": "one pass over the train split, eval transform (center crop + normalise), one process, 1 torch thread",
        "goal": ">= 3x images/s",
        "met": cached / pil >= 3,
    }


# ----- d: orchestration overhead ----------------------------------------------------------------------


def _stub_search(plan: Plan, work: Path, study: str, *, trials: int) -> dict:
    """One `run_search` of `trials` stub trials; its overhead and where the overhead went."""
    from benchmarks import _trials
    from search.runner import run_search

    sp = {"backbone": BACKBONE, "freeze_depth": ["all"], "augmentation": ["none"],
          "lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}, "max_epochs": 3}
    s = settings(work, study, space=sp, trials=trials)
    t0 = time.time()
    summary = run_search(s, trial_fn=partial(_trials.stub_trial, epoch_seconds=plan.stub_epoch_s), progress=False)
    import optuna
    import ray

    from search.runner import default_concurrency

    conc = default_concurrency(cpus=ray.cluster_resources().get("CPU", 1), gpus=0,
                               cpus_per_trial=s.cpus_per_trial, gpus_per_trial=0)
    busy = summary.compute_seconds / (summary.wall_seconds * conc)
    spans = sorted((t.user_attrs["started_at"], t.user_attrs["finished_at"])
                   for t in optuna.load_study(study_name=study, storage=summary.storage).get_trials(deepcopy=False)
                   if t.user_attrs.get("started_at") and t.user_attrs.get("finished_at"))
    # Where the slot time went: before the first trial (pre-flight, study, Tune's first workers),
    # between one trial's end and the next start on the same slot, and the idle tail (slots
    # with no trial left to start while the last ones finish).
    slots = [t0] * conc
    gaps: list[float] = []
    for start, end in spans:
        i = min(range(conc), key=lambda k: slots[k])
        if slots[i] > t0:
            gaps.append(start - slots[i])
        slots[i] = end
    wall_end = t0 + summary.wall_seconds
    return {"wall_s": round(summary.wall_seconds, 2), "compute_s": round(summary.compute_seconds, 2),
            "concurrency": conc, "trials": summary.trials_run, "states": summary.counts,
            "overhead": 1 - busy,
            "before_first_trial_s": round(spans[0][0] - t0, 2) if spans else None,
            "between_trials_s": round(statistics.mean(gaps), 3) if gaps else None,
            "idle_tail_slot_s": round(sum(wall_end - end for end in slots), 2),
            "per_trial_overhead_s": (summary.wall_seconds * conc - summary.compute_seconds) / max(1, summary.trials_run)}


def part_d(plan: Plan, work: Path) -> dict:
    from search import runner
    from search.space import SearchSpace

    t = time.time()
    runner._ensure_ray(settings(work, "bench-d"))  # a no-op when an earlier part started Ray
    ray_start = time.time() - t
    t = time.time()
    SearchSpace.from_dict({"backbone": BACKBONE})  # the driver's one-off imports (timm) to check backbones
    driver_imports = time.time() - t
    out: dict[str, Any] = {
        "ray_start_s": round(ray_start, 2), "driver_imports_s": round(driver_imports, 2),
        "note": "overhead = 1 - sum(trial compute) / (wall x concurrent trials), wall from run_search's call "
                "to its return; Ray is started once per process and the driver's imports are done before "
                "these runs (ray_start_s, driver_imports_s)"}
    before = runner._run.REUSE_ACTORS
    few = min(FEW_STUB_TRIALS, plan.stub_trials // 2)
    try:
        runs = [(True, plan.stub_trials, "many"), (True, few, "few"), (False, few, "few, fresh worker per trial")]
        for reuse, n, label in runs:
            runner._run.REUSE_ACTORS = reuse
            print(f"[d] {n} stub trials, reuse_actors={reuse} ...", file=sys.stderr, flush=True)
            out[label] = {"reuse_actors": reuse, **_stub_search(plan, work, f"bench-d-{len(out)}", trials=n)}
    finally:
        runner._run.REUSE_ACTORS = before
    out.update({"default_reuse_actors": before, "overhead": out["many"]["overhead"],
                "goal": f"overhead <= 10% of wall time over many ({plan.stub_trials}) short trials",
                "met": out["many"]["overhead"] <= 0.10})
    return out


# ----- e: concurrency ---------------------------------------------------------------------------------


def part_e(plan: Plan, work: Path) -> dict:
    from search.runner import run_search

    cpus = os.cpu_count() or 1
    # Identical real trials (partial fine-tuning with augmentation: nothing is cached) so that
    # both settings do the same work; no pruning (grace period = epochs).
    sp = {"backbone": BACKBONE, "freeze_depth": [4], "augmentation": ["flip"],
          "lr": [1.0e-3, 1.001e-3], "image_size": 96, "max_epochs": 2}
    out: dict[str, Any] = {"trials": plan.conc_trials, "cpus": cpus}
    for label, cpt in ((f"1 trial x {cpus} threads", float(cpus)), (f"{cpus} trials x 1 thread", 1.0)):
        print(f"[e] {plan.conc_trials} trials, {label} ...", file=sys.stderr, flush=True)
        summary = run_search(
            settings(work, f"bench-e-{int(cpt)}", space=sp, trials=plan.conc_trials, cpus_per_trial=cpt,
                     grace_period=2),
            progress=False,
        )
        out[label] = {"wall_s": round(summary.wall_seconds, 2), "compute_s": round(summary.compute_seconds, 2),
                      "states": summary.counts}
    a, b = out[f"1 trial x {cpus} threads"], out[f"{cpus} trials x 1 thread"]
    out["faster"] = "one trial per CPU" if b["wall_s"] < a["wall_s"] else "one trial with all CPUs"
    out["speedup_per_cpu_trials"] = a["wall_s"] / b["wall_s"]
    return out


# ----- f: memory as the dataset grows -----------------------------------------------------------------


def part_f(plan: Plan, work: Path) -> dict:
    from benchmarks import _memory

    runs = []
    for n in plan.memory_sizes:
        data, cache = work / f"photos-{n}", work / f"cache-f-{n}"
        print(f"[f] {n} photos: generating, then a first and a second head-only trial ...", file=sys.stderr, flush=True)
        t = time.time()
        _memory.make_photos(data, n)
        made_s = time.time() - t
        cold = _memory.measure(data, cache_dir=cache, threads=MEMORY_THREADS, image_size=MEMORY_IMAGE_SIZE)
        warm = _memory.measure(data, cache_dir=cache, threads=MEMORY_THREADS, image_size=MEMORY_IMAGE_SIZE)
        sizes = {name: sum(f.stat().st_size for f in (cache / name).glob(pattern))
                 for name, pattern in (("images", "*.u8"), ("features", "*.pt"))}
        runs.append({"images": n, "generate_s": round(made_s, 1), "first_trial": cold, "warm_trial": warm,
                     "image_cache_mb": round(sizes["images"] / 2**20, 1),
                     "features_mb": round(sizes["features"] / 2**20, 1)})
        shutil.rmtree(data, ignore_errors=True)  # mind the disk: 20k photos and their cache are ~2 GB
        shutil.rmtree(cache, ignore_errors=True)
    small, large = runs[0], runs[-1]
    allowed = 1.2 * small["first_trial"]["peak_rss_mb"] + large["features_mb"]
    return {
        "backbone": BACKBONE, "image_size": MEMORY_IMAGE_SIZE, "threads": MEMORY_THREADS, "runs": runs,
        "allowed_mb": round(allowed, 1),
        "note": "peak_rss_mb: the kernel's peak resident set (ru_maxrss: anonymous and file-backed pages); "
                "peak_anon_mb: anonymous memory alone, sampled every 20 ms. One epoch, freeze_depth all, "
                "augmentation none; a fresh cache for the first trial, the same cache for the warm one.",
        "goal": f"first-trial peak at {large['images']} images <= 1.2 x the peak at {small['images']} "
                f"+ the cached features at {large['images']}",
        "met": large["first_trial"]["peak_rss_mb"] <= allowed,
    }


# ----- g: the search's defaults, old vs new ---------------------------------------------------------

OLD_DEFAULT_SPACE = REPO / "benchmarks" / "spaces" / "old_default.yaml"


@dataclass(frozen=True)
class DefaultsPlan:
    """Sizes of the defaults comparison (part g)."""

    budget_s: float  # time budget of every search
    seeds: tuple[int, ...]  # one old and one new search per seed, interleaved
    trials: int  # --trials of every search (the budget ends them first)


DEFAULTS_FULL = DefaultsPlan(budget_s=480, seeds=(0, 1, 2), trials=60)
DEFAULTS_QUICK = DefaultsPlan(budget_s=60, seeds=(0,), trials=12)


def defaults_arm(arm: str, seed: int, plan: DefaultsPlan, work: Path, data: Path) -> dict:
    """One search of part g, from cold caches: the old defaults or the new ones."""
    from benchmarks import _trials
    from search.runner import run_search
    from search.space import load_space

    run_dir = work / f"{arm}-{seed}"
    os.environ["TLSEARCH_CACHE"] = str(run_dir / "cache")  # cold: every cache starts empty
    log_path = run_dir / "epochs.jsonl"
    run_dir.mkdir(parents=True)
    common = dict(data=str(data), trials=plan.trials, time_budget_s=plan.budget_s, seed=seed,
                  cache_dir=str(run_dir / "cache"))
    if arm == "old":
        s = settings(run_dir, f"g-old-{seed}", space=load_space(OLD_DEFAULT_SPACE), portfolio=False,
                     budget_aware=False, finetune_grace=1, **common)
    elif arm == "new-nograce":  # the new defaults, but ASHA may stop fine-tuning trials after epoch 1
        s = settings(run_dir, f"g-nograce-{seed}", finetune_grace=1, **common)
    else:
        s = settings(run_dir, f"g-new-{seed}", **common)  # no space: the default space at hand
    print(f"[g] {arm} defaults, seed {seed}, {plan.budget_s:.0f} s ...", file=sys.stderr, flush=True)
    if arm == "plain":
        return plain_arm(seed, plan, data)
    t0 = time.time()
    summary = run_search(s, trial_fn=partial(_trials.timed_fine_tune, log_path=str(log_path)), progress=False)
    records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    log = [{**r, "t": r["t"] - t0} for r in records]
    return {"arm": arm, "seed": seed, "log": log, "best_value": summary.best_value, "counts": summary.counts,
            "fine_tuning": fine_tuning_counts(s), "wall_s": round(summary.wall_seconds, 1)}


# The plain search's trials: a few epochs, as the tutorials' loops (the search cannot afford more
# per trial in a short budget); the default space's image size on a CPU.
PLAIN_EPOCHS, PLAIN_IMAGE_SIZE = 3, 128


def plain_arm(seed: int, plan: DefaultsPlan, data: Path) -> dict:
    """Part g's third arm: the search a user writes (benchmarks/plain.py: Optuna's TPE and
    MedianPruner over the tutorial's loop), one trial at a time on every core, same budget."""
    from benchmarks import plain

    r = plain.search(str(data), str(WEIGHTS_DIR), budget_s=plan.budget_s, image_size=PLAIN_IMAGE_SIZE,
                     epochs=PLAIN_EPOCHS, seed=seed, threads=os.cpu_count())
    done = [e["val_acc"] for e in r["log"] if e["epoch"] == PLAIN_EPOCHS]
    trials = {e["trial"]: e for e in r["log"]}
    started = [e for e in trials.values() if e["train_all"]]
    finished = {e["trial"] for e in r["log"] if e["epoch"] == PLAIN_EPOCHS and e["train_all"]}
    return {"arm": "plain", "seed": seed, "log": r["log"], "best_value": max(done, default=None),
            "counts": r["states"], "wall_s": round(r["wall_s"], 1),
            "fine_tuning": {"started": len(started), "finished": len(finished),
                            "pruned": len(started) - len(finished), "pruned_by_budget": 0, "failed": 0}}


def fine_tuning_counts(s: Any) -> dict:
    """Trials that trained backbone stages: started, finished (COMPLETE), pruned by ASHA / by the budget."""
    import optuna

    from search.backbones import num_stages, resolve_depth
    from search.studies import TrialRecord

    study = optuna.load_study(study_name=s.study, storage=s.storage_url)
    out = {"started": 0, "finished": 0, "pruned": 0, "pruned_by_budget": 0, "failed": 0}
    for t in study.get_trials(deepcopy=False):
        rec = TrialRecord.from_trial(t)
        cfg = rec.config or {}
        if not cfg or t.user_attrs.get("not_started") or not rec.curve:
            continue
        if resolve_depth(cfg["backbone"], cfg["freeze_depth"]) >= num_stages(cfg["backbone"]):
            continue
        out["started"] += 1
        out["finished"] += rec.state == "COMPLETE"
        out["pruned"] += rec.state == "PRUNED"
        out["pruned_by_budget"] += rec.state == "PRUNED" and rec.stopped_by == "time budget"
        out["failed"] += rec.state == "FAIL"
    return out


def time_to(log: list[dict], target: float | None) -> float | None:
    """Seconds until a per-epoch val_acc first reached `target` (None: never)."""
    if target is None:
        return None
    hits = [r["t"] for r in log if (r.get("val_acc") or 0.0) >= target]
    return round(min(hits), 1) if hits else None


DEFAULTS_ARMS = ("old", "new", "new-nograce", "plain")


def part_g(plan: DefaultsPlan, work: Path, data: Path, arms: tuple[str, str] = ("old", "new"),
           reuse: dict | None = None) -> dict:
    """Two arms (`DEFAULTS_ARMS`: old vs new defaults, or new with vs without the fine-tuning
    grace), interleaved per seed (the order alternates so that neither arm always runs on a
    machine warmed by the other). `reuse`: an earlier result of the same data, budget and seeds
    whose plain arm is taken as it is instead of run again (the plain search does not use
    tlsearch's code, so only the other arm changes)."""
    kept = _plain_runs(reuse) if reuse else {}
    runs = []
    for i, seed in enumerate(plan.seeds):
        for arm in (arms if i % 2 == 0 else arms[::-1]):
            runs.append(kept[seed] if arm == "plain" and seed in kept else defaults_arm(arm, seed, plan, work, data))
    rows = []
    for seed in plan.seeds:
        pair = {r["arm"]: r for r in runs if r["seed"] == seed}
        best = max((e.get("val_acc") or 0.0 for r in pair.values() for e in r["log"]), default=None)
        plain_best = pair["plain"]["best_value"] if "plain" in pair else None
        for arm in arms:
            r = pair[arm]
            rows.append({
                "time_to_plain_best_s": time_to(r["log"], plain_best),
                # Optuna's timeout starts no trial after it but lets a running one finish: the
                # plain search runs past the budget, so what it had within the budget is shown too.
                "best_within_budget": max((e.get("val_acc") or 0.0 for e in r["log"] if e["t"] <= plan.budget_s),
                                          default=None),
                "last_epoch_s": max((e["t"] for e in r["log"]), default=None),
                "seed": seed, "arm": arm, "best_value": r["best_value"],
                "best_epoch_val_acc": max((e.get("val_acc") or 0.0 for e in r["log"]), default=None),
                "reference": best,
                "time_to_95_s": time_to(r["log"], 0.95 * best if best else None),
                "time_to_99_s": time_to(r["log"], 0.99 * best if best else None),
                "fine_tuning": r["fine_tuning"], "counts": r["counts"], "wall_s": r["wall_s"],
            })
    return {"budget_s": plan.budget_s, "seeds": list(plan.seeds), "data": str(data), "arms": list(arms), "rows": rows,
            "logs": [{"arm": r["arm"], "seed": r["seed"], "log": r["log"]} for r in runs]}


def _plain_runs(result: dict) -> dict[int, dict]:
    """The plain arm's runs of an earlier part g result, by seed."""
    logs = {e["seed"]: e["log"] for e in result["logs"] if e["arm"] == "plain"}
    return {r["seed"]: {"arm": "plain", "seed": r["seed"], "log": logs[r["seed"]], "best_value": r["best_value"],
                        "counts": r["counts"], "fine_tuning": r["fine_tuning"], "wall_s": r["wall_s"]}
            for r in result["rows"] if r["arm"] == "plain" and r["seed"] in logs}


def defaults_markdown(result: dict) -> str:
    """Part g's side-by-side table."""
    lines = [
        f"Same search, {' vs '.join(result.get('arms', ['old', 'new']))}: {result['data']}, "
        f"{result['budget_s']:.0f} s budget per search, "
        f"seeds {', '.join(map(str, result['seeds']))}, cold caches, arms interleaved. "
        "Times are to 95% / 99% of the best per-epoch val_acc either arm reached in that seed.",
        "",
        "| seed | defaults | best COMPLETE value | best epoch val_acc | within the budget | last epoch at (s) "
        "| to 95% (s) | to 99% (s) "
        "| to plain's best (s) | fine-tuning started | finished | pruned (ASHA) | pruned (budget) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ft = r["fine_tuning"]
        lines.append(
            f"| {r['seed']} | {r['arm']} | {_fmt(r['best_value'], 4)} | {_fmt(r['best_epoch_val_acc'], 4)} "
            f"| {_fmt(r.get('best_within_budget'), 4)} | {_fmt(r.get('last_epoch_s'), 1)} "
            f"| {_fmt(r['time_to_95_s'], 1)} | {_fmt(r['time_to_99_s'], 1)} "
            f"| {_fmt(r.get('time_to_plain_best_s'), 1)} | {ft['started']} | {ft['finished']} "
            f"| {ft['pruned'] - ft['pruned_by_budget']} | {ft['pruned_by_budget']} |")
    return "\n".join(lines) + "\n"


def run_defaults(quick: bool, out: Path, data: Path, arms: tuple[str, ...] = ("old", "new"),
                 budget_s: float | None = None, reuse_plain: str | None = None) -> int:
    """Runs part g alone and writes benchmarks/results/defaults[-DATASET][-ARMS][-quick].json and .md."""
    plan = DEFAULTS_QUICK if quick else DEFAULTS_FULL
    if budget_s:
        plan = DefaultsPlan(budget_s=budget_s, seeds=plan.seeds, trials=plan.trials)
    work = Path(tempfile.mkdtemp(prefix="tlsearch-bench-g-"))
    t0 = time.time()
    try:
        reuse = json.loads(Path(reuse_plain).read_text(encoding="utf-8")) if reuse_plain else None
        if reuse and (reuse["budget_s"], reuse["seeds"], Path(reuse["data"]).name) != (plan.budget_s, list(plan.seeds), data.name):
            raise SystemExit(f"{reuse_plain} is not of the same data, budget and seeds")
        result = part_g(plan, work, data, arms, reuse)
        if reuse:
            result["plain_reused_from"] = str(reuse_plain)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(quick=quick, total_s=round(time.time() - t0, 1), finished=time.strftime("%Y-%m-%d %H:%M"),
                  machine={"cpus": os.cpu_count(), "load_end": load_avg()})
    # The dataset the defaults were chosen on keeps the plain name; another one's run sits beside it.
    stem = "defaults" if data.resolve() == DATA.resolve() else f"defaults-{data.name}"
    stem += "" if arms == ("old", "new") else "-" + "-vs-".join(arms)
    stem += "-quick" if quick else ""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    table = defaults_markdown(result)
    if result.get("plain_reused_from"):
        table += (f"\nThe plain arm's runs are those of {Path(result['plain_reused_from']).name} (same data, budget and "
                  "seeds, run earlier on the same machine): the plain search does not use tlsearch's code.\n")
    (out / f"{stem}.md").write_text("# tlsearch defaults, old vs new\n\n" + table
                                    + f"\nTotal {result['total_s']:.0f} s.\n", encoding="utf-8")
    print(table)
    return 0


# ----- h: imbalance handling on an imbalanced dataset -------------------------------------------------


@dataclass(frozen=True)
class ImbalancePlan:
    """Sizes of part h (full or --quick)."""

    seeds: tuple[int, ...]  # one pair of searches (with / without imbalance handling) per seed
    trials: int  # trials per search
    epochs: int  # ASHA's largest rung
    image_size: int


IMB_FULL = ImbalancePlan(seeds=(0, 1, 2), trials=8, epochs=5, image_size=128)
IMB_QUICK = ImbalancePlan(seeds=(0,), trials=3, epochs=2, image_size=128)
KEEP_ONE_IN = 6  # part h: bees kept in train (1 in 6, by sorted file name)
IMBALANCE_SPACE = {"loss_weighting": ["none", "inverse_sqrt", "inverse_frequency"], "balanced_sampler": [False, True]}


def imbalanced_copy(dest: Path, *, cut: str = "bees", keep_one_in: int = KEEP_ONE_IN) -> dict[str, dict[str, int]]:
    """Copies hymenoptera to `dest` with `cut` thinned to 1 in `keep_one_in` in train (val unchanged).

    Returns:
        Images per split and class.
    """
    counts: dict[str, dict[str, int]] = {}
    for split_dir in sorted(p for p in DATA.iterdir() if p.is_dir()):
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            files = sorted(p for p in class_dir.iterdir() if p.is_file())
            if split_dir.name == "train" and class_dir.name == cut:
                files = files[::keep_one_in]
            out = dest / split_dir.name / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, out / f.name)
            counts.setdefault(split_dir.name, {})[class_dir.name] = len(files)
    return counts


def imbalance_space(p: ImbalancePlan, *, handling: bool) -> dict:
    """Part h's space: head only or the last stage too, small images; the imbalance dimensions or none.

    No augmentation: every trial then trains on cached features (pooled, or at the last stage's
    boundary), so three seeds of both searches fit in minutes on two busy cores.
    """
    sp = {
        "backbone": BACKBONE,
        "freeze_depth": ["all", 7],  # Lite0 has 8 stages: the head alone, or the last stage too
        "augmentation": "none",
        "lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
        "weight_decay": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
        "image_size": p.image_size,
        "batch_size": 16,
        "optimizer": "adamw",
        "max_epochs": p.epochs,
    }
    return {**sp, **IMBALANCE_SPACE} if handling else sp


def part_h(plan: Plan, work: Path) -> dict:
    import optuna

    from search.runner import run_search

    p = IMB_QUICK if plan is QUICK else IMB_FULL
    data = work / "hymenoptera-imbalanced"
    counts = imbalanced_copy(data)
    arms = {"with imbalance handling": True, "without": False}
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in p.seeds:
        for arm, handling in arms.items():  # interleaved: a load spike falls on both arms of a seed
            print(f"[h] seed {seed}, {arm}: {p.trials} trials ...", file=sys.stderr, flush=True)
            study = f"bench-h-{seed}-{'with' if handling else 'without'}"
            t = time.time()
            summary = run_search(
                settings(work, study, data=str(data), space=imbalance_space(p, handling=handling), trials=p.trials,
                         metric="val_macro_f1", seed=seed),
                progress=False,
            )
            st = optuna.load_study(study_name=study, storage=summary.storage)
            best = st.best_trial if summary.best_trial is not None else None
            curve = (best.user_attrs.get("curve") or [{}])[-1] if best else {}
            per_class = {r["class"]: round(r["recall"], 3) for r in (best.user_attrs.get("per_class") or [])} if best else {}
            runs[arm].append({"seed": seed, "best_val_macro_f1": summary.best_value, "best_trial": summary.best_trial,
                              "val_acc": curve.get("val_acc"), "recall": per_class,
                              "best_params": summary.best_params, "states": summary.counts,
                              "wall_s": round(time.time() - t, 1)})
    means = {arm: statistics.mean(r["best_val_macro_f1"] or 0.0 for r in rs) for arm, rs in runs.items()}
    gain = means["with imbalance handling"] - means["without"]
    per_seed = [w["best_val_macro_f1"] - wo["best_val_macro_f1"]
                for w, wo in zip(runs["with imbalance handling"], runs["without"])
                if w["best_val_macro_f1"] is not None and wo["best_val_macro_f1"] is not None]
    return {
        "counts": counts, "plan": p.__dict__, "space_without": imbalance_space(p, handling=False),
        "imbalance_dimensions": IMBALANCE_SPACE, "runs": runs, "mean_val_macro_f1": means,
        "gain_points": 100 * gain, "gain_points_per_seed": [round(100 * g, 2) for g in per_seed],
        "goal": "imbalance handling in the space: mean best val_macro_f1 >= +2 points",
        "met": 100 * gain >= 2.0,
    }




# ----- i: ensembles (on its own) -----------------------------------------------------------------------


@dataclass(frozen=True)
class EnsembleArm:
    """One dataset of part i: the search that makes the pool, and how its held-out set is made."""

    name: str  # the folder under ../shared/data
    image_size: int  # every trial's input side (small images are upscaled by the transform)
    trials: int  # trials the search runs
    budget_s: float  # the search's time budget
    max_epochs: int  # ASHA's largest rung
    test_from_val: float | None  # the share of each class's val/ moved to test/; None: test/ is there
    val_fraction: float = 0.2  # val's share of train/ when there is no val/


ENSEMBLE_BACKBONES = ["timm/tf_efficientnet_lite0", "timm/tf_efficientnet_lite1"]
ENSEMBLE_FREEZE = ["all", 5]  # a head alone, or the last stages fine-tuned too (Lite0/1 have 8 stages)
ENSEMBLE_KEEP = 8  # checkpoints kept per backbone: the pool of soups and ensembles
BOOTSTRAP = 2000  # paired resamples of the held-out images per difference
ENSEMBLE_FULL = (
    EnsembleArm("hymenoptera", image_size=128, trials=12, budget_s=540, max_epochs=3, test_from_val=0.5),
    EnsembleArm("cifar10_mini", image_size=96, trials=16, budget_s=300, max_epochs=3, test_from_val=None,
                val_fraction=0.3),
)
ENSEMBLE_QUICK = (
    EnsembleArm("hymenoptera", image_size=96, trials=4, budget_s=120, max_epochs=1, test_from_val=0.5),
)


def heldout_copy(src: Path, dst: Path, *, test_from_val: float | None, seed: int = 0) -> Path:
    """A copy of `src` with a test/ split: train/ as is, `test_from_val` of each class of val/ (a fixed
    random draw) moved to test/, the rest left in val/. With None, `src` is copied as it is (it has test/).

    Returns:
        `dst`.
    """
    import random

    if test_from_val is None:
        shutil.copytree(src, dst)
        return dst
    shutil.copytree(src / "train", dst / "train")
    rng = random.Random(seed)
    for cls in sorted(p.name for p in (src / "val").iterdir() if p.is_dir()):
        files = sorted((src / "val" / cls).iterdir())
        rng.shuffle(files)
        cut = round(len(files) * test_from_val)
        for split, chosen in (("test", files[:cut]), ("val", files[cut:])):
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                shutil.copy2(f, dst / split / cls / f.name)
    return dst


def paired_bootstrap(correct: Any, base: Any, *, resamples: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Accuracy difference of two models on the same images, with a 95% percentile interval from
    paired resamples of the images.

    Args:
        correct: a 0/1 tensor per image of the model compared.
        base: the same for the baseline (the best single trial).

    Returns:
        diff, low, high (accuracy points as fractions), resamples.
    """
    import torch

    n = len(base)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    d = (correct.float() - base.float())[idx].mean(1)
    low, high = torch.quantile(d, torch.tensor([0.025, 0.975])).tolist()
    return {"diff": (correct.float() - base.float()).mean().item(), "low": low, "high": high, "resamples": resamples}


def ensemble_arm(arm: EnsembleArm, work: Path) -> dict:
    """A real search on the arm's data, then `build_ensemble` on its kept trials, scored on test/."""
    import torch

    import search.ensemble._build as build
    from search.ensemble import build_ensemble
    from search.ensemble._choose import Candidate, heldout_probs
    from search.runner import run_search

    data = heldout_copy(SHARED / "data" / arm.name, work / arm.name, test_from_val=arm.test_from_val)
    sp = {"backbone": ENSEMBLE_BACKBONES, "freeze_depth": ENSEMBLE_FREEZE, "augmentation": ["none", "flip"],
          "lr": {"low": 3.0e-4, "high": 1.0e-2, "log": True}, "image_size": arm.image_size, "batch_size": 32,
          "optimizer": "adamw", "max_epochs": arm.max_epochs}
    study = f"bench-i-{arm.name.replace('_', '-')}"
    s = settings(work, study, data=str(data), space=sp, trials=arm.trials, time_budget_s=arm.budget_s,
                 keep_checkpoints=ENSEMBLE_KEEP, val_fraction=arm.val_fraction)
    print(f"[i] {arm.name}: search, {arm.trials} trials, {arm.budget_s:.0f} s budget ...", file=sys.stderr, flush=True)
    run = run_search(s, progress=False)
    failures = _failures(s)

    # The procedure's own Predictions, kept for the per-image scores below (no second forward pass).
    made: list[Any] = []

    class Recorded(build.Predictions):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    print(f"[i] {arm.name}: build_ensemble ...", file=sys.stderr, flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # under load, one thread is far faster than two fighting for the CPUs
    before = build.Predictions
    build.Predictions = Recorded
    t = time.time()
    try:
        summary = build_ensemble(study, studies_dir=s.studies_dir, out=work / f"{study}-model", progress=True)
    finally:
        build.Predictions = before
        torch.set_num_threads(threads)
    ensemble_s = time.time() - t
    preds = made[0]
    y = preds.labels["test"]
    rows = summary["candidates"]

    def correct(row: dict) -> Any:
        c = Candidate(row["name"], row["kind"], tuple((m["member"], m["weight"]) for m in row["members"]),
                      tta=row["tta"], temperature=row["temperature"])
        return heldout_probs(preds, c, "test").argmax(1) == y

    hits = {r["name"]: correct(r) for r in rows}
    base = hits["best single"]
    out_rows = []
    for r in rows:
        # The per-image accuracy recomputed here must be the procedure's own held-out accuracy.
        assert abs(hits[r["name"]].float().mean().item() - r["heldout_accuracy"]) < 1e-6, r["name"]
        out_rows.append({**{k: r[k] for k in ("name", "kind", "tta", "temperature", "val_score", "heldout_accuracy",
                                               "val_ece_before", "val_ece_after", "heldout_ece_before",
                                               "heldout_ece_after", "latency_ms", "size_mb", "shipped")},
                         "members": [f"{m['member']} ({m['backbone'].split('/')[-1]})"
                                     + (f" x{m['weight']:g}" if m["weight"] != 1 else "") for m in r["members"]],
                         "vs_best_single": paired_bootstrap(hits[r["name"]], base)})
    shipped = next(r for r in out_rows if r["shipped"])
    gain = shipped["heldout_accuracy"] - next(r for r in out_rows if r["name"] == "best single")["heldout_accuracy"]
    return {
        "data": arm.name, "arm": arm.__dict__, "space": sp, "keep_checkpoints": ENSEMBLE_KEEP,
        "search": {"wall_s": round(run.wall_seconds, 1), "states": run.counts, "failures": failures},
        "pool": sorted({m for r in rows for m in (x["member"] for x in r["members"])}),
        "pool_size": len(preds.trials), "pool_backbones": {
            b: sum(t.config.backbone == b for t in preds.trials.values()) for b in ENSEMBLE_BACKBONES},
        "ensemble_s": round(ensemble_s, 1), "val_images": summary["val_images"], "heldout": summary["heldout"],
        "test_images": len(y), "candidates": out_rows, "shipped": summary["shipped"], "guard": summary.get("guard"),
        "shipped_gain": gain, "goal": "shipped >= best single + 0.01 on test/", "met": gain >= 0.01,
        "test": summary["test"],
    }


def _failures(s: Any) -> list[dict]:
    """The FAIL trials of a benchmark study and why (the study goes with the benchmark's folder)."""
    import optuna

    from search.studies import TrialRecord

    study = optuna.load_study(study_name=s.study, storage=s.storage_url)
    return [{"trial": t.number, "config": TrialRecord.from_trial(t).config, "error": TrialRecord.from_trial(t).error}
            for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.FAIL]


def ensembles_markdown(result: dict) -> str:
    """Part i's tables, one per dataset."""
    lines = [f"Run {result['finished']}{' (quick)' if result['quick'] else ''}, {result['machine']['cpus']} CPUs, "
             f"load {result['machine']['load_start']} at start / {result['machine']['load_end']} at end. Every choice "
             "on validation; accuracy on test/ (no choice read it); Δ vs best single with a paired bootstrap 95% "
             f"interval ({BOOTSTRAP} resamples of the test images). ECE: 15 bins, on test/.", ""]
    for a in result["arms"]:
        if "error" in a:
            lines += [f"## {a['data']}", "", f"failed: {a['error']}", ""]
            continue
        pb = ", ".join(f"{n} {b.split('/')[-1]}" for b, n in a["pool_backbones"].items())
        lines += [
            f"## {a['data']}",
            "",
            f"Search: {a['arm']['trials']} trials ({a['search']['states']}), {a['search']['wall_s']:.0f} s; "
            f"image size {a['arm']['image_size']}, freeze {ENSEMBLE_FREEZE}, {a['arm']['max_epochs']} epochs max. "
            f"Pool: {a['pool_size']} kept trials ({pb}). Validation {a['val_images']} images, test {a['test_images']} "
            f"images. build_ensemble: {a['ensemble_s']:.0f} s (1 torch thread).",
            "",
            *[f"Failed trial {f['trial']}: {f['error']}\n" for f in a["search"].get("failures", [])],
            "| candidate | members | val | test acc | Δ vs best single [95% CI] | ECE before → after T | T "
            "| latency ms | MB | shipped |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in a["candidates"]:
            d = r["vs_best_single"]
            lines.append(
                f"| {r['name']} | {', '.join(r['members'])} | {r['val_score']:.4f} | {r['heldout_accuracy']:.4f} "
                f"| {100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] "
                f"| {r['heldout_ece_before']:.3f} → {r['heldout_ece_after']:.3f} | {r['temperature']:.2f} "
                f"| {r['latency_ms']:.1f} | {r['size_mb']:.1f} | {'**yes**' if r['shipped'] else ''} |")
        g = a.get("guard") or {}
        if g.get("gain") is not None:
            lines += ["", f"Best on validation: {g['val_best']}; against the best single trial out of sample on "
                          f"validation halves ({g['images']} images): {100 * g['gain']:+.1f} points, log loss "
                          f"{-g.get('loss_gain', 0.0):+.3f} (lower is better), so "
                          f"{'the best single trial ships' if g['shipped_single'] else 'it ships'}."]
        lines += ["", f"Shipped: {a['shipped']}, {100 * a['shipped_gain']:+.1f} points vs the best single trial on "
                      f"test/ (goal ≥ +1.0: {_met(a['met'])}).", ""]
    return "\n".join(lines)


def run_ensembles(quick: bool, out: Path) -> int:
    """Runs part i alone and writes benchmarks/results/ensembles(-quick).json and .md."""
    import ray

    arms = ENSEMBLE_QUICK if quick else ENSEMBLE_FULL
    work = Path(tempfile.mkdtemp(prefix="tlsearch-bench-i-"))
    os.environ["TLSEARCH_CACHE"] = str(work / "cache")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    result: dict[str, Any] = {"quick": quick, "machine": {"cpus": os.cpu_count(), "load_start": load_avg()},
                              "arms": []}
    t0 = time.time()
    try:
        for arm in arms:
            if not (SHARED / "data" / arm.name).exists():
                print(f"[i] skipped {arm.name}: {SHARED / 'data' / arm.name} is absent", file=sys.stderr)
                continue
            result["arms"].append(ensemble_arm(arm, work))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    result.update(total_s=round(time.time() - t0, 1), finished=time.strftime("%Y-%m-%d %H:%M"))
    result["machine"]["load_end"] = load_avg()
    stem = "ensembles-quick" if quick else "ensembles"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    table = ensembles_markdown(result)
    (out / f"{stem}.md").write_text("# tlsearch ensembles: better than the best trial?\n\n" + table
                                    + f"\nTotal {result['total_s']:.0f} s.\n", encoding="utf-8")
    print(table)
    return 0


PARTS: dict[str, tuple[str, Callable[[Plan, Path], dict]]] = {
    "c": ("decoded-image cache vs PIL decoding", part_c),
    "b": ("head-only trial: cached features vs no cache", part_b),
    "d": ("orchestration overhead over short trials", part_d),
    "e": ("concurrency: 1 trial x all CPUs vs 1 trial per CPU", part_e),
    "a": ("tlsearch vs hand-written Optuna loop", part_a),
    "f": ("peak memory of a first head-only trial as the dataset grows", part_f),
    "h": ("imbalanced data: macro-F1 with vs without imbalance handling in the space", part_h),
}


# ----- output -----------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _met(v: Any) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[v]


def markdown(results: dict) -> str:
    """The results as a markdown table (one row per measured part) plus the run's conditions."""
    m = results["machine"]
    lines = [
        f"Run {results['finished']} ({'quick' if results['quick'] else 'full'}), {m['cpus']} CPUs, no GPU, "
        f"load average {m['load_start']} at start / {m['load_end']} at end; torch {m['torch']}.",
        "",
        "| part | tlsearch | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    p = results["parts"]
    if "a" in p:
        a = p["a"]
        lines.append(
            f"| a. time to val_acc ≥ {a['target_val_acc']} ({a['budget_s']:.0f} s budget; best acc in budget) "
            f"| {_fmt(a['tlsearch']['time_to_target_s'], 1)} s ({a['tlsearch']['best_val_acc']:.3f}; "
            f"{a['tlsearch']['trials']} trials) "
            f"| hand-written: {_fmt(a['handwritten']['time_to_target_s'], 1)} s ({a['handwritten']['best_val_acc']:.3f}; "
            f"{a['handwritten']['trials']} trials) | "
            + (f"{_fmt(a['ratio'])}×" if a.get("ratio") is not None or a.get("ratio_upper_bound") is None
               else f"< {_fmt(a['ratio_upper_bound'])}× (hand-written missed the target)")
            + f" | ≤ 0.3× | {_met(a['met'])} |")
    if "b" in p:
        b = p["b"]
        r = b["runs"]
        lines.append(
            f"| b. head-only trial, training time (val_acc) | warm: {r['later trial (cache warm)']['train_s']:.2f} s "
            f"({r['later trial (cache warm)']['val_acc']:.3f}); first trial incl. cache build: "
            f"{r['first trial (builds caches)']['trial_s']:.1f} s | no cache: {r['no cache']['train_s']:.1f} s "
            f"({r['no cache']['val_acc']:.3f}) | {b['ratio']:.0f}× less (whole trial: warm {b['ratio_trial_wall_warm']:.1f}×, "
            f"first {b['ratio_trial_wall_first']:.1f}×) | ≥ 10×, Δacc ≤ 0.02 | {_met(b['met'])} |")
        if "partial_freeze" in b:
            pf = b["partial_freeze"]
            f, n = pf["runs"]["first trial (builds caches)"], pf["runs"]["no cache"]
            lines.append(
                f"| b (partial). freeze_depth {pf['freeze_depth']} trial, whole trial wall (val_acc) "
                f"| boundary cache, first trial incl. build: {f['trial_s']:.1f} s ({f['val_acc']:.3f}) "
                f"| no cache: {n['trial_s']:.1f} s ({n['val_acc']:.3f}) | {pf['ratio_trial_wall']:.1f}× less | — | — |")
    if "c" in p:
        c = p["c"]
        lines.append(
            f"| c. images/s, one pass, {c['images']} images | cache: {c['cached_images_per_s']:.0f} "
            f"(build once: {c['cache_build_s']:.1f} s) | PIL decode: {c['pil_images_per_s']:.0f} | {c['ratio']:.1f}× "
            f"| ≥ 3× | {_met(c['met'])} |")
    if "d" in p:
        d = p["d"]
        many, few, fresh = d["many"], d["few"], d["few, fresh worker per trial"]

        def where(r: dict) -> str:
            return (f"{r['overhead']:.1%}: start-up {r['before_first_trial_s']:.1f} s once, "
                    f"{_fmt(r['between_trials_s'])} s between trials, idle tail {r['idle_tail_slot_s']:.1f} slot-s")

        lines.append(
            f"| d. orchestration overhead, {many['trials']} short trials (~{many['compute_s'] / max(1, many['trials']):.1f} s "
            f"each, {many['concurrency']} at a time) | {where(many)} "
            f"| {fresh['trials']} trials, fresh worker per trial: {fresh['overhead']:.1%} "
            f"({fresh['per_trial_overhead_s']:.1f} s/trial vs {few['per_trial_overhead_s']:.1f} reusing workers) "
            f"| — | ≤ 10% | {_met(d['met'])} |")
        lines.append(
            f"| d (few). the same, only {few['trials']} trials | {where(few)} | — | — | (start-up's share) | — |")
    if "e" in p:
        e = p["e"]
        keys = [k for k in e if " x " in k]
        lines.append(
            f"| e. {e['trials']} identical trials, wall | {keys[1]}: {e[keys[1]]['wall_s']:.1f} s "
            f"| {keys[0]}: {e[keys[0]]['wall_s']:.1f} s | {e['speedup_per_cpu_trials']:.2f}× | (sets the default) | — |")
    if "f" in p:
        f = p["f"]
        cells = "; ".join(f"{r['images']:,} images: {r['first_trial']['peak_rss_mb'] / 1024:.2f} GB "
                          f"(anon {r['first_trial']['peak_anon_mb'] / 1024:.2f})" for r in f["runs"])
        warm = f["runs"][-1]["warm_trial"]["peak_rss_mb"] / 1024
        lines.append(
            f"| f. peak memory, first head-only trial (builds the caches), {f['image_size']} px | {cells} "
            f"| warm trial at {f['runs'][-1]['images']}: {warm:.2f} GB | — | ≤ 1.2 × smallest + features "
            f"({f['allowed_mb'] / 1024:.2f} GB) | {_met(f['met'])} |")
    if "h" in p:
        g = p["h"]
        w, wo = g["runs"]["with imbalance handling"], g["runs"]["without"]
        seeds = ", ".join(f"{a['best_val_macro_f1']:.3f}/{b['best_val_macro_f1']:.3f}" for a, b in zip(w, wo)
                          if a["best_val_macro_f1"] is not None and b["best_val_macro_f1"] is not None)
        train = g["counts"]["train"]
        lines.append(
            f"| h. best val_macro_f1, hymenoptera with bees cut to 1 in {KEEP_ONE_IN} in train "
            f"({', '.join(f'{k} {v}' for k, v in train.items())}), {len(w)} seeds × {g['plan']['trials']} trials "
            f"| with imbalance handling: {g['mean_val_macro_f1']['with imbalance handling']:.3f} "
            f"| without: {g['mean_val_macro_f1']['without']:.3f} (per seed with/without: {seeds}) "
            f"| {g['gain_points']:+.1f} points | ≥ +2 points | {_met(g['met'])} |")
    lines.append("")
    lines.append("Ratios: a = tlsearch / hand-written time; b, c = baseline / tlsearch; "
                 "e = (1 trial x all CPUs) / (1 trial per CPU) wall time. Raw figures: "
                 "`benchmarks/results/latest.json`.")
    return "\n".join(lines) + "\n"


def update_readme(table: str) -> None:
    """Puts the table between the README's bench markers (adds a Performance section if missing)."""
    text = README.read_text(encoding="utf-8")
    block = f"{START}\n{table}{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Performance\n\n" + block + "\n"
    README.write_text(text, encoding="utf-8")


# ----- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a fast smoke run with small budgets")
    ap.add_argument("--budget-s", type=float, default=None, help="part g: seconds per search (default 480)")
    ap.add_argument("--only", default="", help=f"comma-separated parts to run, of {','.join(sorted(PARTS))}")
    ap.add_argument("--out", default=str(RESULTS),
                    help="results folder: latest.json/.md (full run), quick.* (--quick), partial-<parts>.* (--only)")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the README's Performance table")
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
    # Only a full run of every part is "latest" (and goes into the README); smoke and partial runs
    # never overwrite it.
    full = not args.quick and set(parts) == set(PARTS)
    stem = "latest" if full else ("quick" if args.quick else "partial")
    if not full and set(parts) != set(PARTS):  # e.g. partial-h.json: one part's run keeps another's
        stem += "-" + "".join(sorted(parts))
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    table = markdown(results)
    (out / f"{stem}.md").write_text("# tlsearch benchmark\n\n" + table, encoding="utf-8")
    if full and not args.no_readme and out.resolve() == RESULTS.resolve():
        update_readme(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
