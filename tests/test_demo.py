"""The demo (search/demo.py): real pretrained weights from the `demo` extra's packages, converted
for timm once; without them, the from-scratch demo and one line on how to get the better one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from search import demo
from search.backbones import WeightsError


def _packaged_checkpoint(path: Path, arch: str = "tf_efficientnet_lite0") -> dict:
    """A checkpoint laid out as the weight packages ship it: timm's tensors, other key names."""
    import timm

    state = timm.create_model(arch, pretrained=False).state_dict()
    shipped = {f"_pkg_{i}": t.clone() for i, t in enumerate(state.values())}
    torch.save(shipped, path)
    return state


def test_packaged_weights_convert_by_position_for_timm(tmp_path: Path) -> None:
    source = tmp_path / "efficientnet-lite0.pth"
    state = _packaged_checkpoint(source)
    out = demo.convert_packaged_weights("timm/tf_efficientnet_lite0", source, tmp_path / "weights")
    assert out == tmp_path / "weights" / "tf_efficientnet_lite0.pth"  # the --weights-dir layout
    converted = torch.load(out, weights_only=True)
    assert list(converted) == list(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(3)}, source)
    with pytest.raises(WeightsError, match="tlsearch\\[demo\\]"):
        demo.convert_packaged_weights("timm/tf_efficientnet_lite0", source, tmp_path / "weights")
    assert not (tmp_path / "weights" / "tf_efficientnet_lite0.pth").exists()


def test_demo_uses_installed_packages_as_a_weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "efficientnet-lite0.pth"
    _packaged_checkpoint(source)
    monkeypatch.setenv("TLSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "packaged_weights",
                        lambda name: source if name == "timm/tf_efficientnet_lite0" else None)
    monkeypatch.setattr(demo, "DEMO_WEIGHT_PACKAGES", {"timm/tf_efficientnet_lite0": "x"})
    found, weights_dir = demo.demo_weights(None)
    assert found == ["timm/tf_efficientnet_lite0"]
    assert Path(weights_dir) == tmp_path / "cache" / "weights"
    assert (tmp_path / "cache" / "weights" / "tf_efficientnet_lite0.pth").is_file()


