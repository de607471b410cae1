"""One trial of transfer learning, and `tlsearch train` built on it.

- `_loop.py`: `fine_tune` (build the model, load the data, alternate `train_one_epoch` and
  `evaluate`, report every epoch) and its small named steps; `TrialResult` is what it returns.
- `_train.py`: `train`, the `tlsearch train` command: a config file trained again on the split
  its study used (`training_index`), saved as a model folder.

Checkpoints and model folders are written and read by `search.model_io`; `save_checkpoint` and
`load_checkpoint` are re-exported here.
"""

from __future__ import annotations

from search.model_io import load_checkpoint, save_checkpoint
from search.trial._loop import (
    OPTIMIZER_BUILDERS,
    NonFiniteLossError,
    Report,
    TrialResult,
    build_optimizer,
    evaluate,
    fine_tune,
    load_data,
    measure_latency,
    pick_device,
    seed_everything,
    train_one_epoch,
    lr_multiplier,
    warmup_cosine,
)
from search.trial._train import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION, train, training_index

__all__ = [
    "DEFAULT_SPLIT_SEED",
    "DEFAULT_VAL_FRACTION",
    "OPTIMIZER_BUILDERS",
    "NonFiniteLossError",
    "Report",
    "TrialResult",
    "build_optimizer",
    "evaluate",
    "fine_tune",
    "load_checkpoint",
    "load_data",
    "measure_latency",
    "pick_device",
    "save_checkpoint",
    "seed_everything",
    "train",
    "train_one_epoch",
    "training_index",
    "lr_multiplier",
    "warmup_cosine",
]
