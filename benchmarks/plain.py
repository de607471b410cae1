"""The reference: a fine-tuning loop and a search written the way the tutorials write them.

The loop follows the torchvision transfer-learning tutorial (ImageFolder, Resize + CenterCrop,
a pretrained model with a new classifier, CrossEntropyLoss, one optimizer over every trainable
parameter at one learning rate, `model.train()` / `model.eval()`), with AdamW and a timm model
loaded from a local state dict, as a user of these weights writes it. The search is the Optuna
tutorial's: `create_study` with TPE and the MedianPruner, `trial.report` / `should_prune` every
epoch, one trial at a time in one process.

Nothing from `search` is imported: this is what a user writes without tlsearch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import optuna
import timm
import torch
import torch.nn.functional as F
from torchvision import datasets, transforms

# Not photos: tlsearch skips this placeholder too, so both sides train on the same images.
SKIP = {"imageNotFound.gif"}


def make_model(name: str, weights: str, num_classes: int, *, train_all: bool) -> torch.nn.Module:
    """A timm model with its local weights and a new classifier; `train_all` False: the head alone."""
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.reset_classifier(num_classes)
    if not train_all:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)
    return model


def loaders(model: torch.nn.Module, data: str, *, image_size: int, batch_size: int, augment: bool,
            seed: int) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader, int]:
    """Train and val loaders of an ImageFolder with train/ and val/, normalised as the weights were.

    Returns:
        (train loader, val loader, number of classes).
    """
    cfg = timm.data.resolve_data_config({}, model=model)
    norm = [transforms.ToTensor(), transforms.Normalize(cfg["mean"], cfg["std"])]
    center = [transforms.Resize(round(image_size / 0.875)), transforms.CenterCrop(image_size)]
    random = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    valid = lambda p: Path(p).name not in SKIP  # noqa: E731
    train = datasets.ImageFolder(f"{data}/train", transforms.Compose((random if augment else center) + norm),
                                 is_valid_file=valid)
    val = datasets.ImageFolder(f"{data}/val", transforms.Compose(center + norm), is_valid_file=valid)
    g = torch.Generator().manual_seed(seed)
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
            torch.utils.data.DataLoader(val, batch_size=64), len(train.classes))


def train_and_validate(model: torch.nn.Module, train_loader: Any, val_loader: Any, *, epochs: int, lr: float,
                       weight_decay: float, on_epoch: Callable[[int, float, float], None] | None = None) -> float:
    """The tutorial's loop: AdamW over the trainable parameters at one constant rate.

    Args:
        on_epoch: called with (epoch, val_acc, train_loss) after every epoch; may raise to stop.

    Returns:
        The last epoch's validation accuracy.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    acc = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        total = seen = 0.0
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            seen += len(y)
        acc = accuracy(model, val_loader)
        if on_epoch is not None:
            on_epoch(epoch, acc, total / max(seen, 1))
    return acc


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: Any) -> float:
    """Top-1 accuracy over a loader, the model in eval mode."""
    model.eval()
    correct = n = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        n += len(y)
    return correct / n


def fine_tune(data: str, weights_dir: str, *, backbone: str, image_size: int, epochs: int, lr: float,
              weight_decay: float, batch_size: int = 32, seed: int = 0, train_all: bool = True,
              augment: bool = False, on_epoch: Callable[[int, float, float], None] | None = None) -> float:
    """One run of the reference loop (a fresh model, seeded), as the parity benchmark calls it."""
    torch.manual_seed(seed)
    model = make_model(backbone, f"{weights_dir}/{backbone}.pth", 1000, train_all=train_all)
    train_loader, val_loader, n = loaders(model, data, image_size=image_size, batch_size=batch_size,
                                          augment=augment, seed=seed)
    model.reset_classifier(n)  # the head is made after the classes are known, as in the tutorial
    return train_and_validate(model, train_loader, val_loader, epochs=epochs, lr=lr,
                              weight_decay=weight_decay, on_epoch=on_epoch)


def search(data: str, weights_dir: str, *, budget_s: float, image_size: int, epochs: int, seed: int = 0,
           threads: int | None = None, lr: tuple[float, float] = (1e-5, 1e-2)) -> dict:
    """The hand-written search: TPE over backbone (the weights at hand), head-only or all layers,
    augmentation (none / crop + flip) and one learning rate; MedianPruner; Optuna's `timeout`.

    Returns:
        {"log": per-epoch records with "t" seconds since start, "trials": n, "wall_s": seconds,
        "states": trials per state}.
    """
    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backbones = sorted(p.stem for p in Path(weights_dir).glob("*.pth"))
    t0 = time.time()
    log: list[dict] = []

    def objective(trial: optuna.Trial) -> float:
        params = {
            "backbone": trial.suggest_categorical("backbone", backbones),
            "train_all": trial.suggest_categorical("train_all", [False, True]),
            "augment": trial.suggest_categorical("augment", [False, True]),
            "lr": trial.suggest_float("lr", *lr, log=True),
        }

        def on_epoch(epoch: int, acc: float, train_loss: float) -> None:
            log.append({"t": time.time() - t0, "trial": trial.number, "epoch": epoch, "val_acc": acc,
                        "train_loss": train_loss, **params})
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        return fine_tune(data, weights_dir, image_size=image_size, epochs=epochs, weight_decay=1e-2,
                         seed=seed, on_epoch=on_epoch, **params)

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner())
    study.optimize(objective, timeout=budget_s)
    return {"log": log, "trials": len(study.trials), "wall_s": time.time() - t0,
            "states": {s.name: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}}
