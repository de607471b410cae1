"""Backbone registry: builds, stage coverage, freezing, param groups, weights loading."""

from __future__ import annotations

import socket
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from search import backbones as B
from search.config import ConfigError

TIMM_LITE0 = "timm/tf_efficientnet_lite0"
ALL_NAMES = [*B.REGISTRY, TIMM_LITE0]


def _build_meta(name: str, num_classes: int = 3) -> B.Backbone:
    """Builds without allocating (meta device); regnet computes widths with tensors: CPU."""
    try:
        with torch.device("meta"):
            return B.build_backbone(name, num_classes, pretrained=False)
    except (NotImplementedError, RuntimeError):
        return B.build_backbone(name, num_classes, pretrained=False)


def _coverage(backbone: B.Backbone) -> Counter:
    body = backbone.model.body
    return Counter(n for s in backbone.stages for n, _ in B._stage_params(body, s))


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty torch hub / HF cache and a network that refuses every connection."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable (test)")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return tmp_path


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_entry_builds_and_stages_cover_body_once(name: str) -> None:
    bb = _build_meta(name)
    body, head = bb.model.body, bb.model.head
    assert isinstance(head[0], nn.Dropout) and head[1].out_features == 3
    assert head[1].in_features == bb.num_features
    # No classifier Linear with 1000 outputs may survive in the body.
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in body.modules())
    counts = _coverage(bb)
    params = {n for n, _ in body.named_parameters()}
    assert set(counts) == params, f"uncovered: {sorted(params - set(counts))[:5]}"
    assert all(c == 1 for c in counts.values()), [n for n, c in counts.items() if c > 1][:5]
    assert len({s.name for s in bb.stages}) == len(bb.stages)
    assert len(bb.stages) == B.num_stages(name)
    assert bb.params_total == sum(p.numel() for p in bb.model.parameters())
    assert bb.interpolation in ("bilinear", "bicubic") and bb.default_size >= 224
    assert bb.source == "random"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", TIMM_LITE0])
def test_forward_pass_gives_pooled_features_and_logits(name: str) -> None:
    torch.manual_seed(0)
    bb = B.build_backbone(name, 3, pretrained=False, dropout=0.1).model
    x = torch.randn(2, 3, 64, 64)
    bb.eval()
    with torch.no_grad():
        feats = bb.body(x)
        out = bb(x)
    assert feats.shape == (2, bb.head[1].in_features)
    assert out.shape == (2, 3)


def test_unknown_backbone_lists_valid_ones() -> None:
    expected = r"unknown backbone 'resnt50'; available: resnet18, resnet34, .*or timm/<name>"
    with pytest.raises(ConfigError, match=expected):
        B.get_spec("resnt50")
    with pytest.raises(ConfigError, match="not in timm.list_models"):
        B.get_spec("timm/no_such_model_xyz")
    with pytest.raises(ConfigError, match="unknown backbone"):
        B.build_backbone("resnt50", 3, pretrained=False)


def test_list_backbones_patterns() -> None:
    assert B.list_backbones("resnet*") == ["resnet18", "resnet34", "resnet50", "resnet101"]
    assert len(B.list_backbones()) >= 25
    assert TIMM_LITE0 in B.list_backbones("timm/tf_efficientnet_lite*")


def test_resolve_depth_and_range_errors() -> None:
    assert B.resolve_depth("resnet18", "all") == 5
    assert B.resolve_depth("resnet18", 2) == 2
    for bad in (6, -1, True, "3"):
        with pytest.raises(ConfigError, match="freeze_depth must be between 0 and 5 for resnet18, got"):
            B.resolve_depth("resnet18", bad)


def _bn_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k}


