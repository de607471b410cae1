"""`tlsearch fit`: the budget arithmetic and presets as pure functions; bad input at the command
line; and, through the shared Ray session, a fit on tiny generated images with random-init
backbones: the shipped folder is the study's best trial, a kill in the ship step does not cost
the search."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_image_folder
from search.config import ConfigError
from search.pipeline import (
    MIN_SEARCH_S,
    PRESETS,
    PhaseClock,
    default_study_name,
    fits,
    get_preset,
    per_image_seconds,
    plan_reserve,
    preset_space,
    refit_seconds,
    search_budget,
)
from search.space import SearchSpace

# A search that ends by its trial count within seconds: two linear probes of a random-init resnet18.
TINY_SPACE = {"backbone": "resnet18", "pretrained": False, "freeze_depth": "all", "augmentation": "none",
              "lr": {"low": 1e-3, "high": 1e-2, "log": True}, "image_size": 32, "batch_size": 8, "max_epochs": 2}


# ----- pure decisions ----------------------------------------------------------------------------


def test_reserve_grows_with_the_data_and_is_capped() -> None:
    small = plan_reserve(budget_s=600, val_images=10, test_images=10, per_image_s=0.01, ensemble=False, refit=False)
    big = plan_reserve(budget_s=600, val_images=10, test_images=5000, per_image_s=0.01, ensemble=False, refit=False)
    assert big.evaluate_s > small.evaluate_s and big.ship_s == small.ship_s
    none = plan_reserve(budget_s=600, val_images=10, test_images=0, per_image_s=0.01, ensemble=False, refit=False)
    assert none.evaluate_s == 0  # no test/: nothing to evaluate
    ens = plan_reserve(budget_s=600, val_images=100, test_images=0, per_image_s=0.01, ensemble=True, refit=False)
    assert ens.ship_s > none.ship_s
    huge = plan_reserve(budget_s=100, val_images=10**5, test_images=10, per_image_s=0.1, ensemble=True, refit=False)
    assert huge.total_s == pytest.approx(0.5 * 100)  # the ensemble's share shrinks to half the budget
    slow = plan_reserve(budget_s=100, val_images=10, test_images=10**4, per_image_s=0.1, ensemble=False, refit=False)
    assert slow.evaluate_s > 1000  # the evaluation is never cut: such a budget is refused
    with pytest.raises(ConfigError):
        search_budget(100, elapsed_s=0.0, reserve=slow)
    refit = plan_reserve(budget_s=600, val_images=10, test_images=10, per_image_s=0.01, ensemble=False, refit=True)
    assert refit.total_s == pytest.approx(small.total_s + 0.3 * 600)


def test_search_budget_is_what_is_left_and_a_budget_too_short_is_refused() -> None:
    r = plan_reserve(budget_s=300, val_images=10, test_images=10, per_image_s=0.01, ensemble=False, refit=False)
    assert search_budget(300, elapsed_s=12.0, reserve=r) == pytest.approx(300 - 12.0 - r.total_s)
    with pytest.raises(ConfigError, match="give at least"):
        search_budget(r.total_s + MIN_SEARCH_S - 1, elapsed_s=0.0, reserve=r)


def test_per_image_cost_is_the_slowest_measured_trial_else_an_allowance() -> None:
    assert per_image_seconds([4.0, None, 20.0], gpu=False) == pytest.approx(0.020 + 0.003)
    assert per_image_seconds([], gpu=True) < per_image_seconds([], gpu=False)
    assert fits(10, left_s=10) and not fits(10.5, left_s=10)


def test_a_refit_is_estimated_from_its_trials_time_on_train_plus_val() -> None:
    short = refit_seconds(trial_seconds=0.0, train_images=100, val_images=50)
    assert refit_seconds(trial_seconds=100.0, train_images=100, val_images=50) == pytest.approx(short + 150 * 1.2)
    assert not fits(refit_seconds(trial_seconds=100.0, train_images=100, val_images=50), left_s=150)


def test_phases_add_up_to_the_wall_clock() -> None:
    ticks = iter([100.0, 101.5, 130.0, 130.0, 133.25])
    clock = PhaseClock(now=lambda: next(ticks))
    clock.lap("start")
    clock.lap("search")
    clock.lap("ship")
    clock.lap("ship")  # a phase met again adds up
    assert clock.phases == {"start": 1.5, "search": 28.5, "ship": 3.25}
    assert sum(clock.phases.values()) == pytest.approx(clock.total_s) == pytest.approx(33.25)


def test_presets_are_a_registry_and_fast_searches_linear_probes_only() -> None:
    assert list(PRESETS) == ["fast", "good", "best"] and all(p.description for p in PRESETS.values())
    with pytest.raises(ConfigError, match="available: fast, good, best"):
        get_preset("huge")
    base = SearchSpace.from_dict({"backbone": ["resnet18", "efficientnet_b0"], "freeze_depth": [0, 2, "all"],
                                  "augmentation": ["none", "flip"], "image_size": 64, "max_epochs": 3})
    fast = preset_space(get_preset("fast"), base).to_dict()
    assert fast["freeze_depth"] == "all" and fast["augmentation"] == "none"
    assert fast["backbone"] == ["resnet18", "efficientnet_b0"]  # every backbone at hand is probed
    assert preset_space(get_preset("good"), base) is base
    best = get_preset("best")
    assert best.ensemble and "randaugment" in preset_space(best, base).to_dict()["augmentation"]
    # best adds the backbones at hand beyond the default list; the other presets keep the list
    more = ["resnet18", "mobilenet_v3_large"]
    assert preset_space(best, base, more=more).to_dict()["backbone"] == ["resnet18", "efficientnet_b0", "mobilenet_v3_large"]
    assert preset_space(get_preset("good"), base, more=more) is base
    assert preset_space(get_preset("fast"), base, more=more).to_dict()["backbone"] == ["resnet18", "efficientnet_b0"]


def test_more_backbones_at_hand_are_the_defaults_of_both_hardwares_with_weights(tmp_path: Path) -> None:
    from search.pipeline import _presets

    (tmp_path / "resnet50.pth").write_bytes(b"")  # a GPU default, at hand on a CPU machine
    assert "resnet50" in _presets.more_backbones_at_hand(weights_dir=str(tmp_path))


def test_default_study_name_is_the_folder_name() -> None:
    assert default_study_name("/data/my pets/") == "my-pets"
    assert default_study_name("/data/labels.csv") == "labels"


# ----- the command line: bad input is one line and exit 2 -------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--time-budget", "0"], "duration must be > 0"),
    (["--time-budget", "soon"], "bad duration 'soon'"),
    (["--time-budget", "10m", "--preset", "huge"], "unknown preset 'huge'; available: fast, good, best"),
    (["--time-budget", "20s"], "s to search after"),
    ([], "the following arguments are required: --time-budget"),
])
def test_bad_presets_and_budgets_are_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str], args: list[str],
                                                         message: str) -> None:
    from search.cli import main

    data = make_image_folder(tmp_path / "data", per_class=3)
    monkeypatch.chdir(tmp_path)
    assert main(["fit", str(data), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tlsearch: error:") and message in err[0], err
    assert not (tmp_path / "models").exists()


# ----- end to end, through the shared Ray session -------------------------------------------------


def _fit(data: Path, study: str, space: SearchSpace | None = None, **kw):
    from search.pipeline import fit

    kw.setdefault("trials", 2)
    return fit(data, "3m", study=study, space=space or SearchSpace.from_dict(TINY_SPACE), pretrained=False,
               cache=False, cpus_per_trial=1.0, progress=False, **kw)


def _val_logits(model_dir: Path, data: Path):
    """The logits a model folder gives DATA's validation images, read as `predict` reads images."""
    import torch

    from search.augment import eval_transform
    from search.data import ImageDataset, SplitSpec, scan_dataset
    from search.ensemble import load_model

    model, meta = load_model(model_dir)
    index = scan_dataset(data, **SplitSpec.from_dict(meta["split"], source="model.json").scan_args())
    pre = meta["preprocessing"]
    ds = ImageDataset(index.val, size=pre["resize_size"], cache=False,
                      transform=eval_transform(pre["image_size"], mean=tuple(pre["mean"]), std=tuple(pre["std"])))
    with torch.no_grad():
        return model(torch.stack([ds[i][0] for i in range(len(ds))]))


