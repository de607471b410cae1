"""Helpers shared by the reliability tests: the CLI in a subprocess, process tags, the figures.

`FIGURES` collects what the closing note quotes; `conftest.pytest_terminal_summary` prints it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent

# What the closing note quotes. Bad inputs: name -> handled clearly (bool).
FIGURES: dict[str, Any] = {"bad_inputs": {}, "lost": None, "left_running": None, "payloads_executed": 0,
                           "payloads_tried": 0}


def expect_bad_inputs(*names: str) -> None:
    """Counts planted bad inputs in M before anything is tried: a case whose check never runs or
    fails stays counted as not handled."""
    for name in names:
        FIGURES["bad_inputs"].setdefault(name, False)


def record_bad_input(name: str, ok: bool, detail: object = "") -> None:
    """Asserts that one planted bad input was handled clearly; only then does it count in N.

    A name seen before counts as handled only when every check of it held.
    """
    cases = FIGURES["bad_inputs"]
    earlier = cases.get(name, True) if name in _CHECKED else True  # every earlier check of it held
    cases[name] = False
    _CHECKED.add(name)
    assert ok, f"{name}: not handled clearly {detail}"
    cases[name] = earlier


_CHECKED: set[str] = set()  # names whose check has run and held at least once


def env(tmp: Path, **extra: str) -> dict[str, str]:
    """An environment for a child `tlsearch`: this checkout importable, caches in tmp, few threads."""
    out = {**os.environ}
    out.pop("TLSEARCH_DEBUG", None)
    out.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]),
        TLSEARCH_CACHE=str(tmp / "cache"),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    out.update(extra)
    return out


def cli(args: list[str], *, cwd: Path, timeout: float = 300, module: str = "search", **extra: str) -> subprocess.CompletedProcess:
    """Runs `python -m search ARGS` (or another module) in cwd and captures its output."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env(cwd, **extra),
                          capture_output=True, text=True, timeout=timeout)


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def clear_error(proc: Any, *words: str, name: str | None = None) -> str:
    """Asserts exit 2 with exactly one error line on stderr (after any warnings naming files), no
    traceback, naming `words`; records the input."""
    err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode()
    lines = [line for line in stderr_lines(err) if not line.startswith("warning: ")]
    if name:
        expect_bad_inputs(name)
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith("tlsearch: error:"), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    if name:
        record_bad_input(name, True)  # every assertion above held
    return lines[0]


# ----- processes of one Ray session, found by a tag in their environment ---------------------------


def tagged(tag: str) -> list[int]:
    """Pids of live processes whose environment holds TLREL_TAG=tag (a driver, Ray and its workers)."""
    needle = f"TLREL_TAG={tag}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            environ = (d / "environ").read_bytes()
            status = (d / "status").read_text()
        except OSError:
            continue
        if "State:\tZ" in status:  # a zombie holds no resources; its parent reaps it
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(d.name))
    return pids


def kill_tagged(tag: str) -> int:
    """SIGKILLs every process of the tag; returns how many there were."""
    pids = tagged(tag)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def wait_untagged(tag: str, timeout: float = 30.0) -> list[int]:
    """Waits until no process of the tag is left; returns the ones still there at the timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = tagged(tag)
        if not left:
            return []
        time.sleep(0.5)
    return tagged(tag)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
