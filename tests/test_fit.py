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


def test_reserve_grows_with_the_data_and_only_the_ensemble_share_is_capped() -> None:
    small = plan_reserve(budget_s=600, test_images=10, per_image_s=0.01)
    big = plan_reserve(budget_s=600, test_images=5000, per_image_s=0.01)
    assert big.evaluate_s > small.evaluate_s and big.ship_s == small.ship_s
    none = plan_reserve(budget_s=600, test_images=0, per_image_s=0.01)
    assert none.evaluate_s == 0  # no test/: nothing to evaluate
    ens = plan_reserve(budget_s=600, test_images=0, per_image_s=0.01, ensemble_s=40.0)
    assert ens.ensemble_s == 40.0 and ens.total_s == pytest.approx(none.total_s + 40.0)
    huge = plan_reserve(budget_s=100, test_images=10, per_image_s=0.1, ensemble_s=10**4)
    assert huge.total_s == pytest.approx(0.5 * 100)  # the ensemble's share shrinks to half the budget
    slow = plan_reserve(budget_s=100, test_images=10**4, per_image_s=0.1)
    assert slow.evaluate_s > 1000  # the evaluation is never cut: such a budget is refused
    with pytest.raises(ConfigError):
        search_budget(100, elapsed_s=0.0, reserve=slow)
    refit = plan_reserve(budget_s=600, test_images=10, per_image_s=0.01, refit=True)
    assert refit.total_s == pytest.approx(small.total_s + 0.3 * 600)


@pytest.mark.parametrize("refit, ensemble_s", [(False, 0.0), (True, 0.0), (False, 500.0), (True, 500.0)])
def test_the_smallest_budget_the_hint_names_leaves_a_search_and_the_model_folder_its_time(
        refit: bool, ensemble_s: float) -> None:
    import re

    from search.pipeline._budget import SHIP_S

    def reserve(t: float):
        return plan_reserve(budget_s=t, test_images=100, per_image_s=0.02, ensemble_s=ensemble_s, refit=refit)

    with pytest.raises(ConfigError, match="give at least") as e:
        search_budget(20, elapsed_s=6.0, reserve=reserve(20))
    need = int(re.search(r"give at least (\d+)s", str(e.value)).group(1))
    for t in (need, need + 5):  # at the budget it names (and above), the search gets its minimum
        r = reserve(t)
        assert r.ship_s >= SHIP_S  # the model folder keeps its time at any budget
        assert search_budget(t, elapsed_s=6.0, reserve=r) >= MIN_SEARCH_S - 1e-9
    with pytest.raises(ConfigError):  # and it asks for at most a few seconds more than it needs
        search_budget(need - 9, elapsed_s=6.0, reserve=reserve(need - 9))


def test_search_budget_is_what_is_left_and_a_budget_too_short_is_refused() -> None:
    r = plan_reserve(budget_s=300, test_images=10, per_image_s=0.01)
    assert search_budget(300, elapsed_s=12.0, reserve=r) == pytest.approx(300 - 12.0 - r.total_s)
    with pytest.raises(ConfigError, match="give at least"):
        search_budget(r.total_s + MIN_SEARCH_S - 1, elapsed_s=0.0, reserve=r)


def test_per_image_cost_is_the_slowest_measured_trial_else_an_allowance() -> None:
    assert per_image_seconds([4.0, None, 20.0], gpu=False) == pytest.approx(0.020 + 0.003)
    assert per_image_seconds([], gpu=True) < per_image_seconds([], gpu=False)
    assert fits(10, left_s=10) and not fits(10.5, left_s=10)


