"""Backbone registry: builds, stage coverage, freezing, param groups, weights loading."""

from __future__ import annotations

import hashlib
import os
import shutil
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
    return Counter(n for s in backbone.stages for n, _ in B._freeze._stage_params(body, s))


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Weight hashes are remembered under the cache dir: each test gets its own."""
    monkeypatch.setenv("TLSEARCH_CACHE", str(tmp_path / "tlsearch-cache"))
    monkeypatch.setattr(B._weights, "_DIGESTS", {})


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
    frozen_names = {n for s in bb.stages[:k] for n, _ in B._freeze._stage_params(body, s)}
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
    # The backbone at a fraction of the head's rate, then decayed per stage.
    two = {g["name"]: g["lr"] for g in B.param_groups(bb, lr=1.0, weight_decay=0.0, lr_decay=0.5, backbone_lr_mult=0.1)}
    assert two["head"] == 1.0 and two["layer4"] == pytest.approx(0.05) and two["layer3"] == pytest.approx(0.025)


def test_param_groups_vit_stages_with_parameter_paths() -> None:
    bb = _build_meta("vit_b_16")
    B.freeze(bb, 1)  # stem: conv_proj plus the class_token / pos_embedding parameters
    assert not bb.model.body.class_token.requires_grad
    assert not bb.model.body.encoder.pos_embedding.requires_grad
    assert bb.model.body.encoder.layers[0].ln_1.weight.requires_grad
    groups = B.param_groups(bb, lr=1.0, weight_decay=0.0, lr_decay=0.9)
    assert {g["name"] for g in groups} >= {"head", "norm.no_decay", "block0"}
    # One rate per stage (its no_decay group included), 0.9 less per stage away from the head:
    # norm 0.9, block11 0.81, ..., block0 0.9**13; the frozen stem has no group.
    lrs: dict[str, set[float]] = {}
    for g in groups:
        lrs.setdefault(g["name"].removesuffix(".no_decay"), set()).add(g["lr"])
    assert list(lrs) == ["head", "norm", *(f"block{i}" for i in range(11, -1, -1))]
    assert all(len(rates) == 1 for rates in lrs.values())
    expected = {"head": 1.0, "norm": 0.9, "block11": 0.81, "block10": 0.729, "block0": 0.9**13}
    assert {name: lrs[name].pop() for name in expected} == pytest.approx(expected)


def test_weights_dir_loads_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = B._registry._create_network(B.get_spec("resnet18"))
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    assert B.weights_status("resnet18", tmp_path) == f"file {tmp_path / 'resnet18.pth'}"
    bb = B.build_backbone("resnet18", 3, pretrained=True, weights_dir=tmp_path)
    assert torch.equal(bb.model.body.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert torch.equal(bb.model.body.bn1.running_var, source.bn1.running_var)
    assert isinstance(bb.model.body.fc, nn.Identity)
    assert bb.source == f"file {tmp_path / 'resnet18.pth'}"


def test_weights_dir_mismatch_names_file_and_keys(tmp_path: Path) -> None:
    state = B._registry._create_network(B.get_spec("resnet18")).state_dict()
    state["extra.weight"] = state.pop("layer1.0.conv1.weight")
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    with pytest.raises(B.WeightsError) as info:
        B.build_backbone("resnet18", 3, pretrained=True, weights_dir=tmp_path)
    msg = str(info.value)
    assert str(path) in msg and "layer1.0.conv1.weight" in msg and "extra.weight" in msg
    assert "\n" not in msg

    # A file for another architecture: shapes differ.
    torch.save(B._registry._create_network(B.get_spec("resnet50")).state_dict(), path)
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
    torch.save(B._registry._create_network(B.get_spec("resnet18")).state_dict(), hub / "resnet18-f37072fd.pth")
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


# ----- weights identity and safe loading -------------------------------------------------------

SMALL = "shufflenet_v2_x1_0"  # 2.3M params: a 9 MB weights file


class Payload:
    """Unpickling this runs code: it writes `path` (the side effect the tests look for)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def _save_weights(path: Path, seed: int, name: str = SMALL) -> Path:
    """A random-init state_dict of `name`: files of different seeds differ in content only."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(B._registry._create_network(B.get_spec(name)).state_dict(), path)
    return path


def _rewrite_keeping_mtime(path: Path, seed: int) -> None:
    """Replaces the content in place (same inode and size) and puts the old mtime back."""
    before = path.stat()
    _save_weights(path, seed)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_weights_id_names_the_content_of_the_file_loaded(tmp_path: Path) -> None:
    first = _save_weights(tmp_path / "a" / f"{SMALL}.pth", seed=1)
    other = _save_weights(tmp_path / "b" / f"{SMALL}.pth", seed=2)
    assert first.stat().st_size == other.stat().st_size  # same name, same size, other content
    copy = tmp_path / "c" / f"{SMALL}.pth"
    copy.parent.mkdir()
    shutil.copy(first, copy)

    def build(folder: str) -> B.Backbone:
        return B.build_backbone(SMALL, 2, pretrained=True, weights_dir=tmp_path / folder)

    a, b, c = build("a"), build("b"), build("c")
    assert a.weights_id == _sha(first) and b.weights_id == _sha(other)
    assert a.weights_id != b.weights_id
    assert c.weights_id == a.weights_id, "a copy at another path is the same weights"
    assert B.build_backbone(SMALL, 2, pretrained=False).weights_id == "random"

    # The same path rewritten with other content, size and mtime kept: a new id, not the remembered one.
    _rewrite_keeping_mtime(first, seed=2)
    again = build("a")
    assert again.weights_id == b.weights_id
    assert torch.equal(again.model.body.conv1[0].weight, b.model.body.conv1[0].weight)


def test_weights_hash_is_remembered_across_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save_weights(tmp_path / f"{SMALL}.pth", seed=1)
    expected = B.weights_file_id(path)
    assert expected == _sha(path)
    store = B._weights._digest_store()
    assert store.is_file() and str(path.resolve()) in store.read_text()

    def no_hashing() -> None:
        raise AssertionError("hashed again")

    monkeypatch.setattr(B._weights, "_DIGESTS", {})  # a fresh process: only the file store knows the hash
    monkeypatch.setattr(B._weights.hashlib, "sha256", no_hashing)
    assert B.weights_file_id(path) == expected
    _rewrite_keeping_mtime(path, seed=2)  # a new version of the file is hashed again
    with pytest.raises(AssertionError, match="hashed again"):
        B.weights_file_id(path)


def test_torch_hub_cache_weights_get_their_content_identity(offline: Path) -> None:
    hub = B._weights._hub_path(B._torchvision._tv_weights(SMALL).url)
    _save_weights(hub, seed=1)
    first = B.build_backbone(SMALL, 2, pretrained=True)
    assert first.source == f"cache {hub}"
    assert first.weights_id == _sha(hub)
    _rewrite_keeping_mtime(hub, seed=2)
    assert B.build_backbone(SMALL, 2, pretrained=True).weights_id == _sha(hub) != first.weights_id


def _hf_cache_file(root: Path, filename: str) -> Path:
    """Where the Hugging Face cache keeps timm/tf_efficientnet_lite0's `filename` (revision main)."""
    from timm.models import get_pretrained_cfg

    repo = get_pretrained_cfg("tf_efficientnet_lite0").hf_hub_id
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    return folder / "snapshots" / commit / filename