@pytest.mark.parametrize("depth", [0, 2, 5, "all"])
def test_freeze_trains_exactly_the_right_params(depth: int | str) -> None:
    torch.manual_seed(0)
    bb = B.build_backbone("resnet18", 3, pretrained=False)
    k = B.resolve_depth(bb, depth)
    trainable = B.freeze(bb, depth)
    body = bb.model.body
    frozen_names = {n for s in bb.stages[:k] for n, _ in B._stage_params(body, s)}
    for n, p in body.named_parameters():
        assert p.requires_grad == (n not in frozen_names), n
    assert all(p.requires_grad for p in bb.model.head.parameters())
    expected = sum(p.numel() for n, p in body.named_parameters() if n not in frozen_names)
    assert trainable == expected + sum(p.numel() for p in bb.model.head.parameters())
    if depth == "all":
        assert trainable == 512 * 3 + 3

    # One SGD step in train mode: frozen BatchNorm stats and weights stay as they were.
    bb.model.train()
    frozen_modules = [body.get_submodule(p) for s in bb.stages[:k] for p in s.paths]
    assert all(not m.training for fm in frozen_modules for m in fm.modules())
    before_stats = {i: _bn_stats(m) for i, m in enumerate(frozen_modules)}
    before_w = {n: p.detach().clone() for n, p in body.named_parameters()}
    opt = torch.optim.SGD(B.param_groups(bb, lr=0.1, weight_decay=0.0), lr=0.1)
    loss = nn.functional.cross_entropy(bb.model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    for i, m in enumerate(frozen_modules):
        for key, value in _bn_stats(m).items():
            assert torch.equal(value, before_stats[i][key]), key
    for n, p in body.named_parameters():
        assert torch.equal(p, before_w[n]) == (n in frozen_names), n
    # Unfrozen BatchNorm does update its stats (the model really trained).
    if k < 5:
        assert not torch.equal(body.layer4[0].bn1.running_mean, torch.zeros(512))


def test_refreeze_releases_stages_and_eval_mode() -> None:
    bb = _build_meta("mobilenet_v3_small")
    B.freeze(bb, "all")
    bb.model.train()
    # The pre-logits stage holds a Dropout: frozen, it must be off.
    assert not bb.model.body.classifier[2].training
    assert bb.model.head.training
    B.freeze(bb, 0)
    assert bb.model.body.classifier[2].training and bb.model.body.features[0].training
    assert all(p.requires_grad for p in bb.model.parameters())
    bb.model.eval()
    assert not bb.model.body.features[0].training


def test_param_groups_hold_trainable_params_and_decay_lr() -> None:
    bb = _build_meta("resnet18")
    B.freeze(bb, 3)  # stem, layer1, layer2 frozen
    groups = B.param_groups(bb, lr=1.0, weight_decay=0.05, lr_decay=0.5)
    in_groups = [p for g in groups for p in g["params"]]
    trainable = [p for p in bb.model.parameters() if p.requires_grad]
    assert len(in_groups) == len(trainable) and {id(p) for p in in_groups} == {id(p) for p in trainable}
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {
        "head": 1.0,
        "head.no_decay": 1.0,
        "layer4": 0.5,
        "layer4.no_decay": 0.5,
        "layer3": 0.25,
        "layer3.no_decay": 0.25,
    }
    for g in groups:
        assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 0.05)
        assert all((p.ndim <= 1) == g["name"].endswith("no_decay") for p in g["params"])
    flat = B.param_groups(bb, lr=0.1, weight_decay=0.0)
    assert {g["lr"] for g in flat} == {0.1}


def test_param_groups_vit_stages_with_parameter_paths() -> None:
    bb = _build_meta("vit_b_16")
    B.freeze(bb, 1)  # stem: conv_proj plus the class_token / pos_embedding parameters
    assert not bb.model.body.class_token.requires_grad
    assert not bb.model.body.encoder.pos_embedding.requires_grad
    assert bb.model.body.encoder.layers[0].ln_1.weight.requires_grad
    groups = B.param_groups(bb, lr=1.0, weight_decay=0.0, lr_decay=0.9)
    assert {g["name"] for g in groups} >= {"head", "norm.no_decay", "block0"}