def test_the_ensemble_estimate_counts_the_kept_pool_each_member_at_its_own_latency() -> None:
    from search.pipeline import ensemble_members, ensemble_seconds

    # 40 COMPLETE trials, of which the procedure keeps 9 (3 per backbone): one slow ViT-like kept trial
    # must not price the other eight at its latency.
    kept = [("a", 10.0), ("a", 12.0), ("a", 11.0), ("b", 20.0), ("b", 21.0), ("b", 22.0), ("c", 200.0), ("c", 5.0),
            ("c", 6.0)]
    members = ensemble_members(kept)
    assert len(members) == 9 + 3  # the kept trials and one soup per backbone, at its slowest trial
    assert sorted(members[9:]) == [12.0, 22.0, 200.0]
    need = ensemble_seconds(val_images=100, test_images=100, members=members, gpu=False)
    per_member = sum(m / 1000 + 0.003 for m in members)
    assert need == pytest.approx(2 * 200 * per_member)
    assert need < 0.5 * ensemble_seconds(val_images=100, test_images=100, members=[200.0] * 40, gpu=False)
    # Before the search, the pool is the one it will keep: fewer backbones, fewer members.
    few = ensemble_seconds(val_images=100, test_images=0, members=ensemble_members([("a", None)] * 3), gpu=False)
    more = ensemble_seconds(val_images=100, test_images=0, members=ensemble_members([("a", None)] * 3 + [("b", None)] * 3),
                            gpu=False)
    assert more == pytest.approx(2 * few)


def test_the_reserve_before_the_search_uses_the_pool_the_search_keeps(tmp_path: Path) -> None:
    from search.data import scan_dataset
    from search.pipeline import ensemble_members, ensemble_seconds, fit_reserve, get_preset
    from search.settings import SearchSettings

    data = make_image_folder(tmp_path / "data", per_class=4, splits=("train", "val", "test"))
    index = scan_dataset(str(data))
    space = SearchSpace.from_dict({**TINY_SPACE, "backbone": ["resnet18", "mobilenet_v3_small"]})
    settings = SearchSettings(study="r", data=str(data), space=space, keep_checkpoints=2)
    r = fit_reserve(settings, index, budget_s=10_000, preset=get_preset("best"), refit=False)
    pool = ensemble_members([("resnet18", None)] * 2 + [("mobilenet_v3_small", None)] * 2)
    assert r.ensemble_s == pytest.approx(ensemble_seconds(val_images=len(index.val), test_images=len(index.test),
                                                          members=pool, gpu=False))
    assert fit_reserve(settings, index, budget_s=10_000, preset=get_preset("good"), refit=False).ensemble_s == 0
    # An interrupted study continued: its trials' latencies price the evaluation; with no checkpoint
    # kept yet, the pool is still the space's.
    import optuna

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={},
                                              user_attrs={"latency_ms": 50.0, "config": {"backbone": "resnet18"}}))
    measured = fit_reserve(settings, index, budget_s=10_000, preset=get_preset("best"), refit=False, study=study)
    assert measured.ensemble_s == pytest.approx(r.ensemble_s)
    assert measured.evaluate_s == pytest.approx(2.0 + len(index.test) * (0.050 + 0.003))


def test_a_refit_of_a_cached_probe_is_estimated_at_the_backbones_forward_cost() -> None:
    # A probe on cached features trained 1000 images an epoch at 2000 img/s (0.5 ms each: the head
    # alone); the backbone's forward pass costs 20 ms an image. The refit runs the backbone on
    # every one of the 1500 images of train+val, each epoch, and scores val after each.
    est = refit_seconds(train_images=1000, val_images=500, epochs=5, train_s_per_image=1 / 2000,
                        forward_s_per_image=0.020, cached=True)
    forward = 5 * (1500 + 500) * 0.020
    assert est > forward  # the whole backbone each epoch, not the cached features' 6 s
    assert est < 2 * forward + 20
    # On images, the trial's own rate is the cost of an image (its forward pass is in it).
    images = refit_seconds(train_images=1000, val_images=500, epochs=5, train_s_per_image=0.060,
                           forward_s_per_image=0.020, cached=False)
    assert images == pytest.approx((5 * (1500 * 0.060 + 500 * 0.023)) * 1.2 + 10.0)
    # An LP-FT config's probe reads train+val too.
    lpft = refit_seconds(train_images=1000, val_images=500, epochs=5, probe_epochs=2, train_s_per_image=0.060,
                         forward_s_per_image=0.020, cached=False)
    assert lpft - images == pytest.approx(2 * 2000 * 0.023 * 1.2)
    assert not fits(est, left_s=forward)


