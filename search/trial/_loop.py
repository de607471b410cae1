"""One trial of transfer learning: backbone, frozen stages, new head, train/eval epochs, metrics.

`fine_tune` is the function the search calls in every Ray trial and `tlsearch train` calls once.
It reads top to bottom: build the model, load the data, build the optimizer and schedule, then
alternate `train_one_epoch` and `evaluate`, reporting every epoch to a callback. The last epoch's
weights go to a checkpoint through `search.model_io`.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from search.config import TrialConfig
from search.features import model_layout
from search.metrics import TOP5_MIN_CLASSES, confusion_scores, per_class_table
from search.model_io import save_checkpoint, save_val_logits
from search.trial._optim import _head_lr, build_optimizer, lr_multiplier

if TYPE_CHECKING:
    from search.backbones import Backbone
    from search.data import DatasetIndex

Report = Callable[[dict[str, Any]], None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial has diverged."""


@dataclass
class TrialResult:
    """What one trial produced."""

    config: TrialConfig  # the config it ran
    class_names: list[str]  # index -> class name, as in the dataset
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics dict per epoch
    params_total: int = 0  # parameters of the whole model
    params_trainable: int = 0  # parameters that received gradients
    latency_ms: float = 0.0  # batch-1 inference time on the trial's device
    seconds: float = 0.0  # wall time of the whole trial
    checkpoint_path: str | None = None  # the last epoch's state_dict, when asked for
    model: nn.Module | None = None  # the trained model, last epoch (for `tlsearch train`)
    preprocessing: dict[str, Any] = field(default_factory=dict)  # what predict needs to reproduce eval

    @property
    def best(self) -> dict[str, Any]:
        """Metrics of the epoch with the highest val_acc (the first one on ties)."""
        if not self.history:
            return {}
        return max(self.history, key=lambda m: (m["val_acc"], -m["epoch"]))

    @property
    def final(self) -> dict[str, Any]:
        """Metrics of the last epoch."""
        return self.history[-1] if self.history else {}


