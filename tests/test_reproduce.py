"""`tlsearch train` on an exported config validates on exactly the study's split.

The split travels with the config: the study records it (`split_spec`), export writes it
(`split`), `train` reuses it, checks that DATA is the study's dataset, and model.json records what
it trained on. Studies are built with Optuna directly (no Ray), as `tlsearch run DATA --seed 3
--val-fraction 0.3` leaves them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import optuna
import pytest

from search.trial import _train as trial_module  # `train`, and the `fine_tune` it calls
from search.cli import main
from search.config import TrialConfig, dump_yaml, load_trial_config, load_yaml
from search.settings import SearchSettings
from search.data import DatasetIndex, scan_dataset
from search.export import export_trial
from search.trial import training_index
from tests.conftest import make_image_folder

CONFIG = TrialConfig(backbone="resnet18", pretrained=False, image_size=32, batch_size=8, epochs=1, lr=1e-3, seed=0)
# The search's split, deliberately not the defaults (seed 0, val_fraction 0.2) nor the trial's seed.
SEED, FRACTION = 3, 0.3


class Warnings(list):
    def __call__(self, message: str) -> None:
        self.append(message)


@pytest.fixture()
def flat_data(tmp_path: Path) -> Path:
    """One folder per class, no val/: the split is the search's random draw."""
    return make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=10, size=16, splits=())


def _study(tmp_path: Path, index: DatasetIndex, name: str = "repro") -> optuna.Study:
    """The study a search on `index` leaves: its user_attrs as `runner._open_study` sets them."""
    (tmp_path / "studies").mkdir(exist_ok=True)
    study = optuna.create_study(
        study_name=name, storage=f"sqlite:///{tmp_path / 'studies' / (name + '.db')}", direction="maximize"
    )
    attrs = {
        "dataset": index.root,
        "dataset_fingerprint": index.fingerprint,
        "class_names": list(index.classes),
        "split": index.split,
        "split_spec": index.split_spec.to_dict(),
        "settings": {"seed": SEED, "val_fraction": FRACTION, "cpus_per_trial": 1},
    }
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    dist = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)}
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 1e-3}, distributions=dist, value=0.75, user_attrs={"config": CONFIG.to_dict()},
        intermediate_values={1: 0.75},
    ))
    return study


def _exported(tmp_path: Path, data: Path) -> tuple[DatasetIndex, Path]:
    """(the study's index, its exported best.yaml) for a search with --seed 3 --val-fraction 0.3."""
    index = scan_dataset(data, val_fraction=FRACTION, seed=SEED, warn=Warnings())
    _study(tmp_path, index)
    [path] = export_trial("repro", studies_dir=tmp_path / "studies", reports_dir=tmp_path / "reports")
    return index, path


def _relative_val(index: DatasetIndex) -> list[str]:
    return [os.path.relpath(p, index.root) for p, _ in index.val]


def test_export_records_the_study_split(tmp_path: Path, flat_data: Path) -> None:
    index, path = _exported(tmp_path, flat_data)
    record = load_yaml(path)
    assert record["split"] == {"layout": "random", "val_fraction": FRACTION, "seed": SEED}
    assert record["dataset_fingerprint"] == index.fingerprint
    assert record["seed"] == 0  # the training seed stays the trial's own
    assert load_trial_config(path) == CONFIG  # still a config train accepts


def test_a_new_study_records_its_split(tmp_path: Path, flat_data: Path) -> None:
    pytest.importorskip("ray")
    from search.runner import _open_study
    from search.space import default_space
    from search.studies import get_storage

    settings = SearchSettings(study="s", data=str(flat_data), seed=SEED, val_fraction=FRACTION,
                              studies_dir=str(tmp_path / "studies"))
    (tmp_path / "studies").mkdir()
    index = scan_dataset(flat_data, val_fraction=FRACTION, seed=SEED, warn=Warnings())
    study, _ = _open_study(settings, get_storage(settings.storage_url), index, default_space(gpu=False))
    assert study.user_attrs["split_spec"] == {"layout": "random", "val_fraction": FRACTION, "seed": SEED}


