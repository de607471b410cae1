"""Backbone registry: name -> network, pretrained weights, ordered stages and a fresh head.

Every backbone is a torchvision model from `REGISTRY` or any timm model as `timm/<name>`.
`build_backbone` returns a `Backbone` whose `.model` is a `TransferModel`: `.body` is the
network with its classifier replaced by `nn.Identity` (it outputs pooled pre-logit features)
and `.head` is `Dropout + Linear(num_features, num_classes)`. The body is cut into ordered
named stages, stem first, so that `freeze(backbone, k)` can freeze the first k of them and
`param_groups` can give each trainable stage its own learning rate.

Pretrained weights come from, in order: `weights_dir/<model name>.pth` (a state_dict), the
torch hub cache (torchvision) or the Hugging Face cache (timm), or a download with a short
socket timeout. An offline machine without weights gets a `WeightsError` within seconds.
Every checkpoint, ours or downloaded, is read with `torch.load(..., weights_only=True)` (or as
safetensors): a file that needs to unpickle arbitrary objects is refused, never run. The built
`Backbone.weights_id` names the content of the file actually loaded ("sha256:<16 hex>"), or
"random".
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import os
import pickle
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from search.config import ConfigError, FreezeDepth, TLSearchError

TIMM_PREFIX = "timm/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 10.0  # socket timeout for weight downloads: an offline machine fails fast


class WeightsError(TLSearchError):
    """Pretrained weights are missing, cannot be fetched, or do not fit the network."""


@dataclass(frozen=True)
class Stage:
    """One named stage of a backbone: the unit that `freeze` freezes."""

    name: str  # e.g. "stem", "layer1", "norm"
    paths: tuple[str, ...]  # dotted names of modules or parameters inside the body


StageLayout = Callable[[nn.Module], list[Stage]]


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry: how to build a backbone, where its classifier is, how to cut stages."""

    name: str  # registry name: torchvision model name, or timm/<name>
    family: str  # architecture family, e.g. "resnet", "efficientnet", "timm"
    description: str  # one line for `tlsearch backbones`
    classifier: str  # dotted path of the module replaced by nn.Identity (holds the last Linear)
    stages: StageLayout = field(repr=False)  # body (classifier already removed) -> ordered stages


class TransferModel(nn.Module):
    """A pretrained body plus a new head; frozen stages stay in eval mode under `train()`."""

    def __init__(self, body: nn.Module, head: nn.Sequential) -> None:
        super().__init__()
        self.body = body
        self.head = head
        # Body-relative module paths kept in eval mode: frozen BatchNorm keeps its running
        # stats and frozen dropout / stochastic depth stay off, so frozen features are fixed.
        self.frozen_paths: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        if mode:
            for path in self.frozen_paths:
                self.body.get_submodule(path).eval()
        return self


@dataclass
class Backbone:
    """A built backbone: the model and what training and preprocessing need to know about it.

    `weights_id` is the identity of the weights the body started from: "sha256:<16 hex digits>"
    of the content of the file actually loaded (a --weights-dir file, the torch hub cache file or
    the Hugging Face cache file), or "random" for a random initialisation (then the trial's seed
    tells which). Two files with different content never share an id; a copy of a file at another
    path keeps it. Feature caches key on it and trial records store it.
    """

    model: TransferModel  # body + head
    name: str  # registry name, e.g. "resnet18" or "timm/tf_efficientnet_lite0"
    stages: list[Stage]  # ordered, stem first, head excluded; cover every body parameter once
    num_features: int  # width of the pooled pre-logit features (the head's input)
    mean: tuple[float, float, float]  # normalisation of the pretrained weights
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" or "bicubic", as the weights were trained
    default_size: int  # input side the weights were trained/evaluated at
    params_total: int  # parameters of body + head
    source: str  # where the weights came from: "random", "file <path>", "cache <path>", ...
    # content identity of the initial weights: "sha256:<16 hex>" or "random"; "" means unknown
    # (a Backbone built by hand), which nothing may cache under
    weights_id: str = ""
    freeze_depth: int = 0  # stages frozen now (set by `freeze`)


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