def test_a_refit_estimate_of_a_trial_reads_what_it_measured(tmp_path: Path) -> None:
    import optuna

    from search.config import TrialConfig
    from search.data import scan_dataset
    from search.pipeline import refit_estimate

    data = make_image_folder(tmp_path / "data", per_class=10)
    index = scan_dataset(str(data))
    cfg = TrialConfig(backbone="resnet18", pretrained=False, freeze_depth="all", augmentation="none", epochs=4)
    trial = optuna.trial.create_trial(value=0.5, params={}, distributions={}, user_attrs={
        "config": cfg.to_dict(), "train_seconds": 0.2, "images_per_s": 5000.0, "latency_ms": 30.0})
    cached = refit_estimate(trial, index, cache=True)
    n, v = len(index.train) + len(index.val), len(index.val)
    assert cached >= 4 * (n + v) * 0.030  # the backbone's forward pass on every image, every epoch
    uncached = refit_estimate(trial, index, cache=False)
    assert uncached < cached  # its 5000 img/s were on images: the rate itself is the cost


def test_phases_start_at_the_given_start_and_add_up_to_the_wall_clock() -> None:
    ticks = iter([100.0, 101.5, 130.0, 130.0, 133.25, 134.0])
    clock = PhaseClock(now=lambda: next(ticks), start=95.0)  # the process began 5 s before fit was called
    clock.lap("start")
    clock.lap("search")
    clock.lap("ship")
    clock.lap("ship")  # a phase met again adds up
    assert clock.phases == {"start": 5.0, "search": 1.5, "ship": 28.5 + 0.0}
    clock.lap("exit")
    assert sum(clock.phases.values()) == pytest.approx(clock.total_s) == pytest.approx(133.25 - 95.0)
    assert clock.left_s(200) == pytest.approx(200 - (134.0 - 95.0))


def test_process_start_is_before_now_and_at_most_the_process_age() -> None:
    import time

    from search.pipeline import process_start

    t = process_start()
    assert t <= time.monotonic()
    stat = Path("/proc/self/stat")
    if stat.exists():  # pytest's process started before this module was imported
        from search.pipeline import _budget

        assert t < _budget._IMPORTED_AT


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
    (tmp_path / "vit_b_16.pth").write_bytes(b"")  # takes 224 px only
    assert "resnet50" in _presets.more_backbones_at_hand(weights_dir=str(tmp_path))
    assert "vit_b_16" not in _presets.more_backbones_at_hand(weights_dir=str(tmp_path), image_size=128)
    assert "vit_b_16" in _presets.more_backbones_at_hand(weights_dir=str(tmp_path), image_size=224)


def test_the_ensemble_procedures_best_single_ships_as_a_trial() -> None:
    from search.pipeline import shipped_kind

    single = {"kind": "single", "tta": False, "members": [{"member": "trial 3", "trials": [3]}]}
    assert shipped_kind(single) == "trial"  # --refit can then train its config again
    assert shipped_kind({**single, "tta": True}) == "ensemble"
    assert shipped_kind({"kind": "soup", "tta": False, "members": [{"trials": [1, 2]}]}) == "ensemble"


def test_default_study_name_is_the_folder_name_and_a_changed_name_gets_a_hash() -> None:
    from search.config import check_study_name

    assert default_study_name("/data/pets/") == "pets"
    assert default_study_name("/data/labels.csv") == "labels"
    names = [default_study_name(d) for d in ("/data/my pets/", "/data/a...b", "/data/a..b", "/d/фото", "/d/照片",
                                             "/d/...", "/d/" + "x" * 300)]
    for n in names:
        assert check_study_name(n) == n  # a name the study storage takes, never an exit 2
    assert names[0].startswith("my-pets-") and names[1].startswith("a.b-")
    assert len(set(names)) == len(names)  # non-ASCII names do not all become one study


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


