from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "search", *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_help_is_fast_and_imports_nothing_heavy() -> None:
    t0 = time.perf_counter()
    r = run_cli("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "train" in r.stdout
    assert time.perf_counter() - t0 < 10  # generous here; the contract (about a second) is measured in the note
    probe = "import sys, search.cli; print(sorted(m for m in ('torch', 'ray', 'plotly', 'optuna') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_usage_error_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tlsearch: error:") and "\n" not in err and "Traceback" not in err


def test_missing_dataset_is_one_line_exit_2(tmp_path: Path) -> None:
    r = run_cli("check", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "nope" in r.stderr


def test_check_json(tiny_dataset: Path) -> None:
    r = run_cli("check", str(tiny_dataset), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["classes"] == ["circle", "square", "triangle"]


def test_check_shows_the_test_folder_apart_from_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=5, size=16, splits=("train", "test"))
    assert main(["check", str(root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["totals"] == {"train": 8, "val": 2, "test": 10}  # val drawn from train/, test/ whole
    assert summary["split_spec"]["test"] == "test" and summary["split_spec"]["layout"] == "random"
    assert main(["check", str(root)]) == 0
    text = capsys.readouterr().out
    assert "8 train / 2 val / 10 test images" in text and "held out" in text


def test_hostile_study_name_is_refused_before_anything_is_written(tmp_path: Path, tiny_dataset: Path) -> None:
    r = run_cli("run", str(tiny_dataset), "--study", "../escape", cwd=tmp_path)
    assert r.returncode == 2 and "study name" in r.stderr
    assert not (tmp_path / "studies").exists() and not (tmp_path.parent / "escape.db").exists()


def test_bad_config_file_exit_2(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backbone: resnt18\n")
    r = run_cli("train", str(cfg), str(tiny_dataset))
    assert r.returncode == 2, r.stderr
    assert "unknown backbone 'resnt18'" in r.stderr and "resnet18" in r.stderr
