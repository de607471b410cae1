"""Trial functions the benchmarks hand to `run_search` (they run inside Ray workers).

Kept in their own light module: a Ray worker imports it by name (the repository root is on the
workers' PYTHONPATH), so it must not pull in the benchmark driver.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any


def timed_fine_tune(config: Any, index: Any, *, log_path: str, report: Any = None, **kwargs: Any) -> Any:
    """`search.trial.fine_tune`, also appending (unix time, trial, epoch, val_acc) per epoch to `log_path`.

    The driver reads the log to find when the search first reached a target accuracy.
    """
    from search.trial import fine_tune

    tag = f"{os.getpid()}-{time.time():.6f}"

    def timed_report(metrics: dict) -> None:
        line = {"t": time.time(), "trial": tag, "epoch": metrics.get("epoch"), "val_acc": metrics.get("val_acc"),
                "freeze_depth": config.freeze_depth, "augmentation": config.augmentation, "lr": config.lr}
        with open(log_path, "a", encoding="utf-8") as f:  # O_APPEND: concurrent trials' lines stay whole
            f.write(json.dumps(line) + "\n")
        if report is not None:
            report(metrics)

    return fine_tune(config, index, report=timed_report, **kwargs)


def stub_trial(config: Any, index: Any, *, report: Any, epoch_seconds: float = 1.0, **kwargs: Any) -> None:
    """A trial that costs exactly `epoch_seconds` of busy CPU per epoch and reports a made-up val_acc.

    Orchestration overhead is measured with it: every second not spent in here is overhead.
    """
    import torch

    x = torch.randn(256, 256)
    for epoch in range(1, config.epochs + 1):
        end = time.perf_counter() + epoch_seconds
        while time.perf_counter() < end:  # busy, like training, so CPU contention shows
            x = torch.tanh(x @ x * 1e-3)
        acc = 0.5 + 0.4 * min(1.0, config.lr * 100) * epoch / config.epochs
        report({"epoch": epoch, "val_acc": acc, "val_loss": 1.0 - acc, "val_balanced_acc": acc,
                "train_loss": 1.0 - acc, "epoch_seconds": epoch_seconds, "images_per_s": 0.0})


_PHASE_LOG: dict[str, Any] = {}  # where this worker's wrapped phases write: the trial running now


def phased_fine_tune(config: Any, index: Any, *, log_path: str, report: Any = None, **kwargs: Any) -> Any:
    """`search.trial.fine_tune`, also appending where its time goes to `log_path` (one JSON line per
    phase: backbone build, image-cache build, feature pass, each epoch's report), unix times.

    The phases are timed by wrapping the functions that do them, once per (reused) worker process;
    each wrapper writes for the trial running at the time.
    """
    import search.backbones as backbones
    import search.features as features
    from search.data import _cache
    from search.trial import fine_tune

    tag = f"{os.getpid()}-{time.time():.6f}"

    def write(event: str, start: float, **more: Any) -> None:
        line = {"trial": tag, "backbone": config.backbone, "event": event, "start": start, "end": time.time(), **more}
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    _PHASE_LOG["write"] = write

    def timed(owner: Any, name: str, event: str) -> None:
        original = getattr(owner, name)
        if getattr(original, "_phased", False):
            return

        def wrapper(*args: Any, **kw: Any) -> Any:
            t = time.time()
            try:
                return original(*args, **kw)
            finally:
                _PHASE_LOG["write"](event, t)

        wrapper._phased = True  # type: ignore[attr-defined]
        setattr(owner, name, wrapper)

    timed(backbones, "build_backbone", "build backbone + weights")
    timed(_cache.ImageDataset, "prepare", "image cache (decode)")
    timed(features, "compute_features", "feature pass (forward)")
    write("trial function entered", time.time())
    started = time.time()

    def timed_report(metrics: dict) -> None:
        write(f"epoch {metrics.get('epoch')} reported", started, val_acc=metrics.get("val_acc"))
        if report is not None:
            report(metrics)

    return fine_tune(config, index, report=timed_report, **kwargs)
