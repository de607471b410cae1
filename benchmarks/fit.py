"""Part m: `tlsearch fit` with each preset on real data, against its budget and against retraining.

    python -m benchmarks.fit [--datasets hymenoptera,spoken_digits] [--presets fast,good,best]
                             [--budgets fast=60,good=180,best=180] [--refit good]

For each dataset of ../shared/data a copy is laid out with a test/ split (symlinks, nothing is
copied): train/ as it is, each class's val/ images halved, the first half staying val/, the second
becoming test/. Then for each preset, from cold caches in a fresh folder:

1. `tlsearch fit DATA --time-budget T --preset P --json`: its wall-clock, measured from outside the
   process (from before the interpreter starts to after it exits), against T (goal <= 1.05 T), and
   the summary's own; what it shipped, the shipped model's val score and its held-out (test/) accuracy;
2. the five-command path's last steps on the same study: `tlsearch train` of the best config it
   exported (retraining from scratch, caches warm), then `tlsearch evaluate` on test/: the retrained
   model's held-out accuracy (goal: the shipped model's is not lower) and the time `fit` saved.

`--refit P` adds, on the first dataset, one row of `fit --preset P --refit` at P's budget.

Writes benchmarks/results/fit-DATASETS.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"
WEIGHTS = SHARED / "weights"
TLSEARCH = [sys.executable, "-m", "search"]


def with_test_split(src: Path, dst: Path) -> Path:
    """`dst`: src's train/, and its val/ halved per class into val/ and test/ (symlinks)."""
    for cls in sorted(p for p in (src / "train").iterdir() if p.is_dir()):
        (dst / "train" / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir()):
            (dst / "train" / cls.name / f.name).symlink_to(f)
    for cls in sorted(p for p in (src / "val").iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        half = len(files) // 2
        for split, part in (("val", files[:half]), ("test", files[half:])):
            (dst / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in part:
                (dst / split / cls.name / f.name).symlink_to(f)
    return dst


def command(args: list[str], *, cwd: Path, env: dict) -> tuple[dict | None, float, str]:
    """Runs one tlsearch command: (its --json output or None, wall seconds, the end of stderr).

    The wall seconds are this process's: from before the command's interpreter starts to after it
    has exited, its own start-up and shutdown included (what a user waits)."""
    t0 = time.monotonic()
    out = subprocess.run([*TLSEARCH, *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    try:
        obj = json.loads(out.stdout) if out.returncode == 0 else None
    except json.JSONDecodeError:
        obj = None
    return obj, wall, f"rc {out.returncode}: {out.stderr[-600:]}" if out.returncode else ""


def one(data: Path, preset: str, budget_s: float, work: Path, *, refit: bool = False) -> dict:
    """fit with one preset, then the retrain of its best config; fresh folder, cold caches."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TLSEARCH_CACHE": str(work / "cache")}
    work.mkdir(parents=True)
    study = f"{data.name}-{preset}" + ("-refit" if refit else "")
    fit, fit_wall, err = command(["fit", str(data), "--time-budget", f"{budget_s:g}s", "--preset", preset,
                                  "--study", study, "--out", "shipped", "--weights-dir", str(WEIGHTS),
                                  "--no-progress", "--json", *(["--refit"] if refit else [])], cwd=work, env=env)
    row: dict = {"data": data.name, "preset": preset + (" --refit" if refit else ""), "budget_s": budget_s,
                 "fit_wall_s": round(fit_wall, 1), "over_budget": round(fit_wall / budget_s, 3), "error": err or None}
    if fit is None:
        return row
    row.update(shipped=fit.get("shipped"), kind=fit.get("kind"), val_score=fit.get("val_score"),
               heldout_acc=(fit.get("heldout") or {}).get("accuracy"), phases=fit.get("phases"),
               fit_reported_wall_s=fit.get("wall_seconds"), refit=fit.get("refit"), notes=fit.get("notes"))
    best = fit.get("best_config")
    if not best:
        return row
    trained, train_wall, err = command(["train", best, str(data), "--out", "retrained", "--weights-dir", str(WEIGHTS),
                                        "--json"], cwd=work, env=env)
    row.update(retrain_wall_s=round(train_wall, 1), retrain_val_acc=(trained or {}).get("val_acc"),
               retrain_error=err or None)
    if trained is not None:
        ev, _, err = command(["evaluate", "retrained", str(data), "--json"], cwd=work, env=env)
        row.update(retrain_heldout_acc=(ev or {}).get("accuracy"), evaluate_error=err or None)
    return row


def _f(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def markdown(rows: list[dict], cpus: int) -> str:
    lines = ["# `tlsearch fit` per preset (part m)\n",
             f"This machine: {cpus} CPU cores, no GPU. ../shared's datasets with val/ halved into val/ and test/; "
             "pretrained EfficientNet-Lite0/1 from ../shared/weights; cold caches. \"Retrained\": `tlsearch train` of "
             "the best config `fit` exported (the five-command path), then `tlsearch evaluate` on test/.\n",
             "\"fit wall\" is measured from outside the process (interpreter start to exit); \"summary\" is the "
             "wall-clock fit's own summary states.\n",
             "| data | preset | T (s) | fit wall (s) | wall / T | summary (s) | shipped | val | held-out acc "
             "| retrained held-out acc | retrain (s), the time fit saved |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['data']} | {r['preset']} | {r['budget_s']:g} | {r['fit_wall_s']} | "
                         f"{r['over_budget']} | | failed: {r['error'][:80]} | | | | |")
            continue
        lines.append(f"| {r['data']} | {r['preset']} | {r['budget_s']:g} | {r['fit_wall_s']} | {r['over_budget']} | "
                     f"{_f(r.get('fit_reported_wall_s'), 1)} | {r.get('shipped')} ({r.get('kind')}"
                     f"{', refit' if r.get('refit') else ''}) | {_f(r.get('val_score'))} | {_f(r.get('heldout_acc'))} | "
                     f"{_f(r.get('retrain_heldout_acc'))} | {_f(r.get('retrain_wall_s'), 1)} |")
    lines.append(f"\nLoad at the end: {[round(x, 2) for x in os.getloadavg()]}.\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="hymenoptera,spoken_digits")
    ap.add_argument("--presets", default="fast,good,best")
    ap.add_argument("--budgets", default="fast=60,good=180,best=180", help="seconds per preset")
    ap.add_argument("--refit", default=None, metavar="PRESET",
                    help="one more row on the first dataset: fit --preset PRESET --refit at that preset's budget")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if not WEIGHTS.is_dir():
        print(f"skipped: {WEIGHTS} is needed", file=sys.stderr)
        return 0
    budgets = {k: float(v) for k, v in (kv.split("=") for kv in args.budgets.split(","))}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            data = with_test_split(SHARED / "data" / name, Path(tmp) / "data" / name)
            for preset in args.presets.split(","):
                print(f"[m] {name}, fit --preset {preset}, {budgets[preset]:g} s ...", file=sys.stderr, flush=True)
                rows.append(one(data, preset, budgets[preset], Path(tmp) / f"{name}-{preset}"))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                shutil.rmtree(Path(tmp) / f"{name}-{preset}" / "cache", ignore_errors=True)
            if args.refit and name == args.datasets.split(",")[0]:
                preset = args.refit
                print(f"[m] {name}, fit --preset {preset} --refit, {budgets[preset]:g} s ...", file=sys.stderr, flush=True)
                rows.append(one(data, preset, budgets[preset], Path(tmp) / f"{name}-{preset}-refit", refit=True))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                shutil.rmtree(Path(tmp) / f"{name}-{preset}-refit" / "cache", ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "fit-" + args.datasets.replace(",", "-")
    (out / f"{name}.json").write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n", encoding="utf-8")
    md = markdown(rows, os.cpu_count() or 1)
    (out / f"{name}.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
