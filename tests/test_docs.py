"""The documentation stays true: the command reference against `tlsearch COMMAND --help`, the
benchmark pages against benchmarks/results/, the space keys against the parser, the site's build."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ROOT / "docs" / "_hooks"


def _hook(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", HOOKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


cli_reference = _hook("cli_reference")
benchmarks = _hook("benchmarks")
COMMANDS = list(cli_reference.commands())


def _cli_help(*args: str) -> str:
    env = {**os.environ, "COLUMNS": cli_reference.COLUMNS, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "search", *args, "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _page_help(page: str, command: str) -> str:
    """The `--help` block of one command's section of the generated page."""
    m = re.search(rf'```text title="tlsearch {re.escape(command)} --help"\n(.*?)\n```', page, re.S)
    assert m, f"the reference has no --help block for {command}"
    return m.group(1)


def test_reference_lists_every_command_of_tlsearch_help() -> None:
    listed = _cli_help()
    page = cli_reference.page()
    assert len(COMMANDS) >= 15
    for name in COMMANDS:
        assert re.search(rf"^    {re.escape(name)}\s", listed, re.M), f"{name} is not in tlsearch --help"
        assert f"\n## {name}\n" in page, f"the reference has no section for {name}"
    sections = re.findall(r"^## (\S+)$", page, re.M)
    assert sections == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_reference_matches_command_help(command: str) -> None:
    """The page shows exactly what `tlsearch COMMAND --help` prints, and a row per option."""
    page = cli_reference.page()
    printed = _cli_help(command)
    assert _page_help(page, command) == printed.rstrip("\n")
    section = page.split(f"\n## {command}\n", 1)[1].split("\n## ", 1)[0]
    for option in sorted(set(re.findall(r"(?<![\w-])--[a-z][\w-]*", printed)) - {"--help"}):
        assert f"`{option}`" in section, f"{option} of tlsearch {command} has no row in the reference"


def test_reference_would_catch_a_drift() -> None:
    """The comparison fails when the page's text differs from the command's (a planted drift)."""
    page = cli_reference.page().replace("--study STUDY", "--study NAME", 1)
    assert _page_help(page, "run") != _cli_help("run").rstrip("\n")


def test_every_results_file_is_a_figure_with_its_provenance() -> None:
    results = sorted(p.stem for p in benchmarks.RESULTS.glob("*.json"))
    assert results, "no benchmark results"
    figures = [f for fs in benchmarks.figures().values() for f in fs]
    assert sorted(f.stem for f in figures) == results
    in_git = (ROOT / ".git").exists() and shutil.which("git")
    for f in figures:
        assert re.match(r"\d{4}-\d\d-\d\d", f.date), f"{f.stem}: no date ({f.date})"
        assert "CPUs" in f.machine and "not recorded" not in f.machine, f"{f.stem}: no machine"
        assert f.command.startswith("python -m benchmarks."), f"{f.stem}: no command"
        module = f.command.split()[2].removeprefix("benchmarks.")
        assert (ROOT / "benchmarks" / f"{module}.py").exists(), f"{f.stem}: {f.command} names no module"
        if in_git:
            assert re.fullmatch(r"[0-9a-f]{7,}|not committed yet", f.commit), f"{f.stem}: commit {f.commit}"
        assert f.table.strip(), f"{f.stem}: nothing to show"
    pages = benchmarks.pages()
    for f in figures:
        page = pages[f"benchmarks/{benchmarks.part_of(f.stem).slug}.md"]
        assert f"## {f.stem}\n" in page and f"`{f.command}`" in page and f.commit in page


def test_benchmark_figures_follow_their_results_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new results file, of a module the hook has never heard of, gets a page with its provenance."""
    (tmp_path / "zz-new.json").write_text(json.dumps({"finished": "2027-01-02 03:04", "machine": {"cpus": 8}}))
    (tmp_path / "zz-new.md").write_text("# zz\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    monkeypatch.setattr(benchmarks, "RESULTS", tmp_path)
    pages = benchmarks.pages()
    page = pages["benchmarks/zz.md"]
    assert "2027-01-02 03:04" in page and "8 CPUs" in page and "`python -m benchmarks.zz`" in page
    assert "| 1 | 2 |" in page and "[benchmarks/zz.py](zz.md)" in pages[benchmarks.INDEX]


def test_space_format_lists_every_key_the_parser_accepts() -> None:
    from search.space._params import VALID_KEYS

    text = (ROOT / "docs" / "reference" / "space-format.md").read_text(encoding="utf-8")
    table = set(re.findall(r"^\| `(\w+)` \|", text.split("## Keys", 1)[1], re.M))
    assert table == set(VALID_KEYS), f"missing {set(VALID_KEYS) - table}, extra {table - set(VALID_KEYS)}"


def test_readme_is_short_and_keeps_the_quickstart() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/python -m pytest -q"
    assert test_command in readme
    assert test_command.replace("pip install -e", "pip install -q -e") in ci, ".ci/run runs another test command"
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[demo]' && .venv/bin/tlsearch demo" in readme
    shot = ROOT / "docs" / "img" / "report.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size < 300 * 1024
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", readme):
        assert (ROOT / link).exists(), f"the README links to {link}, which is not there"


def test_site_builds_strictly_offline(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="needs the docs extra (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="needs mkdocs-material (the docs extra)")
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    for page in ("getting-started.html", "concepts/early-stopping.html", "guides/cluster.html",
                 "reference/cli.html", "reference/api.html", "reference/space-format.html",
                 "reference/exit-codes.html", "reference/files.html", "benchmarks/index.html",
                 "benchmarks/parity.html", "img/report.png"):
        assert (site / page).exists(), f"the site has no {page}"
    api = (site / "reference" / "api.html").read_text(encoding="utf-8")
    assert "run_search" in api and "Returns" in api, "the API page has no docstrings"
    external = re.compile(r"<(?:script|link)[^>]*(?:src|href)=\"(?:https?:)?//", re.I)
    remote = [p.relative_to(site).as_posix() for p in site.rglob("*.html") if external.search(p.read_text(encoding="utf-8"))]
    assert not remote, f"pages that load from the network: {remote}"