def test_fit_ships_the_best_trials_own_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_session) -> None:
    import json
    import time

    from search.ensemble import evaluate_model
    import torch

    from search.export import predict
    from search.model_io import load_val_logits
    from search.studies import best_trial, load_study

    data = make_image_folder(tmp_path / "data", size=32, splits=("train", "val", "test"))
    monkeypatch.chdir(tmp_path)
    space = SearchSpace.from_dict(TINY_SPACE)  # it imports torch: not part of fit's time
    t0 = time.monotonic()
    s = _fit(data, "tiny", space)
    wall = time.monotonic() - t0

    study = load_study("tiny")
    best = best_trial(study.get_trials(), maximize=True)
    assert s.searched and s.kind == "trial" and s.trials == (best.number,)
    assert s.val_score == best.value
    model = Path(s.model_dir)
    assert model == (tmp_path / "models" / "tiny").resolve()
    # The folder scores on validation what the study measured for that trial: same weights, same epoch.
    assert evaluate_model(model, data, split="val")["accuracy"] == pytest.approx(best.value, abs=1e-9)
    kept, _ = load_val_logits(best.user_attrs["checkpoint"])
    assert torch.allclose(_val_logits(model, data), kept, atol=1e-4)
    rows = predict(model, [next((data / "test" / "circle").iterdir())])
    assert rows[0]["top"][0][0] in ("circle", "square", "triangle")
    meta = json.loads((model / "model.json").read_text())
    assert meta["study"] == "tiny" and meta["trials"] == [best.number]
    assert meta["dataset_fingerprint"] == study.user_attrs["dataset_fingerprint"]
    assert meta["split"] == study.user_attrs["split_spec"]
    assert s.heldout is not None and s.heldout["images"] == 18 and 0.0 <= s.heldout["accuracy"] <= 1.0
    assert s.heldout["accuracy"] == pytest.approx(evaluate_model(model, data)["accuracy"])
    assert Path(s.report).is_file() and Path(s.best_config).is_file()
    # Each phase's seconds add up to the wall clock of the call.
    names = [n for n, _ in s.phases]
    assert names == ["start", "search", "report", "ship", "evaluate"]
    assert sum(v for _, v in s.phases) == pytest.approx(s.wall_seconds, abs=0.01)
    assert s.wall_seconds == pytest.approx(wall, abs=0.5)

    # Preset best on the same study: no search, the ensemble procedure's folder ships.
    e = _fit(data, "tiny", space, preset="best", out=tmp_path / "models" / "tiny-best")
    assert not e.searched and e.kind == "ensemble" and len(load_study("tiny").trials) == len(study.trials)
    meta = json.loads((Path(e.model_dir) / "model.json").read_text())
    assert meta["kind"] == "ensemble" and meta["study"] == "tiny" and meta["trials"] == list(e.trials)
    assert set(e.trials) <= {t.number for t in study.trials} and e.heldout is not None
    assert predict(e.model_dir, [next((data / "test" / "square").iterdir())])[0]["top"]


