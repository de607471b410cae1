"""The torchvision source: the registry of torchvision models, their stage layouts and weights.

Each entry of `REGISTRY` names a torchvision model, where its classifier is and how its body is
cut into ordered stages, stem first. Pretrained weights are torchvision's DEFAULT weights, kept
in the torch hub cache; they are read by our safe loader, never by torchvision's builder (which
would unpickle the file).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from search.backbones._source import BackboneSource
from search.backbones._types import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    Preprocessing,
    Stage,
    StageLayout,
)
from search.backbones._weights import DOWNLOAD_TIMEOUT_S, _hub_path, _socket_timeout
from search.config import ConfigError

# ---------------------------------------------------------------------------------------------
# Stage layouts, one function per family. Each receives the body (classifier already swapped).


def _stage(name: str, *paths: str) -> Stage:
    return Stage(name, tuple(paths))


def _resnet_stages(body: nn.Module) -> list[Stage]:
    # relu and maxpool have no parameters; they run with the stem anyway.
    return [_stage("stem", "conv1", "bn1")] + [_stage(f"layer{i}", f"layer{i}") for i in range(1, 5)]


def _feature_groups(groups: list[list[int]], tail: list[Stage] | None = None) -> StageLayout:
    """Layout over `body.features` grouped by index (stem first), plus optional trailing stages."""

    def layout(body: nn.Module) -> list[Stage]:
        stages = [
            _stage("stem" if i == 0 else f"stage{i}", *(f"features.{j}" for j in group))
            for i, group in enumerate(groups)
        ]
        return stages + list(tail or [])

    return layout


def _each_feature(body: nn.Module) -> list[Stage]:
    # efficientnet: features[0] is the stem conv, each following entry one resolution/config
    # stage, the last the 1x1 head conv.
    n = len(body.features)
    return _feature_groups([[i] for i in range(n)])(body)


_MBV3_PRE_LOGITS = [_stage("pre_logits", "classifier.0", "classifier.1", "classifier.2")]


def _vgg_stages(body: nn.Module) -> list[Stage]:
    stages, current = [], []
    for i, module in enumerate(body.features):
        current.append(f"features.{i}")
        if isinstance(module, nn.MaxPool2d):  # one stage per resolution
            stages.append(_stage(f"block{len(stages) + 1}", *current))
            current = []
    assert not current, "vgg features should end with a MaxPool2d"
    return stages + [_stage("pre_logits", *(f"classifier.{i}" for i in range(6)))]


def _downsampled_stages(*norm: str) -> list[Stage]:
    """ConvNeXt and Swin: features.0 is the stem, then each stage after the first is a
    downsampling layer plus its blocks, and a final norm (where each family keeps it)."""
    return [
        _stage("stem", "features.0"),
        _stage("stage1", "features.1"),
        _stage("stage2", "features.2", "features.3"),
        _stage("stage3", "features.4", "features.5"),
        _stage("stage4", "features.6", "features.7"),
        _stage("norm", *norm),
    ]


def _convnext_stages(body: nn.Module) -> list[Stage]:
    return _downsampled_stages("classifier.0", "classifier.1")


def _regnet_stages(body: nn.Module) -> list[Stage]:
    return [_stage("stem", "stem")] + [
        _stage(f"block{i}", f"trunk_output.block{i}") for i in range(1, 5)
    ]


def _shufflenet_stages(body: nn.Module) -> list[Stage]:
    return [_stage("stem", "conv1", "maxpool")] + [
        _stage(n, n) for n in ("stage2", "stage3", "stage4", "conv5")
    ]


def _densenet_stages(body: nn.Module) -> list[Stage]:
    f = "features."
    return [
        _stage("stem", f + "conv0", f + "norm0", f + "relu0", f + "pool0"),
        _stage("block1", f + "denseblock1", f + "transition1"),
        _stage("block2", f + "denseblock2", f + "transition2"),
        _stage("block3", f + "denseblock3", f + "transition3"),
        _stage("block4", f + "denseblock4", f + "norm5"),
    ]


def _vit_stages(body: nn.Module) -> list[Stage]:
    layers = [
        _stage(f"block{i}", f"encoder.layers.{child}")
        for i, (child, _) in enumerate(body.encoder.layers.named_children())
    ]
    stem = _stage("stem", "conv_proj", "class_token", "encoder.pos_embedding", "encoder.dropout")
    return [stem] + layers + [_stage("norm", "encoder.ln")]


def _swin_stages(body: nn.Module) -> list[Stage]:
    return _downsampled_stages("norm")


def _spec(name: str, family: str, description: str, classifier: str, stages: StageLayout) -> BackboneSpec:
    return BackboneSpec(name, family, description, classifier, stages)


_MBV2 = [[0], [1], [2, 3], [4, 5, 6], [7, 8, 9, 10], [11, 12, 13], [14, 15, 16], [17], [18]]
_MBV3_LARGE = [[0], [1], [2, 3], [4, 5, 6], [7, 8, 9, 10], [11, 12], [13, 14, 15], [16]]
_MBV3_SMALL = [[0], [1], [2, 3], [4, 5, 6], [7, 8], [9, 10, 11], [12]]

REGISTRY: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        _spec("resnet18", "resnet", "ResNet-18, 11.7M params: fast, robust baseline", "fc", _resnet_stages),
        _spec("resnet34", "resnet", "ResNet-34, 21.8M params", "fc", _resnet_stages),
        _spec("resnet50", "resnet", "ResNet-50 (V2 weights), 25.6M params", "fc", _resnet_stages),
        _spec("resnet101", "resnet", "ResNet-101 (V2 weights), 44.5M params", "fc", _resnet_stages),
        _spec("wide_resnet50_2", "resnet", "Wide ResNet-50-2, 68.9M params", "fc", _resnet_stages),
        _spec("mobilenet_v2", "mobilenet_v2", "MobileNetV2, 3.5M params: mobile-sized",
              "classifier", _feature_groups(_MBV2)),
        _spec("mobilenet_v3_small", "mobilenet_v3", "MobileNetV3-Small, 2.5M params: smallest, fastest",
              "classifier.3", _feature_groups(_MBV3_SMALL, _MBV3_PRE_LOGITS)),
        _spec("mobilenet_v3_large", "mobilenet_v3", "MobileNetV3-Large, 5.5M params: fast and accurate",
              "classifier.3", _feature_groups(_MBV3_LARGE, _MBV3_PRE_LOGITS)),
        _spec("vgg11_bn", "vgg", "VGG-11 with BatchNorm, 132.9M params", "classifier.6", _vgg_stages),
        _spec("vgg16", "vgg", "VGG-16, 138.4M params: large, classic", "classifier.6", _vgg_stages),
        _spec("vgg16_bn", "vgg", "VGG-16 with BatchNorm, 138.4M params", "classifier.6", _vgg_stages),
        _spec("efficientnet_b0", "efficientnet", "EfficientNet-B0, 5.3M params, 224 px",
              "classifier", _each_feature),
        _spec("efficientnet_b1", "efficientnet", "EfficientNet-B1, 7.8M params, 240 px",
              "classifier", _each_feature),
        _spec("efficientnet_b2", "efficientnet", "EfficientNet-B2, 9.1M params, 288 px",
              "classifier", _each_feature),
        _spec("efficientnet_b3", "efficientnet", "EfficientNet-B3, 12.2M params, 300 px",
              "classifier", _each_feature),
        _spec("efficientnet_v2_s", "efficientnet", "EfficientNetV2-S, 21.5M params, 384 px",
              "classifier", _each_feature),
        _spec("convnext_tiny", "convnext", "ConvNeXt-Tiny, 28.6M params: modern CNN",
              "classifier.2", _convnext_stages),
        _spec("convnext_small", "convnext", "ConvNeXt-Small, 50.2M params", "classifier.2", _convnext_stages),
        _spec("regnet_y_400mf", "regnet", "RegNetY-400MF, 4.3M params", "fc", _regnet_stages),
        _spec("regnet_y_800mf", "regnet", "RegNetY-800MF, 6.4M params", "fc", _regnet_stages),
        _spec("regnet_y_1_6gf", "regnet", "RegNetY-1.6GF, 11.2M params", "fc", _regnet_stages),
        _spec("shufflenet_v2_x1_0", "shufflenet", "ShuffleNetV2 x1.0, 2.3M params: tiny",
              "fc", _shufflenet_stages),
        _spec("densenet121", "densenet", "DenseNet-121, 8.0M params", "classifier", _densenet_stages),
        _spec("vit_b_16", "vit", "ViT-B/16, 86.6M params: transformer, needs 224 px",
              "heads", _vit_stages),
        _spec("swin_t", "swin", "Swin-T, 28.3M params: windowed transformer", "head", _swin_stages),
    ]
}


def _tv_weights(name: str) -> Any:
    """torchvision's DEFAULT weights enum of a model (its url and its eval transforms)."""
    return torchvision.models.get_model_weights(name).DEFAULT


