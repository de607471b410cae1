"""kill -9 of everything, Ctrl-C once and twice, then resume: one study through the real CLI.

The chain runs `tlsearch` (trials swapped for `stubs.stub_trial`, see stubcli.py) in its own
process group and its own Ray, tagged through an environment variable so that every process it
started (raylet, GCS, workers) can be found and killed, and orphans can be counted:

1. `run`, kill -9 of the driver and every process it started once 2 trials finished;
2. `resume`, Ctrl-C once (SIGINT to the process group, as a terminal does): exit 130, message;
3. `resume`, Ctrl-C twice: exit 130 at once;
4. `resume` to the end: the count reached, nothing finished lost or changed, nothing RUNNING.

The dataset has a class named `<img src=x onerror=alert(1)>`; the final report is opened in
headless chromium to check that no element was injected.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import pytest

from reliability._util import FIGURES, env, kill_tagged, stderr_lines, tagged, wait_untagged
from tests.conftest import make_image_folder

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.ray
HOSTILE = "<img src=x onerror=alert(1)>"
STUDY = "chain"
TRIALS = 10
FIN = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _finished(trials: list) -> dict[int, tuple]:
    """Trials that count, as (state, value, intermediate values, error)."""
    return {
        t.number: (t.state, t.value, dict(t.intermediate_values), t.user_attrs.get("error"))
        for t in trials
        if t.state in FIN or (t.state == optuna.trial.TrialState.FAIL and not t.user_attrs.get("interrupted"))
    }


class Chain:
    """The study, its folder and what each step saw."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.data = make_image_folder(work / "data", classes=("ants", HOSTILE), per_class=4, size=24)
        (work / "space.yaml").write_text(
            "backbone: resnet18\nlr: {low: 1.0e-4, high: 1.0e-2, log: true}\nimage_size: 32\nmax_epochs: 3\n"
        )
        self.url = f"sqlite:///{work / 'studies' / (STUDY + '.db')}"
        self.ray_tmp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths live under it
        self.steps: dict[str, dict] = {}
        self.orphans: dict[str, list[str]] = {}

    def trials(self) -> list:
        try:
            return optuna.load_study(study_name=STUDY, storage=self.url).get_trials()
        except Exception:  # not created yet
            return []

    def start(self, args: list[str], tag: str) -> subprocess.Popen:
        e = env(self.work, TLREL_TAG=tag, STUB_EPOCH_S="0.7", RAY_TMPDIR=self.ray_tmp)
        return subprocess.Popen([sys.executable, "-m", "reliability.stubcli", *args, "--no-progress"],
                                cwd=self.work, env=e, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for(self, proc: subprocess.Popen, cond, timeout: float = 120) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if cond(self.trials()):
                return True
            time.sleep(0.4)
        return False


def _sigint_step(chain: Chain, name: str, presses: int) -> None:
    tag = uuid.uuid4().hex
    before = _finished(chain.trials())
    proc = chain.start(["resume", STUDY], tag)
    try:
        # Press once a trial of this run is RUNNING (after the reconcile) and one more has finished.
        went = chain.wait_for(proc, lambda ts: len(_finished(ts)) > len(before)
                              and any(t.state == optuna.trial.TrialState.RUNNING for t in ts))
        pressed = time.time()
        for _ in range(presses):
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.3)
        out, err = proc.communicate(timeout=120)
        took = time.time() - pressed
    finally:
        if proc.poll() is None:
            kill_tagged(tag)
            proc.wait(timeout=30)
    left = wait_untagged(tag, 30)
    chain.orphans[name] = [str(p) for p in left]
    kill_tagged(tag)
    chain.steps[name] = {"went": went, "rc": proc.returncode, "err": err, "took": took, "before": before,
                         "after": chain.trials()}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    c = Chain(tmp_path_factory.mktemp("chain"))
    run = ["run", str(c.data), "--study", STUDY, "--space", "space.yaml", "--trials", str(TRIALS),
           "--max-concurrent", "2", "--no-pretrained", "--no-cache"]

    # 1. kill -9 of the driver and every process it started, two trials in.
    tag = uuid.uuid4().hex
    proc = c.start(run, tag)
    try:
        went = c.wait_for(proc, lambda ts: len(_finished(ts)) >= 2, timeout=150)
        before = _finished(c.trials())
        running = sum(t.state == optuna.trial.TrialState.RUNNING for t in c.trials())
        killed = kill_tagged(tag)
        with contextlib.suppress(ProcessLookupError):  # gone already if the run ended early (see `went`)
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    c.steps["kill9"] = {"went": went, "rc": proc.returncode, "err": err, "before": before, "killed": killed,
                        "running_at_kill": running}
    c.orphans["kill9"] = [str(p) for p in wait_untagged(tag, 10)]

    # 2. and 3. Ctrl-C once, then twice.
    _sigint_step(c, "ctrl_c_once", 1)
    _sigint_step(c, "ctrl_c_twice", 2)

    # 4. resume to the end.
    tag = uuid.uuid4().hex
    proc = c.start(["resume", STUDY], tag)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            kill_tagged(tag)
            proc.wait(timeout=30)
    c.orphans["final"] = [str(p) for p in wait_untagged(tag, 30)]
    kill_tagged(tag)
    c.steps["final"] = {"rc": proc.returncode, "out": out, "err": err, "after": c.trials()}
    return c


