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