def test_weights_dir_loads_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = B._create_network(B.get_spec("resnet18"))
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    assert B.weights_status("resnet18", tmp_path) == f"file {tmp_path / 'resnet18.pth'}"
    bb = B.build_backbone("resnet18", 3, pretrained=True, weights_dir=tmp_path)
    assert torch.equal(bb.model.body.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert torch.equal(bb.model.body.bn1.running_var, source.bn1.running_var)
    assert isinstance(bb.model.body.fc, nn.Identity)
    assert bb.source == f"file {tmp_path / 'resnet18.pth'}"


def test_weights_dir_mismatch_names_file_and_keys(tmp_path: Path) -> None:
    state = B._create_network(B.get_spec("resnet18")).state_dict()
    state["extra.weight"] = state.pop("layer1.0.conv1.weight")
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    with pytest.raises(B.WeightsError) as info:
        B.build_backbone("resnet18", 3, pretrained=True, weights_dir=tmp_path)
    msg = str(info.value)
    assert str(path) in msg and "layer1.0.conv1.weight" in msg and "extra.weight" in msg
    assert "\n" not in msg

    # A file for another architecture: shapes differ.
    torch.save(B._create_network(B.get_spec("resnet50")).state_dict(), path)
    with pytest.raises(B.WeightsError, match=f"weights file {path} does not fit resnet18"):
        B.build_backbone("resnet18", 3, pretrained=True, weights_dir=tmp_path)


def test_offline_without_weights_fails_fast(offline: Path) -> None:
    assert B.weights_status("resnet18") == "missing"
    start = time.monotonic()
    with pytest.raises(B.WeightsError) as info:
        B.build_backbone("resnet18", 3, pretrained=True, weights_dir=offline / "nothing")
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert "resnet18-f37072fd.pth" in msg and "--weights-dir" in msg and "--no-pretrained" in msg
    with pytest.raises(B.WeightsError, match="no pretrained weights for resnet18"):
        B.check_weights("resnet18")
    with pytest.raises(B.WeightsError, match="no pretrained weights for timm/tf_efficientnet_lite0"):
        B.check_weights(TIMM_LITE0)


def test_weights_status_sees_torch_hub_cache(offline: Path) -> None:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(B._create_network(B.get_spec("resnet18")).state_dict(), hub / "resnet18-f37072fd.pth")
    assert B.weights_status("resnet18") == "cached"
    assert B.check_weights("resnet18") == "cached"
    bb = B.build_backbone("resnet18", 2, pretrained=True)
    assert bb.source.startswith("cache ")


def test_timm_shared_weights_load_strictly(shared_dir: Path) -> None:
    weights = shared_dir / "weights"
    bb = B.build_backbone(TIMM_LITE0, 2, pretrained=True, weights_dir=weights)
    state = torch.load(weights / "tf_efficientnet_lite0.pth", weights_only=True)
    assert torch.equal(bb.model.body.conv_stem.weight, state["conv_stem.weight"])
    assert bb.mean == (0.5, 0.5, 0.5) and bb.std == (0.5, 0.5, 0.5)
    assert bb.interpolation == "bicubic" and bb.num_features == 1280
    bb.model.eval()
    with torch.no_grad():
        assert bb.model(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_describe_and_table_are_cheap() -> None:
    d = B.describe("vit_b_16")
    assert d["num_stages"] == 14 and d["stages"][0] == "stem" and d["stages"][-1] == "norm"
    assert d["params"] == 85_798_656 and d["weights"] in ("cached", "missing")
    start = time.monotonic()
    table = B.backbones_table()
    assert time.monotonic() - start < 30
    assert [r["name"] for r in table] == list(B.REGISTRY)
    assert all(r["params"] > 0 and r["num_stages"] >= 5 for r in table)
