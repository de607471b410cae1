"""`evaluate_model`: a saved model folder scored on a dataset's test split (the final evaluation)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from search.ensemble._select import classification_summary


def evaluate_model(model_dir: str | os.PathLike, data: str | os.PathLike, *, device: str | None = None,
                   batch_size: int = 64, split: str = "test") -> dict[str, Any]:
    """Scores a model folder (from `tlsearch train` or `tlsearch ensemble`) on DATA's test split.

    The split is the one the model's folder records (its study's), so test/ is what the search
    held out; only this and the ensemble's final score ever read it.

    Args:
        model_dir: the model folder.
        data: the dataset folder (or label file).
        device: None: CUDA when available.
        batch_size: images per forward pass.
        split: "test" (the final evaluation), or "val" (to check that a folder scores on
            validation what its study measured).

    Returns:
        model_dir, dataset, images, accuracy, balanced_accuracy, macro_f1, per_class (the
        `search.metrics.per_class_table` rows), confusion_matrix (rows: true class), class_names.
    """
    from search.augment import eval_transform
    from search.data import DatasetError, ImageDataset, SplitSpec, scan_dataset
    from search.ensemble._load import load_model
    from search.trial import pick_device

    model, meta = load_model(model_dir)
    recorded = meta.get("split")
    index = scan_dataset(data, **(SplitSpec.from_dict(recorded, source=f"{model_dir}: split").scan_args()
                                  if isinstance(recorded, dict) else {}))
    samples = index.val if split == "val" else index.test
    if not samples:
        raise DatasetError(f"{index.source} has no test split (a test/ folder beside train/, or test rows); "
                           "evaluate scores only data the search never saw")
    names = list(meta["class_names"])
    if names != list(index.classes):
        raise DatasetError(f"{model_dir} predicts classes {names}, {index.source} has {list(index.classes)}")
    pre = meta["preprocessing"]
    ds = ImageDataset(samples, size=pre["resize_size"], cache=False,
                      transform=eval_transform(pre["image_size"], mean=tuple(pre["mean"]), std=tuple(pre["std"])))
    dev = pick_device(device)
    model = model.to(dev).eval()
    probs, labels = [], []
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False):
            probs.append(model(x.to(dev)).float().softmax(1).cpu())
            labels.append(y)
    summary = classification_summary(torch.cat(probs), torch.cat(labels), names)
    return {"model_dir": str(Path(model_dir).resolve()), "dataset": index.source, **summary, "class_names": names}
