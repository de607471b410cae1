"""What `tlsearch check --labels` finds on real data with planted label errors and near-duplicates.

    python -m benchmarks.data_issues [--per-class-train 60] [--per-class-val 20]

For each dataset of ../shared (aid25, cut to 60 train + 20 val images per class: 2,000 images;
hymenoptera whole), a copy in a temporary folder gets:

- label errors: 2.5% of the train images moved into another class's folder (chosen at random);
- near-duplicates: copies of val images, resized to 0.5-0.7x and JPEG re-encoded at quality 60-80,
  put in train/ (in their own class); and copies trimmed by 4% on each side (quality 75), counted
  apart.

Then `tlsearch check COPY --labels --json --weights-dir ../shared/weights` runs once in a fresh
process with an empty cache (cold: decode, features, probe, cleanlab), timed from the launch.
Reported: precision and recall of the listed label issues in their top k and top 2k (k = the
planted errors; goal: recall >= 0.8 in the top 2k), the near-duplicate recall (goal 1.0) and any
pair not planted, and the pairs found on the clean datasets (goal: none) with the closest
cross-split similarity there. Writes benchmarks/results/data_issues.json and .md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"
IMAGE_EXTS = {".jpg", ".jpeg", ".png"}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)


def make_copy(src: Path, dst: Path, *, per_class_train: int | None, per_class_val: int | None, seed: int) -> None:
    """DATA's train/ and val/ copied to dst, cut to the first N images per class (by a seeded draw)."""
    rng = random.Random(seed)
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            files = _images(cls)
            if n is not None and len(files) > n:
                files = sorted(rng.sample(files, n))
            (dst / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, dst / split / cls.name / f.name)


def plant_label_errors(root: Path, *, fraction: float, seed: int) -> list[dict]:
    """Moves `fraction` of train images into another class's folder; returns what moved where."""
    rng = random.Random(seed)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    files = _images(root / "train")
    moved = []
    for f in sorted(rng.sample(files, max(1, round(fraction * len(files))))):
        true = f.parent.name
        wrong = rng.choice([c for c in classes if c != true])
        dst = root / "train" / wrong / f"moved_{f.name}"
        shutil.move(f, dst)
        moved.append({"path": str(dst), "true": true, "given": wrong})
    return moved


def plant_near_duplicates(root: Path, *, n_resized: int, n_trimmed: int, seed: int) -> list[dict]:
    """Resized + re-encoded and trimmed copies of val images, put in train/ in their own class."""
    from PIL import Image

    rng = random.Random(seed)
    val = _images(root / "val")
    picks = rng.sample(val, n_resized + n_trimmed)
    planted = []
    for k, src in enumerate(picks):
        im = Image.open(src).convert("RGB")
        w, h = im.size
        if k < n_resized:
            kind, scale, quality = "resized", rng.uniform(0.5, 0.7), rng.randint(60, 80)
        else:
            kind, scale, quality = "trimmed", 1.0, 75
            dx, dy = round(0.04 * w), round(0.04 * h)
            im = im.crop((dx, dy, w - dx, h - dy))
        im = im.resize((max(8, round(im.width * scale)), max(8, round(im.height * scale))), Image.Resampling.BILINEAR)
        dst = root / "train" / src.parent.name / f"{kind}_copy_{src.stem}.jpg"
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        dst.write_bytes(buf.getvalue())
        planted.append({"copy": str(dst), "of": str(src), "kind": kind, "scale": round(scale, 3), "quality": quality})
    return planted


def run_check(root: Path, cache: Path) -> tuple[dict, float]:
    """`tlsearch check ROOT --labels --json` in a fresh process with an empty cache; (its JSON, seconds)."""
    env = {**os.environ, "TLSEARCH_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "search", "check", str(root), "--labels", "--json",
                          "--weights-dir", str(SHARED / "weights")], capture_output=True, text=True, env=env,
                         timeout=1200)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"check failed on {root}: {out.stderr[-2000:]}")
    return json.loads(out.stdout), seconds


def label_scores(issues: list[dict], moved: list[dict]) -> dict:
    planted = {m["path"] for m in moved}
    k = len(planted)
    ranked = [r["path"] for r in issues]
    out = {"planted": k, "listed": len(ranked)}
    for name, n in (("k", k), ("2k", 2 * k)):
        hits = len(planted & set(ranked[:n]))
        out[f"recall_top_{name}"] = round(hits / k, 3)
        out[f"precision_top_{name}"] = round(hits / max(1, min(n, len(ranked))), 3)
    hits_all = len(planted & set(ranked))
    out["recall_all_listed"] = round(hits_all / k, 3)
    suggested = {r["path"]: r["suggested"] for r in issues}
    right = [m for m in moved if suggested.get(m["path"]) == m["true"]]
    out["true_class_suggested"] = f"{len(right)} of {hits_all} found"
    return out


def near_scores(found: list[dict], planted: list[dict]) -> dict:
    pairs = {frozenset((d["a"]["path"], d["b"]["path"])): d for d in found}
    out: dict = {}
    for kind in ("resized", "trimmed"):
        mine = [p for p in planted if p["kind"] == kind]
        hits = [p for p in mine if frozenset((p["copy"], p["of"])) in pairs]
        named = all({pairs[frozenset((p["copy"], p["of"]))]["a"]["split"],
                     pairs[frozenset((p["copy"], p["of"]))]["b"]["split"]} == {"train", "val"} for p in hits)
        out[kind] = {"planted": len(mine), "found": len(hits), "recall": round(len(hits) / max(1, len(mine)), 3),
                     "splits_named_train_val": named}
    planted_pairs = {frozenset((p["copy"], p["of"])) for p in planted}
    out["pairs_not_planted"] = [d for key, d in pairs.items() if key not in planted_pairs]
    out["precision"] = round((len(pairs) - len(out["pairs_not_planted"])) / max(1, len(pairs)), 3)
    return out