# ---------------------------------------------------------------------------------------------
# Lookup


def list_backbones(pattern: str = "*") -> list[str]:
    """Lists registry names matching a shell-style pattern.

    Args:
        pattern: fnmatch pattern, e.g. "resnet*"; a pattern starting with "timm/" lists timm
            models instead (e.g. "timm/*lite*").

    Returns:
        Matching names, registry order (timm: timm's order).
    """
    if pattern.startswith(TIMM_PREFIX):
        import timm

        return [TIMM_PREFIX + n for n in timm.list_models(pattern[len(TIMM_PREFIX):])]
    return [n for n in REGISTRY if fnmatch.fnmatchcase(n, pattern)]


@functools.lru_cache(maxsize=None)
def _timm_models() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def get_spec(name: str) -> BackboneSpec:
    """Returns the registry entry of a backbone.

    Args:
        name: a registry name or timm/<timm model name>.

    Returns:
        The spec. Unknown names raise ConfigError listing the valid ones.
    """
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        arch = name[len(TIMM_PREFIX):]
        if arch.split(".")[0] not in _timm_models():
            raise ConfigError(
                f"unknown timm backbone {name!r}: {arch!r} is not in timm.list_models() "
                f"(try `tlsearch backbones` or timm.list_models('*{arch[:6]}*'))"
            )
        return BackboneSpec(
            name, "timm", f"timm model {arch}", "(timm reset_classifier)", _timm_stages
        )
    spec = REGISTRY.get(name)  # type: ignore[arg-type]
    if spec is None:
        raise ConfigError(
            f"unknown backbone {name!r}; available: {', '.join(REGISTRY)}, or timm/<name>"
        )
    return spec


def _file_stem(name: str) -> str:
    """The weights file name (without .pth) of a backbone: its model name without timm/."""
    return name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name


# ---------------------------------------------------------------------------------------------
# Networks


def _create_network(spec: BackboneSpec) -> nn.Module:
    """The full network with its original classifier and random weights."""
    if spec.family == "timm":
        import timm

        return timm.create_model(spec.name[len(TIMM_PREFIX):], pretrained=False)
    return torchvision.models.get_model(spec.name, weights=None)


def _swap_classifier(net: nn.Module, spec: BackboneSpec) -> int:
    """Replaces the classifier by nn.Identity in place; returns the pre-logit width."""
    if spec.family == "timm":
        width = int(net.num_features)
        net.reset_classifier(0)  # keeps timm's global pooling: body(x) is pooled features
        return width
    old = net.get_submodule(spec.classifier)
    linears = [m for m in old.modules() if isinstance(m, nn.Linear)]
    assert linears, f"{spec.name}: no Linear inside {spec.classifier}"
    parent, _, leaf = spec.classifier.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, nn.Identity())
    return linears[-1].in_features


def _timm_stages(body: nn.Module) -> list[Stage]:
    """Stages from timm's coarse group matcher, collapsed to whole modules where possible."""
    from timm.models._manipulate import group_parameters

    matcher = body.group_matcher(coarse=True)
    groups = group_parameters(body, matcher)
    stages, used = [], set()
    for lid in sorted(groups):
        names = groups[lid]
        label = _timm_group_name(matcher, names[0], lid)
        while label in used:
            label += "_"
        used.add(label)
        stages.append(Stage(label, tuple(_collapse(body, names))))
    return stages


def _timm_group_name(matcher: Any, first_param: str, lid: int) -> str:
    import re

    if isinstance(matcher, dict):
        for key, spec in matcher.items():
            specs = spec if isinstance(spec, (list, tuple)) else [(spec, None)]
            for sub in specs:
                regex = sub[0] if isinstance(sub, (list, tuple)) else sub
                if regex is None:
                    continue
                m = re.match(regex, first_param)
                if m:
                    idx = [g for g in m.groups() if g is not None]
                    return key + "".join(f".{g}" for g in idx)
        return "head"
    return f"group{lid}"


