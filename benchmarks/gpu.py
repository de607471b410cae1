"""The GPU path, measured in a few minutes on one GPU.

    python -m benchmarks.gpu [--quick] [--out benchmarks/results/gpu-latest.json]

1. Training-step throughput of one backbone (images/s, batch 64) in fp32, with AMP, and with
   AMP + channels_last: what `trial.fine_tune` uses on CUDA (AMP, channels_last, pinned memory).
2. One real trial through `fine_tune` on CUDA (pinned-memory loaders, workers): images/s per epoch.
3. Several small trials per GPU: the same trials through `run_search` with 1 GPU per trial vs
   a fraction of a GPU per trial (Ray packs several on the card), wall time of each.

Data: ../shared/data/hymenoptera when present, else a generated ImageFolder. Without CUDA it writes
a JSON that says it was skipped and why, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OUT = REPO / "benchmarks" / "results" / "gpu-latest.json"


def make_data(root: Path, *, per_class: int = 60, size: int = 160) -> Path:
    """A generated ImageFolder (train/ and val/, 3 classes of coloured shapes)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    for split, n in (("train", per_class), ("val", per_class // 3)):
        for c, shape in enumerate(("circle", "square", "triangle")):
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                im = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
                d = ImageDraw.Draw(im)
                x, y, r = rng.randrange(30, size - 30), rng.randrange(30, size - 30), rng.randrange(12, 28)
                fill = tuple(rng.randrange(256) for _ in range(3))
                if c == 0:
                    d.ellipse((x - r, y - r, x + r, y + r), fill=fill)
                elif c == 1:
                    d.rectangle((x - r, y - r, x + r, y + r), fill=fill)
                else:
                    d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
                im.save(folder / f"{i}.jpg", quality=90)
    return root


def step_throughput(backbone: str, *, steps: int, batch: int, size: int, weights_dir: str | None) -> dict:
    """Training images/s of full fine-tuning in fp32, AMP, and AMP + channels_last."""
    import torch
    import torch.nn.functional as F

    from search import backbones

    out = {}
    for label, amp, cl in (("fp32", False, False), ("amp", True, False), ("amp+channels_last", True, True)):
        bb = backbones.build_backbone(backbone, 10, pretrained=weights_dir is not None, weights_dir=weights_dir)
        model = bb.model.cuda()
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        x = torch.randn(batch, 3, size, size, device="cuda")
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), device="cuda")
        for i in range(steps + 5):
            if i == 5:  # the first steps pick kernels (cudnn benchmark) and warm the allocator
                torch.cuda.synchronize()
                t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        torch.cuda.synchronize()
        out[label] = steps * batch / (time.perf_counter() - t)
        del model, opt
        torch.cuda.empty_cache()
    return out


def one_trial(data: str, backbone: str, *, weights_dir: str | None, epochs: int, size: int) -> dict:
    """One `fine_tune` trial on CUDA: seconds, val_acc and images/s per epoch."""
    from search.config import TrialConfig
    from search.data import scan_dataset
    from search.trial import fine_tune

    index = scan_dataset(data, warn=lambda m: None)
    cfg = TrialConfig(backbone=backbone, pretrained=weights_dir is not None, freeze_depth=0, augmentation="flip",
                      image_size=size, epochs=epochs, batch_size=64, lr=3e-4)
    r = fine_tune(cfg, index, weights_dir=weights_dir, device="cuda")
    return {"seconds": r.seconds, "val_acc": r.final["val_acc"],
            "images_per_s": [h["images_per_s"] for h in r.history]}


def packed_trials(data: str, backbone: str, *, weights_dir: str | None, trials: int, size: int, work: Path) -> dict:
    """The same trials with 1 GPU each vs a fraction of the GPU each: wall seconds."""
    from search.settings import SearchSettings
    from search.runner import run_search

    space = {"backbone": backbone, "freeze_depth": [0, 2], "augmentation": ["flip"],
             "lr": {"low": 1e-4, "high": 1e-3, "log": True}, "image_size": size, "batch_size": 64, "max_epochs": 2}
    out = {}
    cpus = os.cpu_count() or 1
    for gpt in (1.0, 0.25):
        per_gpu = round(1 / gpt)
        s = SearchSettings(study=f"gpu-{per_gpu}", data=data, space=space, trials=trials, gpus_per_trial=gpt,
                           cpus_per_trial=max(1.0, float(cpus // per_gpu)), grace_period=2,
                           weights_dir=weights_dir, pretrained=weights_dir is not None,
                           studies_dir=str(work / "studies"), reports_dir=str(work / "reports"))
        summary = run_search(s, progress=False)
        out[f"{per_gpu} trial(s) per GPU"] = {"wall_s": summary.wall_seconds, "compute_s": summary.compute_seconds,
                                              "states": summary.counts, "best": summary.best_value}
    return out


def main(argv: list[str] | None = None) -> int:
    """Runs the GPU benchmark; returns the exit code (0 also when skipped)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and trials")
    ap.add_argument("--out", default=str(OUT), help="the JSON file to write")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    import torch

    result: dict[str, Any] = {"finished": None, "torch": torch.__version__, "quick": args.quick}
    if not torch.cuda.is_available():
        result.update(skipped="no CUDA device on this machine; nothing measured", finished=time.strftime("%Y-%m-%d %H:%M"))
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"skipped: no CUDA device on this machine (wrote {out})", file=sys.stderr)
        return 0

    torch.backends.cudnn.benchmark = True
    work = Path(tempfile.mkdtemp(prefix="tlsearch-gpu-"))
    os.environ["TLSEARCH_CACHE"] = str(work / "cache")
    hymenoptera = SHARED / "data" / "hymenoptera"
    lite0 = SHARED / "weights" / "tf_efficientnet_lite0.pth"
    if hymenoptera.exists() and lite0.exists():
        data, backbone, weights_dir = str(hymenoptera), "timm/tf_efficientnet_lite0", str(lite0.parent)
    else:  # random weights on generated data: throughput is what is measured here
        data, backbone, weights_dir = str(make_data(work / "data")), "resnet18", None
    result.update(device=torch.cuda.get_device_name(0), data=data, backbone=backbone)
    steps, trials, epochs = (20, 4, 2) if args.quick else (60, 8, 3)
    t = time.time()
    print("[gpu] step throughput: fp32 / amp / amp+channels_last ...", file=sys.stderr, flush=True)
    result["train_images_per_s"] = step_throughput(backbone, steps=steps, batch=64, size=224, weights_dir=weights_dir)
    print("[gpu] one fine_tune trial on CUDA ...", file=sys.stderr, flush=True)
    result["trial"] = one_trial(data, backbone, weights_dir=weights_dir, epochs=epochs, size=224)
    print(f"[gpu] {trials} trials: 1 per GPU vs 4 per GPU ...", file=sys.stderr, flush=True)
    result["packing"] = packed_trials(data, backbone, weights_dir=weights_dir, trials=trials, size=160, work=work)
    result["total_s"] = time.time() - t
    result["finished"] = time.strftime("%Y-%m-%d %H:%M")
    out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
