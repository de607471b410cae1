"""Search space: YAML parsing, validation with clear errors, define-by-run -> valid TrialConfigs."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from search import backbones
from search.config import ConfigError, TrialConfig
from search.space import Choice, Constant, Range, SearchSpace, backbones_in, default_space, load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sample(space: SearchSpace, n: int = 30, seed: int = 0) -> list[tuple[dict, TrialConfig]]:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = space.define_by_run(trial)
        cfg = space.to_trial_config({**trial.params, **constants})
        out.append((dict(trial.params), cfg))
        study.tell(trial, 0.5)
    return out


def test_kinds_choice_range_constant() -> None:
    s = SearchSpace.from_dict(
        {
            "backbone": ["resnet18", "efficientnet_b0"],
            "lr": {"low": 1e-5, "high": 1e-2, "log": True},
            "image_size": {"low": 96, "high": 160, "step": 32},
            "label_smoothing": {"low": 0, "high": 0.2},
            "batch_size": 16,
            "max_epochs": 4,
        }
    )
    p = s.param_dict
    assert p["backbone"] == Choice(("resnet18", "efficientnet_b0"))
    assert p["lr"] == Range(1e-5, 1e-2, log=True, is_int=False)
    assert p["image_size"] == Range(96, 160, step=32, is_int=True)
    assert p["label_smoothing"] == Range(0.0, 0.2, is_int=False)  # float field: float range
    assert p["batch_size"] == Constant(16)
    assert s.max_epochs == 4
    for params, cfg in _sample(s):
        assert cfg.epochs == 4 and cfg.batch_size == 16
        assert cfg.image_size in (96, 128, 160)
        assert 1e-5 <= cfg.lr <= 1e-2 and 0.0 <= cfg.label_smoothing <= 0.2
        assert "batch_size" not in params  # constants are not Optuna params


def test_yaml_file_and_string_exponents(tmp_path: Path) -> None:
    f = tmp_path / "space.yaml"
    # PyYAML reads 1e-5 (no dot) as a string: the bound is still a number.
    f.write_text("backbone: [resnet18]\nlr: {low: 1e-5, high: 1e-2, log: true}\nmax_epochs: 3\n")
    s = load_space(f)
    assert s.param_dict["lr"].low == pytest.approx(1e-5)
    assert SearchSpace.from_dict(s.to_dict()) == s


def test_round_trip_default_spaces() -> None:
    for gpu in (False, True):
        s = default_space(gpu=gpu)
        assert SearchSpace.from_dict(s.to_dict()) == s
    assert backbones_in(default_space(gpu=False)) == ["resnet18", "mobilenet_v3_large", "efficientnet_b0"]
    assert default_space(gpu=True).param_dict["image_size"] == Constant(224)


@pytest.mark.parametrize(
    "space, words",
    [
        ({"backbone": ["resnet18"], "lerning_rate": 0.1}, ["unknown key", "lerning_rate", "valid keys", "lr"]),
        ({"backbone": ["resnt50"]}, ["resnt50", "available", "resnet50"]),
        ({"backbone": "resnt50"}, ["resnt50", "available"]),
        ({"lr": {"low": 0.1, "high": 0.01}}, ["lr", "inverted", "0.1", "0.01"]),
        ({"lr": {"low": 0, "high": 0.01, "log": True}}, ["lr", "log", "low"]),
        ({"augmentation": []}, ["augmentation", "empty"]),
        ({"augmentation": ["flip", "autoaug"]}, ["autoaug", "available"]),
        ({"lr": {"low": 1e-4}}, ["lr", "range", "low, high"]),
        ({"lr": {"low": 1e-4, "high": 1e-2, "lg": True}}, ["lr", "range"]),
        ({"lr": {"low": 1e-4, "high": 1e-2, "log": True, "step": 1e-4}}, ["lr", "log and step"]),
        ({"image_size": {"low": 96.5, "high": 128}}, ["image_size.low", "integer"]),
        ({"augmentation": {"low": 1, "high": 2}}, ["augmentation", "not numeric"]),
        ({"max_epochs": 0}, ["max_epochs", "0"]),
        ({"epochs": [2, 4]}, ["epochs", "max_epochs"]),
        ({"batch_size": [16, -1]}, ["batch_size", "-1"]),
        ({"freeze_depth": [0, "half"]}, ["freeze_depth", "half"]),
    ],
)
def test_validation_errors_name_the_rule(space: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        SearchSpace.from_dict(space, source="my.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("my.yaml")
    for w in words:
        assert w in msg, (w, msg)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("backbone: [resnet18\nlr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: malformed YAML"):
        load_space(f)
    with pytest.raises(ConfigError, match="no such file"):
        load_space(tmp_path / "missing.yaml")


def test_freeze_depth_all_and_clipping() -> None:
    s = SearchSpace.from_dict({"backbone": ["resnet18", "efficientnet_b0"], "freeze_depth": [0, 7, "all"]})
    n = {b: backbones.num_stages(b) for b in ("resnet18", "efficientnet_b0")}
    assert n["resnet18"] < 7 <= n["efficientnet_b0"]
    seen = set()
    for params, cfg in _sample(s, n=40):
        assert params["freeze_depth"] in (0, 7, "all")  # same choices for every backbone
        if params["freeze_depth"] == 7:
            assert cfg.freeze_depth == min(7, n[cfg.backbone])  # clipped to the stage count
        else:
            assert cfg.freeze_depth == params["freeze_depth"]
        seen.add((cfg.backbone, params["freeze_depth"]))
    assert ("resnet18", 7) in seen


def test_freeze_depth_range_up_to_all() -> None:
    s = SearchSpace.from_dict({"backbone": ["resnet18", "efficientnet_b0"], "freeze_depth": {"low": 1, "high": "all"}})
    assert SearchSpace.from_dict(s.to_dict()) == s
    for params, cfg in _sample(s, n=40):
        assert 1 <= cfg.freeze_depth <= backbones.num_stages(cfg.backbone)


def test_policy_children_only_under_their_policy() -> None:
    s = SearchSpace.from_dict(
        {
            "backbone": "resnet18",
            "augmentation": ["flip", "randaugment", "augmix"],
            "randaugment_num_ops": {"low": 1, "high": 3},
            "randaugment_magnitude": [5, 9, 15],
            "augmix_severity": {"low": 1, "high": 5},
        }
    )
    policies = set()
    for params, cfg in _sample(s, n=40):
        policies.add(cfg.augmentation)
        has_ra = {"randaugment_num_ops", "randaugment_magnitude"} <= set(params)
        assert has_ra == (cfg.augmentation == "randaugment")
        assert ("augmix_severity" in params) == (cfg.augmentation == "augmix")
        if cfg.augmentation == "randaugment":
            assert 1 <= cfg.randaugment_num_ops <= 3 and cfg.randaugment_magnitude in (5, 9, 15)
    assert policies == {"flip", "randaugment", "augmix"}


def test_constant_policy_turns_children_on() -> None:
    s = SearchSpace.from_dict({"augmentation": "augmix", "augmix_severity": [2, 4]})
    for params, cfg in _sample(s, n=5):
        assert params["augmix_severity"] in (2, 4) and cfg.augmix_severity == params["augmix_severity"]


def test_default_space_samples_valid_configs() -> None:
    for gpu in (False, True):
        s = default_space(gpu=gpu)
        for _, cfg in _sample(s, n=15):
            assert cfg.backbone in backbones_in(s)
            assert cfg.epochs == s.max_epochs


def test_incompatibility() -> None:
    a = SearchSpace.from_dict({"backbone": ["resnet18", "efficientnet_b0"], "lr": {"low": 1e-4, "high": 1e-2}})
    assert a.incompatibility(a) is None
    b = SearchSpace.from_dict({"backbone": ["resnet18"], "lr": {"low": 1e-4, "high": 1e-2}})
    assert "backbone" in a.incompatibility(b)
    c = SearchSpace.from_dict({"backbone": ["resnet18", "efficientnet_b0"], "lr": {"low": 1e-5, "high": 1e-1}})
    assert a.incompatibility(c) is None  # a wider range is fine for Optuna
    assert "max_epochs" in a.incompatibility(a.with_max_epochs(9))


def test_baseline_is_the_linear_probe_when_the_space_offers_it() -> None:
    space = SearchSpace.from_dict({
        "backbone": ["resnet18", "mobilenet_v3_large"],
        "freeze_depth": [0, 2, "all"],
        "augmentation": ["flip", "none", "randaugment"],
        "lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
        "batch_size": {"low": 16, "high": 64, "step": 16},
        "weight_decay": {"low": 0.0, "high": 0.1},
    })
    assert space.baseline() == {
        "backbone": "resnet18", "freeze_depth": "all", "augmentation": "none",
        "lr": pytest.approx(1e-3), "batch_size": 48, "weight_decay": pytest.approx(0.05),
    }


def test_baseline_without_probe_choices_takes_first_values_and_range_tops() -> None:
    space = SearchSpace.from_dict({"backbone": ["resnet18"], "freeze_depth": {"low": 0, "high": "all"},
                                   "augmentation": ["randaugment", "flip"]})
    base = space.baseline()
    assert base["freeze_depth"] == 5 and base["augmentation"] == "randaugment"


def test_freeze_depth_no_listed_backbone_has_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"freeze_depth 99 .*resnet18: 5"):
        SearchSpace.from_dict({"backbone": ["resnet18"], "freeze_depth": [99]})
    with pytest.raises(ConfigError, match="freeze_depth 9"):
        SearchSpace.from_dict({"backbone": "resnet18", "freeze_depth": {"low": 0, "high": 9}})
    # A depth only the deeper backbone has is clipped for the other, as documented.
    space = SearchSpace.from_dict({"backbone": ["resnet18", "vit_b_16"], "freeze_depth": [0, 8]})
    assert space.to_trial_config({"backbone": "resnet18", "freeze_depth": 8}).freeze_depth == 5


# ----- fine-tuning priors, the impossible-range warning, the portfolio, the offline default ------

from search.space import (  # noqa: E402
    default_space_at_hand,
    lr_warnings,
    with_finetune_priors,
)

LITE = ["timm/tf_efficientnet_lite0", "timm/tf_efficientnet_lite1"]


def test_priors_fill_only_what_the_space_does_not_state() -> None:
    space = with_finetune_priors(SearchSpace.from_dict({
        "backbone": "resnet18", "freeze_depth": ["all", 2, 0], "lr": {"low": 1e-4, "high": 3e-2, "log": True},
        "lr_decay": 0.9, "max_epochs": 5,
    }))
    d = space.to_dict()
    assert d["lr"] == {"low": 1e-4, "high": 3e-2, "log": True}  # kept
    assert d["lr_decay"] == 0.9  # stated: kept
    # A user's lr trains every layer, as in the plain loop it came from: no fraction of it.
    assert d["backbone_lr_mult"] == 1.0
    assert d["warmup_epochs"] == pytest.approx(0.5)  # a tenth of the epochs, then cosine
    # Fine-tunes start from a random head; LP-FT, asked for, from the space's linear probe (its
    # rate within lr's range).
    assert d["lp_epochs"] == 0 and "lp_lr" not in d
    lpft = with_finetune_priors(SearchSpace.from_dict({**d, "lp_epochs": 5})).to_dict()
    assert lpft["lp_epochs"] == 5 and lpft["lp_lr"] == pytest.approx(3e-3)
    # The default space's lr is the head's rate; the backbone's share is its own prior.
    from search.space import default_space

    dflt = with_finetune_priors(default_space(gpu=False)).to_dict()
    assert dflt["backbone_lr_mult"] == {"low": 0.01, "high": 0.3, "log": True}
    fixed = with_finetune_priors(SearchSpace.from_dict({"backbone_lr_mult": 1.0, "warmup_epochs": 0}))
    assert fixed.param_dict["backbone_lr_mult"] == Constant(1.0) and fixed.param_dict["warmup_epochs"] == Constant(0.0)
    # An old best.yaml (no backbone_lr_mult) trains every stage at lr, as before.
    assert TrialConfig.from_dict({"lr": 1e-3}).backbone_lr_mult == 1.0


def test_a_space_stored_before_the_priors_keeps_its_single_rate_schedule() -> None:
    from search.space import keep_stored_schedule

    old = SearchSpace.from_dict({"backbone": "resnet18", "freeze_depth": ["all", 0], "lr_decay": 0.9})
    kept = keep_stored_schedule(old)
    p = kept.param_dict
    assert p["backbone_lr_mult"] == Constant(1.0) and p["warmup_epochs"] == Constant(0.0)
    assert p["lr_decay"] == Constant(0.9)  # stated: kept
    assert with_finetune_priors(kept) == kept  # nothing added on resume
    cfg = with_finetune_priors(kept).to_trial_config({"backbone": "resnet18", "freeze_depth": 0})
    assert (cfg.backbone_lr_mult, cfg.lr_decay, cfg.warmup_epochs) == (1.0, 0.9, 0.0)
    # A space stored since then names every prior: unchanged.
    new = with_finetune_priors(old)
    assert keep_stored_schedule(new) == new


def test_backbone_rate_is_only_drawn_when_stages_train() -> None:
    space = with_finetune_priors(SearchSpace.from_dict({"backbone": "resnet18", "freeze_depth": ["all", 0],
                                                        "backbone_lr_mult": {"low": 0.01, "high": 0.3, "log": True}}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        space.define_by_run(trial)
        fine_tunes = trial.params["freeze_depth"] == 0
        assert ("backbone_lr_mult" in trial.params) == fine_tunes, trial.params
        assert ("lr_decay" in trial.params) == fine_tunes
        study.tell(trial, 0.5)
    cfg = space.to_trial_config({"freeze_depth": 0, "backbone_lr_mult": 0.05})
    assert cfg.backbone_lr_mult == 0.05


def test_warning_for_a_learning_rate_that_cannot_fine_tune() -> None:
    # lr 1e-2 for full fine-tuning with AdamW and the backbone at the head's rate: one line.
    bad = with_finetune_priors(SearchSpace.from_dict({"lr": 1e-2, "freeze_depth": 0, "backbone_lr_mult": 1.0,
                                                      "lr_decay": 1.0}))
    lines = lr_warnings(bad, source="space.yaml")
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("space.yaml: lr 0.01") and "adamw" in lines[0] and "backbone_lr_mult" in lines[0]
    # The same lr as the head's rate, the backbone's at a fraction: fine.
    assert lr_warnings(with_finetune_priors(SearchSpace.from_dict(
        {"lr": 1e-2, "freeze_depth": 0, "backbone_lr_mult": {"low": 0.01, "high": 0.3, "log": True}}))) == []
    # A user's lr of 1e-2 trains every layer at it: the warning.
    assert len(lr_warnings(with_finetune_priors(SearchSpace.from_dict({"lr": 1e-2, "freeze_depth": 0})))) == 1
    # A range that reaches sensible rates: fine; a linear probe at 1e-2: fine.
    assert lr_warnings(SearchSpace.from_dict({"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "backbone_lr_mult": 1.0})) == []
    assert lr_warnings(SearchSpace.from_dict({"lr": 1e-2, "freeze_depth": "all", "backbone_lr_mult": 1.0})) == []
    # SGD takes larger rates.
    assert lr_warnings(SearchSpace.from_dict({"lr": 1e-2, "optimizer": "sgd", "backbone_lr_mult": 1.0})) == []


def test_portfolio_runs_proven_recipes_cheapest_first_within_the_space() -> None:
    space = with_finetune_priors(SearchSpace.from_dict({
        "backbone": LITE, "freeze_depth": ["all", 2, 0], "augmentation": ["none", "flip", "trivialaugment"],
        "lr": {"low": 1e-4, "high": 2e-3, "log": True}, "image_size": 160,
        "backbone_lr_mult": {"low": 0.01, "high": 0.3, "log": True},
    }))
    recipes = space.portfolio(6)
    names = [r for r, _ in recipes]
    assert len(recipes) == 6 and names[:2] == ["linear probe", "linear probe"]
    by_name = {(r, p["backbone"]): p for r, p in recipes}
    probe = by_name[("linear probe", LITE[0])]
    assert probe["freeze_depth"] == "all" and probe["augmentation"] == "none" and "backbone_lr_mult" not in probe
    assert probe["lr"] == pytest.approx(2e-3)  # 3e-3 clipped into the space's range
    last = by_name[("last stages", LITE[0])]
    assert last["freeze_depth"] == 2 and last["backbone_lr_mult"] == pytest.approx(0.3)  # the space's partial depth
    full = by_name[("full fine-tune", LITE[0])]
    assert full["freeze_depth"] == 0 and full["lr_decay"] == pytest.approx(1.0) and full["augmentation"] == "none"
    assert full["lr"] * full["backbone_lr_mult"] == pytest.approx(5e-4)  # every stage at the recipe's rate
    # Cheapest first: every probe, then partial, then full fine-tunes.
    order = {"linear probe": 0, "last stages": 1, "full fine-tune": 2}
    assert [order[r] for r in names] == sorted(order[r] for r in names)
    # The cap holds, and the first backbone gets its fine-tunes before the second.
    four = space.portfolio(4)
    assert len(four) == 4 and sorted((r, p["backbone"]) for r, p in four) == sorted([
        ("linear probe", LITE[0]), ("linear probe", LITE[1]), ("last stages", LITE[0]), ("full fine-tune", LITE[0])])
    # A probe-only space has one recipe per backbone; recipes never leave the space.
    probe_only = SearchSpace.from_dict({"backbone": LITE, "freeze_depth": "all"})
    assert [r for r, _ in probe_only.portfolio(6)] == ["linear probe", "linear probe"]
    for _, params in recipes:
        for name, value in params.items():
            p = space.param_dict[name]
            if isinstance(p, Choice):
                assert value in p.values
            elif isinstance(p, Range):
                assert p.low <= value <= float(p.high)


def test_offline_default_space_holds_the_backbones_at_hand(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # empty caches
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "tf_efficientnet_lite0.pth").write_bytes(b"")  # a timm model
    (weights / "resnet18.pth").write_bytes(b"")  # a registered default
    (weights / "not_a_model.pth").write_bytes(b"")  # named after nothing: ignored
    space, note = default_space_at_hand(gpu=False, weights_dir=str(weights))
    assert backbones_in(space) == ["resnet18", "timm/tf_efficientnet_lite0"]
    assert note is not None and "\n" not in note
    assert "left out mobilenet_v3_large, efficientnet_b0" in note and str(weights) in note
    # Nothing at hand: the defaults stay (an online machine downloads them).
    space, note = default_space_at_hand(gpu=False, weights_dir=str(tmp_path / "empty"))
    assert backbones_in(space) == ["resnet18", "mobilenet_v3_large", "efficientnet_b0"] and note is None


def test_the_default_cpu_image_size_fits_the_images_and_the_time() -> None:
    from search.space import default_space, for_dataset
    from search.space._defaults import fitted_image_size

    # Large photos, a small training split: 160 px; small images (64-px tiles, spectrograms): 128 px.
    assert fitted_image_size(median_side=375, train_images=240, budget_s=300.0, cpus=2) == 160
    assert fitted_image_size(median_side=64, train_images=240, budget_s=300.0, cpus=2) == 128
    assert fitted_image_size(median_side=150, train_images=240, budget_s=None, cpus=2) == 128
    # Large photos, but three 160-px epochs of 3,000 images would take more than half of 300 s.
    assert fitted_image_size(median_side=600, train_images=3000, budget_s=300.0, cpus=2) == 128
    assert fitted_image_size(median_side=600, train_images=3000, budget_s=None, cpus=2) == 160
    space = default_space(gpu=False)
    assert for_dataset(space, [120, 120], median_side=375, budget_s=300.0, cpus=2).param_dict["image_size"].value == 160
    assert for_dataset(space, [120, 120], median_side=100, budget_s=300.0, cpus=2) is space  # nothing to change
    gpu = default_space(gpu=True)  # 224 px stays 224 px
    assert for_dataset(gpu, [120, 120], median_side=375, budget_s=300.0, cpus=2) is gpu


def test_a_scan_records_the_median_shorter_side(tmp_path) -> None:
    from PIL import Image

    from search.data import scan_dataset

    for split in ("train", "val"):
        for c, size in (("a", (40, 90)), ("b", (200, 120))):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", size, (i * 40, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    stats = scan_dataset(tmp_path).image_stats
    assert stats is not None and stats.median_side == 120  # shorter sides: six 40s and six 120s