def _collapse(body: nn.Module, param_names: list[str]) -> list[str]:
    """Smallest list of module paths (or leftover parameter paths) covering exactly param_names.

    Module paths let `freeze` put whole frozen modules (BatchNorm, dropout) in eval mode.
    """
    wanted = set(param_names)
    paths: list[str] = []
    covered: set[str] = set()
    for mod_name, module in body.named_modules():
        if not mod_name or any(mod_name.startswith(p + ".") or mod_name == p for p in paths):
            continue
        prefix = mod_name + "."
        own = [prefix + n for n, _ in module.named_parameters()]
        if own and all(n in wanted for n in own):
            paths.append(mod_name)
            covered.update(own)
    leftovers = [n for n in param_names if n not in covered]
    return paths + leftovers


def _resolve(body: nn.Module, path: str) -> nn.Module | nn.Parameter:
    """The module or parameter at a dotted path inside the body."""
    try:
        return body.get_submodule(path)
    except AttributeError:
        return body.get_parameter(path)


def _stage_params(body: nn.Module, stage: Stage) -> Iterator[tuple[str, nn.Parameter]]:
    for path in stage.paths:
        obj = _resolve(body, path)
        if isinstance(obj, nn.Parameter):
            yield path, obj
        else:
            for n, p in obj.named_parameters():
                yield f"{path}.{n}", p


@dataclass(frozen=True)
class _Info:
    """What describe/num_stages need, computed once per name from a weightless build."""

    stages: tuple[Stage, ...]
    params_body: int
    num_features: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    default_size: int


@functools.lru_cache(maxsize=None)
def _info(name: str) -> _Info:
    spec = get_spec(name)
    try:
        # The meta device allocates nothing, so even vgg16 / vit_b_16 "build" in milliseconds.
        with torch.device("meta"):
            net = _create_network(spec)
    except (NotImplementedError, RuntimeError):
        net = _create_network(spec)  # regnet computes its widths with tensor ops: build on CPU
    width = _swap_classifier(net, spec)
    mean, std, interp, size = _preprocessing(spec, net)
    return _Info(
        stages=tuple(spec.stages(net)),
        params_body=sum(p.numel() for p in net.parameters()),
        num_features=width,
        mean=mean,
        std=std,
        interpolation=interp,
        default_size=size,
    )


def _preprocessing(spec: BackboneSpec, net: nn.Module) -> tuple[tuple, tuple, str, int]:
    """(mean, std, interpolation, default size) that the pretrained weights expect."""
    if spec.family == "timm":
        cfg = net.pretrained_cfg
        return (
            tuple(cfg.get("mean", IMAGENET_MEAN)),
            tuple(cfg.get("std", IMAGENET_STD)),
            "bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear",
            int(cfg.get("input_size", (3, 224, 224))[-1]),
        )
    weights = _tv_weights(spec.name)
    try:
        t = weights.transforms()
        mean, std = tuple(t.mean), tuple(t.std)
        interp = "bicubic" if "BICUBIC" in str(t.interpolation) else "bilinear"
        size = int(t.crop_size[0])
    except (AttributeError, TypeError):
        mean, std, interp, size = IMAGENET_MEAN, IMAGENET_STD, "bilinear", 224
    return mean, std, interp, size


def _tv_weights(name: str) -> Any:
    return torchvision.models.get_model_weights(name).DEFAULT


def num_stages(name: str) -> int:
    """Number of stages of a backbone (cached; no weights loaded).

    Args:
        name: backbone name.

    Returns:
        len(stages), the largest valid freeze depth.
    """
    return len(_info(name).stages)


def stage_names(name: str) -> list[str]:
    """Names of a backbone's stages, stem first (cached; no weights loaded)."""
    return [s.name for s in _info(name).stages]


# ---------------------------------------------------------------------------------------------
# Weights


def _weights_file(name: str, weights_dir: str | Path | None) -> Path | None:
    if weights_dir is None:
        return None
    return Path(weights_dir).expanduser() / f"{_file_stem(name)}.pth"


def _hub_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


# ---------------------------------------------------------------------------------------------
# Weights identity: the content hash of the file loaded, computed once per file version

WEIGHTS_IDS_FILE = "weights-ids.json"  # under the cache dir: known hashes, shared by processes
_DIGESTS: dict[tuple[str, int, int, int, int, int], str] = {}  # this process's known hashes


