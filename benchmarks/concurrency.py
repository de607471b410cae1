"""Part e: on this machine, one trial with every CPU against one trial per CPU (the default).

    python -m benchmarks.bench --only e
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from benchmarks._common import BACKBONE, Plan, settings


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
