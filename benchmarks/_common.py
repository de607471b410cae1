"""What every part of benchmarks/bench.py shares: paths, sizes, settings, small helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "hymenoptera"
WEIGHTS_DIR = SHARED / "weights"
BACKBONE = "timm/tf_efficientnet_lite0"
RESULTS = REPO / "benchmarks" / "results"

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


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def met(v: Any) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[v]



def write_results(out: str | Path, name: str, result: dict, markdown: str) -> None:
    """Writes `name`.json (the result) and `name`.md (its table) under `out`, and prints the table."""
    import json

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (folder / f"{name}.md").write_text(markdown, encoding="utf-8")
    print(markdown)