def _stat_key(path: Path) -> tuple[str, int, int, int, int, int]:
    """What identifies one version of a file without reading it.

    Size and mtime alone miss a rewrite in place with the old mtime put back; the ctime cannot be
    put back, and a file swapped in by rename has a new inode.
    """
    real = path.resolve()  # the Hugging Face cache links snapshot names to blobs
    st = real.stat()
    return (str(real), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def weights_file_id(path: str | Path) -> str:
    """The content identity of a weights file, as `Backbone.weights_id` records it.

    The file is hashed once per version: the hash is remembered by (resolved path, inode, size,
    mtime, ctime) in memory and in `<cache dir>/weights-ids.json`, so later builds, in this
    process or another, do not read a large file again.

    Args:
        path: the weights file.

    Returns:
        "sha256:<first 16 hex digits of the file's sha256>".
    """
    path = Path(path)
    return _file_digest(path, _stat_key(path))


def _file_digest(path: Path, key: tuple[str, int, int, int, int, int]) -> str:
    """The content id of `path`, which must still be the version `key` was taken from (the
    caller takes `key` before loading, so the id names what was loaded)."""
    known = _DIGESTS.get(key)
    store = _digest_store()
    if known is None:
        entry = _read_digests(store).get(key[0])
        if isinstance(entry, list) and tuple(entry[:-1]) == key[1:] and str(entry[-1]).startswith("sha256:"):
            known = str(entry[-1])
    hashed = known is None
    if hashed:
        digest = hashlib.sha256()
        with open(key[0], "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        known = f"sha256:{digest.hexdigest()[:16]}"
    if _stat_key(path) != key:
        raise WeightsError(f"weights file {path} changed while it was being read; run again")
    _DIGESTS[key] = known
    if hashed:
        _remember_digest(store, key, known)
    return known


def _digest_store() -> Path:
    from search.data import default_cache_dir

    return default_cache_dir() / WEIGHTS_IDS_FILE


def _read_digests(store: Path) -> dict[str, Any]:
    try:
        data = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or damaged: it is only a cache
        return {}
    return data if isinstance(data, dict) else {}


def _remember_digest(store: Path, key: tuple[str, int, int, int, int, int], digest: str) -> None:
    """Adds one file's hash to the store (written atomically), dropping files that are gone."""
    entries = {p: e for p, e in _read_digests(store).items() if os.path.exists(p)}
    entries[key[0]] = [*key[1:], digest]
    tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entries, indent=0, sort_keys=True), encoding="utf-8")
        tmp.replace(store)
    except OSError:  # a read-only cache folder only costs a rehash next time
        tmp.unlink(missing_ok=True)