def fine_tune(
    config: TrialConfig,
    index: DatasetIndex,
    *,
    report: Report | None = None,
    weights_dir: str | None = None,
    cache: bool = True,
    cache_dir: str | None = None,
    device: str | None = None,
    checkpoint_path: str | None = None,
    threads: int | None = None,
    train_on_val: bool = False,
    keep_model: bool = False,
    resume_from: str | None = None,
    start_epoch: int = 0,
) -> TrialResult:
    """Trains one config on a dataset and reports metrics after every epoch.

    Args:
        config: the trial config.
        index: the scanned dataset (`search.data.DatasetIndex`).
        report: called after every epoch with that epoch's metrics (the search's hook).
        weights_dir: folder of `<model name>.pth` state dicts used instead of downloads.
        cache: use the decoded-image and frozen-feature caches.
        cache_dir: where caches live; None: the default cache folder.
        device: "cpu", "cuda", "cuda:1", ...; None: CUDA when available.
        checkpoint_path: where to save the last epoch's state_dict (overwritten every epoch).
        threads: torch CPU threads for this trial (= CPUs given to it).
        train_on_val: train on train+val (the final fit); val metrics are then optimistic.
        keep_model: keep the trained model in the result.
        resume_from: a checkpoint of this config after `start_epoch` epochs (a trial the time
            budget cut short): its weights are loaded and training goes on from epoch
            `start_epoch + 1`, on the same schedule. The optimizer's moments restart (checkpoints
            hold the model only).
        start_epoch: epochs already trained by the checkpoint.

    Returns:
        The trial's result with per-epoch history.
    """
    from search import backbones, imbalance
    from search.model_io import eval_preprocessing

    start = time.perf_counter()
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    seed_everything(config.seed)
    dev = pick_device(device)
    num_classes = len(index.classes)

    bb = backbones.build_backbone(
        config.backbone,
        num_classes,
        pretrained=config.pretrained,
        weights_dir=weights_dir,
        dropout=config.dropout,
    )
    trainable = backbones.freeze(bb, config.freeze_depth)
    lp_val_acc = None
    if resume_from:
        from search.model_io import load_checkpoint

        bb.model.load_state_dict(load_checkpoint(resume_from))
    elif config.lp_epochs > 0 and backbones.resolve_depth(bb, config.freeze_depth) < len(bb.stages):
        # A refit's probe trains on train+val too: the head it hands on has seen what the fine-tune sees.
        probe = fine_tune(probe_config(config), index, weights_dir=weights_dir, cache=cache, cache_dir=cache_dir,
                          device=device, threads=threads, keep_model=True, train_on_val=train_on_val)
        bb.model.head.load_state_dict(probe.model.head.state_dict())
        lp_val_acc = probe.final["val_acc"]
    model = bb.model.to(dev, memory_format=torch.channels_last)  # on every device (`features.model_layout`)

    train_loader, val_loader, plan = load_data(
        config, index, bb, device=dev, cache=cache, cache_dir=cache_dir, train_on_val=train_on_val,
    )
    optimizer = build_optimizer(config, backbones.param_groups(
        bb, lr=config.lr, weight_decay=config.weight_decay, lr_decay=config.lr_decay,
        backbone_lr_mult=config.backbone_lr_mult,
    ))
    steps_per_epoch = max(1, len(train_loader))
    done = start_epoch * steps_per_epoch  # a continued trial picks up its schedule where it was
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step + done, schedule=config.lr_schedule, steps_per_epoch=steps_per_epoch,
            warmup_steps=round(config.warmup_epochs * steps_per_epoch), epochs=config.epochs,
        ),
    )
    mix = None
    if not plan.train_cached:  # mixing cached features is not mixing images
        from search.augment import batch_mix

        mix = batch_mix(config, num_classes)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")
    counts = imbalance.class_counts(_train_labels(index, train_on_val=train_on_val), num_classes)
    weights = imbalance.loss_weight_tensor(config, counts, dev)

    result = TrialResult(
        config=config,
        class_names=list(index.classes),
        params_total=sum(p.numel() for p in model.parameters()),
        params_trainable=trainable,
        checkpoint_path=checkpoint_path,
        preprocessing=eval_preprocessing(config, bb),
    )
    result.latency_ms = measure_latency(model, config.image_size, dev)
    best_acc = -1.0
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.perf_counter()
        train_loss, seen = train_one_epoch(
            plan.train_module(model), train_loader, optimizer, scheduler,
            label_smoothing=config.label_smoothing, mix=mix, scaler=scaler, device=dev, class_weights=weights,
        )
        val = evaluate(plan.eval_module(model), val_loader, num_classes, device=dev)
        seconds = time.perf_counter() - t0
        best_acc = max(best_acc, val["val_acc"])
        if checkpoint_path:
            # The last epoch's weights, like the study value and the confusion matrix: a trial
            # stopped after this epoch is described by this epoch everywhere.
            save_checkpoint(model, checkpoint_path)
            if epoch == config.epochs:
                # A trial that ran its whole budget may join a soup or an ensemble: its validation
                # logits let `tlsearch ensemble` choose without running it again.
                logits, labels = collect_logits(plan.eval_module(model), val_loader, device=dev)
                save_val_logits(logits, labels, checkpoint_path)
        metrics = {
            "epoch": epoch,
            "val_acc": val["val_acc"],
            "val_loss": val["val_loss"],
            "val_balanced_acc": val["val_balanced_acc"],
            "val_macro_f1": val["val_macro_f1"],
            **({"val_top5_acc": val["val_top5_acc"]} if "val_top5_acc" in val else {}),
            "train_loss": train_loss,
            "epoch_seconds": seconds,
            "images_per_s": seen / seconds if seconds > 0 else 0.0,
            "lr": _head_lr(optimizer),
            "params_total": result.params_total,
            "params_trainable": trainable,
            "latency_ms": result.latency_ms,
            "confusion_matrix": val["confusion_matrix"],
            "per_class": per_class_table(val["confusion_matrix"], index.classes),
            "best_val_acc": best_acc,  # the best epoch so far, labelled as such wherever shown
            "lp_val_acc": lp_val_acc,  # LP-FT: the probe's val_acc, where the fine-tune started from
            "device": str(dev),
            "weights_id": getattr(bb, "weights_id", None),
        }
        if epoch == start_epoch + 1 and plan.feature_pass_s is not None:
            metrics["feature_pass_s"] = plan.feature_pass_s  # what the search's cautious estimates start from
        result.history.append(metrics)
        if report is not None:
            report(dict(metrics))
    result.seconds = time.perf_counter() - start
    if keep_model:
        result.model = model.eval()
    return result


