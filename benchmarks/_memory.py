"""Peak memory of a first (cold) head-only trial as the dataset grows (part f of benchmarks/bench.py).

`make_photos` writes a dataset of 400x300 JPEG photos fast (a few hundred distinct pictures, each
file made unique by a JPEG comment); `measure` runs one trial in a child process
(this file run as a script) and reports its peak resident memory: the kernel's maximum
(ru_maxrss, anonymous and file-backed pages together) and, sampled every 20 ms, the peak of
anonymous memory alone (what the process itself allocated, as opposed to pages of mapped files
that the page cache holds and may drop).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PHOTO_SIZE = (400, 300)  # width, height
DISTINCT_PER_CLASS = 40  # distinct pictures per class; the rest are copies with their own comment


def make_photos(root: Path, n: int, *, classes: int = 5, seed: int = 0) -> Path:
    """Writes `n` 400x300 JPEGs into root/<class>/ (class folders, no split: val is drawn from them).

    Args:
        root: the dataset folder to create.
        n: number of images, spread evenly over the classes.
        classes: number of class folders.
        seed: seed of the pictures (colour gradient per class plus noise).

    Returns:
        root.
    """
    import io

    import numpy as np
    from PIL import Image

    w, h = PHOTO_SIZE
    yy, xx = np.mgrid[0:h, 0:w]

    def picture(c: int, k: int) -> bytes:
        rng = np.random.default_rng([seed, c, k])
        base = np.stack([(xx * (c + 1) * 255 / w) % 256, (yy * (classes - c) * 255 / h) % 256,
                         np.full_like(xx, (40 * c + 3 * k) % 256)], -1)
        img = (base + rng.integers(0, 48, (h, w, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        pool_pictures = {c: list(pool.map(lambda k, c=c: picture(c, k), range(DISTINCT_PER_CLASS)))
                         for c in range(classes)}
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % classes
        jpeg = pool_pictures[c][(i // classes) % DISTINCT_PER_CLASS]
        comment = f"photo {i}".encode()
        # A COM segment right after SOI: every file's bytes differ, the picture does not.
        unique = jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]
        (root / f"class{c}" / f"{i:06d}.jpg").write_bytes(unique)
    return root


def measure(data: Path, *, cache_dir: Path, threads: int, image_size: int = 128,
            python_path: str | None = None) -> dict[str, Any]:
    """Runs one head-only Lite0 trial (1 epoch, no augmentation) in a child process.

    Args:
        data: the dataset folder.
        cache_dir: its TLSEARCH_CACHE (empty: a first trial that builds the caches; built: warm).
        threads: torch threads of the trial.
        image_size: the backbone's input side.
        python_path: where `search` is imported from in the child; None: this checkout.

    Returns:
        peak_rss_mb (ru_maxrss), peak_anon_mb (sampled), wall_s, and the child's own figures
        (images, scan_s, trial_s, val_acc).
    """
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TLSEARCH_CACHE": str(cache_dir), "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": python_path or str(repo)}
    # Run as a script: its folder, not the repository, heads sys.path, so `search` comes from python_path.
    cmd = [sys.executable, str(Path(__file__).resolve()), str(data), str(threads), str(image_size)]
    t0 = time.time()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=str(repo))
        peak = {"anon": 0}
        done = threading.Event()

        def sample() -> None:
            status = Path(f"/proc/{proc.pid}/status")
            while not done.is_set():
                try:
                    for line in status.read_text().splitlines():
                        if line.startswith("RssAnon:"):
                            peak["anon"] = max(peak["anon"], int(line.split()[1]))
                except OSError:
                    return
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # wait4, not Popen.wait: it also returns the child's resource usage (its peak RSS).
        _, code, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(code)
        done.set()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0 or not stdout.strip():
        raise RuntimeError(f"memory trial failed ({proc.returncode}): {stderr[-2000:]}")
    figures = json.loads(stdout.strip().splitlines()[-1])
    return {**figures, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "peak_anon_mb": round(peak["anon"] / 1024, 1), "wall_s": round(time.time() - t0, 1)}


def _child(data: str, threads: int, image_size: int) -> None:
    from search.config import TrialConfig
    from search.data import scan_dataset
    from search.trial import fine_tune

    shared = Path(__file__).resolve().parents[2] / "shared" / "weights"
    t = time.time()
    index = scan_dataset(data, warn=lambda m: None)
    scan_s = time.time() - t
    cfg = TrialConfig(backbone="timm/tf_efficientnet_lite0", freeze_depth="all", augmentation="none",
                      image_size=image_size, epochs=1, batch_size=32, lr=1e-3, optimizer="adamw")
    result = fine_tune(cfg, index, weights_dir=str(shared), cache=True, threads=threads)
    import search

    print(json.dumps({"search": str(Path(search.__file__).parent), "images": len(index.train) + len(index.val),
                      "scan_s": round(scan_s, 1), "trial_s": round(result.seconds, 1),
                      "val_acc": result.final["val_acc"]}), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