def test_without_weights_the_demo_falls_back_and_says_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import search.backbones as backbones
    import search.outputs
    import search.runner

    monkeypatch.setenv("TLSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "packaged_weights", lambda name: None)
    monkeypatch.setattr(backbones, "weights_status", lambda name, weights_dir=None: "missing")

    def offline(name: str, weights_dir: object = None) -> str:
        raise WeightsError(f"no pretrained weights for {name} (offline)")

    monkeypatch.setattr(backbones, "check_weights", offline)
    seen = {}
    monkeypatch.setattr(search.runner, "run_search", lambda settings, **kw: seen.setdefault("settings", settings))
    monkeypatch.setattr(search.outputs, "after_search", lambda summary, study, storage, **kw: 0)
    monkeypatch.setattr(demo, "make_demo_dataset", lambda root: Path(root))
    monkeypatch.chdir(tmp_path)
    assert demo.run_demo(tmp_path / "w", trials=2) == 0
    err = capsys.readouterr().err
    assert "pip install 'tlsearch[demo]'" in err and err.count("tlsearch[demo]") == 1
    s = seen["settings"]
    assert s.study == demo.DEMO_STUDY_SCRATCH and s.pretrained is False
    assert s.space.to_dict()["backbone"] == ["resnet18"]


def test_with_weights_the_demo_searches_pretrained_or_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import search.outputs
    import search.runner

    monkeypatch.setattr(demo, "demo_weights", lambda weights_dir: (list(demo.DEMO_WEIGHT_PACKAGES), "/w"))
    seen = {}
    monkeypatch.setattr(search.runner, "run_search", lambda settings, **kw: seen.setdefault("settings", settings))
    monkeypatch.setattr(search.outputs, "after_search", lambda summary, study, storage, **kw: 0)
    monkeypatch.setattr(demo, "make_demo_dataset", lambda root: Path(root))
    monkeypatch.chdir(tmp_path)
    assert demo.run_demo(tmp_path / "w") == 0
    s = seen["settings"]
    assert s.study == "demo" and s.weights_dir == "/w"
    space = s.space.to_dict()
    assert len(space["backbone"]) >= 2 and space["pretrained"] == [True, False]
    assert "all" in space["freeze_depth"] and any(isinstance(d, int) for d in space["freeze_depth"])


def test_demo_dataset_is_remade_when_its_recipe_changes(tmp_path: Path) -> None:
    root = demo.make_demo_dataset(tmp_path / "d", train_per_class=2, val_per_class=1, size=24)
    assert len(list((root / "train").rglob("*.png"))) == 8
    root = demo.make_demo_dataset(tmp_path / "d", train_per_class=3, val_per_class=1, size=24)
    assert len(list((root / "train").rglob("*.png"))) == 12


@pytest.mark.parametrize("inside", [True, False])
def test_the_demos_closing_paths_work_from_the_users_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str], inside: bool) -> None:
    """`tlsearch demo --dir D` searches in D; what it prints at the end is typed where the user stands."""
    import shlex

    import optuna

    import search.export
    import search.report
    import search.runner

    user = tmp_path / "me"
    user.mkdir()
    workdir = user / "x" if inside else tmp_path / "elsewhere"
    monkeypatch.chdir(user)
    monkeypatch.setattr(demo, "demo_weights", lambda weights_dir: ([], None))

    def dataset(root: Path) -> Path:
        (root / "val" / "circle").mkdir(parents=True)
        (root / "val" / "circle" / "circle_000.png").write_bytes(b"")
        return root

    def search_(settings, **kw) -> object:  # a study with one finished trial, where a search would leave it
        Path("studies").mkdir()
        study = optuna.create_study(study_name=settings.study, storage=f"sqlite:///{Path('studies').resolve()}/"
                                    f"{settings.study}.db", direction="maximize")
        study.set_user_attr("dataset", settings.data)
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=0.5))
        return None

    def written(rel: str):  # the report and config as their writers return them: relative to the search's folder
        def write(study, **kw):
            path = Path(rel.format(study=study))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
            return path if rel.endswith("html") else (path, {})
        return write

    monkeypatch.setattr(demo, "make_demo_dataset", dataset)
    monkeypatch.setattr(search.runner, "run_search", search_)
    monkeypatch.setattr(search.report, "write_report", written("reports/{study}/index.html"))
    monkeypatch.setattr(search.export, "export_trial", written("reports/{study}/best.yaml"))
    assert demo.run_demo(workdir, trials=1, progress=False) == 0
    out = capsys.readouterr().out
    monkeypatch.chdir(user)
    study = demo.DEMO_STUDY_SCRATCH
    prefix = "x/" if inside else f"{workdir}/"
    report = next(line for line in out.splitlines() if line.startswith("report: "))
    assert report == f"report: {prefix}reports/{study}/index.html" and Path(report.split(" ", 1)[1]).is_file()
    commands = {line.split()[1]: shlex.split(line.split("#")[0]) for line in out.splitlines()
                if line.startswith("  tlsearch ")}
    assert commands["show"] == ["tlsearch", "show", study, "--storage", f"sqlite:///{prefix}studies/{study}.db"]
    assert Path(commands["show"][-1].removeprefix("sqlite:///")).is_file()
    assert commands["train"] == ["tlsearch", "train", f"{prefix}reports/{study}/best.yaml", f"{prefix}data/demo",
                                 "--out", f"{prefix}models/{study}"]
    assert commands["predict"] == ["tlsearch", "predict", f"{prefix}models/{study}",
                                   f"{prefix}data/demo/val/circle/circle_000.png"]
    assert all(Path(p).exists() for p in (*commands["train"][2:4], commands["predict"][3]))
    # Interrupted: resume runs where the search ran.
    from types import SimpleNamespace

    from search.outputs import after_search

    monkeypatch.chdir(workdir)
    assert after_search(SimpleNamespace(interrupted=True), study, None, here=user) == 130
    assert f"continue with: cd {prefix.rstrip('/')} && tlsearch resume {study}\n" in capsys.readouterr().err
