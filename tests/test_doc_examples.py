"""Every shell and Python block of README.md and docs/ runs, unless it is marked as not run.

A block is a fenced `bash`/`sh`/`shell` or `python` block. The line before a block that is not run
says why: `<!-- not run: REASON -->`. The runnable blocks of a page run in order, in one fresh
folder holding `my_images/` (a tiny generated ImageFolder with train/, val/ and test/), `tiny.yaml`
(a space of random-initialised ResNet-18s at 32 px) and the study `pets` searched on them; there
`tlsearch` is the real command with every trial's training replaced by `reliability.stubs`
(docs/contributing-docs.md tells writers the same).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL, PYTHON = {"bash", "sh", "shell"}, {"python", "py"}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->")
TINY_SPACE = """\
backbone: [resnet18]
pretrained: false
freeze_depth: [0, all]
augmentation: [none]
lr: {low: 1.0e-4, high: 1.0e-2, log: true}
image_size: 32
batch_size: 8
max_epochs: 2
"""
# Python blocks run with this first: `search.runner.run_search` gets the stand-in trials.
PRELUDE = "import reliability.stubcli  # noqa: F401 - every trial runs reliability.stubs\n"


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the reason, for a block that is not run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The shell and Python blocks of one markdown page, in order."""
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        lang = m.group(1).lower()
        if lang not in SHELL | PYTHON:
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = NOT_RUN.search(before)
        out.append(Block(page, text.count("\n", 0, m.start()) + 1, lang, m.group(2),
                         reason.group(1) if reason else None))
    return out


def _env(bin_dir: Path, home: Path) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "TLSEARCH_CACHE": str(home / "cache"), "OMP_NUM_THREADS": "2", "STUB_EPOCH_S": "0.05",
           "COLUMNS": "100", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def _run(block: Block, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    if block.lang in SHELL:
        args = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    else:
        args = [sys.executable, "-c", PRELUDE + block.code]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def doc_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the folder every page's examples run in, the `tlsearch` shim's folder)."""
    home = tmp_path_factory.mktemp("doc-examples")
    bin_dir = home / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "tlsearch"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m reliability.stubcli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    base = home / "base"
    make_image_folder(base / "my_images", splits=("train", "val", "test"), per_class=6, size=32)
    (base / "tiny.yaml").write_text(TINY_SPACE)
    out = subprocess.run([str(shim), "run", "my_images", "--study", "pets", "--space", "tiny.yaml",
                          "--trials", "3", "--no-progress"],
                         cwd=base, env=_env(bin_dir, home), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # The study records absolute paths (data, studies/, reports/): every page runs in `base`
    # itself, laid anew from this pristine copy first.
    shutil.copytree(base, home / "pristine", symlinks=True)
    return base, bin_dir


def test_every_block_runs_or_says_why_not() -> None:
    """A block that is not run gives a reason a reader can check; the rest run below."""
    every = [b for page in PAGES for b in blocks(page)]
    assert len(every) >= 20, "the docs lost their examples"
    vague = [b.where for b in every if b.not_run is not None and len(b.not_run.split()) < 3]
    assert not vague, f"a 'not run' needs a reason of a few words: {vague}"
    runnable = [b for b in every if b.not_run is None]
    assert len(runnable) >= 10, f"only {len(runnable)} runnable blocks"
    assert any(b.page.name == "README.md" for b in runnable), "the README has no runnable block"


def test_the_harness_reads_fences_and_marks() -> None:
    page = ROOT / "README.md"
    got = blocks(page)
    assert any(b.lang in SHELL for b in got) and all(b.page == page for b in got)
    assert any(b.not_run for b in got), "the README's install commands are marked as not run"


RUNNABLE_PAGES = [p for p in PAGES if any(b.not_run is None for b in blocks(p))]


@pytest.mark.ray
@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE_PAGES])
def test_page_examples_run(page: Path, doc_folder: tuple[Path, Path], tmp_path: Path) -> None:
    base, bin_dir = doc_folder
    shutil.rmtree(base)
    shutil.copytree(base.parent / "pristine", base, symlinks=True)
    work = base
    env = _env(bin_dir, tmp_path)
    for block in blocks(page):
        if block.not_run is not None:
            continue
        out = _run(block, work, env)
        assert out.returncode == 0, (f"{block.where}: exit {out.returncode}\n--- block\n{block.code}"
                                     f"--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}")