def test_kill9_of_everything_then_resume(chain: Chain) -> None:
    k = chain.steps["kill9"]
    assert k["went"], f"the search did not get going: {k['err'][-3000:]}"
    assert k["rc"] == -signal.SIGKILL and k["killed"] >= 3  # driver, raylet, gcs at least
    # The first resume (Ctrl-C once) reconciled what the kill left RUNNING.
    after_resume = chain.steps["ctrl_c_once"]["before"]
    final = chain.steps["final"]["after"]
    lost = [n for n, v in k["before"].items() if _finished(final).get(n) != v]
    running = [t.number for t in final if t.state == optuna.trial.TrialState.RUNNING]
    FIGURES["lost"], FIGURES["left_running"] = len(lost), len(running)
    assert not lost and not running
    assert set(k["before"]) <= set(after_resume)
    assert chain.orphans["kill9"] == []


def test_resume_reaches_the_count(chain: Chain) -> None:
    from search.runner import SURPLUS

    f = chain.steps["final"]
    assert f["rc"] == 0, f["err"][-3000:]
    finished = _finished(f["after"])
    assert len(finished) == TRIALS, {t.number: (t.state.name, t.user_attrs.get("error")) for t in f["after"]}
    interrupted = [t for t in f["after"] if t.user_attrs.get("interrupted")]
    assert interrupted, "the stops interrupted no trial: the test did not stop a search mid-trial"
    for t in interrupted:  # each interrupted trial was tried again with the same params
        # Never started, so nothing to retry: the count was reached (SURPLUS), or the stop came between
        # Optuna's ask and the sampling of its params (no params: a later trial samples afresh).
        if t.user_attrs.get("error") == SURPLUS or not t.params:
            continue
        assert any(r.user_attrs.get("retry_of") == t.number and r.params == t.params for r in f["after"]), (
            t.number, t.params, t.user_attrs.get("error"),
            [(r.number, r.state.name, r.params, r.user_attrs.get("retry_of")) for r in f["after"]])
    assert "Traceback" not in f["err"]
    assert (chain.work / "reports" / STUDY / "index.html").is_file()
    assert (chain.work / "reports" / STUDY / "best.yaml").is_file()


@pytest.mark.parametrize("name", ["ctrl_c_once", "ctrl_c_twice"])
def test_ctrl_c_stops_cleanly_and_stays_resumable(chain: Chain, name: str) -> None:
    s = chain.steps[name]
    assert s["went"], s["err"][-3000:]
    assert s["rc"] == 130, (s["rc"], s["err"][-3000:])
    assert "Traceback" not in s["err"], s["err"][-3000:]
    assert f"tlsearch resume {STUDY}" in s["err"], s["err"][-2000:]
    assert s["took"] < (60 if name == "ctrl_c_once" else 20), s["took"]
    # Nothing finished before the stop changed; nothing stays RUNNING once the driver has exited.
    assert all(_finished(s["after"]).get(n) == v for n, v in s["before"].items())
    assert not [t.number for t in s["after"] if t.state == optuna.trial.TrialState.RUNNING]
    assert chain.orphans[name] == [], [*chain.orphans[name]]


def test_no_orphans_after_the_last_run(chain: Chain) -> None:
    assert chain.orphans["final"] == []


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install -y chromium) at /usr/bin/chromium")
def test_hostile_class_name_escaped_in_browser(chain: Chain, tmp_path: Path) -> None:
    from html.parser import HTMLParser

    from reliability._util import expect_bad_inputs, record_bad_input

    expect_bad_inputs("hostile class name in the report")
    page = chain.work / "reports" / STUDY / "index.html"
    html = page.read_text(encoding="utf-8")
    assert HOSTILE not in html  # never raw in the file

    class Dom(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.imgs: list[dict] = []
            self.text: list[str] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            if tag == "img":
                self.imgs.append(dict(attrs))

        def handle_data(self, data: str) -> None:
            self.text.append(data)

    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=8000", "--dump-dom", page.as_uri()]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "LANG": "C.UTF-8"})
    assert out.returncode == 0, out.stderr[-2000:]
    dom = Dom()
    dom.feed(out.stdout)
    injected = [i for i in dom.imgs if i.get("src") == "x" or "onerror" in i]
    record_bad_input("hostile class name in the report", not injected, injected)
    assert HOSTILE in "".join(dom.text) or HOSTILE in out.stdout.replace("&lt;", "<").replace("&gt;", ">")
