"""The baseline: a search written the way the Optuna and PyTorch tutorials write one.

One process, `optuna.create_study` with its default sampler (TPE) and default pruner
(MedianPruner), `trial.report` / `trial.should_prune` every epoch, torchvision `ImageFolder`
decoding every JPEG with PIL in every epoch, no caches. Same search space as tlsearch:
timm/tf_efficientnet_lite0 from a local state dict, freeze depth in the same 8 stages, augmentation
(none / flip / trivialaugment), lr; same image size, epochs, batch size and optimizer.

Nothing from `search` is imported: this is what a user would write without tlsearch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna
import timm
import torch
import torch.nn.functional as F
from torchvision import datasets, transforms

from benchmarks.plain import accuracy

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # tf_efficientnet_lite0's normalisation
# Not photos: tlsearch skips this placeholder too, so both sides train on the same images.
SKIP = {"imageNotFound.gif"}


def make_model(weights: str, freeze_depth: Any, num_classes: int) -> torch.nn.Module:
    """Lite0 with its weights, a new 2-class head, and the first `freeze_depth` stages frozen."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    model.reset_classifier(num_classes)
    # The same 8 stages as timm's coarse groups: stem, blocks 0-5, blocks 6 + conv_head.
    stages = [[model.conv_stem, model.bn1], *[[b] for b in model.blocks[:-1]],
              [model.blocks[-1], model.conv_head, model.bn2]]
    k = len(stages) if freeze_depth == "all" else int(freeze_depth)
    frozen = [m for stage in stages[:k] for m in stage]
    for m in frozen:
        m.requires_grad_(False)
    model.frozen = frozen  # kept in eval mode (BatchNorm stats fixed) by `set_train`
    return model


def set_train(model: torch.nn.Module) -> None:
    model.train()
    for m in model.frozen:
        m.eval()


def loaders(data: str, augmentation: str, image_size: int, batch_size: int, seed: int) -> tuple:
    resize = round(image_size / 0.875)
    norm = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    center = [transforms.Resize(resize), transforms.CenterCrop(image_size)]
    train_tf = {
        "none": center,
        "flip": [transforms.Resize(resize), transforms.RandomResizedCrop(image_size),
                 transforms.RandomHorizontalFlip()],
        "trivialaugment": [transforms.Resize(resize), transforms.RandomResizedCrop(image_size),
                           transforms.RandomHorizontalFlip(), transforms.TrivialAugmentWide()],
    }[augmentation]
    valid = lambda p: Path(p).name not in SKIP  # noqa: E731
    train = datasets.ImageFolder(f"{data}/train", transforms.Compose(train_tf + norm), is_valid_file=valid)
    val = datasets.ImageFolder(f"{data}/val", transforms.Compose(center + norm), is_valid_file=valid)
    g = torch.Generator().manual_seed(seed)
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=g, drop_last=True),
            torch.utils.data.DataLoader(val, batch_size=64))


def objective(trial: optuna.Trial, *, data: str, weights: str, space: dict, log: list, t0: float) -> float:
    """One trial: suggest, build, train `epochs` epochs, report val_acc each epoch, maybe prune."""
    freeze_depth = trial.suggest_categorical("freeze_depth", space["freeze_depth"])
    augmentation = trial.suggest_categorical("augmentation", space["augmentation"])
    lr = trial.suggest_float("lr", space["lr"]["low"], space["lr"]["high"], log=True)
    torch.manual_seed(0)
    model = make_model(weights, freeze_depth, num_classes=2)
    train_loader, val_loader = loaders(data, augmentation, space["image_size"], space["batch_size"], 0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    acc = 0.0
    for epoch in range(1, space["max_epochs"] + 1):
        set_train(model)
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        acc = accuracy(model, val_loader)
        log.append({"t": time.time() - t0, "trial": trial.number, "epoch": epoch, "val_acc": acc,
                    "freeze_depth": freeze_depth, "augmentation": augmentation, "lr": lr})
        trial.report(acc, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return acc


def run(*, data: str, weights: str, space: dict, budget_s: float, seed: int = 0, threads: int | None = None) -> dict:
    """Runs the hand-written search for `budget_s` seconds.

    Args:
        data: an ImageFolder with train/ and val/.
        weights: the Lite0 state dict.
        space: freeze_depth and augmentation lists, lr {low, high}, image_size, batch_size, max_epochs.
        budget_s: Optuna's `timeout` (a trial running at the deadline finishes, as in Optuna).
        seed: the sampler's seed (the same as tlsearch's, so both start from the same configs).
        threads: torch threads; None: all cores (one process uses the whole machine).

    Returns:
        {"log": per-epoch records with "t" seconds since start, "trials": n, "wall_s": seconds}.
    """
    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.time()
    log: list[dict] = []
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(lambda t: objective(t, data=data, weights=weights, space=space, log=log, t0=t0),
                   timeout=budget_s)
    return {"log": log, "trials": len(study.trials), "wall_s": time.time() - t0,
            "states": {s.name: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}}
