"""Frozen-feature cache: run the frozen backbone over the data once, train the head on the result.

When every stage is frozen (`freeze_depth: all`) and the training input is deterministic
(augmentation `none`, no mixup or cutmix), the body's output for an image never changes: it is
computed once per (backbone, weights, image size, dataset fingerprint, split) and reused by every
epoch and every later trial with that key. Head-only trials then train in seconds.

Features live on disk under `<cache dir>/features/`, one file per key, written atomically; the
folder is kept under a size budget by removing the least recently used files.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from search.config import TrialConfig

# The feature folder is trimmed to this many bytes (least recently used files go first).
DEFAULT_BUDGET_BYTES = int(os.environ.get("TLSEARCH_FEATURE_CACHE_BYTES", 4 * 2**30))


def can_cache(config: TrialConfig, bb: Any) -> bool:
    """True when the trial trains the head alone on deterministic input."""
    from search.augment import is_deterministic
    from search.backbones import resolve_depth

    head_only = resolve_depth(bb, config.freeze_depth) == len(bb.stages)
    return head_only and is_deterministic(config) and config.mixup_alpha == 0 and config.cutmix_alpha == 0


def feature_key(config: TrialConfig, bb: Any, *, fingerprint: str, split: str, weights_id: str) -> str:
    """A key that changes whenever the cached features would."""
    parts = [bb.name, weights_id, str(config.image_size), fingerprint, split, "body-v1"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def weights_identity(config: TrialConfig, weights_dir: str | None) -> str:
    """What the body's weights are: random (seeded), a local file (path, size, mtime), or the default."""
    if not config.pretrained:
        return f"random-seed{config.seed}"
    name = config.backbone.split("/", 1)[-1]
    if weights_dir:
        p = Path(weights_dir, f"{name}.pth")
        if p.exists():
            st = p.stat()
            return f"file:{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return "default"


def feature_loaders(
    config: TrialConfig,
    bb: Any,
    train_ds: Dataset,
    val_ds: Dataset,
    *,
    index: Any,
    device: torch.device,
    cache_dir: str | os.PathLike | None = None,
    weights_dir: str | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Loaders of cached (features, label) pairs for the train and val splits.

    Args:
        config: the trial config (head-only, deterministic input; see `can_cache`).
        bb: the built backbone, weights loaded.
        train_ds: the train split yielding (image tensor, label).
        val_ds: the val split.
        index: the scanned dataset (for its fingerprint).
        device: where to run the body.
        cache_dir: the cache root; None: the default cache folder.
        weights_dir: the trial's weights folder (part of the key).

    Returns:
        (train loader, val loader) over features.
    """
    from search.data import default_cache_dir

    folder = Path(cache_dir or default_cache_dir()) / "features"
    weights_id = weights_identity(config, weights_dir)
    sets = []
    for split, ds in (("train", train_ds), ("val", val_ds)):
        key = feature_key(config, bb, fingerprint=index.fingerprint, split=split, weights_id=weights_id)
        feats, labels = cached_features(folder / f"{key}.pt", bb.model.body, ds, device=device)
        sets.append(TensorDataset(feats, labels))
    trim(folder, DEFAULT_BUDGET_BYTES)
    g = torch.Generator().manual_seed(config.seed)
    train = DataLoader(sets[0], batch_size=config.batch_size, shuffle=True, generator=g,
                       drop_last=len(sets[0]) > config.batch_size)
    val = DataLoader(sets[1], batch_size=max(256, config.batch_size), shuffle=False)
    return train, val


def cached_features(
    path: Path, body: torch.nn.Module, ds: Dataset, *, device: torch.device, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads features from `path`, or computes and saves them (one process at a time per key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent trial with the same key waits, then reads
        if path.exists():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                os.utime(path)  # mark as recently used
                return blob["features"], blob["labels"]
            except Exception:  # a damaged file is recomputed, never trusted
                path.unlink(missing_ok=True)
        feats, labels = compute_features(body, ds, device=device, batch_size=batch_size)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        torch.save({"features": feats, "labels": labels}, tmp)
        tmp.replace(path)
        return feats, labels


@torch.no_grad()
def compute_features(
    body: torch.nn.Module, ds: Dataset, *, device: torch.device, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the body (in eval mode) over a dataset; returns (features float32, labels int64)."""
    was_training = body.training
    body.eval()
    feats, labels = [], []
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
    use_amp = device.type == "cuda"
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            f = body(x.to(device))
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y))
    body.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


def trim(folder: Path, budget_bytes: int) -> None:
    """Removes the least recently used feature files until the folder fits the budget."""
    files = sorted(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    for p in files:
        if total <= budget_bytes:
            break
        if time.time() - p.stat().st_mtime < 60:  # just written or read: in use by a trial
            continue
        total -= p.stat().st_size
        p.unlink(missing_ok=True)