def clean_pairs(data: Path) -> dict:
    """Near-duplicate pairs found on an untouched dataset, and its closest cross-split similarity."""
    import numpy as np

    from search.data import NEAR_DUPLICATE_SIMILARITY, fingerprint_files, near_duplicates, scan_dataset
    from search.data._near import similar_pairs

    t0 = time.perf_counter()
    index = scan_dataset(data, warn=lambda _: None)
    splits = [[p for p, _ in s] for _, s in index._splits() if s]
    prints = fingerprint_files([p for paths in splits for p in paths])
    found = near_duplicates(index, prints=prints)
    a = np.stack([prints[p] for p in splits[0] if p in prints])
    b = np.stack([prints[p] for p in splits[1] if p in prints])
    closest = max((s for _, _, s in similar_pairs(a, b, threshold=0.9)), default=None)
    return {"dataset": data.name, "images": sum(map(len, splits)), "threshold": NEAR_DUPLICATE_SIMILARITY,
            "pairs_found": len(found), "closest_cross_split_similarity": round(closest, 4) if closest else "< 0.9",
            "seconds": round(time.perf_counter() - t0, 1)}


def bench_dataset(name: str, *, per_class_train: int | None, per_class_val: int | None, work: Path, seed: int) -> dict:
    root = work / name
    make_copy(SHARED / "data" / name, root, per_class_train=per_class_train, per_class_val=per_class_val, seed=seed)
    images = len(_images(root))
    moved = plant_label_errors(root, fraction=0.025, seed=seed)
    n_val = len(_images(root / "val"))
    planted = plant_near_duplicates(root, n_resized=min(20, n_val // 4), n_trimmed=min(10, n_val // 8), seed=seed)
    result, seconds = run_check(root, work / f"cache-{name}")
    li = result["label_issues"]
    top = [{k: r[k] for k in ("rank", "split", "given", "suggested", "given_prob")}
           | {"path": os.path.relpath(r["path"], root), "planted": r["path"] in {m["path"] for m in moved}}
           for r in li["issues"][:10]]
    return {
        "dataset": name, "images_before_planting": images, "images_checked_by_probe": li["images"],
        "classes": len(result["classes"]), "image_size": li["image_size"], "backbone": li["backbone"],
        "folds": li["folds"], "probe_accuracy": li["probe_accuracy"],
        "check_seconds_cold": round(seconds, 1), "label_seconds": li["seconds"], "feature_seconds": li["feature_seconds"],
        "labels": label_scores(li["issues"], moved), "top10": top,
        "near_duplicates": near_scores(result["near_duplicates_across_splits"], planted),
        "exact_duplicates_across_splits": len(result["duplicates_across_splits"]),
    }


def to_markdown(res: dict) -> str:
    lines = ["# check --labels and near-duplicates on real data with planted issues", "",
             f"{res['machine']}; `python -m benchmarks.data_issues`; cold: a fresh process and an empty cache, "
             "timed from the launch (scan, near-duplicates, decode, features, probe, cleanlab).", "",
             "| dataset | images | classes | check, cold (s) | of which labels (s) | probe acc. | planted errors | "
             "recall top k | precision top k | recall top 2k | listed | near-dup recall (resized+JPEG) | "
             "trimmed 4% | pairs not planted |", "|" + "---|" * 14]
    for d in res["datasets"]:
        lab, near = d["labels"], d["near_duplicates"]
        lines.append(f"| {d['dataset']} | {d['images_before_planting']} | {d['classes']} | {d['check_seconds_cold']} | "
                     f"{d['label_seconds']} | {d['probe_accuracy']} | {lab['planted']} | {lab['recall_top_k']} | "
                     f"{lab['precision_top_k']} | {lab['recall_top_2k']} | {lab['listed']} | "
                     f"{near['resized']['found']}/{near['resized']['planted']} | "
                     f"{near['trimmed']['found']}/{near['trimmed']['planted']} | {len(near['pairs_not_planted'])} |")
    lines += ["", "Near-duplicate pairs on the clean datasets (goal: none):", "",
              "| dataset | images | pairs found | closest cross-split similarity | threshold | seconds |", "|---|---|---|---|---|---|"]
    for c in res["clean"]:
        lines.append(f"| {c['dataset']} | {c['images']} | {c['pairs_found']} | {c['closest_cross_split_similarity']} | "
                     f"{c['threshold']} | {c['seconds']} |")
    lines += ["", f"Total wall time: {res['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class-train", type=int, default=60, help="aid25: train images per class kept")
    ap.add_argument("--per-class-val", type=int, default=20, help="aid25: val images per class kept")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not (SHARED / "weights" / "tf_efficientnet_lite0.pth").is_file():
        print(f"skipped: needs {SHARED}/weights/tf_efficientnet_lite0.pth and {SHARED}/data", file=sys.stderr)
        return 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tl-data-issues-") as tmp:
        work = Path(tmp)
        datasets = [bench_dataset("aid25", per_class_train=a.per_class_train, per_class_val=a.per_class_val,
                                  work=work, seed=a.seed),
                    bench_dataset("hymenoptera", per_class_train=None, per_class_val=None, work=work, seed=a.seed)]
    clean = [clean_pairs(SHARED / "data" / n) for n in ("aid25", "hymenoptera", "spoken_digits", "cifar10_mini")]
    res = {"cpus": os.cpu_count(), "machine": f"{os.cpu_count()} CPU cores, no GPU used", "datasets": datasets, "clean": clean,
           "seconds": round(time.perf_counter() - t0, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_issues.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "data_issues.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
