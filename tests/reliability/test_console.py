"""A quiet console: Ray's and Optuna's own start-up warnings and info lines stay off the terminal.

One search through the real CLI (trials swapped for `stubs.stub_trial`, see stubcli.py), its
stderr a pipe: with --no-progress, stderr stays empty while the search runs; what Ray said (its
token-authentication warning, "Started a local Ray instance") is in studies/<study>/tlsearch.log;
stdout ends with the top of the leaderboard and the study's own next commands.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from reliability._util import cli

pytestmark = pytest.mark.ray

RAY_NOISE = ("WARNING", "INFO", "Token authentication", "Started a local Ray", "worker.py", "[I ", "[W ")


def test_a_run_prints_no_ray_or_optuna_lines_and_ends_with_next_steps(tmp_path: Path) -> None:
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=4, size=24)
    space = tmp_path / "space.yaml"
    space.write_text("backbone: [resnet18]\npretrained: false\nfreeze_depth: [all]\nlr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
                     "image_size: 32\nmax_epochs: 2\n")
    with tempfile.TemporaryDirectory(prefix="tlr") as ray_tmp:  # short: Ray's socket paths have a limit
        proc = cli(["run", str(data), "--study", "quiet", "--space", str(space), "--trials", "2", "--no-progress"],
                   cwd=tmp_path, module="reliability.stubcli", timeout=600, RAY_TMPDIR=ray_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr[-3000:]  # --no-progress: nothing at all while it runs
    assert not any(word in proc.stdout for word in RAY_NOISE[2:]), proc.stdout
    log = (tmp_path / "studies" / "quiet" / "tlsearch.log").read_text()
    assert "Started a local Ray" in log
    out = proc.stdout
    assert "2 trials: " in out and "next:" in out
    assert "tlsearch train reports/quiet/best.yaml data --out models/quiet" in out
    assert "tlsearch predict models/quiet data/val/" in out
    assert (tmp_path / "reports" / "quiet" / "index.html").is_file()