def probe_config(config: TrialConfig) -> TrialConfig:
    """The linear probe an LP-FT trial starts with: its head alone, un-augmented, `lp_epochs` at
    `lp_lr`; batch size, weight decay, loss and seed are the trial's, so `train` rebuilds the same head.

    Args:
        config: a config with `lp_epochs` > 0.

    Returns:
        The probe's config (head only, on cached features where the cache is on).
    """
    return config.replace(
        freeze_depth="all", augmentation="none", mixup_alpha=0.0, cutmix_alpha=0.0, lr=config.lp_lr,
        epochs=config.lp_epochs, warmup_epochs=0.0, lr_schedule="cosine", backbone_lr_mult=1.0, lr_decay=1.0,
        lp_epochs=0,
    )


def _train_labels(index: DatasetIndex, *, train_on_val: bool) -> list[int]:
    """Each training sample's label, in the training dataset's order (train, then val for a full fit)."""
    samples = (*index.train, *index.val) if train_on_val else index.train
    return [label for _, label in samples]


@dataclass
class _Plan:
    """How the train/eval loops see the model: whole, or `tail` + head over the frozen stages'
    cached output (`tail` is nn.Identity for head-only trials)."""

    tail: nn.Module | None = None  # set: the val loader yields cached features
    train_cached: bool = False  # the train loader yields cached features too
    feature_pass_s: float | None = None  # seconds spent computing those features; None: none computed

    def train_module(self, model: nn.Module) -> nn.Module:
        model.train()
        return nn.Sequential(self.tail, model.head) if self.tail is not None and self.train_cached else model

    def eval_module(self, model: nn.Module) -> nn.Module:
        model.eval()
        return nn.Sequential(self.tail, model.head) if self.tail is not None else model


def load_data(
    config: TrialConfig,
    index: DatasetIndex,
    bb: Backbone,
    *,
    device: torch.device,
    cache: bool,
    cache_dir: str | None,
    train_on_val: bool = False,
) -> tuple[Iterable, Iterable, _Plan]:
    """Builds the train and val loaders; with the cache, the frozen stages' output comes from
    `features.cached_loaders` (validation always, training when its input is deterministic).

    Returns:
        (train loader, val loader, plan saying whether they yield images or features).
    """
    from search import augment, data

    train_tf = augment.train_transform(config, mean=bb.mean, std=bb.std, interpolation=bb.interpolation)
    eval_tf = augment.eval_transform(config.image_size, mean=bb.mean, std=bb.std)
    train_ds, val_ds = data.dataset_splits(
        index, image_size=config.image_size, train_transform=train_tf, eval_transform=eval_tf,
        cache=cache, cache_dir=cache_dir,
    )
    if train_on_val:
        val_as_train = data.dataset_splits(
            index, image_size=config.image_size, train_transform=train_tf, eval_transform=train_tf,
            cache=cache, cache_dir=cache_dir,
        )[1]
        train_ds = torch.utils.data.ConcatDataset([train_ds, val_as_train])
    labels = _train_labels(index, train_on_val=train_on_val)

    if cache and not train_on_val:
        from search import features

        for ds in (train_ds, val_ds):  # the image cache first, so that the feature pass is timed alone
            if getattr(ds, "cached", False):
                ds.prepare()
        before = features.computed_seconds()
        cached = features.cached_loaders(config, bb, train_ds, val_ds, index=index, device=device,
                                         cache_dir=cache_dir)
        spent = features.computed_seconds() - before
        if cached is not None:
            train_loader, val_loader, tail = cached
            timed = spent if spent > 0 else None
            if train_loader is None:  # augmented training input: only validation is cached
                return (_image_loader(config, train_ds, device, train=True, labels=labels), val_loader,
                        _Plan(tail=tail, feature_pass_s=timed))
            return train_loader, val_loader, _Plan(tail=tail, train_cached=True, feature_pass_s=timed)

    return (_image_loader(config, train_ds, device, train=True, labels=labels),
            _image_loader(config, val_ds, device, train=False), _Plan())


