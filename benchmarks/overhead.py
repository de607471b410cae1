"""Part d: the orchestration overhead of `run_search` over many short stub trials, and over a few
(the one-off start-up's share), with and without Ray reusing trial workers.

    python -m benchmarks.bench --only d
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks._common import BACKBONE, FEW_STUB_TRIALS, Plan, settings


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
