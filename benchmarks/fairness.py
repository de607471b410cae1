"""Fair fine-tunes: how early stopping compares trials, and `fit` against the hand-written search.

    python -m benchmarks.fairness --part replay  [--classes 10 --per-class 60 --side 64]
    python -m benchmarks.fairness --part compare [--datasets hymenoptera,spoken_digits,aid25,cifar10_mini]
                                                 [--seeds 0,1,2] [--budget 300]

replay: a case between hymenoptera (the probe wins outright) and aid25 (a fine-tune wins by 12
points), built from real data: aerial scenes of ../shared/data/aid25 cut to a few classes and
shrunk to small tiles, where a probe is within a few points of a fine-tune at the rung. tlsearch's
own trial function trains the default space's linear probes (every backbone at hand) and the full
fine-tune of the best-probed one to the space's max_epochs; their per-epoch curves are then fed to
ASHA as the search runs it now (rungs per kind of trial, `PruneTrackingASHA`) and as it ran before
(one set of rungs, fine-tunes spared for 2 epochs): at which epoch each rule stops the fine-tune,
and what the study's best trial is under each. The synthetic curves of a new user's run (a
fine-tune at 0.870, 0.902, 0.916 and rising against probes flat at 0.93) are replayed beside them.
It also measures what the plan's cautious estimates assume: a full fine-tune epoch over the
probe's feature pass, and images per second and core.

compare: for each dataset of ../shared/data (a test/ split made from val/ where there is none; a
val/ made from train/ where there is no val/), from cold caches, 3 arms within one budget:
`tlsearch fit DATA --time-budget T` (default preset), the search a user writes from the tutorials
(benchmarks/plain.py: Optuna TPE + MedianPruner over a plain loop, 3 epochs, head only or every
layer, one rate), and a plain full fine-tune of Lite0 at one rate (5e-4) for 3 epochs (its
wall-clock said: it fits the budget or not). Validation score of each, held-out (test/) accuracy
where the arm keeps a model.

Writes benchmarks/results/fairness-replay.{json,md} or fairness-compare-<datasets>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"
WEIGHTS = SHARED / "weights"
# A new user's run on 64-px aerial tiles (10 land-use classes): probes flat at 0.93, the full
# fine-tune of the best-probed backbone rising.
SYNTHETIC = {"probes": [[0.925, 0.93, 0.93, 0.93, 0.93, 0.93], [0.916, 0.928, 0.93, 0.931, 0.93, 0.93]],
             "fine_tune": [0.870, 0.902, 0.916, 0.935, 0.945, 0.948]}


# ----- replay ------------------------------------------------------------------------------------


def small_tiles(src: Path, dst: Path, *, classes: int, per_class: int, side: int, seed: int = 0) -> Path:
    """`dst`: `classes` classes of src, `per_class` train images each and every val image, each
    shrunk to `side` px (JPEG, quality 90), as small aerial tiles come."""
    from PIL import Image

    rng = random.Random(seed)
    names = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    for cls in sorted(rng.sample(names, classes)):
        for split, n in (("train", per_class), ("val", None)):
            files = sorted((src / split / cls).iterdir())
            if n is not None:
                files = sorted(rng.sample(files, min(n, len(files))))
            (dst / split / cls).mkdir(parents=True)
            for f in files:
                with Image.open(f) as im:
                    im.convert("RGB").resize((side, side), Image.BICUBIC).save(dst / split / cls / f"{f.stem}.jpg",
                                                                              quality=90)
    return dst


def real_curves(data: Path, cache: Path, *, threads: int) -> dict:
    """The default space's probes and the best-probed backbone's full fine-tune, trained by
    tlsearch's trial function on `data`: curves, epoch seconds and start-ups."""
    from search.data import scan_dataset
    from search.imbalance import class_counts
    from search.settings import SearchSettings
    from search.space import FINE_TUNE_ORDER, PROBE_RECIPE, RECIPES, backbones_in, default_space_at_hand, for_dataset
    from search.trial import fine_tune

    index = scan_dataset(str(data))
    space, _ = default_space_at_hand(gpu=False, weights_dir=str(WEIGHTS))
    counts = class_counts([label for _, label in index.train], len(index.classes))
    median = index.image_stats.median_side if index.image_stats else 0
    space = SearchSettings(study="replay", data=str(data), space=for_dataset(space, counts, median_side=median))
    space = space.resolve().space
    recipes = {r.name: r for r in RECIPES}

    def run(recipe: str, backbone: str) -> dict:
        cfg = space.to_trial_config(space._recipe_params(recipes[recipe], backbone))
        t0 = time.time()
        res = fine_tune(cfg, index, weights_dir=str(WEIGHTS), cache_dir=str(cache), threads=threads)
        curve = [round(h["val_acc"], 4) for h in res.history]
        seconds = [round(h["epoch_seconds"], 2) for h in res.history]
        wall = time.time() - t0
        return {"recipe": recipe, "backbone": backbone, "curve": curve, "epoch_seconds": seconds,
                "startup_s": round(wall - sum(seconds), 2), "wall_s": round(wall, 1), "image_size": cfg.image_size,
                "images_per_s": round(sum(h["images_per_s"] for h in res.history) / len(res.history), 1)}

    probes = []
    for b in backbones_in(space):
        print(f"[replay] probe {b} ...", file=sys.stderr, flush=True)
        probes.append(run(PROBE_RECIPE, b))
    best = max(probes, key=lambda p: p["curve"][-1])["backbone"]
    print(f"[replay] full fine-tune {best} ...", file=sys.stderr, flush=True)
    full = run(FINE_TUNE_ORDER[0], best)
    return {"train_images": len(index.train), "val_images": len(index.val), "classes": len(index.classes),
            "probes": probes, "fine_tune": full}


