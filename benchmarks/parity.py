"""Part j: tlsearch's trainer against the reference loop (benchmarks/plain.py), same config.

    python -m benchmarks.parity                    # spoken_digits and hymenoptera, 3 seeds
    python -m benchmarks.parity --quick            # one seed, one epoch, spoken_digits
    python -m benchmarks.parity --arms plain,tlsearch,tlsearch-defaults

Every arm trains timm/tf_efficientnet_lite0 (../shared/weights) on the same split with the same
settings: all layers trained, AdamW at one rate for every layer, the same weight decay, batch size,
image size, epochs and CPU threads, no augmentation. Per epoch, validation accuracy side by side,
and for each tlsearch arm the paired difference to the reference loop (seed by seed) with a 95%
t-interval over seeds.

Arms:
  plain              the reference loop (constant rate, the tutorial's);
  tlsearch           `search.trial.fine_tune` with exactly those settings (backbone_lr_mult 1,
                     lr_decay 1, no warm-up), its schedule as it is;
  tlsearch-cosine-steps  the same, with the rate decayed every batch by a cosine to zero at the
                     last one (`lr_schedule: cosine_steps`, every trial's schedule before);
  tlsearch-defaults  the same settings stated in a space, and what tlsearch fills in for what the
                     space does not state (warm-up, layer-wise decay at its prior's middle, the
                     backbone's share of a user's lr);
  tlsearch-lpft      `tlsearch` from the head the space's linear probe trains (LP-FT: `lp_epochs`
                     = the default space's max_epochs, at the probe recipe's rate);
  tlsearch-recipe    the default space's "full fine-tune" recipe as the search runs it (its rates,
                     batch size, weight decay and warm-up), at the case's image size and epochs.

The first arm is the reference of the paired differences (`plain` where it runs).

Writes benchmarks/results/parity.json and .md (parity-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS_DIR = SHARED / "weights"
RESULTS = REPO / "benchmarks" / "results"
BACKBONE = "tf_efficientnet_lite0"
ARMS = ("plain", "tlsearch", "tlsearch-cosine-steps", "tlsearch-defaults", "tlsearch-lpft", "tlsearch-recipe")
# t quantiles (0.975) by degrees of freedom, for the paired interval over seeds.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass(frozen=True)
class Case:
    """One dataset and the config every arm trains on it."""

    name: str  # folder under ../shared/data
    image_size: int
    lr: float  # one rate for every layer
    epochs: int
    weight_decay: float = 1e-2  # AdamW's own default, what the reference loop passes too
    batch_size: int = 32


CASES = {
    # Far from ImageNet: fine-tuning beats the linear probe by 15 points (../shared/README.md).
    "spoken_digits": Case("spoken_digits", image_size=128, lr=5e-4, epochs=3),
    # Photos: the tutorial's dataset; a rate like the one a user's search found there.
    "hymenoptera": Case("hymenoptera", image_size=160, lr=1.8e-4, epochs=3),
}


def plain_arm(case: Case, seed: int, threads: int) -> list[dict]:
    from benchmarks import plain

    import torch

    torch.set_num_threads(threads)
    curve: list[dict] = []
    t0 = time.time()
    plain.fine_tune(
        str(SHARED / "data" / case.name), str(WEIGHTS_DIR), backbone=BACKBONE, image_size=case.image_size,
        epochs=case.epochs, lr=case.lr, weight_decay=case.weight_decay, batch_size=case.batch_size, seed=seed,
        on_epoch=lambda e, acc, loss: curve.append({"epoch": e, "val_acc": acc, "train_loss": loss,
                                                    "t": round(time.time() - t0, 1)}),
    )
    return curve


def trial_config(case: Case, seed: int, arm: str) -> Any:
    """The TrialConfig of a tlsearch arm."""
    from search.config import TrialConfig
    from search.space import Constant, SearchSpace, with_finetune_priors
    from search.space._params import _middle

    stated: dict[str, Any] = dict(
        backbone=f"timm/{BACKBONE}", freeze_depth=0, augmentation="none", image_size=case.image_size,
        batch_size=case.batch_size, optimizer="adamw", lr=case.lr, weight_decay=case.weight_decay, seed=seed,
    )
    if arm == "tlsearch-defaults":
        # What the plain loop states, in a space; the rest is what tlsearch fills in (each prior
        # range at its middle): warm-up, layer-wise decay, the backbone's share, LP-FT.
        space = with_finetune_priors(SearchSpace.from_dict({**stated, "max_epochs": case.epochs}))
        drawn = {name: _middle(p) for name, p in space.params if not isinstance(p, Constant)}
        return space.to_trial_config(drawn)
    if arm == "tlsearch-recipe":
        from search.space import RECIPES, default_space_at_hand

        space = with_finetune_priors(default_space_at_hand(gpu=False, weights_dir=str(WEIGHTS_DIR))[0])
        recipe = next(r for r in RECIPES if r.name == "full fine-tune")
        params = space._recipe_params(recipe, f"timm/{BACKBONE}")
        return space.to_trial_config(params).replace(image_size=case.image_size, epochs=case.epochs, seed=seed)
    fields = dict(stated, epochs=case.epochs, backbone_lr_mult=1.0, lr_decay=1.0, warmup_epochs=0.0)
    if arm == "tlsearch-cosine-steps":
        fields.update(lr_schedule="cosine_steps")
    if arm == "tlsearch-lpft":
        from search.space import PROBE_LR, default_space

        fields.update(lp_epochs=default_space(gpu=False).max_epochs, lp_lr=PROBE_LR)
    return TrialConfig(**fields)


def tlsearch_arm(case: Case, seed: int, threads: int, arm: str, cache_dir: str) -> list[dict]:
    from search.data import scan_dataset
    from search.trial import fine_tune

    index = scan_dataset(SHARED / "data" / case.name)
    curve: list[dict] = []
    t0 = time.time()
    fine_tune(
        trial_config(case, seed, arm), index, weights_dir=str(WEIGHTS_DIR), threads=threads, cache_dir=cache_dir,
        report=lambda m: curve.append({"epoch": m["epoch"], "val_acc": m["val_acc"], "train_loss": m["train_loss"],
                                       "t": round(time.time() - t0, 1)}),
    )
    return curve


def paired(diffs: list[float]) -> dict:
    """Mean of the paired differences and a 95% t-interval over seeds."""
    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": m, "low": None, "high": None}
    half = T975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": m, "low": m - half, "high": m + half}


def run_case(case: Case, seeds: list[int], arms: list[str], threads: int, work: Path) -> dict:
    runs: list[dict] = []
    for i, seed in enumerate(seeds):
        for arm in (arms if i % 2 == 0 else arms[::-1]):  # alternate the order: load falls on every arm
            print(f"[j] {case.name} seed {seed} {arm} ...", file=sys.stderr, flush=True)
            cache = str(work / f"{case.name}-{arm}-{seed}")  # cold caches for every run
            curve = plain_arm(case, seed, threads) if arm == "plain" else tlsearch_arm(case, seed, threads, arm, cache)
            print(f"    {[round(c['val_acc'], 3) for c in curve]}", file=sys.stderr, flush=True)
            runs.append({"arm": arm, "seed": seed, "curve": curve})
    by = {(r["arm"], r["seed"]): r["curve"] for r in runs}
    epochs = []
    for e in range(1, case.epochs + 1):
        row: dict[str, Any] = {"epoch": e}
        for arm in arms:
            accs = [by[arm, s][e - 1]["val_acc"] for s in seeds]
            row[arm] = {"mean": statistics.fmean(accs), "per_seed": accs}
            if arm != arms[0]:
                row[arm]["vs_ref"] = paired([a - p for a, p in zip(accs, row[arms[0]]["per_seed"])])
        epochs.append(row)
    return {"case": case.__dict__, "seeds": seeds, "arms": arms, "runs": runs, "epochs": epochs}


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:+.1f}"


def markdown(result: dict) -> str:
    lines = []
    for c in result["cases"]:
        case, arms = c["case"], c["arms"]
        lines += [
            f"## {case['name']}",
            "",
            f"timm/{BACKBONE}, all layers trained, AdamW at {case['lr']:g} for every layer, weight decay "
            f"{case['weight_decay']:g}, batch {case['batch_size']}, {case['image_size']} px, no augmentation, "
            f"{result['threads']} threads, seeds {', '.join(map(str, c['seeds']))}, cold caches. Val accuracy "
            "(mean over seeds; per seed in brackets); against the reference: mean paired difference in points "
            "with a 95% t-interval over seeds.",
            "",
            "| epoch | " + " | ".join(arms) + " | " + " | ".join(f"{a} − {arms[0]}" for a in arms[1:]) + " |",
            "|---" * (2 * len(arms)) + "|",
        ]
        for row in c["epochs"]:
            cells = [f"{row[a]['mean']:.3f} ({', '.join(f'{v:.3f}' for v in row[a]['per_seed'])})" for a in arms]
            diffs = [f"{_pct(row[a]['vs_ref']['mean'])} [{_pct(row[a]['vs_ref']['low'])}, "
                     f"{_pct(row[a]['vs_ref']['high'])}]" for a in arms[1:]]
            lines.append(f"| {row['epoch']} | " + " | ".join(cells) + " | " + " | ".join(diffs) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, one epoch, spoken_digits")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {','.join(CASES)}")
    ap.add_argument("--arms", default="plain,tlsearch,tlsearch-cosine-steps,tlsearch-defaults", help=f"comma-separated, of {','.join(ARMS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: each case's)")
    ap.add_argument("--batch-size", type=int, default=None, help="batch size of every run (default: each case's)")
    ap.add_argument("--stem", default=None, help="results file name (default: parity, parity-quick)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if not (SHARED / "data").is_dir() or not (WEIGHTS_DIR / f"{BACKBONE}.pth").is_file():
        print(f"skipped: {SHARED} with data/ and weights/{BACKBONE}.pth is needed", file=sys.stderr)
        return 0
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"unknown arm {unknown[0]!r}; available: {', '.join(ARMS)}", file=sys.stderr)
        return 2
    cases = [CASES[c] for c in args.cases.split(",") if c]
    if args.epochs:
        cases = [Case(**{**c.__dict__, "epochs": args.epochs}) for c in cases]
    if args.batch_size:
        cases = [Case(**{**c.__dict__, "batch_size": args.batch_size}) for c in cases]
    seeds = [0] if args.quick else list(range(args.seeds))
    if args.quick:
        cases = [Case(**{**CASES["spoken_digits"].__dict__, "epochs": 1})]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="tlsearch-bench-j-") as work:
        os.environ["TLSEARCH_CACHE"] = work
        result = {"threads": args.threads, "cases": [run_case(c, seeds, arms, args.threads, Path(work)) for c in cases]}
    result.update(total_s=round(time.time() - t0, 1), finished=time.strftime("%Y-%m-%d %H:%M"),
                  machine={"cpus": os.cpu_count(), "load_end": list(os.getloadavg())})
    stem = args.stem or ("parity-quick" if args.quick else "parity")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    table = markdown(result)
    (out / f"{stem}.md").write_text(f"# Trainer parity (part j)\n\n{table}\nTotal {result['total_s']:.0f} s.\n",
                                    encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
