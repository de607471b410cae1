"""Frozen-feature cache: run the frozen stages over the data once, train the rest on the result.

The frozen stages' output for an image never changes when their input does not: always for
validation, and for training with augmentation `none` (no mixup or cutmix). It is computed once
per (backbone, weights content, freeze depth, image size, dataset fingerprint, split, library
versions) and reused by every epoch and every later trial with that key (`cached_loaders`).

- Head-only trials (`freeze_depth: all`) cache the body's pooled output and then train in seconds.
- Partial freezing caches at the freeze boundary: the body is split with torch.fx after its last
  frozen stage (`split_at_boundary`), the split is checked against the whole body on a test
  batch, and the frozen part's output is cached in float16 when it fits `PARTIAL_BUDGET_BYTES`.
  Bodies that do not split cleanly there, and boundaries too large for the budget, run uncached.

Features live on disk under `<cache dir>/features/`, one file per key, written atomically and
read back with `weights_only=True` (a file holding anything but tensors is recomputed); the
folder is kept under a size budget by removing the least recently used files.
"""

from __future__ import annotations

import time

import functools
import hashlib
import importlib.metadata
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from search.config import TrialConfig, atomic_save, file_lock
from search.disk import FEATURE_BUDGET_BYTES, touch, trim_lru

if TYPE_CHECKING:
    from search.backbones import Backbone
    from search.data import DatasetIndex

# Boundary features of one trial (train + val, float16) are cached only up to this size: early
# boundaries of large images are big, and the trial holds them in memory.
PARTIAL_BUDGET_BYTES = int(os.environ.get("TLSEARCH_PARTIAL_CACHE_BYTES", 2**30))


# Part of every key: bump it when what a feature file holds, or how it is computed, changes.
FEATURE_FORMAT = 2


