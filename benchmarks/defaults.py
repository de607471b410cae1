"""Part g: the search's defaults, old against new, and against the search a user writes.

    python -m benchmarks.bench --defaults [--arms old,new] [--data DIR] [--budget-s S]

The same search with the defaults as they were (benchmarks/spaces/old_default.yaml, the linear probe
alone as warm start, no budget-aware scheduling, one ASHA grace for all) and with the new ones (the
default space at hand, fine-tuning priors, the recipe portfolio, budget-aware scheduling), same
data, same time budget, several seeds, the arms interleaved, every run from cold caches. `--arms
new,plain` puts the search a user writes beside them (benchmarks/plain.py). Writes
benchmarks/results/defaults[-DATA][-ARMS].json and .md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks._common import DATA, REPO, WEIGHTS_DIR, fmt, load_avg, settings


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
            f"| {r['seed']} | {r['arm']} | {fmt(r['best_value'], 4)} | {fmt(r['best_epoch_val_acc'], 4)} "
            f"| {fmt(r.get('best_within_budget'), 4)} | {fmt(r.get('last_epoch_s'), 1)} "
            f"| {fmt(r['time_to_95_s'], 1)} | {fmt(r['time_to_99_s'], 1)} "
            f"| {fmt(r.get('time_to_plain_best_s'), 1)} | {ft['started']} | {ft['finished']} "
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

