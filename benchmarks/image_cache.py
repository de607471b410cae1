"""Part c: images/s of the decoded-image cache against decoding every JPEG with PIL.

    python -m benchmarks.bench --only c
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from benchmarks._common import DATA, Plan


def part_c(plan: Plan, work: Path) -> dict:
    import torch

    from search import augment
    from search.data import dataset_splits, scan_dataset

    index = scan_dataset(DATA, warn=lambda m: None)
    tf = augment.eval_transform(plan.image_size, mean=(0.5,) * 3, std=(0.5,) * 3)

    def images_per_s(cache: bool) -> float:
        ds = dataset_splits(index, image_size=plan.image_size, train_transform=tf, eval_transform=tf,
                            cache=cache, cache_dir=str(work / "cache-c"))[0]
        n, t = 0, time.perf_counter()
        for x, _ in torch.utils.data.DataLoader(ds, batch_size=32):
            n += len(x)
        return n / (time.perf_counter() - t)

    print("[c] image loading: cache build, cached, PIL ...", file=sys.stderr, flush=True)
    # One thread, as in a trial with one CPU (the default): per-image tensor ops gain nothing from
    # more, and on a busy machine a second thread makes every small op wait for it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = time.perf_counter()
    build_rate = images_per_s(True)  # the first pass builds the cache file
    build_s = time.perf_counter() - t
    cached = statistics.median(images_per_s(True) for _ in range(3))
    pil = statistics.median(images_per_s(False) for _ in range(3))
    torch.set_num_threads(threads)
    return {
        "images": len(index.train),
        "cache_build_s": round(build_s, 2),
        "first_pass_images_per_s": build_rate,
        "cached_images_per_s": cached,
        "pil_images_per_s": pil,
        "ratio": cached / pil,
        "note": "one pass over the train split, eval transform (center crop + normalise), one process, 1 torch thread",
        "goal": ">= 3x images/s",
        "met": cached / pil >= 3,
    }
