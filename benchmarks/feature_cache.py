"""Part b: a head-only trial on cached frozen features against the same trial with cache=False,
and a partly frozen trial with its boundary cache.

    python -m benchmarks.bench --only b
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks._common import BACKBONE, DATA, PARTIAL_FREEZE_DEPTH, WEIGHTS_DIR, Plan


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