def _image_loader(
    config: TrialConfig, ds: Any, device: torch.device, *, train: bool, labels: list[int] | None = None,
) -> torch.utils.data.DataLoader:
    """A loader of decoded images: for training shuffled with the trial's seed (or drawn class-balanced,
    `imbalance.shuffling`, from each sample's label), in order for validation."""
    from search import imbalance

    pin = device.type == "cuda"
    workers = _loader_workers(device)
    if train:
        return torch.utils.data.DataLoader(
            ds, batch_size=config.batch_size, **imbalance.shuffling(config, labels or []),
            drop_last=len(ds) > config.batch_size, num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
        )
    return torch.utils.data.DataLoader(
        ds, batch_size=max(config.batch_size, 64), shuffle=False, num_workers=workers,
        pin_memory=pin, persistent_workers=workers > 0,
    )


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    label_smoothing: float,
    mix: Callable | None,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    class_weights: torch.Tensor | None = None,
) -> tuple[float, int]:
    """One pass over the training data.

    Args:
        class_weights: per-class weights of the loss (`imbalance.loss_weight_tensor`); None: unweighted.

    Returns:
        (mean training loss, images seen).
    """
    total, seen = 0.0, 0
    use_amp = device.type == "cuda"
    for x, y in loader:
        x, y = _to_device(x, y, device)
        if mix is not None and x.dim() == 4 and len(x) > 1:
            x, y = mix(x, y)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss = F.cross_entropy(model(x), y, weight=class_weights, label_smoothing=label_smoothing)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"training loss is {loss.item()} (diverged; lower the lr)")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.item() * len(x)
        seen += len(x)
    return total / max(seen, 1), seen


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, num_classes: int, *, device: torch.device) -> dict[str, Any]:
    """Top-1 accuracy, balanced accuracy, macro-F1, loss (unweighted) and confusion matrix on a loader;
    top-5 accuracy too with `metrics.TOP5_MIN_CLASSES` classes or more."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, n, top5 = 0.0, 0, 0
    with_top5 = num_classes >= TOP5_MIN_CLASSES
    use_amp = device.type == "cuda"
    for x, y in loader:
        x, y = _to_device(x, y, device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        n += len(y)
        pred = logits.argmax(1)
        if with_top5:
            top5 += (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum().item()
        confusion += torch.bincount(
            (y * num_classes + pred).cpu(), minlength=num_classes * num_classes
        ).reshape(num_classes, num_classes)
    scores = confusion_scores(confusion.tolist())
    out = {
        "val_acc": scores["acc"],
        "val_loss": loss_sum / max(n, 1),
        "val_balanced_acc": scores["balanced_acc"],
        "val_macro_f1": scores["macro_f1"],
        "confusion_matrix": confusion.tolist(),
    }
    if with_top5:
        out["val_top5_acc"] = top5 / max(n, 1)
    return out


@torch.no_grad()
def collect_logits(model: nn.Module, loader: Iterable, *, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits (float32, on the CPU) and the labels over a loader, in its order."""
    outs, ys = [], []
    use_amp = device.type == "cuda"
    for x, y in loader:
        x, y = _to_device(x, y, device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            outs.append(model(x).float().cpu())
        ys.append(y.cpu())
    if not outs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(ys)


@torch.no_grad()
def measure_latency(model: nn.Module, image_size: int, device: torch.device, *, runs: int = 5) -> float:
    """Median batch-1 inference time in milliseconds."""
    model.eval()
    x = model_layout(torch.zeros(1, 3, image_size, image_size, device=device))
    times = []
    for i in range(runs + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:  # the first calls warm up allocators and kernels
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(device: str | None) -> torch.device:
    """The requested device, or CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _loader_workers(device: torch.device) -> int:
    # On CPU the trial's own threads do the math; extra loader processes would fight them for cores.
    # On a GPU, decoding and augmentation on the CPU must keep up with the card.
    if device.type != "cuda":
        return 0
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return model_layout(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