def replay(probes: list[list[float]], fine_tune: list[float], *, per_kind: bool, classes: int) -> dict:
    """Feeds the probes, then the fine-tune, to ASHA as `_run._scheduler` builds it; returns the
    epoch at which the fine-tune stopped and the best COMPLETE score of the study."""
    from search.runner._schedulers import PruneTrackingASHA
    from search.space import SearchSpace

    space = SearchSpace.from_dict({"backbone": "resnet18", "freeze_depth": ["all", 0], "max_epochs": len(fine_tune)})
    asha = PruneTrackingASHA(time_attr="training_iteration", metric="val_acc", mode="max", max_t=len(fine_tune),
                             grace_period=1, reduction_factor=3, finetune_grace=2, space=space,
                             chance=1.0 / classes, per_kind=per_kind)
    complete, ran = [], []
    curves = [({"backbone": "resnet18", "freeze_depth": "all"}, c) for c in probes]
    curves.append(({"backbone": "resnet18", "freeze_depth": 0}, fine_tune))
    for i, (config, curve) in enumerate(curves):
        trial = SimpleNamespace(trial_id=f"t{i}", config=config)
        asha.on_trial_add(None, trial)
        epochs = len(curve)
        for epoch, value in enumerate(curve, start=1):
            if asha.on_trial_result(None, trial, {"training_iteration": epoch, "val_acc": value}) == "STOP" \
                    and epoch < len(curve):
                epochs = epoch
                break
        ran.append(epochs)
        if epochs == len(curve):
            complete.append(curve[-1])
    return {"fine_tune_epochs": ran[-1], "fine_tune_at_stop": fine_tune[ran[-1] - 1],
            "best_complete": max(complete), "fine_tune_complete": ran[-1] == len(fine_tune)}