def fit(*args, **kwargs):
    from search.pipeline import fit as fit_

    return fit_(*args, **kwargs)


def _fit(data: Path, study: str | None, space: SearchSpace | None = None, **kw):
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

    # Preset best on the same study: no search, the ensemble procedure's folder ships; the options a
    # finished study cannot take are said, not dropped in silence.
    e = _fit(data, "tiny", space, preset="best", out=tmp_path / "models" / "tiny-best")
    assert not e.searched and len(load_study("tiny").trials) == len(study.trials)
    summary = json.loads((Path("studies") / "tiny" / "ensemble.json").read_text())
    row = next(r for r in summary["candidates"] if r["shipped"])
    single = row["kind"] == "single" and not row["tta"]
    assert e.kind == ("trial" if single else "ensemble")  # the best single trial ships as a trial
    [note] = [n for n in e.notes if "had finished its search" in n]
    assert "--space is not used" in note and "'good' preset's space" in note and "--time-budget" in note
    meta = json.loads((Path(e.model_dir) / "model.json").read_text())
    assert meta["kind"] == "ensemble" and meta["study"] == "tiny" and meta["trials"] == list(e.trials)
    assert meta["fit"]["preset"] == "best"
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
    assert any("--time-budget covers shipping and evaluating only" in n for n in s.notes)
    assert [n for n, _ in s.phases] == ["start", "report", "ship", "evaluate"]
    assert (Path(s.model_dir) / "model.pt").is_file() and s.heldout is None
    assert any("no test/" in n for n in s.notes)

    # --refit trains that trial's config again on train+val, inside the budget, and says so; on the
    # machine's CPUs, not the trial's recorded single thread.
    import search.trial as trial_module

    calls = []
    real_train = trial_module.train

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(trial_module, "train", spy)
    r = _fit(data, "killed", refit=True)
    assert [c["threads"] for c in calls] == [fit_module._cpus()] and calls[0]["full"]
    meta = json.loads((Path(r.model_dir) / "model.json").read_text())
    assert r.refit and meta["full_fit"] and meta["refit_of"] == s.trials[0] and meta["study"] == "killed"
    assert meta["fit"]["shipped"] == r.shipped and meta["fit"]["preset"] == "good"  # the refit keeps fit's record
    assert [n for n, _ in r.phases] == ["start", "report", "ship", "refit", "evaluate"]
    assert any("--refit" in n for n in r.notes) and "refit on train+val" in format_fit(r)


