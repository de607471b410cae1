"""Class imbalance: how lopsided a training split is, the loss's class weights, the balanced sampler.

Two search dimensions (`TrialConfig.loss_weighting`, `TrialConfig.balanced_sampler`) act here;
the default space offers them when the training split's largest class is at least
`IMBALANCE_RATIO` times its smallest (`is_imbalanced`), and leaves them out otherwise.

Both work the same whether a trial trains on images or on cached frozen features: the weights
depend only on the class counts, and the sampler only on each training sample's label.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    import torch

    from search.config import TrialConfig

# The default space searches imbalance handling from this largest/smallest class ratio on.
IMBALANCE_RATIO = 3.0


def class_counts(labels: Iterable[int], num_classes: int) -> list[int]:
    """Training images per class, in class-index order (0 for a class with none)."""
    seen = Counter(int(y) for y in labels)
    return [seen.get(c, 0) for c in range(num_classes)]


def imbalance_ratio(counts: Sequence[int]) -> float:
    """Largest class over smallest (classes with no image left out); 1.0 with fewer than 2 classes."""
    present = [n for n in counts if n > 0]
    if len(present) < 2:
        return 1.0
    return max(present) / min(present)


def is_imbalanced(counts: Sequence[int]) -> bool:
    """Whether the default space should search imbalance handling for these training counts."""
    return imbalance_ratio(counts) >= IMBALANCE_RATIO


def class_weights(counts: Sequence[int], weighting: str) -> list[float] | None:
    """Per-class weights of the training loss.

    `inverse_frequency` weighs class c by 1/n_c, `inverse_sqrt` by 1/sqrt(n_c). Both are scaled
    so that the mean weight over the training images is 1: the loss keeps its usual size, so a
    learning rate means the same with and without weighting.

    Args:
        counts: training images per class.
        weighting: "none", "inverse_frequency" or "inverse_sqrt".

    Returns:
        One weight per class, or None for "none" (plain cross-entropy). A class with no training
        image gets the largest weight of the others (it never occurs in training anyway).
    """
    if weighting == "none":
        return None
    power = {"inverse_frequency": 1.0, "inverse_sqrt": 0.5}.get(weighting)
    if power is None:
        raise ValueError(f"unknown loss weighting {weighting!r}")
    raw = [n ** -power if n > 0 else 0.0 for n in counts]
    total = sum(counts)
    mean = sum(w * n for w, n in zip(raw, counts)) / total if total else 0.0
    if not mean:
        return [1.0] * len(counts)
    weights = [w / mean for w in raw]
    top = max(weights)
    return [w if n > 0 else top for w, n in zip(weights, counts)]


def loss_weight_tensor(config: TrialConfig, counts: Sequence[int], device: Any) -> torch.Tensor | None:
    """`class_weights` as a float32 tensor on `device` for `F.cross_entropy(weight=...)`; None: unweighted."""
    import torch

    weights = class_weights(counts, config.loss_weighting)
    return None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)


def shuffling(config: TrialConfig, labels: Sequence[int]) -> dict[str, Any]:
    """The DataLoader keywords that order one epoch of training samples.

    Plain: a shuffle seeded with the trial's seed. With `balanced_sampler`: a
    `WeightedRandomSampler` drawing as many samples as the split holds, with replacement, each
    with probability 1/(its class count), so every class comes up equally often; seeded too.

    Args:
        config: the trial config (`balanced_sampler`, `seed`).
        labels: each training sample's label, in dataset order.

    Returns:
        {"shuffle": True, "generator": ...} or {"sampler": ...}.
    """
    import torch

    generator = torch.Generator().manual_seed(config.seed)
    if not config.balanced_sampler or not len(labels):
        return {"shuffle": True, "generator": generator}
    labels = [int(y) for y in labels]
    counts = Counter(labels)
    weights = torch.tensor([1.0 / counts[y] for y in labels], dtype=torch.double)
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=len(labels), replacement=True,
                                                     generator=generator)
    return {"sampler": sampler}