def test_a_kill_in_the_ship_step_then_fit_again_ships_without_searching(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_session) -> None:
    import json

    import search.pipeline._fit as fit_module
    from search.pipeline import format_fit
    from search.studies import load_study

    data = make_image_folder(tmp_path / "data", size=32)  # no test/
    monkeypatch.chdir(tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C there would

    with monkeypatch.context() as m:
        m.setattr(fit_module, "ship_trial", killed)
        with pytest.raises(KeyboardInterrupt):
            _fit(data, "killed")
    trials = len(load_study("killed").trials)
    assert trials >= 2 and not (tmp_path / "models" / "killed").exists()

    s = _fit(data, "killed", trials=4)  # a search that ran again would add trials
    assert not s.searched and len(load_study("killed").trials) == trials  # the search was not repeated
    assert [n for n, _ in s.phases] == ["start", "report", "ship", "evaluate"]
    assert (Path(s.model_dir) / "model.pt").is_file() and s.heldout is None
    assert any("no test/" in n for n in s.notes)

    # --refit trains that trial's config again on train+val, inside the budget, and says so.
    r = _fit(data, "killed", refit=True)
    meta = json.loads((Path(r.model_dir) / "model.json").read_text())
    assert r.refit and meta["full_fit"] and meta["refit_of"] == s.trials[0] and meta["study"] == "killed"
    assert [n for n, _ in r.phases] == ["start", "report", "ship", "refit", "evaluate"]
    assert any("--refit" in n for n in r.notes) and "refit on train+val" in format_fit(r)