def test_fit_on_a_finished_study_of_other_data_stops_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], ray_session) -> None:
    from search.cli import main

    monkeypatch.chdir(tmp_path)
    a = make_image_folder(tmp_path / "a" / "photos", size=32, splits=("train", "val", "test"))
    b = make_image_folder(tmp_path / "b" / "photos", size=36, splits=("train", "val", "test"))
    first = _fit(a, None)  # the study is the folder's name: "photos"
    assert first.study == "photos" and first.searched
    shipped = (Path(first.model_dir) / "model.pt").read_bytes()
    capsys.readouterr()

    import search.pipeline._fit as fit_module

    # The CLI's own call, with the tiny space and random init of this test's studies.
    real = fit_module.fit
    monkeypatch.setattr("search.pipeline.fit", lambda *args, **kw: real(
        *args, **{**kw, "space": SearchSpace.from_dict(TINY_SPACE), "pretrained": False, "cache": False}))
    assert main(["fit", str(b), "--time-budget", "3m", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tlsearch: error: study 'photos' was searched on"), err
    assert str(a.resolve()) in err[0] and str(b.resolve()) in err[0]
    assert "--study" in err[0] and "--allow-changed-data" in err[0]  # same classes: both ways on
    assert (Path(first.model_dir) / "model.pt").read_bytes() == shipped  # a's model is left as it was

    # Asked for, the study's model ships and is scored on b's test/, with a note.
    c = _fit(b, None, allow_changed_data=True)
    assert not c.searched and c.heldout is not None and any("--allow-changed-data" in n for n in c.notes)
    # The same data ships again, as before.
    again = _fit(a, None)
    assert not again.searched and again.trials == first.trials and not any("allow" in n for n in again.notes)


def test_fit_ends_by_its_budget_within_it_and_ships(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     ray_session) -> None:
    """No trial count: the search runs until its share of a 50 s budget ends, then ships and evaluates."""
    import time

    from search.pipeline import format_fit
    from search.studies import load_study

    data = make_image_folder(tmp_path / "data", size=32, splits=("train", "val", "test"))
    monkeypatch.chdir(tmp_path)
    space = SearchSpace.from_dict(TINY_SPACE)
    budget = 50.0
    t0 = time.monotonic()
    s = fit(data, budget, study="budget", space=space, pretrained=False, cache=False, cpus_per_trial=1.0,
            progress=False)
    wall = time.monotonic() - t0
    assert wall <= 1.05 * budget, (wall, s.phases)
    assert s.searched and [n for n, _ in s.phases] == ["start", "search", "report", "ship", "evaluate"]
    searched_for = load_study("budget").user_attrs["fit"]["budget_s"]
    assert MIN_SEARCH_S <= searched_for < budget and dict(s.phases)["search"] >= 0.9 * searched_for  # ended by its budget
    assert (Path(s.model_dir) / "model.pt").is_file() and s.heldout is not None and s.heldout["images"] == 18
    assert sum(v for _, v in s.phases) == pytest.approx(s.wall_seconds, abs=0.01)
    assert s.wall_seconds <= wall + 0.01
    assert f"of {budget:.0f}s" in format_fit(s)


def test_downloads_and_rays_shutdown_are_inside_the_budget_and_the_cli_counts_from_the_process_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_session) -> None:
    import time

    import search.pipeline._fit as fit_module
    import search.runner as runner

    data = make_image_folder(tmp_path / "data", size=32)
    monkeypatch.chdir(tmp_path)
    events: list[tuple[str, float]] = []

    def slow_download(space, weights_dir):
        time.sleep(2.0)  # as a download of the space's weights would take
        events.append(("download", time.monotonic()))

    real_search = fit_module._search

    def search(settings, **kw):
        events.append(("search", settings.time_budget_s))
        return real_search(settings, **kw)

    monkeypatch.setattr(runner, "check_space_weights", slow_download)
    monkeypatch.setattr(fit_module, "_search", search)
    monkeypatch.setattr(fit_module, "_start_ray", lambda settings, verbose: True)  # as if fit had started Ray
    monkeypatch.setattr(fit_module, "_stop_ray", lambda: events.append(("stop", time.monotonic())))
    t0 = time.monotonic()
    s = _fit(data, "dl", started_at=t0 - 1.0)  # the process started a second before the call
    assert [e for e, _ in events] == ["download", "search", "stop"]  # fetched before the search's budget was set
    phases = dict(s.phases)
    assert phases["start"] >= 3.0  # the process's second and the download
    assert events[1][1] <= 180 - phases["start"]  # the search's budget left them out
    assert list(phases)[-1] == "exit" and s.wall_seconds == pytest.approx(time.monotonic() - t0 + 1.0, abs=0.5)

    # The CLI passes the process's start.
    from search.cli import main
    from search.pipeline import process_start

    seen = {}

    def fake_fit(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr("search.pipeline.fit", fake_fit)
    main(["fit", str(data), "--time-budget", "1m"])
    assert seen["started_at"] == pytest.approx(process_start(), abs=0.05) and seen["started_at"] < t0
