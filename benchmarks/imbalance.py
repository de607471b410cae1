"""Part h: on an imbalanced copy of hymenoptera (bees cut to 1 in 6 in train, val unchanged), macro-F1
of the best trial of a search with imbalance handling in the space against the same search without.

    python -m benchmarks.bench --only h
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks._common import BACKBONE, DATA, QUICK, Plan, settings




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



