"""Bad configs, spaces, durations, study names and output paths: exit 2 with one clear line.

Most cases call the CLI's `main` in-process (same code path as the command, without paying a
Python start-up per case); a few run `python -m search` to prove there is no traceback end to end.
Each runs in a fresh working folder, whose tree is checked afterwards: a refused command writes
nothing, and nothing ever lands outside studies/ and reports/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability._util import cli, clear_error, record_bad_input
from tests.conftest import make_image_folder


class _Proc:
    def __init__(self, rc: int, err: str) -> None:
        self.returncode, self.stderr = rc, err


def main_in(cwd: Path, args: list[str], capsys, monkeypatch) -> _Proc:  # noqa: ANN001
    from search.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    rc = main(args)
    return _Proc(rc, capsys.readouterr().err)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=3, size=16)
    return tmp_path


SPACES = {  # case -> (space YAML, words the error line must hold)
    "malformed YAML space": ("backbone: [resnet18\nlr: {low: 1}\nimage_size: 32\n", ["space.yaml:", "malformed YAML"]),
    "unknown key in space": ("backbone: resnet18\ncolour: [red, blue]\n", ["colour"]),
    "unknown backbone in space": ("backbone: [resnet18, resnet9000]\n", ["resnet9000", "resnet18", "resnet50"]),
    "inverted range": ("backbone: resnet18\nlr: {low: 1.0e-2, high: 1.0e-4, log: true}\n", ["lr"]),
    "freeze depth no backbone has": ("backbone: [resnet18]\nfreeze_depth: [99]\n", ["freeze_depth 99", "resnet18: 5"]),
}


@pytest.mark.parametrize("case", list(SPACES))
def test_bad_space(work: Path, case: str, capsys, monkeypatch) -> None:
    text, words = SPACES[case]
    (work / "space.yaml").write_text(text)
    before = tree(work)
    proc = main_in(work, ["run", "data", "--study", "s", "--space", "space.yaml", "--no-progress"], capsys, monkeypatch)
    clear_error(proc, *words, name=f"config: {case}")
    assert tree(work) == before


CONFIGS = {
    "malformed YAML config": ("backbone: resnet18\nlr: [0.1\nepochs: 1\n", ["tiny.yaml:", "malformed YAML"]),
    "unknown key in config": ("backbone: resnet18\nimage_size: 32\ncolour: red\n", ["colour", "valid keys"]),
    "unknown backbone in config": ("backbone: resnet9000\nimage_size: 32\npretrained: false\n", ["resnet9000", "resnet18"]),
    "bad value in config": ("backbone: resnet18\nimage_size: 32\nlr: -1\n", ["lr", "-1"]),
    "freeze depth the backbone lacks": ("backbone: resnet18\nfreeze_depth: 99\npretrained: false\n",
                                        ["freeze_depth", "99", "resnet18", "5"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_trial_config(work: Path, case: str, capsys, monkeypatch) -> None:
    text, words = CONFIGS[case]
    (work / "tiny.yaml").write_text(text)
    before = tree(work)
    proc = main_in(work, ["train", "tiny.yaml", "data"], capsys, monkeypatch)
    clear_error(proc, *words, name=f"config: {case}")
    assert tree(work) == before


@pytest.mark.parametrize("duration", ["10parsecs", "-5m", "0", "1e999h"])
def test_bad_duration(work: Path, duration: str, capsys, monkeypatch) -> None:
    proc = main_in(work, ["run", "data", "--study", "s", f"--time-budget={duration}", "--no-progress"], capsys, monkeypatch)
    clear_error(proc, "duration", name=f"config: --time-budget {duration}")


NAMES = {"slash": "a/b", "dotdot": "..", "escape": "../../etc/x", "absolute": "/tmp/tlsearch-hostile-study", "nul": "a\0b",
         "too long": "x" * 201, "empty": "", "dash": "-rf"}


@pytest.mark.parametrize("case", list(NAMES))
def test_hostile_study_name_refused_and_nothing_written(work: Path, case: str, capsys, monkeypatch) -> None:
    name = NAMES[case]
    before = tree(work)
    for args in (["run", "data", f"--study={name}", "--no-pretrained", "--no-progress"], ["resume", name],
                 ["show", name], ["report", name], ["export", name]):
        proc = main_in(work, args, capsys, monkeypatch)
        clear_error(proc, name=f"study name: {case} ({args[0]})")
    assert tree(work) == before
    assert not (work.parent / "etc").exists() and not Path("/tmp/tlsearch-hostile-study").exists()


def test_hostile_study_name_through_the_command(work: Path) -> None:
    """The same end to end: a real process, no traceback."""
    proc = cli(["run", "data", "--study", "../../evil", "--no-pretrained", "--no-progress"], cwd=work)
    clear_error(proc, "study name", name="study name: ../../evil (process)")
    assert tree(work) == {p for p in tree(work) if p.startswith("data/")}


@pytest.fixture()
def exported_study(work: Path) -> Path:
    """A study with one COMPLETE trial, made directly with Optuna (no search needed)."""
    import optuna

    from search.config import TrialConfig

    (work / "studies").mkdir()
    st = optuna.create_study(study_name="ex", storage=f"sqlite:///{work / 'studies' / 'ex.db'}", direction="maximize")
    t = st.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    t.set_user_attr("config", TrialConfig(image_size=32, pretrained=False).to_dict())
    st.tell(t, 0.9)
    return work


def test_export_into_a_new_folder_creates_it(exported_study: Path, capsys, monkeypatch) -> None:
    proc = main_in(exported_study, ["export", "ex", "--out", "new/deeper/best.yaml"], capsys, monkeypatch)
    assert proc.returncode == 0, proc.stderr
    assert (exported_study / "new" / "deeper" / "best.yaml").is_file()


@pytest.mark.parametrize("case", ["under a file", "onto a folder"])
def test_export_to_an_unwritable_path_is_one_line(exported_study: Path, case: str, capsys, monkeypatch) -> None:
    (exported_study / "afile").write_text("x")
    (exported_study / "adir").mkdir()
    out = "afile/best.yaml" if case == "under a file" else "adir"
    proc = main_in(exported_study, ["export", "ex", "--out", out], capsys, monkeypatch)
    clear_error(proc, out, name=f"export --out {case}")
    assert (exported_study / "afile").read_text() == "x"


def test_export_unknown_study_and_trial(exported_study: Path, capsys, monkeypatch) -> None:
    clear_error(main_in(exported_study, ["export", "nope"], capsys, monkeypatch), "nope", name="export: unknown study")
    clear_error(main_in(exported_study, ["export", "ex", "--trial", "7"], capsys, monkeypatch), "no trial 7",
                name="export: unknown trial")