def test_train_validates_on_the_study_split(
    tmp_path: Path, flat_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, path = _exported(tmp_path, flat_data)
    seen: list[DatasetIndex] = []

    class Stop(Exception):
        pass

    def capture(cfg, data_index, **kw):  # stands in for training: what data would it get?
        seen.append(data_index)
        raise Stop

    monkeypatch.setattr(trial_module, "fine_tune", capture)
    with pytest.raises(Stop):
        trial_module.train(path, flat_data, progress=False)
    assert seen[0].val == index.val and seen[0].train == index.train
    assert seen[0].fingerprint == index.fingerprint


def test_plain_train_records_the_study_split_and_fingerprint(
    tmp_path: Path, flat_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index, path = _exported(tmp_path, flat_data)
    assert main(["train", str(path), str(flat_data), "--out", str(tmp_path / "model"), "--json"]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err, err
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["dataset_fingerprint"] == index.fingerprint
    assert meta["split"] == {"layout": "random", "val_fraction": FRACTION, "seed": SEED}


def test_explicit_seed_or_fraction_overrides_with_one_warning(tmp_path: Path, flat_data: Path) -> None:
    index, path = _exported(tmp_path, flat_data)
    record = load_yaml(path)
    w = Warnings()
    same = training_index(flat_data, record, seed=SEED, val_fraction=FRACTION, warn=w)
    assert w == [] and same == index  # "overriding" with the recorded values changes nothing
    other = training_index(flat_data, record, seed=5, warn=w)
    assert len(w) == 1 and "\n" not in w[0]
    assert "val_fraction 0.3, seed 3" in w[0] and "seed 5" in w[0]
    assert other == scan_dataset(flat_data, val_fraction=FRACTION, seed=5, warn=Warnings())


def test_explicit_override_through_the_cli(
    tmp_path: Path, flat_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, path = _exported(tmp_path, flat_data)
    out = tmp_path / "model"
    assert main(["train", str(path), str(flat_data), "--out", str(out), "--seed", "5", "--val-fraction", "0.5"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "overriding the recorded split" in warnings[0], warnings
    meta = json.loads((out / "model.json").read_text())
    assert meta["split"] == {"layout": "random", "val_fraction": 0.5, "seed": 5}
    assert meta["dataset_fingerprint"] == scan_dataset(flat_data, val_fraction=0.5, seed=5).fingerprint


def test_changed_dataset_stops_unless_allowed(
    tmp_path: Path, flat_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index, path = _exported(tmp_path, flat_data)
    shutil.copy(flat_data / "a" / "a_0.png", flat_data / "a" / "extra.png")  # one image more
    args = ["train", str(path), str(flat_data), "--out", str(tmp_path / "model")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "not the dataset of study 'repro'" in err and index.fingerprint in err and "--allow-changed-data" in err
    assert not (tmp_path / "model").exists()

    assert main([*args, "--allow-changed-data"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "not the dataset of study 'repro'" in warnings[0]
    assert json.loads((tmp_path / "model" / "model.json").read_text())["dataset_fingerprint"] != index.fingerprint


@pytest.mark.parametrize("splits", [(), ("train", "test"), ("train", "val", "test")])
def test_a_copy_with_new_mtimes_is_the_study_dataset(tmp_path: Path, splits: tuple[str, ...]) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=6, size=16, splits=splits)
    index, path = _exported(tmp_path, data)
    copy = Path(shutil.copytree(data, tmp_path / "other-machine" / "data"))
    for i, f in enumerate(sorted(copy.rglob("*.png"))):
        os.utime(f, ns=(2 * 10**18 + i, 2 * 10**18 + i))
    w = Warnings()
    again = training_index(copy, load_yaml(path), warn=w)
    assert w == []
    assert again.fingerprint == index.fingerprint and _relative_val(again) == _relative_val(index)


def test_train_and_test_layout_keeps_test_out_of_training(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=6, size=16, splits=("train", "test"))
    index, path = _exported(tmp_path, data)
    record = load_yaml(path)
    assert record["split"] == {"layout": "random", "train": "train", "val_fraction": FRACTION, "seed": SEED,
                               "test": "test"}
    used = training_index(data, record, warn=Warnings())
    test_files = {str(p) for p in (data / "test").rglob("*.png")}
    assert {p for p, _ in used.test} == test_files
    assert not test_files & {p for p, _ in used.train + used.val}
    assert used.val == index.val and len(used.val) == 4  # round(6 * 0.3) = 2 per class, from train/


def test_config_without_a_split(tmp_path: Path, flat_data: Path) -> None:
    # A hand-written config: `tlsearch run`'s default split, nothing to warn about.
    hand = dump_yaml(CONFIG.replace(seed=7).to_dict(), tmp_path / "hand.yaml")
    w = Warnings()
    index = training_index(flat_data, load_yaml(hand), warn=w)
    assert w == [] and index.split_spec.seed == 0 and index.split_spec.val_fraction == 0.2
    # An export from before splits were recorded: the same split, and one line saying DATA is unchecked.
    record = {**CONFIG.to_dict(), "study": "old", "dataset_fingerprint": "0123456789abcdef"}
    old = dump_yaml(record, tmp_path / "old.yaml")
    index = training_index(flat_data, load_yaml(old), warn=w)
    assert len(w) == 1 and "records no split" in w[0] and index.split_spec.seed == 0


def test_bad_split_record_is_one_line_exit_2(
    tmp_path: Path, flat_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = dump_yaml({**CONFIG.to_dict(), "split": {"layout": "random", "val_fraction": 2, "seed": 0}},
                    tmp_path / "bad.yaml")
    assert main(["train", str(bad), str(flat_data), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.yaml: split: val_fraction must be between 0 and 1" in err


@pytest.mark.ray
def test_run_export_train_predict_on_a_label_file(tmp_path: Path) -> None:
    """`run` on a CSV (no split column, --seed 3), export, then `train` validates on the very same draw."""
    import subprocess
    import sys

    data = make_image_folder(tmp_path / "ds" / "images", per_class=8, size=32, splits=())
    names = {"circle": "round", "square": "box", "triangle": "tri"}  # the file's labels, not the folders'
    rows = [f"images/{c}/{p.name},{n}" for c, n in names.items() for p in sorted((data / c).iterdir())]
    labels = tmp_path / "ds" / "labels.csv"
    labels.write_text("\n".join(["path,label", *rows]) + "\n")
    (tmp_path / "space.yaml").write_text(
        "backbone: resnet18\nlr: {low: 1.0e-3, high: 1.0e-2, log: true}\nimage_size: 32\nbatch_size: 8\nmax_epochs: 2\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TLSEARCH_CACHE": str(tmp_path / "cache")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "search", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)

    r = cli("run", "ds", "--study", "csv", "--trials", "2", "--no-pretrained", "--space", "space.yaml", "--seed", "3",
            "--cpus-per-trial", "1", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="csv", storage=f"sqlite:///{tmp_path / 'studies' / 'csv.db'}")
    expected = scan_dataset(labels, val_fraction=0.2, seed=3, warn=Warnings(), cache_dir=tmp_path / "cache")
    assert study.user_attrs["split_spec"] == {"layout": "csv", "val_fraction": 0.2, "seed": 3, "labels": "labels.csv"}
    assert study.user_attrs["dataset_fingerprint"] == expected.fingerprint
    assert study.user_attrs["dataset"] == str(labels) and study.user_attrs["class_names"] == ["box", "round", "tri"]

    r = cli("export", "csv")
    assert r.returncode == 0, r.stderr
    record = load_yaml(tmp_path / "reports" / "csv" / "best.yaml")
    assert record["split"] == study.user_attrs["split_spec"]
    # train re-draws val from the record (seed 3), not from its own default (seed 0)
    index = training_index(labels, record, warn=Warnings())
    assert index.val == expected.val and index.train == expected.train
    assert scan_dataset(labels, seed=0, warn=Warnings(), cache_dir=tmp_path / "cache").val != expected.val

    r = cli("train", "reports/csv/best.yaml", "ds/labels.csv", "--out", "model", "--json")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr, r.stderr
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["dataset_fingerprint"] == expected.fingerprint and meta["split"] == record["split"]
    r = cli("predict", "model", str(data / "circle" / "circle_0.png"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\t")[1].split()[0] in names.values()


def test_lp_ft_head_is_rebuilt_by_export_then_train(tmp_path: Path, flat_data: Path) -> None:
    """An LP-FT trial (head probed first, then every stage fine-tuned) is reproduced exactly by
    export -> train: the probe's head travels as its config (`lp_epochs`, `lp_lr`) and is rebuilt."""
    from search.trial import fine_tune

    index = scan_dataset(flat_data, val_fraction=FRACTION, seed=SEED, warn=Warnings())
    # A fine-tuning rate too small to move anything: what the model knows at epoch 1 is the probe's.
    lpft = CONFIG.replace(freeze_depth=0, lp_epochs=2, lp_lr=0.05, lr=1e-12, epochs=1)
    trial = fine_tune(lpft, index, cache=False, keep_model=True)
    m = trial.final
    assert m["lp_val_acc"] is not None and m["val_acc"] == pytest.approx(m["lp_val_acc"])
    cold = fine_tune(lpft.replace(lp_epochs=0), index, cache=False, keep_model=True)
    assert not torch_equal(trial.model.head.state_dict(), cold.model.head.state_dict())  # the head was probed

    study = _study(tmp_path, index)
    dist = {"lr": optuna.distributions.FloatDistribution(1e-13, 1e-1, log=True)}
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 1e-12}, distributions=dist, value=1.0, user_attrs={"config": lpft.to_dict()},
        intermediate_values={1: m["val_acc"]},
    ))
    [path] = export_trial("repro", studies_dir=tmp_path / "studies", reports_dir=tmp_path / "reports")
    assert load_yaml(path)["lp_epochs"] == 2 and load_trial_config(path) == lpft
    out = trial_module.train(path, flat_data, out=tmp_path / "model", progress=False, cache=False)
    assert out["val_acc"] == m["val_acc"] and out["val_loss"] == pytest.approx(m["val_loss"], abs=1e-6)


def torch_equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