class TorchvisionSource(BackboneSource):
    """The models of `REGISTRY`, built by torchvision; weights from the torch hub cache."""

    prefix = ""

    @property
    def hint(self) -> str:
        return ", ".join(REGISTRY)

    def owns(self, name: str) -> bool:
        return isinstance(name, str) and name in REGISTRY

    def names(self, pattern: str) -> list[str]:
        return [n for n in REGISTRY if fnmatch.fnmatchcase(n, pattern)]

    def spec(self, name: str) -> BackboneSpec:
        if not self.owns(name):
            raise ConfigError(f"unknown torchvision backbone {name!r}; available: {self.hint}")
        return REGISTRY[name]

    def create(self, spec: BackboneSpec) -> nn.Module:
        return torchvision.models.get_model(spec.name, weights=None)

    def remove_classifier(self, net: nn.Module, spec: BackboneSpec) -> int:
        old = net.get_submodule(spec.classifier)
        linears = [m for m in old.modules() if isinstance(m, nn.Linear)]
        assert linears, f"{spec.name}: no Linear inside {spec.classifier}"
        parent, _, leaf = spec.classifier.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, nn.Identity())
        return linears[-1].in_features

    def preprocessing(self, spec: BackboneSpec, net: nn.Module) -> Preprocessing:
        weights = _tv_weights(spec.name)
        try:
            t = weights.transforms()
            mean, std = tuple(t.mean), tuple(t.std)
            interp = "bicubic" if "BICUBIC" in str(t.interpolation) else "bilinear"
            size = int(t.crop_size[0])
        except (AttributeError, TypeError):
            mean, std, interp, size = IMAGENET_MEAN, IMAGENET_STD, "bilinear", 224
        return Preprocessing(mean, std, interp, size)

    def cached(self, name: str) -> Path | None:
        path = _hub_path(_tv_weights(name).url)
        return path if path.is_file() else None

    def expected_location(self, name: str) -> str:
        return f"the torch hub cache ({_hub_path(_tv_weights(name).url)})"

    def download(self, name: str) -> Path:
        url = _tv_weights(name).url
        dst = _hub_path(url)
        dst.parent.mkdir(parents=True, exist_ok=True)
        # As torchvision's check_hash: the file name carries a prefix of its sha256.
        named = torch.hub.HASH_REGEX.search(dst.name)
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                torch.hub.download_url_to_file(url, str(dst), named.group(1) if named else None, progress=True)
        except Exception as e:  # urllib raises many types; all mean "could not fetch"
            raise self.missing(name, f"download failed (offline?: {type(e).__name__})") from None
        return dst


TORCHVISION = TorchvisionSource()