def feature_key(config: TrialConfig, bb: Backbone, *, fingerprint: str, split: str, depth: int | None = None) -> str:
    """A key that changes whenever the cached features would.

    Args:
        config: the trial config (image size; the seed of random weights).
        bb: the built backbone (its name and `weights_id`).
        fingerprint: the dataset fingerprint.
        split: "train" or "val".
        depth: the freeze boundary the features are taken at; None: the whole body.

    Returns:
        24 hex digits of a sha256 over all of them, the library versions and FEATURE_FORMAT.
    """
    parts = [bb.name, weights_identity(config, bb), f"size{config.image_size}", fingerprint, split,
             "body" if depth is None else f"boundary{depth}", *library_versions(), f"format{FEATURE_FORMAT}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def weights_identity(config: TrialConfig, bb: Backbone) -> str:
    """What the body's weights are: the content id of the loaded file, or random with the seed.

    Args:
        config: the trial config (its seed made the random weights).
        bb: the built backbone; `bb.weights_id` names the file it loaded.

    Returns:
        "sha256:<hex>" or "random-seed<seed>"; "" when the backbone does not say (nothing is cached).
    """
    weights_id = getattr(bb, "weights_id", "")
    return f"random-seed{config.seed}" if weights_id == "random" else weights_id


def library_versions() -> tuple[str, ...]:
    """The versions that change what a network computes from given weights (kernels, builders)."""
    import torchvision

    return (f"torch{torch.__version__}", f"torchvision{torchvision.__version__}", f"timm{_timm_version()}")


@functools.lru_cache(maxsize=1)
def _timm_version() -> str:
    try:  # from the package metadata: importing timm only for its version costs seconds
        return importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cached_loaders(
    config: TrialConfig,
    bb: Backbone,
    train_ds: Dataset,
    val_ds: Dataset,
    *,
    index: DatasetIndex,
    device: torch.device,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[DataLoader | None, DataLoader, nn.Module] | None:
    """Loaders over the frozen stages' cached output, or None when nothing can be cached.

    Args:
        config: the trial config.
        bb: the built backbone, weights loaded and frozen to the config's depth.
        train_ds, val_ds: the splits yielding (image tensor, label).
        index: the scanned dataset (its fingerprint is part of the key).
        device: where to run the frozen stages.
        cache_dir: the cache root; None: the default cache folder.

    Returns:
        (train loader, or None when training input is not deterministic; val loader; the module
        that turns the cached output into the body's output: nn.Identity for head-only trials).
        None when no stage is frozen, or the body does not split cleanly at the boundary, or
        the boundary features would exceed PARTIAL_BUDGET_BYTES, or the backbone does not name
        its weights (`weights_id`).
    """
    from search.augment import is_deterministic
    from search.backbones import resolve_depth

    if not weights_identity(config, bb):  # features of unnamed weights could be anyone's
        return None
    depth = resolve_depth(bb, config.freeze_depth)
    train_too = is_deterministic(config)
    splits = {"train": train_ds, "val": val_ds} if train_too else {"val": val_ds}
    where = dict(index=index, device=device, cache_dir=cache_dir)
    if depth == len(bb.stages):
        loaders = _cached_loaders(config, bb, splits, bb.model.body, val_batch=256, **where)
        return loaders.get("train"), loaders["val"], nn.Identity()
    split = split_at_boundary(bb, depth, config.image_size)
    if split is None:
        return None
    frozen_part, rest, shape = split
    if sum(map(len, splits.values())) * math.prod(shape) * 2 > PARTIAL_BUDGET_BYTES:
        return None
    loaders = _cached_loaders(config, bb, splits, frozen_part, val_batch=64, depth=depth, dtype=torch.float16, **where)
    return loaders.get("train"), loaders["val"], BoundaryTail(rest)


def _cached_loaders(
    config: TrialConfig,
    bb: Backbone,
    splits: dict[str, Dataset],
    module: nn.Module,
    *,
    index: DatasetIndex,
    device: torch.device,
    cache_dir: str | os.PathLike | None,
    val_batch: int,
    depth: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, DataLoader]:
    """Loaders over `module`'s cached output for each named split ("train" shuffled with the
    trial's seed or drawn class-balanced, "val" in order); depth: the freeze boundary `module`
    ends at, None: the body."""
    from search.data import default_cache_dir
    from search.imbalance import shuffling

    folder = Path(cache_dir or default_cache_dir()) / "features"
    was = bb.model.training
    loaders = {}
    for split, ds in splits.items():
        key = feature_key(config, bb, fingerprint=index.fingerprint, split=split, depth=depth)
        feats, labels = cached_features(folder / f"{key}.pt", module, ds, device=device, dtype=dtype)
        data = TensorDataset(feats, labels)
        if split == "train":
            # Shuffled with the trial's seed, or drawn class-balanced (the same rule as for images).
            loaders[split] = DataLoader(data, batch_size=config.batch_size, **shuffling(config, labels.tolist()),
                                        drop_last=len(data) > config.batch_size)
        else:
            loaders[split] = DataLoader(data, batch_size=max(val_batch, config.batch_size), shuffle=False)
    bb.model.train(was)  # computing ran `module` in eval mode; frozen modules stay in eval
    trim(folder, FEATURE_BUDGET_BYTES)
    return loaders


def cached_features(
    path: Path, body: torch.nn.Module, ds: Dataset, *, device: torch.device, batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads features from `path`, or computes and saves them (one process at a time per key).

    A file another trial's trim removes between the check and the read is computed again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock")):  # a concurrent trial with the same key waits, then reads
        if path.exists():
            try:
                # weights_only: a file holding pickled objects besides tensors is refused unread
                blob = torch.load(path, map_location="cpu", weights_only=True)
                touch(path)  # mark as recently used
                return blob["features"], blob["labels"]
            except Exception:  # a damaged, foreign or just removed file is recomputed, never trusted
                path.unlink(missing_ok=True)
        # The trial's random stream must not depend on whether the cache was warm.
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            feats, labels = compute_features(body, ds, device=device, batch_size=batch_size, dtype=dtype)
        _COMPUTED["seconds"] += time.perf_counter() - started
        atomic_save(path, {"features": feats, "labels": labels})
        return feats, labels


# Seconds this process spent computing features (not loading them): a trial's feature pass, the
# forward cost of its frozen stages over the data, which the search's time estimates start from.
_COMPUTED = {"seconds": 0.0}


def computed_seconds() -> float:
    """Seconds this process has spent computing (not loading) cached features so far."""
    return _COMPUTED["seconds"]


def model_layout(x: torch.Tensor) -> torch.Tensor:
    """A batch in the layout every trial's model is in: channels_last for 4-D input (images, or
    cached boundary features), as it is otherwise. On CPUs too its convolutions are faster
    (2 cores, 128 px, training steps: 1.1x for ResNet-18 to 1.6x for EfficientNet-Lite0)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


# Every this many images, a pass over a memory-mapped image cache gives back the pages it has read.
RELEASE_EVERY = 2048


@torch.no_grad()
def compute_features(
    body: torch.nn.Module, ds: Dataset, *, device: torch.device, batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the body (in eval mode) over a dataset; returns (features in `dtype`, labels int64).

    Memory stays flat as the dataset grows, apart from the result: each batch is written into
    one tensor allocated for all the features (in `dtype`, so float16 boundary features never
    exist in float32 all at once), and the image cache's pages are given back as the pass goes.
    """
    was_training = body.training
    body.eval()
    feats: torch.Tensor | None = None
    labels = torch.empty(len(ds), dtype=torch.long)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
    release = getattr(ds, "release_pages", None)
    use_amp = device.type == "cuda"
    n = since_release = 0
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            f = body(model_layout(x.to(device)))
        if feats is None:
            feats = torch.empty((len(ds), *f.shape[1:]), dtype=dtype)
        feats[n:n + len(f)] = f.to("cpu", dtype)
        labels[n:n + len(f)] = torch.as_tensor(y)
        n += len(f)
        since_release += len(f)
        if release is not None and since_release >= RELEASE_EVERY:
            release()
            since_release = 0
    if release is not None:
        release()
    body.train(was_training)
    if feats is None:
        return torch.empty(0), labels
    return feats, labels


def trim(folder: Path, budget_bytes: int) -> None:
    """Removes the least recently used feature files until the folder fits the budget.

    Files used in the last minute are in use by a trial and stay; a file another process removes
    meanwhile is skipped, never an error.
    """
    trim_lru(folder.glob("*.pt"), budget_bytes)


# ----- partial freezing: cache at the freeze boundary ---------------------------------------------


class BoundaryTail(nn.Module):
    """The body after the freeze boundary, fed cached (float16) boundary features.

    It works on a float32 copy: the rest may begin with an in-place op (ResNet's ReLU), which
    must never write into the cache.
    """

    def __init__(self, rest: nn.Module) -> None:
        super().__init__()
        self.rest = rest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(x.to(torch.float32, copy=True))


def split_at_boundary(bb: Backbone, depth: int, image_size: int) -> tuple[nn.Module, nn.Module, tuple[int, ...]] | None:
    """Splits the body after its first `depth` stages: (frozen part, the rest, one image's boundary shape).

    The body is traced with torch.fx, every stage module kept whole (only the code between stages
    is traced). The split is taken right after the last frozen stage's module; it is refused
    (None) when the rest needs anything else computed before that point (e.g. the input itself),
    when tracing fails, or when rest(frozen(x)) differs from body(x) on a test batch. Both parts
    share the body's modules and parameters.
    """
    import torch.fx as fx

    from search.backbones import resolve_path

    body = bb.model.body
    stage_mods = {p for st in bb.stages for p in st.paths if isinstance(resolve_path(body, p), nn.Module)}
    frozen = {p for st in bb.stages[:depth] for p in st.paths if p in stage_mods}
    if not 0 < depth < len(bb.stages) or not frozen:
        return None

    class StageTracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname in stage_mods or super().is_leaf_module(m, qualname)

    try:
        graph = StageTracer().trace(body)
    except Exception:
        return None
    nodes = list(graph.nodes)
    cut = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target in frozen]
    if not cut:
        return None
    b = nodes[cut[-1]]

    head_graph, env = fx.Graph(), {}
    for n in nodes[: cut[-1] + 1]:
        env[n] = head_graph.node_copy(n, lambda a: env[a])
    head_graph.output(env[b])

    rest_graph = fx.Graph()
    env = {b: rest_graph.placeholder("boundary")}
    for n in nodes[cut[-1] + 1:]:
        for a in n.all_input_nodes:
            if a in env:
                continue
            if a.op != "get_attr":  # the rest needs more than the boundary: no clean split
                return None
            env[a] = rest_graph.node_copy(a)
        env[n] = rest_graph.node_copy(n, lambda a: env[a])
    try:
        frozen_part, rest = fx.GraphModule(body, head_graph), fx.GraphModule(body, rest_graph)
        frozen_part.graph.eliminate_dead_code()  # what only the rest used
        frozen_part.recompile()
    except Exception:
        return None
    # Modules outside every stage (activations, pooling) run before the boundary too. They have
    # no parameters; with no state either, only randomness (dropout) could make them differ
    # between training and the cached (eval) pass, which the check below catches.
    loose = [body.get_submodule(n.target) for n in frozen_part.graph.nodes
             if n.op == "call_module" and n.target not in frozen]
    if any(True for m in loose for _ in (*m.parameters(), *m.buffers())):
        return None
    was = bb.model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            device = next(body.parameters()).device
            x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
            bb.model.eval()
            mid = frozen_part(x)
            # (a clone: the rest may start in place, like ResNet's ReLU)
            ok = isinstance(mid, torch.Tensor) and torch.allclose(rest(mid.clone()), body(x), rtol=1e-3, atol=1e-4)
            bb.model.train()  # frozen modules stay in eval: the prefix must not change under training
            ok = ok and all(torch.allclose(frozen_part(x), mid, rtol=1e-4, atol=1e-5) for _ in range(2))
    except Exception:
        ok = False
    finally:
        bb.model.train(was)
    return (frozen_part, rest, tuple(mid.shape[1:])) if ok else None
