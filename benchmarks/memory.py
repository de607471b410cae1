"""Part f: peak memory of a first (cold) head-only trial, which builds the caches, on generated
datasets of 400x300 JPEG photos (benchmarks/_memory.py): it must stay flat as the dataset grows,
apart from the cached features it holds.

    python -m benchmarks.bench --only f
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from benchmarks._common import BACKBONE, MEMORY_IMAGE_SIZE, MEMORY_THREADS, Plan


def part_f(plan: Plan, work: Path) -> dict:
    from benchmarks import _memory

    runs = []
    for n in plan.memory_sizes:
        data, cache = work / f"photos-{n}", work / f"cache-f-{n}"
        print(f"[f] {n} photos: generating, then a first and a second head-only trial ...", file=sys.stderr, flush=True)
        t = time.time()
        _memory.make_photos(data, n)
        made_s = time.time() - t
        cold = _memory.measure(data, cache_dir=cache, threads=MEMORY_THREADS, image_size=MEMORY_IMAGE_SIZE)
        warm = _memory.measure(data, cache_dir=cache, threads=MEMORY_THREADS, image_size=MEMORY_IMAGE_SIZE)
        sizes = {name: sum(f.stat().st_size for f in (cache / name).glob(pattern))
                 for name, pattern in (("images", "*.u8"), ("features", "*.pt"))}
        runs.append({"images": n, "generate_s": round(made_s, 1), "first_trial": cold, "warm_trial": warm,
                     "image_cache_mb": round(sizes["images"] / 2**20, 1),
                     "features_mb": round(sizes["features"] / 2**20, 1)})
        shutil.rmtree(data, ignore_errors=True)  # mind the disk: 20k photos and their cache are ~2 GB
        shutil.rmtree(cache, ignore_errors=True)
    small, large = runs[0], runs[-1]
    allowed = 1.2 * small["first_trial"]["peak_rss_mb"] + large["features_mb"]
    return {
        "backbone": BACKBONE, "image_size": MEMORY_IMAGE_SIZE, "threads": MEMORY_THREADS, "runs": runs,
        "allowed_mb": round(allowed, 1),
        "note": "peak_rss_mb: the kernel's peak resident set (ru_maxrss: anonymous and file-backed pages); "
                "peak_anon_mb: anonymous memory alone, sampled every 20 ms. One epoch, freeze_depth all, "
                "augmentation none; a fresh cache for the first trial, the same cache for the warm one.",
        "goal": f"first-trial peak at {large['images']} images <= 1.2 x the peak at {small['images']} "
                f"+ the cached features at {large['images']}",
        "met": large["first_trial"]["peak_rss_mb"] <= allowed,
    }
