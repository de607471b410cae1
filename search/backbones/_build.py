"""Building a backbone: the network, its pretrained weights (from where, and which), a new head.

Pretrained weights come from, in order: `weights_dir/<model name>.pth` (a state_dict), the
backbone source's cache (torch hub for torchvision, Hugging Face for timm), or a download with a
short socket timeout. An offline machine without weights gets a `WeightsError` within seconds.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from search.backbones._registry import _create_network, get_spec, source_of
from search.backbones._types import Backbone, BackboneSpec, TransferModel
from search.backbones._weights import _file_digest, _load_file, _stat_key
from search.config import ConfigError


def _weights_file(name: str, weights_dir: str | Path | None) -> Path | None:
    if weights_dir is None:
        return None
    return Path(weights_dir).expanduser() / f"{source_of(name).file_stem(name)}.pth"


def weights_status(name: str, weights_dir: str | Path | None = None) -> str:
    """Where pretrained weights would come from, without downloading anything.

    Args:
        name: backbone name.
        weights_dir: the --weights-dir folder, if any.

    Returns:
        "file <path>" (weights_dir holds it), "cached" (torch hub / HF cache) or "missing".
    """
    get_spec(name)
    local = _weights_file(name, weights_dir)
    if local is not None and local.is_file():
        return f"file {local}"
    return "cached" if source_of(name).cached(name) is not None else "missing"


def _fetch(name: str) -> Path:
    """Returns the cached checkpoint of a backbone, downloading it (with a timeout) if needed."""
    source = source_of(name)
    hit = source.cached(name)
    return hit if hit is not None else source.download(name)


def check_weights(name: str, weights_dir: str | Path | None = None) -> str:
    """Pre-flight: makes sure pretrained weights are available, fetching them if needed.

    Args:
        name: backbone name.
        weights_dir: the --weights-dir folder, if any.

    Returns:
        The weights status after fetching ("file <path>" or "cached").
    """
    status = weights_status(name, weights_dir)
    if status == "missing":
        _fetch(name)  # raises WeightsError when it cannot
        status = "cached"
    return status


def _pretrained_network(spec: BackboneSpec, weights_dir: str | Path | None) -> tuple[nn.Module, str, str]:
    """The full network with pretrained weights, where they came from, and their content id."""
    local = _weights_file(spec.name, weights_dir)
    from_dir = local is not None and local.is_file()
    path = local if from_dir else _fetch(spec.name)
    assert path is not None
    key = _stat_key(path)  # before loading: the id must name the content that was loaded
    if from_dir:
        net = _create_network(spec)
        _load_file(net, path, spec.name)
    else:
        # The source reads its own cache file, safely (see BackboneSource.load_cached).
        net = source_of(spec.name).load_cached(spec, path)
    return net, f"{'file' if from_dir else 'cache'} {path}", _file_digest(path, key)


def build_backbone(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    weights_dir: str | Path | None = None,
    dropout: float = 0.0,
) -> Backbone:
    """Builds a backbone with a fresh classification head.

    Args:
        name: registry name or timm/<name>.
        num_classes: outputs of the new head.
        pretrained: load pretrained weights (False: random initialisation).
        weights_dir: folder with <model name>.pth state dicts, tried before the caches.
        dropout: dropout probability before the new Linear.

    Returns:
        The Backbone, unfrozen, in train mode; its `weights_id` names the weights loaded.
    """
    spec = get_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    source = source_of(name)
    if pretrained:
        net, origin, weights_id = _pretrained_network(spec, weights_dir)
    else:
        net, origin, weights_id = source.create(spec), "random", "random"
    width = source.remove_classifier(net, spec)
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))
    model = TransferModel(net, head)
    prep = source.preprocessing(spec, net)
    return Backbone(
        model=model,
        name=name,
        stages=spec.stages(net),
        num_features=width,
        mean=prep.mean,
        std=prep.std,
        interpolation=prep.interpolation,
        default_size=prep.size,
        params_total=sum(p.numel() for p in model.parameters()),
        source=origin,
        weights_id=weights_id,
    )