def _timm_cached(name: str) -> Path | None:
    """A timm checkpoint already on disk (HF cache or legacy torch hub cache), or None."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name[len(TIMM_PREFIX):])
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - timm depends on huggingface_hub
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, _, revision = cfg.hf_hub_id.partition("@")
            candidates = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
            for fname in candidates + ["model.safetensors", "pytorch_model.bin"]:
                hit = try_to_load_from_cache(repo, fname, revision=revision or None)
                if isinstance(hit, str):
                    return Path(hit)
    if cfg.url and _hub_path(cfg.url).is_file():
        return _hub_path(cfg.url)
    return None


def _expected_location(name: str) -> str:
    if name.startswith(TIMM_PREFIX):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name[len(TIMM_PREFIX):])
        hub_id = cfg.hf_hub_id if cfg is not None else None
        return f"the Hugging Face cache ({hub_id or 'no hub id'})"
    return f"the torch hub cache ({_hub_path(_tv_weights(name).url)})"


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
    if name.startswith(TIMM_PREFIX):
        return "cached" if _timm_cached(name) is not None else "missing"
    return "cached" if _hub_path(_tv_weights(name).url).is_file() else "missing"


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # urllib (torch.hub) opens sockets without a timeout; a default one turns a black-holed
    # network into a quick error instead of a hang.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` seconds."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _missing_message(name: str, why: str) -> str:
    return (
        f"no pretrained weights for {name}: not in {_expected_location(name)} and {why}; "
        f"put a state_dict at DIR/{_file_stem(name)}.pth and pass --weights-dir DIR, "
        f"or use --no-pretrained"
    )


def _fetch(name: str) -> Path:
    """Returns the cached checkpoint of a backbone, downloading it (with a timeout) if needed."""
    if name.startswith(TIMM_PREFIX):
        hit = _timm_cached(name)
        if hit is not None:
            return hit
        return _download_timm(name)
    url = _tv_weights(name).url
    dst = _hub_path(url)
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    # As torchvision's check_hash: the file name carries a prefix of its sha256.
    named = torch.hub.HASH_REGEX.search(dst.name)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(url, str(dst), named.group(1) if named else None, progress=True)
    except Exception as e:  # urllib raises many types; all mean "could not fetch"
        raise WeightsError(
            _missing_message(name, f"download failed (offline?: {type(e).__name__})")
        ) from None
    return dst


def _download_timm(name: str) -> Path:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name[len(TIMM_PREFIX):])
    if cfg is None or not cfg.hf_hub_id:
        raise WeightsError(_missing_message(name, "timm has no Hugging Face hub id for it"))
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise WeightsError(_missing_message(name, "HF_HUB_OFFLINE is set"))
    from huggingface_hub import constants, hf_hub_download

    # huggingface_hub retries failed connections with back-off (~25 s offline): probe first.
    if not _reachable(constants.ENDPOINT):
        raise WeightsError(_missing_message(name, f"{constants.ENDPOINT} is unreachable (offline?)"))
    repo, _, revision = cfg.hf_hub_id.partition("@")
    last: Exception | None = None
    with _socket_timeout(DOWNLOAD_TIMEOUT_S):
        for fname in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else []) + [
            "model.safetensors",
            "pytorch_model.bin",
        ]:
            try:
                return Path(hf_hub_download(repo, fname, revision=revision or None))
            except Exception as e:  # offline, missing file, timeout: try the next name
                last = e
    raise WeightsError(
        _missing_message(name, f"download failed (offline?: {type(last).__name__})")
    ) from None


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


def _read_state(path: Path, name: str) -> dict[str, Any]:
    """A state_dict from a weights file, without running any code stored in it.

    torch files are read with `weights_only=True` (tensors and plain containers only: a pickled
    object that would run code on loading is refused), safetensors files as safetensors.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        if isinstance(e, pickle.UnpicklingError) and "weights only" in first.lower():
            raise WeightsError(
                f"refused weights file {path} for {name}: it holds pickled Python objects besides "
                f"tensors, and loading those could run code; save a plain state_dict instead"
            ) from None
        raise WeightsError(f"cannot read weights file {path} for {name}: {type(e).__name__}: {first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # common checkpoint wrapper
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} for {name} does not hold a state_dict")
    return state


# Old densenet checkpoints (torchvision's own among them) name layers "norm.1"; the modules are
# now "norm1". The renaming of torchvision's densenet loader (plus the BatchNorm step counter).
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _load_file(net: nn.Module, path: Path, name: str) -> None:
    """Loads a state_dict file strictly into the full network; one-line WeightsError if not."""
    state = _read_state(path, name)
    state = {(m.group(1) + m.group(2) if (m := _DENSENET_OLD_KEY.match(k)) else k): v for k, v in state.items()}
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: state_dict keys fit, sizes don't
        lines = str(e).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise WeightsError(f"weights file {path} does not fit {name}: {detail}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys {', '.join(result.missing_keys[:4])}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys {', '.join(result.unexpected_keys[:4])}")
    if problems:
        more = len(result.missing_keys) + len(result.unexpected_keys)
        raise WeightsError(
            f"weights file {path} does not fit {name}: {'; '.join(problems)} ({more} keys in all)"
        )


