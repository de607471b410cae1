"""Part i: soups, ensembles, flip TTA and temperature against the best single trial, on held-out data.

    python -m benchmarks.bench --ensembles

A real search (Lite0 and Lite1, heads alone and partly fine-tuned) on hymenoptera with a test/ split
made from half of each class of its val/, and on cifar10_mini (its own test/), then
`search.build_ensemble` on the kept trials. Writes benchmarks/results/ensembles.json and .md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import SHARED, load_avg, met, settings




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
                      f"test/ (goal ≥ +1.0: {met(a['met'])}).", ""]
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
