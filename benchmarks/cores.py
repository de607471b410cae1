"""Part k: one fine-tune with every core against two one-core fine-tunes side by side.

    python -m benchmarks.cores [--data DIR] [--image-size 160]

The same trial (timm/tf_efficientnet_lite0 from ../shared/weights, every stage trained, one epoch,
no augmentation) runs once alone with all the machine's threads, then twice at once with one
thread each (two processes, as Ray runs two one-CPU trials). Reported: seconds per epoch of each,
and the throughput (epochs per minute, all runs together). Writes benchmarks/results/cores-DATA.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"

ONE = """
import json, sys, time
from search.config import TrialConfig
from search.data import scan_dataset
from search.trial import fine_tune
data, size, threads, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = TrialConfig(backbone="timm/tf_efficientnet_lite0", freeze_depth=0, augmentation="none", image_size=size,
                  epochs=1, batch_size=32, lr=2e-4)
r = fine_tune(cfg, scan_dataset(data), weights_dir=sys.argv[5], threads=threads, cache_dir=cache)
print(json.dumps({"threads": threads, "epoch_seconds": r.history[-1]["epoch_seconds"]}))
"""


def run(data: str, size: int, threads: list[int], cache: str) -> list[dict]:
    """Runs one process per entry of `threads` at once; returns what each printed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", ONE, data, str(size), str(t), cache, str(SHARED / "weights")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env) for t in threads]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(SHARED / "data" / "hymenoptera"))
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if not (SHARED / "weights" / "tf_efficientnet_lite0.pth").is_file():
        print(f"skipped: {SHARED}/weights/tf_efficientnet_lite0.pth is needed", file=sys.stderr)
        return 0
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as cache:
        run(args.data, args.image_size, [cpus], cache)  # builds the image cache: both arms find it warm
        t0 = time.time()
        alone = run(args.data, args.image_size, [cpus], cache)
        t_alone = time.time() - t0
        t0 = time.time()
        side = run(args.data, args.image_size, [1] * cpus, cache)
        t_side = time.time() - t0
    result = {
        "data": args.data, "image_size": args.image_size, "cpus": cpus, "load_end": list(os.getloadavg()),
        "alone": {"epoch_seconds": alone[0]["epoch_seconds"], "wall_s": t_alone,
                  "epochs_per_min": 60.0 / t_alone},
        "side_by_side": {"epoch_seconds": [r["epoch_seconds"] for r in side], "wall_s": t_side,
                         "epochs_per_min": 60.0 * len(side) / t_side},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cores-{Path(args.data).name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    side_epochs = ", ".join(f"{r['epoch_seconds']:.1f}" for r in side)
    md = (f"# One fine-tune with {cpus} threads vs {cpus} one-thread fine-tunes at once (part k)\n\n"
          f"{Path(args.data).name}, timm/tf_efficientnet_lite0, every stage, {args.image_size} px, one epoch, warm "
          f"image cache.\n\n| | seconds per epoch | wall (s) | epochs per minute, all together |\n|---|---|---|---|\n"
          f"| one trial, {cpus} threads | {alone[0]['epoch_seconds']:.1f} | {t_alone:.1f} | "
          f"{result['alone']['epochs_per_min']:.2f} |\n"
          f"| {cpus} trials, 1 thread each | {side_epochs} | {t_side:.1f} | "
          f"{result['side_by_side']['epochs_per_min']:.2f} |\n\nLoad at the end: {result['load_end']}.\n")
    (out / f"cores-{Path(args.data).name}.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
