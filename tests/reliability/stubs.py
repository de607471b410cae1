"""A fast stand-in for `search.trial.fine_tune` whose backbone choice plants a fault.

resnet18: a normal trial (val_acc rises with the epoch, best for lr near 1e-3);
efficientnet_b0: takes ~256 MB, then raises torch.OutOfMemoryError in epoch 2;
mobilenet_v3_large: reports NaN val_acc;
resnet34: in trial STUB_HANG_TRIAL (default trial-0.pt) waits (STUB_HANG_S) so a test can kill its worker with SIGKILL.
Every trial writes "<pid> <backbone> <rss kB at start>" to <checkpoint>.pid first.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stub_trial(config, index, *, report, checkpoint_path=None, **kwargs):  # noqa: ANN001
    import torch

    delay = float(os.environ.get("STUB_EPOCH_S", "0.3"))
    if checkpoint_path:
        Path(checkpoint_path + ".pid").write_text(f"{os.getpid()} {config.backbone} {rss_kb()}")
    quality = max(0.05, 1.0 - abs(math.log10(config.lr) + 3.0) / 2.0)
    for epoch in range(1, config.epochs + 1):
        if config.backbone == "resnet34" and checkpoint_path and Path(checkpoint_path).name == os.environ.get("STUB_HANG_TRIAL", "trial-0.pt"):
            time.sleep(float(os.environ.get("STUB_HANG_S", "60")))
        time.sleep(delay)
        if config.backbone == "efficientnet_b0" and epoch == 2:
            hog = torch.ones(64 * 2**20)  # 256 MB held when the error is raised
            hog += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        acc = float("nan") if config.backbone == "mobilenet_v3_large" else quality * (1 - 0.5**epoch)
        if checkpoint_path:
            Path(checkpoint_path).write_bytes(b"ckpt")
        report(epoch_metrics(epoch, acc, seconds=delay, lr=config.lr))


def epoch_metrics(epoch: int, acc: float, *, seconds: float, lr: float) -> dict:
    """One epoch's metrics as `fine_tune` reports them, for a stub with accuracy `acc`."""
    return {
        "epoch": epoch, "val_acc": acc, "val_loss": 1 - acc, "val_balanced_acc": acc,
        "train_loss": 1.0 / epoch, "epoch_seconds": seconds, "images_per_s": 100.0, "lr": lr,
        "params_total": 10, "params_trainable": 5, "latency_ms": 1.0,
        "confusion_matrix": [[1, 0], [0, 1]], "best_val_acc": acc,
    }