def part_replay(args: argparse.Namespace) -> dict:
    out: dict[str, Any] = {"synthetic": {}, "real": None}
    for rule, per_kind in (("before", False), ("now", True)):
        out["synthetic"][rule] = replay(SYNTHETIC["probes"], SYNTHETIC["fine_tune"], per_kind=per_kind, classes=10)
    with tempfile.TemporaryDirectory() as tmp:
        data = small_tiles(SHARED / "data" / "aid25", Path(tmp) / "tiles", classes=args.classes,
                           per_class=args.per_class, side=args.side)
        real = real_curves(data, Path(tmp) / "cache", threads=args.threads)
    real["rules"] = {rule: replay([p["curve"] for p in real["probes"]], real["fine_tune"]["curve"], per_kind=per_kind,
                                  classes=real["classes"]) for rule, per_kind in (("before", False), ("now", True))}
    full, probe = real["fine_tune"], next(p for p in real["probes"] if p["backbone"] == real["fine_tune"]["backbone"])
    feature_pass = probe["startup_s"]
    real["measured"] = {
        "feature_pass_s": feature_pass,
        "fine_tune_epoch_s": round(sum(full["epoch_seconds"]) / len(full["epoch_seconds"]), 2),
        "epoch_over_feature_pass": round(sum(full["epoch_seconds"]) / len(full["epoch_seconds"]) / feature_pass, 2),
        "fine_tune_images_per_core_s": round(full["images_per_s"] / args.threads, 1),
    }
    out["real"] = real
    out["case"] = {"classes": args.classes, "per_class": args.per_class, "side": args.side, "threads": args.threads}
    out["cpus"] = os.cpu_count()
    return out


def replay_markdown(r: dict) -> str:
    real = r["real"]
    lines = ["# Early stopping: fine-tunes against probes (fairness, replay)\n",
             f"This machine: {os.cpu_count()} CPU cores. ASHA as the search builds it (reduction factor 3, rungs "
             "at epochs 1 and 3 of 6), fed the probes and then the fine-tune. **before**: one set of rungs for "
             "every trial, fine-tunes spared for 2 epochs; **now**: rungs per kind of trial (head only / training "
             "stages), a fine-tune stopped early only when it diverges (below a third of the way from chance "
             "to the best probe).\n",
             "| curves | rule | fine-tune stopped at epoch | its score there | study's best COMPLETE |",
             "|---|---|---|---|---|"]
    for name, rules in (("synthetic (a new user's aerial tiles)", r["synthetic"]),
                        (f"real: aid25, {r['case']['classes']} classes x {r['case']['per_class']} train, "
                         f"{r['case']['side']}-px tiles", real["rules"])):
        for rule, v in rules.items():
            lines.append(f"| {name} | {rule} | {v['fine_tune_epochs']} | {v['fine_tune_at_stop']:.3f} | "
                         f"{v['best_complete']:.3f} |")
    lines.append("\nReal curves (val_acc per epoch, tlsearch's trial function, "
                 f"{real['train_images']} train / {real['val_images']} val images):\n")
    for p in [*real["probes"], real["fine_tune"]]:
        lines.append(f"- {p['recipe']}, {p['backbone']} at {p['image_size']} px: {p['curve']} "
                     f"(start-up {p['startup_s']} s, epochs {p['epoch_seconds']} s)")
    m = real["measured"]
    lines.append(f"\nMeasured for the plan's cautious estimates: a full fine-tune epoch {m['fine_tune_epoch_s']} s, "
                 f"the probe's feature pass {m['feature_pass_s']} s (ratio {m['epoch_over_feature_pass']}); "
                 f"{m['fine_tune_images_per_core_s']} training images per second and core.\n")
    lines.append(f"Load at the end: {[round(x, 2) for x in os.getloadavg()]}.\n")
    return "\n".join(lines)


# ----- compare -----------------------------------------------------------------------------------


def layout(src: Path, dst: Path) -> Path:
    """train/, val/ and test/ as symlinks: val/ halved into val/ and test/ where there is no
    test/; where there is no val/, every 5th train file by name per class becomes val/."""
    def link(files: list[Path], split: str, cls: str) -> None:
        (dst / split / cls).mkdir(parents=True, exist_ok=True)
        for f in files:
            (dst / split / cls / f.name).symlink_to(f)

    for cls_dir in sorted(p for p in (src / "train").iterdir() if p.is_dir()):
        files = sorted(cls_dir.iterdir())
        if (src / "val").is_dir():
            link(files, "train", cls_dir.name)
        else:
            link([f for i, f in enumerate(files) if i % 5], "train", cls_dir.name)
            link([f for i, f in enumerate(files) if not i % 5], "val", cls_dir.name)
    if (src / "test").is_dir():
        for cls_dir in sorted(p for p in (src / "test").iterdir() if p.is_dir()):
            link(sorted(cls_dir.iterdir()), "test", cls_dir.name)
    if (src / "val").is_dir():
        for cls_dir in sorted(p for p in (src / "val").iterdir() if p.is_dir()):
            files = sorted(cls_dir.iterdir())
            half = len(files) // 2 if not (src / "test").is_dir() else len(files)
            link(files[:half], "val", cls_dir.name)
            if half < len(files):
                link(files[half:], "test", cls_dir.name)
    return dst


