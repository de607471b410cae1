"""The trainable: what runs in a Ray worker for one trial.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import ray
from ray import tune

from search.space import SearchSpace

if TYPE_CHECKING:
    from search.data import DatasetIndex

TrialFn = Callable[..., Any]


def _trainable(
    config: dict,
    *,
    index: DatasetIndex,
    space: SearchSpace,
    trial_fn: TrialFn | None,
    metric: str,
    weights_dir: str | None,
    cache: bool,
    cache_dir: str | None,
    checkpoint_dir: str,
    threads: int,
) -> None:
    """One Ray trial: run the trial function, forwarding its per-epoch metrics to Tune.

    An exception from the trial becomes a final result with an "error" key (and the metric as
    NaN, which ASHA ignores), so the driver records the reason; the search goes on.
    """
    import torch

    threads = max(1, int(config.get("_cpus") or threads))  # a fine-tune given the idle cores
    torch.set_num_threads(threads)
    if trial_fn is None:
        from search.trial import fine_tune as trial_fn
    checkpoint = str(Path(checkpoint_dir, f"trial-{config.get('_trial_number')}.pt"))
    started = time.time()
    extras = _extras(checkpoint=checkpoint, threads=threads, started=started)
    state = {"epoch": 0, "in_report": False}

    def report(metrics: dict) -> None:
        state["epoch"] = int(metrics.get("epoch", state["epoch"] + 1))
        state["in_report"] = True
        tune.report({**metrics, **extras, "train_seconds": time.time() - started})
        state["in_report"] = False

    try:
        cfg = space.to_trial_config(config)
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        resume = {}
        if config.get("_resume_from"):  # continues a trial the time budget cut short
            resume = {"resume_from": config["_resume_from"], "start_epoch": int(config.get("_start_epoch", 0))}
            state["epoch"] = resume["start_epoch"]
        trial_fn(cfg, index, report=report, weights_dir=weights_dir, cache=cache, cache_dir=cache_dir,
                 checkpoint_path=checkpoint, threads=threads, **resume)
    except Exception as e:
        if state["in_report"]:
            raise  # Tune stopping the trial, not the trial failing
        _free_memory()
        text = f"{type(e).__name__}: {e}".strip().splitlines()
        tune.report({
            metric: float("nan"),
            "epoch": state["epoch"],
            "error": text[0] if text else type(e).__name__,
            "traceback": "".join(traceback.format_exception(e))[-4000:],
            **extras,
            "train_seconds": time.time() - started,
        })


def _extras(*, checkpoint: str, threads: int, started: float) -> dict[str, Any]:
    """Where and how a trial runs, reported with every epoch."""
    from search.model_io import library_versions

    host = socket.gethostname()
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": host,
        "worker": f"{host}:{os.getpid()}",
        "started_at": started,
        "checkpoint": checkpoint,
        # What the trial ran with, recorded here so that an export years later says the same.
        "threads": threads,
        "versions": library_versions(),
    }


def _free_memory() -> None:
    """Gives memory back after a failed trial (out-of-memory) before the worker ends."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
