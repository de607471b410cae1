"""Freezing by named stages, and optimizer groups with discriminative learning rates."""

from __future__ import annotations

from typing import Any, Iterator

from torch import nn

from search.backbones._registry import num_stages
from search.backbones._types import Backbone, Stage
from search.config import ConfigError, FreezeDepth


def resolve_path(body: nn.Module, path: str) -> nn.Module | nn.Parameter:
    """The module or parameter at a dotted stage path inside a body.

    Args:
        body: the backbone's body (`Backbone.model.body`).
        path: one of a `Stage`'s paths, e.g. "layer1" or "encoder.pos_embedding".

    Returns:
        The submodule at the path, or else the parameter there.
    """
    try:
        return body.get_submodule(path)
    except AttributeError:
        return body.get_parameter(path)


def _stage_params(body: nn.Module, stage: Stage) -> Iterator[tuple[str, nn.Parameter]]:
    for path in stage.paths:
        obj = resolve_path(body, path)
        if isinstance(obj, nn.Parameter):
            yield path, obj
        else:
            for n, p in obj.named_parameters():
                yield f"{path}.{n}", p


def resolve_depth(backbone_or_name: Backbone | str, depth: FreezeDepth) -> int:
    """Turns a freeze depth (int or "all") into a number of stages, checking its range.

    Args:
        backbone_or_name: a built Backbone or a backbone name.
        depth: an int in 0..len(stages), or "all".

    Returns:
        The number of stages to freeze.
    """
    if isinstance(backbone_or_name, Backbone):
        name, n = backbone_or_name.name, len(backbone_or_name.stages)
    else:
        name, n = backbone_or_name, num_stages(backbone_or_name)
    if depth == "all":
        return n
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= n:
        raise ConfigError(f"freeze_depth must be between 0 and {n} for {name}, got {depth!r}")
    return depth


def freeze(backbone: Backbone, depth: FreezeDepth) -> int:
    """Freezes the first `depth` stages (from the stem); the rest and the head train.

    Frozen parameters get requires_grad=False. Frozen modules are kept in eval mode by
    `TransferModel.train()`, so their BatchNorm running stats never change and their dropout /
    stochastic depth is off. (Eval mode rather than timm's FrozenBatchNorm2d swap keeps the
    state_dict keys and parameter list of the network unchanged, so checkpoints load into an
    unfrozen build.) Calling it again re-freezes from scratch.

    Args:
        backbone: a built backbone (changed in place).
        depth: stages to freeze, 0..len(stages), or "all" (linear probe).

    Returns:
        The number of trainable parameters.
    """
    k = resolve_depth(backbone, depth)
    model = backbone.model
    for p in model.parameters():
        p.requires_grad_(True)
    frozen: list[str] = []
    for stage in backbone.stages[:k]:
        for path in stage.paths:
            obj = resolve_path(model.body, path)
            if isinstance(obj, nn.Parameter):
                obj.requires_grad_(False)
            else:
                obj.requires_grad_(False)
                frozen.append(path)
    model.frozen_paths = frozen
    # Modules frozen earlier but not now must leave eval mode if the model is training.
    model.train(model.training)
    backbone.freeze_depth = k
    return trainable_params(backbone)


def trainable_params(backbone: Backbone) -> int:
    """Number of parameters with requires_grad (head included)."""
    return sum(p.numel() for p in backbone.model.parameters() if p.requires_grad)


def param_groups(
    backbone: Backbone, *, lr: float, weight_decay: float, lr_decay: float = 1.0,
    backbone_lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: trainable params only, discriminative learning rates.

    The head gets `lr`; the trainable stage at distance d from the head (nearest = 1) gets
    `lr * backbone_lr_mult * lr_decay**d`. Biases and norm weights (1-d params) get no weight decay, as in timm's
    param_groups_weight_decay.

    Args:
        backbone: a built (possibly frozen) backbone.
        lr: the head's learning rate.
        weight_decay: decay for weight matrices / kernels.
        lr_decay: factor per stage away from the head, in (0, 1].
        backbone_lr_mult: factor of every backbone stage's rate against the head's, in (0, 1].

    Returns:
        A list of dicts with params, lr, weight_decay and name, for torch.optim.
    """
    body = backbone.model.body
    groups: list[dict[str, Any]] = []

    def add(name: str, named: list[tuple[str, nn.Parameter]], group_lr: float) -> None:
        trainable = [p for _, p in named if p.requires_grad]
        decay = [p for p in trainable if p.ndim > 1]
        no_decay = [p for p in trainable if p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "lr": group_lr, "weight_decay": weight_decay, "name": name})
        if no_decay:
            groups.append(
                {"params": no_decay, "lr": group_lr, "weight_decay": 0.0, "name": f"{name}.no_decay"}
            )

    add("head", list(backbone.model.head.named_parameters()), lr)
    distance = 0
    for stage in reversed(backbone.stages):
        named = list(_stage_params(body, stage))
        if not any(p.requires_grad for _, p in named):
            continue
        distance += 1
        add(stage.name, named, lr * backbone_lr_mult * lr_decay**distance)
    return groups
