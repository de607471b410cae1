"""Fixtures of the reliability suite and the closing summary it prints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reliability._util import FIGURES, ROOT

os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    """Prints the figures the closing note of issue 6 quotes."""
    bad = FIGURES["bad_inputs"]
    if not bad and FIGURES["lost"] is None and not FIGURES["payloads_tried"]:
        return
    tr = terminalreporter
    tr.section("reliability summary")
    clear = sum(bad.values())
    tr.write_line(f"{clear} of {len(bad)} bad inputs handled clearly")
    unclear = sorted(k for k, v in bad.items() if not v)
    if unclear:
        tr.write_line(f"  not clear: {', '.join(unclear)}")
    if FIGURES["lost"] is not None:
        tr.write_line(f"kill -9 then resume: lost {FIGURES['lost']}, left RUNNING {FIGURES['left_running']}")
    else:
        tr.write_line("kill -9 then resume: not run")
    tr.write_line(f"payloads executed {FIGURES['payloads_executed']} (of {FIGURES['payloads_tried']} planted)")


def _tiny_config(path: Path, **changes) -> Path:
    import yaml

    cfg = {"backbone": "resnet18", "pretrained": False, "freeze_depth": 0, "augmentation": "none",
           "image_size": 32, "epochs": 1, "batch_size": 8, "lr": 0.001, "optimizer": "adamw", "seed": 0}
    cfg.update(changes)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture()
def tiny_config():
    """Writes a tiny trial config (resnet18, random weights, 32 px, 1 epoch): tiny_config(path, **changes)."""
    return _tiny_config


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder made by a real `tlsearch train` of the tiny config on a tiny dataset."""
    from reliability._util import cli
    from tests.conftest import make_image_folder

    work = tmp_path_factory.mktemp("model")
    data = make_image_folder(work / "data", classes=("a", "b"), per_class=4, size=24)
    cfg = _tiny_config(work / "tiny.yaml")
    proc = cli(["train", str(cfg), str(data), "--out", str(work / "model"), "--json"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "model"


assert (ROOT / "search").is_dir()