def run_fit(data: Path, work: Path, *, budget: float, seed: int) -> dict:
    """`tlsearch fit` (default preset) from cold caches in a fresh folder; wall-clock from outside."""
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TLSEARCH_CACHE": str(work / "cache")}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "search", "fit", str(data), "--time-budget", f"{budget:g}s",
                          "--study", "fit", "--out", "shipped", "--weights-dir", str(WEIGHTS), "--seed", str(seed),
                          "--no-progress", "--json"], cwd=work, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    row: dict[str, Any] = {"wall_s": round(wall, 1), "rc": out.returncode}
    if out.returncode:
        row["error"] = out.stderr[-600:]
        return row
    fit = json.loads(out.stdout)
    row.update(shipped=fit["shipped"], kind=fit["kind"], val=fit["val_score"],
               test=(fit.get("heldout") or {}).get("accuracy"))
    row["trials"] = study_trials(work / "studies" / "fit.db")
    return row


def study_trials(db: Path) -> list[dict]:
    """Each trial of a fit's study: state, recipe, freeze depth, epochs run of planned, last score."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.load_study(study_name="fit", storage=f"sqlite:///{db}")
    rows = []
    for t in st.trials:
        a = t.user_attrs
        if a.get("not_started"):
            continue
        curve = [round(c.get("val_acc") or 0.0, 3) for c in a.get("curve", [])]
        rows.append({"n": t.number, "state": t.state.name, "recipe": a.get("recipe"),
                     "backbone": str(t.params.get("backbone", "")).replace("timm/tf_efficientnet_", ""),
                     "freeze_depth": t.params.get("freeze_depth"), "epochs": (a.get("config") or {}).get("epochs"),
                     "stopped_by": a.get("stopped_by"), "curve": curve, "error": a.get("error")})
    return rows


def run_plain_search(data: Path, *, budget: float, seed: int) -> dict:
    from benchmarks import plain

    r = plain.search(str(data), str(WEIGHTS), budget_s=budget, image_size=128, epochs=3, seed=seed, threads=os.cpu_count())
    best = max((e["val_acc"] for e in r["log"]), default=None)
    complete = [e["val_acc"] for e in r["log"] if e["epoch"] == 3]
    return {"wall_s": round(r["wall_s"], 1), "val": max(complete) if complete else None, "val_any_epoch": best,
            "trials": r["trials"], "states": {k: v for k, v in r["states"].items() if v}}


def run_plain_fine_tune(data: Path, *, budget: float, seed: int) -> dict:
    """A plain full fine-tune of Lite0 at one rate for 3 epochs; its test/ accuracy."""
    import torch

    from benchmarks import plain

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    t0 = time.time()
    model = plain.make_model("tf_efficientnet_lite0", str(WEIGHTS / "tf_efficientnet_lite0.pth"), 1000, train_all=True)
    train, val, n = plain.loaders(model, str(data), image_size=128, batch_size=32, augment=False, seed=seed)
    model.reset_classifier(n)
    curve: list[float] = []
    acc = plain.train_and_validate(model, train, val, epochs=3, lr=5e-4, weight_decay=1e-2,
                                   on_epoch=lambda e, a, loss: curve.append(round(a, 4)))
    wall = time.time() - t0
    test = None
    if (data / "test").is_dir():
        from torchvision import datasets

        test_set = datasets.ImageFolder(str(data / "test"), val.dataset.transform)
        test = plain.accuracy(model, torch.utils.data.DataLoader(test_set, batch_size=64))
    return {"wall_s": round(wall, 1), "val": acc, "test": test, "curve": curve, "fits": wall <= budget}


def part_compare(args: argparse.Namespace) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            data = layout(SHARED / "data" / name, Path(tmp) / "data" / name)
            for seed in [int(s) for s in args.seeds.split(",")]:
                row: dict[str, Any] = {"data": name, "seed": seed, "budget_s": args.budget}
                for arm in args.arms.split(","):
                    print(f"[compare] {name} seed {seed}: {arm} ...", file=sys.stderr, flush=True)
                    if arm == "fit":
                        row["fit"] = run_fit(data, Path(tmp) / f"{name}-{seed}", budget=args.budget, seed=seed)
                        shutil.rmtree(Path(tmp) / f"{name}-{seed}" / "cache", ignore_errors=True)
                    elif arm == "plain":
                        row["plain"] = run_plain_search(data, budget=args.budget, seed=seed)
                    elif arm == "plain-ft" and seed == 0:  # one plain fine-tune per dataset
                        row["plain_ft"] = run_plain_fine_tune(data, budget=args.budget, seed=seed)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    return {"cpus": os.cpu_count(), "budget_s": args.budget, "rows": rows}


def _f(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}"


def compare_markdown(r: dict) -> str:
    lines = ["# `tlsearch fit` against the hand-written search (fairness, compare)\n",
             f"This machine: {r['cpus']} CPU cores, no GPU; budget {r['budget_s']:g} s per arm; cold caches; "
             "pretrained EfficientNet-Lite0/1 from ../shared/weights. plain search: Optuna TPE + MedianPruner "
             "over the tutorial's loop (3 epochs, head only or every layer, one rate); its val is the best "
             "3-epoch trial. plain FT: Lite0, every layer at 5e-4, 3 epochs, 128 px (one per dataset).\n",
             "| data | seed | fit val | fit test | fit ships | fit wall (s) | plain search val | plain FT val | "
             "plain FT test | plain FT wall (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        fit, plain, ft = row.get("fit") or {}, row.get("plain") or {}, row.get("plain_ft") or {}
        ships = fit.get("shipped", f"failed: {str(fit.get('error'))[-60:]}" if fit.get("rc") else "—")
        ft_wall = f"{ft['wall_s']}{'' if ft.get('fits') else ' (over T)'}" if ft else "—"
        lines.append(f"| {row['data']} | {row['seed']} | {_f(fit.get('val'))} | {_f(fit.get('test'))} | {ships} | "
                     f"{fit.get('wall_s', '—')} | {_f(plain.get('val'))} | {_f(ft.get('val'))} | {_f(ft.get('test'))} | "
                     f"{ft_wall} |")
    lines.append("\nfit's trials (state, recipe, backbone, freeze depth, epochs planned, val_acc per epoch):\n")
    for row in r["rows"]:
        for t in (row.get("fit") or {}).get("trials", []):
            lines.append(f"- {row['data']} s{row['seed']} #{t['n']} {t['state']}"
                         f"{' (' + t['stopped_by'] + ')' if t.get('stopped_by') else ''} {t['recipe'] or 'draw'} "
                         f"{t['backbone']} fd={t['freeze_depth']} e={t['epochs']}: {t['curve']}")
    lines.append(f"\nLoad at the end: {[round(x, 2) for x in os.getloadavg()]}.\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("replay", "compare"), required=True)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--datasets", default="hymenoptera,spoken_digits,aid25,cifar10_mini")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default="fit,plain,plain-ft")
    ap.add_argument("--budget", type=float, default=300.0)
    ap.add_argument("--tag", default="", help="a suffix for the results' file names")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if not WEIGHTS.is_dir():
        print(f"skipped: {WEIGHTS} is needed", file=sys.stderr)
        return 0
    sys.path.insert(0, str(REPO))
    if args.part == "replay":
        result, name, md = part_replay(args), "fairness-replay", replay_markdown
    else:
        result, name, md = part_compare(args), "fairness-compare-" + args.datasets.replace(",", "-"), compare_markdown
    name += f"-{args.tag}" if args.tag else ""
    from benchmarks._common import write_results

    write_results(args.out, name, result, md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
