"""Weight averaging (a model soup's weights) and BatchNorm statistics recomputed for the average."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of state_dicts of one architecture.

    Every floating-point tensor (trained parameters and float buffers such as BatchNorm's running
    statistics) is averaged; integer buffers (`num_batches_tracked`) are the first's.

    Args:
        states: state_dicts with the same keys and shapes.

    Returns:
        The averaged state_dict.

    Raises:
        ValueError: the keys or a shape differ (not one architecture).
    """
    if not states:
        raise ValueError("nothing to average")
    first = states[0]
    for s in states[1:]:
        if s.keys() != first.keys():
            raise ValueError("state_dicts to average have different keys (not one architecture)")
        for k, v in s.items():
            if v.shape != first[k].shape:
                raise ValueError(f"state_dicts to average differ in the shape of {k}: {tuple(v.shape)} vs "
                                 f"{tuple(first[k].shape)}")
    out = {}
    for k, v in first.items():
        if v.is_floating_point():
            # In float64, the mean of identical float32 tensors is exactly that tensor.
            out[k] = torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def batchnorm_differs(states: Sequence[dict[str, torch.Tensor]], model: nn.Module) -> list[str]:
    """Names of the model's BatchNorm modules whose running statistics differ between the states
    (stages a trial fine-tuned); frozen stages keep the same statistics in every trial."""
    names = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or not m.track_running_stats:
            continue
        prefix = f"{name}." if name else ""
        for stat in ("running_mean", "running_var"):
            key = prefix + stat
            if key in states[0] and any(not torch.equal(s[key], states[0][key]) for s in states[1:]):
                names.append(name)
                break
    return names


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, names: Sequence[str], batches: Iterable[torch.Tensor]) -> None:
    """Recomputes the running statistics of the named BatchNorm modules over `batches` (as
    `torch.optim.swa_utils.update_bn` does, but only for those modules: the others, and dropout,
    stay in eval mode).

    Args:
        model: the module (its BatchNorm modules are found by name).
        names: BatchNorm modules to recompute.
        batches: input batches, already preprocessed as the model expects.
    """
    if not names:
        return
    modules = [model.get_submodule(n) for n in names]
    was_training = model.training
    model.eval()
    momenta = []
    for m in modules:
        m.reset_running_stats()
        momenta.append(m.momentum)
        m.momentum = None  # a cumulative average over all batches
        m.train()
    for x in batches:
        model(x)
    for m, momentum in zip(modules, momenta):
        m.momentum = momentum
        m.eval()
    model.train(was_training)