def test_timm_cache_weights_load_safely_with_their_identity(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(offline / "hf"))
    path = _hf_cache_file(offline / "hf", "model.safetensors")
    path.parent.mkdir(parents=True)
    torch.manual_seed(3)
    state = B._registry._create_network(B.get_spec(TIMM_LITE0)).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    bb = B.build_backbone(TIMM_LITE0, 2, pretrained=True)
    assert bb.source == f"cache {path}" and bb.weights_id == _sha(path)
    assert torch.equal(bb.model.body.conv_stem.weight, state["conv_stem.weight"])
    assert "state_dict" not in bb.model.body.pretrained_cfg  # no second copy of the weights kept


@pytest.mark.parametrize("where", ["torch hub cache", "hugging face cache", "weights dir"])
def test_pickle_payload_in_a_weights_file_is_refused_not_run(
    offline: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(offline / "hf"))
    name, weights_dir = "resnet18", None
    if where == "torch hub cache":
        path = B._weights._hub_path(B._torchvision._tv_weights(name).url)
    elif where == "hugging face cache":
        name, path = TIMM_LITE0, _hf_cache_file(offline / "hf", "pytorch_model.bin")
    else:
        weights_dir = offline / "weights"
        path = weights_dir / f"{name}.pth"
    path.parent.mkdir(parents=True)
    marker = offline / "pwned"
    torch.save({"conv1.weight": torch.zeros(1), "evil": Payload(marker)}, path)
    with pytest.raises(B.WeightsError) as info:
        B.build_backbone(name, 2, pretrained=True, weights_dir=weights_dir)
    assert not marker.exists(), "the pickled payload ran"
    msg = str(info.value)
    assert f"refused weights file {path}" in msg and "\n" not in msg


def test_torchvision_hub_files_fit_the_architecture_torchvision_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub files are loaded into `get_model(name, weights=None)`: it must be the very network
    torchvision's builder makes for its DEFAULT weights (no num_classes / image_size change)."""
    import torchvision
    from torchvision.models._api import WeightsEnum

    def both(name: str) -> tuple[nn.Module, nn.Module]:
        ours = B._registry._create_network(B.get_spec(name))
        # torchvision's builder, handed our network's own state_dict as its "download"
        with monkeypatch.context() as m:
            m.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: ours.state_dict())
            theirs = torchvision.models.get_model(name, weights=B._torchvision._tv_weights(name))
        return ours, theirs

    for name in B.REGISTRY:
        try:
            with torch.device("meta"):  # allocates nothing
                ours, theirs = both(name)
        except NotImplementedError:  # regnet computes its widths with tensor ops: build on CPU
            ours, theirs = both(name)
        assert repr(theirs) == repr(ours), name


def test_old_densenet_key_names_are_renamed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = B._registry._create_network(B.get_spec("densenet121"))
    state = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in net.state_dict().items()}
    assert any(".norm.1." in k for k in state)
    torch.save(state, tmp_path / "densenet121.pth")
    bb = B.build_backbone("densenet121", 2, pretrained=True, weights_dir=tmp_path)
    got = bb.model.body.features.denseblock1.denselayer1.norm1.weight
    assert torch.equal(got, net.features.denseblock1.denselayer1.norm1.weight)
