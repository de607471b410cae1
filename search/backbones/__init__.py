"""Backbone registry: name -> network, pretrained weights, ordered stages and a fresh head.

Every backbone is a torchvision model from `REGISTRY` or any timm model as `timm/<name>`; each
library is one `BackboneSource` (`_torchvision.py`, `_timm.py`) and `source_of` says which owns a
name. `build_backbone` returns a `Backbone` whose `.model` is a `TransferModel`: `.body` is the
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

Where things are: `_types.py` (Stage, BackboneSpec, Backbone, TransferModel, WeightsError),
`_source.py` (the BackboneSource interface), `_torchvision.py` and `_timm.py` (the two sources),
`_registry.py` (name -> source, specs, stage counts), `_weights.py` (reading, loading and
identifying weights files), `_build.py` (build_backbone, weights status), `_freeze.py` (freezing
and optimizer groups), `_describe.py` (summaries for `tlsearch backbones`).
"""

from __future__ import annotations

from search.backbones._build import build_backbone, check_weights, weights_status
from search.backbones._describe import backbones_table, describe
from search.backbones._freeze import freeze, param_groups, resolve_depth, resolve_path, trainable_params
from search.backbones._registry import SOURCES, get_spec, list_backbones, num_stages, source_of, stage_names
from search.backbones._source import BackboneSource
from search.backbones._timm import TIMM_PREFIX
from search.backbones._torchvision import REGISTRY
from search.backbones._types import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneSpec,
    Preprocessing,
    Stage,
    StageLayout,
    TransferModel,
    WeightsError,
)
from search.backbones._weights import DOWNLOAD_TIMEOUT_S, WEIGHTS_IDS_FILE, weights_file_id

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "REGISTRY",
    "SOURCES",
    "TIMM_PREFIX",
    "WEIGHTS_IDS_FILE",
    "Backbone",
    "BackboneSource",
    "BackboneSpec",
    "Preprocessing",
    "Stage",
    "StageLayout",
    "TransferModel",
    "WeightsError",
    "backbones_table",
    "build_backbone",
    "check_weights",
    "describe",
    "freeze",
    "get_spec",
    "list_backbones",
    "num_stages",
    "param_groups",
    "resolve_depth",
    "resolve_path",
    "source_of",
    "stage_names",
    "trainable_params",
    "weights_file_id",
    "weights_status",
]
