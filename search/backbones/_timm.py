"""The timm source: any timm model as `timm/<name>`, its stages from timm's group matcher.

timm is imported on first use only. Pretrained weights live in the Hugging Face cache (or, for
old models, the torch hub cache); a cached file is read by our safe loader and handed to timm's
loader so that its checkpoint filters (key renames, resizing) still apply.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from search.backbones._source import BackboneSource
from search.backbones._types import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    Preprocessing,
    Stage,
    WeightsError,
)
from search.backbones._weights import (
    DOWNLOAD_TIMEOUT_S,
    _hub_path,
    _reachable,
    _read_state,
    _socket_timeout,
)
from search.config import ConfigError

TIMM_PREFIX = "timm/"

# ---------------------------------------------------------------------------------------------
# Stages


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


# ---------------------------------------------------------------------------------------------
# The source


@functools.lru_cache(maxsize=None)
def _timm_models() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def _arch(name: str) -> str:
    """The timm model name inside `timm/<name>`."""
    return name[len(TIMM_PREFIX):]


def _pretrained_cfg(name: str) -> Any:
    """timm's pretrained config of `timm/<name>` (hub id, file names, url), or None."""
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(_arch(name))


class TimmSource(BackboneSource):
    """Every timm model, named timm/<name>; weights from the Hugging Face cache."""

    prefix = TIMM_PREFIX

    @property
    def hint(self) -> str:
        return f"{TIMM_PREFIX}<name>"

    def owns(self, name: str) -> bool:
        return isinstance(name, str) and name.startswith(TIMM_PREFIX)

    def names(self, pattern: str) -> list[str]:
        if not pattern.startswith(TIMM_PREFIX):
            return []
        import timm

        return [TIMM_PREFIX + n for n in timm.list_models(_arch(pattern))]

    def spec(self, name: str) -> BackboneSpec:
        arch = _arch(name)
        if arch.split(".")[0] not in _timm_models():
            raise ConfigError(
                f"unknown timm backbone {name!r}: {arch!r} is not in timm.list_models() "
                f"(try `tlsearch backbones` or timm.list_models('*{arch[:6]}*'))"
            )
        return BackboneSpec(name, "timm", f"timm model {arch}", "(timm reset_classifier)", _timm_stages)

    def create(self, spec: BackboneSpec) -> nn.Module:
        import timm

        return timm.create_model(_arch(spec.name), pretrained=False)

    def remove_classifier(self, net: nn.Module, spec: BackboneSpec) -> int:
        width = int(net.num_features)
        net.reset_classifier(0)  # keeps timm's global pooling: body(x) is pooled features
        return width

    def preprocessing(self, spec: BackboneSpec, net: nn.Module) -> Preprocessing:
        cfg = net.pretrained_cfg
        return Preprocessing(
            tuple(cfg.get("mean", IMAGENET_MEAN)),
            tuple(cfg.get("std", IMAGENET_STD)),
            "bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear",
            int(cfg.get("input_size", (3, 224, 224))[-1]),
        )

    def cached(self, name: str) -> Path | None:
        """A checkpoint already on disk (HF cache or legacy torch hub cache), or None."""
        cfg = _pretrained_cfg(name)
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

    def expected_location(self, name: str) -> str:
        cfg = _pretrained_cfg(name)
        hub_id = cfg.hf_hub_id if cfg is not None else None
        return f"the Hugging Face cache ({hub_id or 'no hub id'})"

    def download(self, name: str) -> Path:
        cfg = _pretrained_cfg(name)
        if cfg is None or not cfg.hf_hub_id:
            raise self.missing(name, "timm has no Hugging Face hub id for it")
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise self.missing(name, "HF_HUB_OFFLINE is set")
        from huggingface_hub import constants, hf_hub_download

        # huggingface_hub retries failed connections with back-off (~25 s offline): probe first.
        if not _reachable(constants.ENDPOINT):
            raise self.missing(name, f"{constants.ENDPOINT} is unreachable (offline?)")
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
        raise self.missing(name, f"download failed (offline?: {type(last).__name__})") from None

    def load_cached(self, spec: BackboneSpec, path: Path) -> nn.Module:
        """Through timm's loader, so that its checkpoint filters (key renames, resizing) apply,
        but with the state read by `_read_state`."""
        import timm
        from timm.models import clean_state_dict

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
            net = timm.create_model(_arch(spec.name), pretrained=True, pretrained_cfg_overlay=overlay)
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise WeightsError(f"weights file {path} does not fit {spec.name}: {first}") from None
        net.pretrained_cfg.pop("state_dict", None)  # it would keep a second copy of the weights alive
        return net


TIMM = TimmSource()