def _timm_pretrained(spec: BackboneSpec, path: Path) -> nn.Module:
    """A timm network with the weights of a cached checkpoint, through timm's loader so that its
    checkpoint filters (key renames, resizing) apply, but read by `_read_state`."""
    import timm
    from timm.models import clean_state_dict

    arch = spec.name[len(TIMM_PREFIX):]
    if path.suffix == ".npz":  # timm reads these numpy archives itself, with allow_pickle=False
        overlay: dict[str, Any] = {"file": str(path)}
    else:
        state = _read_state(path, spec.name)
        for wrapper in ("state_dict_ema", "model_ema", "model"):  # as timm's load_state_dict
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
        overlay = {"state_dict": clean_state_dict(state)}
    try:
        net = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise WeightsError(f"weights file {path} does not fit {spec.name}: {first}") from None
    net.pretrained_cfg.pop("state_dict", None)  # it would keep a second copy of the weights alive
    return net


def _pretrained_network(spec: BackboneSpec, weights_dir: str | Path | None) -> tuple[nn.Module, str, str]:
    """The full network with pretrained weights, where they came from, and their content id."""
    local = _weights_file(spec.name, weights_dir)
    from_dir = local is not None and local.is_file()
    path = local if from_dir else _fetch(spec.name)
    assert path is not None
    key = _stat_key(path)  # before loading: the id must name the content that was loaded
    if spec.family == "timm" and not from_dir:
        net = _timm_pretrained(spec, path)
    else:
        # torchvision's builders would read the hub file with weights_only=False: load it here.
        net = _create_network(spec)
        _load_file(net, path, spec.name)
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
    if pretrained:
        net, source, weights_id = _pretrained_network(spec, weights_dir)
    else:
        net, source, weights_id = _create_network(spec), "random", "random"
    width = _swap_classifier(net, spec)
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))
    model = TransferModel(net, head)
    mean, std, interp, size = _preprocessing(spec, net)
    return Backbone(
        model=model,
        name=name,
        stages=spec.stages(net),
        num_features=width,
        mean=mean,
        std=std,
        interpolation=interp,
        default_size=size,
        params_total=sum(p.numel() for p in model.parameters()),
        source=source,
        weights_id=weights_id,
    )


# ---------------------------------------------------------------------------------------------
# Freezing and optimizer groups


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
            obj = _resolve(model.body, path)
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
    backbone: Backbone, *, lr: float, weight_decay: float, lr_decay: float = 1.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: trainable params only, discriminative learning rates.

    The head gets `lr`; the trainable stage at distance d from the head (nearest = 1) gets
    `lr * lr_decay**d`. Biases and norm weights (1-d params) get no weight decay, as in timm's
    param_groups_weight_decay.

    Args:
        backbone: a built (possibly frozen) backbone.
        lr: the head's learning rate.
        weight_decay: decay for weight matrices / kernels.
        lr_decay: factor per stage away from the head, in (0, 1].

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
        add(stage.name, named, lr * lr_decay**distance)
    return groups


# ---------------------------------------------------------------------------------------------
# Listing


def describe(name: str, *, weights_dir: str | Path | None = None) -> dict[str, Any]:
    """A summary of one backbone without loading weights.

    Args:
        name: backbone name.
        weights_dir: the --weights-dir folder, for the weights status.

    Returns:
        A dict with name, family, description, stages (names), num_stages, params (body,
        without the classifier), num_features, default_size, interpolation and weights
        ("file <path>", "cached" or "missing").
    """
    spec = get_spec(name)
    info = _info(name)
    return {
        "name": name,
        "family": spec.family,
        "description": spec.description,
        "stages": [s.name for s in info.stages],
        "num_stages": len(info.stages),
        "params": info.params_body,
        "num_features": info.num_features,
        "default_size": info.default_size,
        "interpolation": info.interpolation,
        "weights": weights_status(name, weights_dir),
    }


def backbones_table(*, pattern: str = "*", weights_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """`describe` for every backbone matching a pattern, for `tlsearch backbones`.

    Args:
        pattern: fnmatch pattern over names; `timm/...` patterns list timm models.
        weights_dir: the --weights-dir folder, for the weights status.

    Returns:
        One dict per backbone, registry order.
    """
    names = list_backbones(pattern)
    if not names:
        raise ConfigError(f"no backbone matches {pattern!r}; see tlsearch backbones")
    return [describe(n, weights_dir=weights_dir) for n in names]
