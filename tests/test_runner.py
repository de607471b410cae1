"""The search engine end to end through one shared local Ray session, on tiny data.

Most runs use `stub_trial`, a fast trial function with deterministic curves (so ASHA stops some
trials); one run goes through the real `fine_tune`. The kill -9 test runs a search in its own
process group with its own Ray instance, kills all of it, then resumes in-process.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from conftest import make_image_folder
from reliability.stubs import epoch_metrics
from search.config import TLSearchError
from search.settings import SearchSettings
from search.space import SearchSpace
from search.studies import get_storage

ray = pytest.importorskip("ray")
from search.runner import INTERRUPTED, MARKER, default_concurrency, finished_count, resume_search, run_search  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.ray
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FIN = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def stub_trial(config, index, *, report, checkpoint_path=None, **kwargs):
    """A fake trial: val_acc rises with the epoch, higher for lr near 1e-3; special backbones misbehave."""
    quality = max(0.05, 1.0 - abs(math.log10(config.lr) + 3.0) / 2.0)
    delay = float(os.environ.get("STUB_EPOCH_S", "0.05"))
    for epoch in range(1, config.epochs + 1):
        time.sleep(delay)
        if config.backbone == "efficientnet_b0" and epoch == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        acc = float("nan") if config.backbone == "mobilenet_v3_large" else quality * (1 - 0.5**epoch)
        if checkpoint_path:
            Path(checkpoint_path).write_bytes(b"ckpt")
        report(epoch_metrics(epoch, acc, seconds=delay, lr=config.lr))


def _settings(tmp: Path, data: Path, study: str, **kw) -> SearchSettings:
    base = dict(
        study=study, data=str(data), trials=6, cpus_per_trial=1.0, pretrained=False, cache=False,
        studies_dir=str(tmp / "studies"), reports_dir=str(tmp / "reports"), grace_period=1, reduction_factor=2,
    )
    base.update(kw)
    return SearchSettings(**base)


def _study(s: SearchSettings) -> optuna.Study:
    # A plain optuna.load_study, as `optuna trials` and optuna-dashboard open it.
    return optuna.load_study(study_name=s.study, storage=s.storage_url)


SPACE = {"backbone": "resnet18", "lr": {"low": 1e-5, "high": 1e-1, "log": True}, "image_size": 32, "max_epochs": 4}


def test_default_concurrency() -> None:
    assert default_concurrency(cpus=2, gpus=0, cpus_per_trial=1, gpus_per_trial=0) == 2
    assert default_concurrency(cpus=16, gpus=2, cpus_per_trial=2, gpus_per_trial=0.5) == 4
    assert default_concurrency(cpus=1, gpus=0, cpus_per_trial=4, gpus_per_trial=0) == 1


def test_asha_prunes_honestly(tmp_path: Path, ray_session) -> None:
    data = make_image_folder(tmp_path / "data")
    s = _settings(tmp_path, data, "asha", trials=8, space=SPACE, seed=1)
    summary = run_search(s, trial_fn=stub_trial, progress=True)
    st = _study(s)
    trials = st.get_trials()
    states = [t.state for t in trials]
    assert len(trials) == 8 and summary.finished == 8 and not summary.interrupted
    assert optuna.trial.TrialState.RUNNING not in states
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert complete and pruned, states
    for t in complete:
        assert t.user_attrs["epochs_run"] == 4 and sorted(t.intermediate_values) == [1, 2, 3, 4]
        assert t.value == pytest.approx(t.intermediate_values[4])
    for t in pruned:
        n = t.user_attrs["epochs_run"]
        assert 1 <= n < 4 and sorted(t.intermediate_values) == list(range(1, n + 1))
        assert [c["epoch"] for c in t.user_attrs["curve"]] == list(range(1, n + 1))
    t = max(complete, key=lambda t: t.value)  # the best: its checkpoint is always kept
    for key in ("config", "params_total", "params_trainable", "train_seconds", "images_per_s", "latency_ms",
                "node_id", "hostname", "worker", "started_at", "finished_at", "checkpoint", "curve",
                "confusion_matrix", "val_loss", "val_balanced_acc", "threads", "versions"):
        assert t.user_attrs.get(key) is not None, key
    assert t.user_attrs["threads"] == 1 and "torch" in t.user_attrs["versions"]
    assert t.user_attrs["config"]["epochs"] == 4 and "error" not in t.user_attrs
    assert Path(t.user_attrs["checkpoint"]).name == f"trial-{t.number}.pt"
    assert set(t.params) == {"lr", "lr_decay"}  # flat TrialConfig names; constants (a stated lr: backbone_lr_mult 1) are not params
    assert st.metric_names == ["val_acc"]
    attrs = st.user_attrs
    assert attrs["class_names"] == ["circle", "square", "triangle"] and attrs["dataset_fingerprint"]
    assert attrs["settings"]["study"] == "asha" and attrs["space"]["max_epochs"] == 4
    assert (s.experiment_dir / MARKER).is_file() and (s.experiment_dir / "settings.yaml").is_file()
    assert summary.best_value == pytest.approx(max(t.value for t in complete))
    assert summary.compute_seconds > 0

    # Running again with the count reached does nothing; a higher count adds only the difference.
    again = run_search(s.replace(trials=9), trial_fn=stub_trial, progress=False)
    assert again.trials_run == 1 and len(_study(s).trials) == 9


def test_failures_recorded_and_search_goes_on(tmp_path: Path, ray_session) -> None:
    data = make_image_folder(tmp_path / "data")
    space = {"backbone": ["resnet18", "efficientnet_b0", "mobilenet_v3_large"], "lr": [1e-3], "max_epochs": 3}
    s = _settings(tmp_path, data, "faults", trials=4, space=space, grace_period=3)
    st = optuna.create_study(study_name=s.study, storage=get_storage(s.storage_url), direction="maximize")
    for b in ("efficientnet_b0", "mobilenet_v3_large", "resnet18", "resnet18"):
        st.enqueue_trial({"backbone": b, "lr": 1e-3})
    summary = run_search(s, trial_fn=stub_trial, progress=False)
    trials = {t.number: t for t in _study(s).get_trials()}
    assert len(trials) == 4 and summary.finished == 4
    raised, nan = trials[0], trials[1]
    assert raised.state == optuna.trial.TrialState.FAIL
    assert "out of memory" in raised.user_attrs["error"] and raised.user_attrs["epochs_run"] == 1
    assert nan.state == optuna.trial.TrialState.FAIL and "not finite" in nan.user_attrs["error"]
    for t in (trials[2], trials[3]):
        assert t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["epochs_run"] == 3
    assert summary.best_trial in (2, 3) and math.isfinite(summary.best_value)


def test_refuses_changed_dataset_and_space(tmp_path: Path, ray_session) -> None:
    data = make_image_folder(tmp_path / "data")
    two = {**SPACE, "max_epochs": 1, "backbone": ["resnet18", "efficientnet_b0"]}
    s = _settings(tmp_path, data, "guard", trials=1, space=two)
    run_search(s, trial_fn=stub_trial, progress=False)
    with pytest.raises(TLSearchError, match="different dataset"):
        run_search(s.replace(data=str(make_image_folder(tmp_path / "other", seed=3))), trial_fn=stub_trial)
    with pytest.raises(TLSearchError, match="choices of backbone"):
        run_search(s, space=SearchSpace.from_dict({**two, "backbone": ["resnet18", "vgg16"]}))
    foreign = _settings(tmp_path, data, "foreign")
    foreign.experiment_dir.mkdir(parents=True)
    (foreign.experiment_dir / "x").write_text("not ours")
    with pytest.raises(TLSearchError, match="not created by tlsearch"):
        run_search(foreign, trial_fn=stub_trial)


_CHILD = """
import os, sys, tempfile, ray
sys.path[:0] = [{root!r}, {tests!r}]
from search.settings import SearchSettings
from search.runner import run_search
from test_runner import stub_trial
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir={temp!r})
s = SearchSettings(**{settings!r})
run_search(s, trial_fn=stub_trial, progress=False)
"""


def _kill_tree(pgid: int, marker: str) -> None:
    """SIGKILLs the driver's process group and every process whose command line names its Ray temp dir."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            cmd = (pid_dir / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_kill9_then_resume(tmp_path: Path, ray_session) -> None:
    data = make_image_folder(tmp_path / "data")
    s = _settings(tmp_path, data, "crash", trials=6, space={**SPACE, "max_epochs": 3}, max_concurrent=2, seed=2)
    temp = tempfile.mkdtemp(prefix="rk-", dir="/tmp")
    code = _CHILD.format(root=str(ROOT), tests=str(TESTS), temp=temp, settings=s.to_dict())
    env = {**os.environ, "STUB_EPOCH_S": "0.6", "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    before: dict[int, tuple] = {}
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if not (s.experiment_dir / MARKER).exists():  # the study's schema is made by then
                continue
            try:
                trials = _study(s).get_trials()
            except Exception:  # study not created yet
                continue
            done = [t for t in trials if t.state in FIN]
            if len(done) >= 2:
                before = {t.number: (t.state, t.value, dict(t.intermediate_values)) for t in done}
                break
    finally:
        _kill_tree(proc.pid, temp)
        proc.wait(timeout=30)
    assert before, f"the search did not get going: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL

    summary = resume_search(s.study, studies_dir=s.studies_dir, trial_fn=stub_trial, progress=False)
    trials = _study(s).get_trials()
    assert optuna.trial.TrialState.RUNNING not in [t.state for t in trials]
    for number, (state, value, iv) in before.items():  # nothing finished lost or changed
        t = trials[number]
        assert (t.state, t.value, dict(t.intermediate_values)) == (state, value, iv)
    assert finished_count(_study(s)) == 6 == summary.finished
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert interrupted, "the kill interrupted no trial, so nothing here was checked"
    for t in interrupted:  # each interrupted trial was retried with the same params
        assert t.user_attrs["error"] == INTERRUPTED
        assert any(r.user_attrs.get("retry_of") == t.number and r.params == t.params for r in trials)


def test_real_fine_tune(tmp_path: Path, ray_session) -> None:
    pytest.importorskip("search.trial")
    data = make_image_folder(tmp_path / "data", size=32)
    space = {"backbone": "resnet18", "freeze_depth": [0, "all"], "lr": {"low": 1e-3, "high": 1e-2, "log": True},
             "image_size": 32, "batch_size": 8, "max_epochs": 2}
    s = _settings(tmp_path, data, "real", trials=2, space=space)
    summary = run_search(s, progress=False)
    trials = _study(s).get_trials()
    assert summary.finished == 2, [t.user_attrs.get("error") for t in trials]
    for t in trials:
        assert t.state in FIN, t.user_attrs.get("error")
        assert t.user_attrs["params_total"] > 0
        if t.state == optuna.trial.TrialState.COMPLETE:  # one of the best 3 of its backbone
            assert Path(t.user_attrs["checkpoint"]).is_file()
        else:  # stopped by ASHA: its checkpoint went when it ended
            assert t.user_attrs["checkpoint"] is None and t.user_attrs["checkpoint_removed"]
        assert len(t.user_attrs["confusion_matrix"]) == 3


def test_asha_is_quiet_about_a_rung_of_failed_trials() -> None:
    import warnings
    from types import SimpleNamespace

    from search.runner import PruneTrackingASHA

    asha = PruneTrackingASHA(time_attr="training_iteration", metric="val_acc", mode="max", max_t=3,
                             grace_period=1, reduction_factor=2)
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(2)]
    for t in trials:
        asha.on_trial_add(None, t)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in trials:
            asha.on_trial_result(None, t, {"training_iteration": 1, "val_acc": float("nan")})
        asha.on_trial_complete(None, trials[0], {"training_iteration": 1, "val_acc": float("nan")})
    assert not [w for w in caught if "NaN" in str(w.message)], [str(w.message) for w in caught]


# ----- the outcome of a trial, decided without Ray --------------------------------------------------


@pytest.mark.parametrize(("kw", "expected"), [
    (dict(values=[0.5, 0.6, 0.7]), ("COMPLETE", None, False)),
    (dict(values=[0.5], asha_stopped=True), ("PRUNED", None, False)),
    (dict(values=[0.5], asha_stopped=True, stopped_by_driver=True), ("FAIL", INTERRUPTED, True)),
    (dict(values=[0.5]), ("FAIL", INTERRUPTED, True)),  # cut short, not by ASHA: the time budget, Ctrl-C
    (dict(values=[], asha_stopped=True), ("FAIL", INTERRUPTED, True)),  # nothing reported
    (dict(values=[0.5], error="RuntimeError: boom"), ("FAIL", "RuntimeError: boom", False)),
    (dict(values=[0.5, float("nan")], asha_stopped=True), ("FAIL", "val_acc is not finite (nan)", False)),
    (dict(values=[0.5, 0.6, 0.7], worker_died=True), ("FAIL", "trial worker died (killed, or out of memory)", False)),
    # Cut by the time budget: stopped early, not failed, after an epoch and before any epoch
    # (that one does not count, and runs again on resume).
    (dict(values=[0.5], stopped_by_driver=True, budget_cut=True), ("PRUNED", None, False)),
    (dict(values=[], stopped_by_driver=True, budget_cut=True), ("PRUNED", None, False)),
    (dict(values=[0.5], error="RuntimeError: boom", budget_cut=True), ("FAIL", "RuntimeError: boom", False)),
])
def test_trial_outcome(kw: dict, expected: tuple) -> None:
    from search.runner import trial_outcome

    args = dict(epochs_planned=3, error=None, worker_died=False, asha_stopped=False, stopped_by_driver=False)
    state, error, interrupted = trial_outcome(**{**args, **kw})
    assert (state.name, error, interrupted) == expected


@pytest.mark.shared
def test_relative_weights_dir_then_resume_from_another_folder(tmp_path: Path, ray_session, shared_dir: Path,
                                                              monkeypatch) -> None:
    """Paths are resolved once, in the driver: a resume from elsewhere means the same weights file."""
    import shutil

    from search.backbones import weights_file_id

    data = make_image_folder(tmp_path / "data", size=32)
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "w").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copy(shared_dir / "weights" / "tf_efficientnet_lite0.pth", work / "w")
    space = {"backbone": "timm/tf_efficientnet_lite0", "freeze_depth": "all", "augmentation": "none",
             "lr": {"low": 1e-3, "high": 1e-2, "log": True}, "image_size": 64, "batch_size": 8, "max_epochs": 1}
    monkeypatch.chdir(work)
    s = SearchSettings(study="rel", data=str(data), trials=2, weights_dir="w", space=space, studies_dir="studies",
                       reports_dir="reports", cache_dir=str(tmp_path / "cache"), warm_start=False)
    run_search(s, progress=False)
    monkeypatch.chdir(elsewhere)
    summary = resume_search("rel", studies_dir=str(work / "studies"), trials=4, progress=False)
    trials = optuna.load_study(study_name="rel", storage=f"sqlite:///{work / 'studies' / 'rel.db'}").get_trials()
    assert summary.finished == 4 and [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4, \
        [t.user_attrs.get("error") for t in trials]
    expected = weights_file_id(work / "w" / "tf_efficientnet_lite0.pth")
    assert expected.startswith("sha256:05796415d9bca55f")
    assert {t.user_attrs["weights_id"] for t in trials} == {expected}
    assert not (elsewhere / "w").exists() and not (elsewhere / "studies").exists()


def _checkpoint_file(s: SearchSettings, t: optuna.trial.FrozenTrial) -> Path:
    return s.experiment_dir / "checkpoints" / f"trial-{t.number}.pt"


def test_checkpoints_kept_only_for_the_best_per_backbone(tmp_path: Path, ray_session) -> None:
    from search import disk

    data = make_image_folder(tmp_path / "data")
    space = {**SPACE, "backbone": ["resnet18", "resnet50", "mobilenet_v3_large"]}  # mobilenet: NaN, so FAIL at once
    s = _settings(tmp_path, data, "bounded", trials=10, space=space, seed=3, keep_checkpoints=1)
    # Temporary files a kill -9 left: one of a dead writer, one being written by a live process.
    folder = s.experiment_dir / "checkpoints"
    folder.mkdir(parents=True)
    (s.experiment_dir / MARKER).write_text("")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = folder / f"trial-90.pt.{dead.pid}.tmp", folder / f"trial-91.pt.{os.getpid()}.tmp"
    for p in (stale, live):
        p.write_bytes(b"partial")
    os.utime(stale, (time.time() - 300,) * 2)

    run_search(s, trial_fn=stub_trial, progress=False)
    st = _study(s)
    trials = st.get_trials()
    states = {t.number: t.state for t in trials}
    assert optuna.trial.TrialState.PRUNED in states.values() and optuna.trial.TrialState.FAIL in states.values()
    on_study = disk.removed_on_study(st.user_attrs)
    best: dict[str, tuple[float, int]] = {}
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            b = t.params["backbone"]
            best[b] = min(best.get(b, (math.inf, 0)), (-t.value, t.number))
    keep = {number for _, number in best.values()}
    for t in trials:
        kept = _checkpoint_file(s, t).exists()
        assert kept == (t.number in keep), (t.number, t.state, t.value, t.params)
        if t.number in keep:
            assert t.user_attrs["checkpoint"] == str(_checkpoint_file(s, t))
        else:  # recorded as removed: on the trial when it went at the trial's end, else on the study
            own = t.user_attrs.get("checkpoint") is None and t.user_attrs.get("checkpoint_removed")
            assert own or t.number in on_study
    assert not stale.exists() and live.exists()



def test_driver_removes_ended_trials_checkpoints_and_keeps_an_interrupted_one_until_its_retry_ends(
        tmp_path: Path) -> None:
    """The searcher's decisions at each trial's end, driven by hand (no Ray session needed)."""
    from search import disk
    from search.runner import HonestOptunaSearch, _Tally

    space = SearchSpace.from_dict({"backbone": "resnet18", "lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                   "max_epochs": 3})
    storage = get_storage(f"sqlite:///{tmp_path / 's.db'}")
    stopped: set = set()
    searcher = HonestOptunaSearch(space, metric="val_acc", mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
                                  study_name="s", storage=storage, asha_stopped=stopped, tally=_Tally(),
                                  keep_checkpoints=1)

    def run(trial_id: str, epochs: int, acc: float, *, error: str | None = None) -> Path:
        number = searcher.suggest(trial_id)["_trial_number"]
        path = tmp_path / f"trial-{number}.pt"
        path.write_bytes(b"ckpt")
        for epoch in range(1, epochs + 1):
            metrics = epoch_metrics(epoch, acc, seconds=0.1, lr=1e-3)
            searcher.on_trial_result(trial_id, {**metrics, "checkpoint": str(path)})
        if error:
            searcher.on_trial_result(trial_id, {"val_acc": float("nan"), "epoch": epochs, "error": error,
                                                "checkpoint": str(path)})
        return path

    good = run("good", 3, 0.9)
    searcher.on_trial_complete("good")
    worse = run("worse", 3, 0.5)
    searcher.on_trial_complete("worse")
    pruned = run("pruned", 1, 0.2)
    stopped.add("pruned")
    searcher.on_trial_complete("pruned")
    failed = run("failed", 1, 0.2, error="RuntimeError: boom")
    searcher.on_trial_complete("failed")
    cut = run("cut", 2, 0.8)
    assert searcher.finish_leftovers() == 1  # the time budget ran out under it

    study = optuna.load_study(study_name="s", storage=storage)
    by_number = {t.number: t for t in study.get_trials()}
    states = [by_number[n].state.name for n in range(5)]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL", "FAIL"] and by_number[4].user_attrs["interrupted"]
    assert good.exists() and cut.exists()
    assert not any(p.exists() for p in (worse, pruned, failed))
    for n in (1, 2, 3):  # each went at its own end: its record says so
        assert by_number[n].user_attrs["checkpoint"] is None and by_number[n].user_attrs["checkpoint_removed"]
    assert by_number[4].user_attrs["checkpoint"] == str(cut)

    retry = run("retry", 3, 0.7)  # the enqueued retry of the interrupted trial
    assert optuna.load_study(study_name="s", storage=storage).trials[5].user_attrs["retry_of"] == 4
    searcher.on_trial_complete("retry")
    assert not cut.exists() and not retry.exists() and good.exists()
    assert disk.removed_on_study(optuna.load_study(study_name="s", storage=storage).user_attrs) == {4}


# ----- budget-aware scheduling ----------------------------------------------------------------------


def test_fits_budget_and_epoch_time_estimates() -> None:
    from search.runner._ledger import EpochTimes, fits_budget, timing_key

    assert fits_budget(None, 5.0)  # no estimate yet: it starts
    assert fits_budget(30.0, None)  # no budget
    assert fits_budget(30.0, 30.0) and not fits_budget(30.1, 30.0)
    times = EpochTimes()
    key = timing_key({"backbone": "resnet18", "freeze_depth": 0, "image_size": 64, "augmentation": "flip"})
    assert times.estimate(key, 4) is None
    times.add_epoch(key, 2.0)
    times.add_epoch(key, 4.0)
    times.add_startup(key, 5.0)
    assert times.estimate(key, 4) == pytest.approx(5.0 + 4 * 3.0)
    other = timing_key({"backbone": "resnet18", "freeze_depth": "all", "image_size": 64, "augmentation": "flip"})
    assert times.estimate(other, 4) is None  # another freeze depth is not alike
    times.add_startup(key, 45.0)  # the first trial of a kind built the caches: a one-off
    assert times.estimate(key, 4) == pytest.approx(5.0 + 4 * 3.0)
    base = {"backbone": "resnet18", "freeze_depth": "all", "image_size": 64, "augmentation": "none", "batch_size": 32}
    # Un-augmented but mixed images are not cached features; another batch size is another speed.
    assert timing_key(base) != timing_key({**base, "mixup_alpha": 0.2})
    assert timing_key(base) != timing_key({**base, "batch_size": 64})
    assert timing_key(base) == timing_key({**base, "mixup_alpha": 0.0})


def _searcher(tmp_path: Path, space: SearchSpace, deadline: float | None):
    from search.runner._ledger import _Tally
    from search.runner._search import HonestOptunaSearch

    storage = get_storage(f"sqlite:///{tmp_path / 's.db'}")
    optuna.create_study(study_name="s", storage=storage, direction="maximize")
    return HonestOptunaSearch(
        space, metric="val_acc", mode="max", sampler=optuna.samplers.RandomSampler(seed=0), study_name="s",
        storage=storage, asha_stopped=set(), tally=_Tally(), driver="d", target=10, deadline=deadline,
    )


def test_no_trial_starts_when_its_estimate_exceeds_the_time_left(tmp_path: Path) -> None:
    from search.runner._ledger import NOT_STARTED, timing_key

    space = SearchSpace.from_dict({"backbone": "resnet18", "freeze_depth": 0, "lr": {"low": 1e-4, "high": 1e-2},
                                   "image_size": 32, "max_epochs": 4})
    searcher = _searcher(tmp_path, space, deadline=time.time() + 10.0)
    assert isinstance(searcher.suggest("a"), dict)  # nothing measured yet: it starts
    key = timing_key(space.to_trial_config({}).to_dict())
    searcher._times.add_epoch(key, 5.0)  # 4 epochs x 5 s > the 10 s left
    assert searcher.suggest("b") is None
    study = optuna.load_study(study_name="s", storage=searcher._ot_study._storage)
    skipped = study.trials[-1]
    assert skipped.state == optuna.trial.TrialState.FAIL and skipped.user_attrs["error"].startswith(NOT_STARTED)
    assert skipped.user_attrs["interrupted"] and finished_count(study) == 0  # not counted, not retried
    from search.studies import leaderboard, state_counts

    # What a user reads leaves the refused draw out: no FAIL row, no failure counted.
    assert skipped.number not in set(leaderboard(study)["trial"]) and state_counts(study.trials)["FAIL"] == 0
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    for i in range(searcher.MAX_SKIPS - 1):
        searcher.suggest(f"c{i}")
    assert searcher.suggest("d") == searcher.FINISHED  # nothing alike fits any more
    roomy = _searcher(tmp_path / "r", space, deadline=time.time() + 100.0)
    roomy._times.add_epoch(key, 5.0)  # 20 s fit in 100 s
    assert isinstance(roomy.suggest("a"), dict)


def slow_trial(config, index, *, report, checkpoint_path=None, resume_from=None, start_epoch=0, **kwargs):
    """Two quick epochs, then one that never ends (the budget cuts it); a continuation runs to the end.

    Its checkpoint is the epoch it reached, and a continuation checks it starts from there.
    """
    if resume_from:
        assert int(Path(resume_from).read_text()) == start_epoch
    for epoch in range(start_epoch + 1, config.epochs + 1):
        if not resume_from and epoch > 2 and checkpoint_path:
            (Path(checkpoint_path).parent / STALLED).write_text("")  # `BudgetClock` ends the budget now
        time.sleep(0.2 if resume_from or epoch <= 2 else 3600)
        if checkpoint_path:
            Path(checkpoint_path).write_text(str(epoch))
        report(epoch_metrics(epoch, 0.1 * epoch, seconds=0.2, lr=config.lr))


STALLED = "stalled"  # written beside its checkpoint by a trial that has begun its never-ending epoch


class BudgetClock:
    """The driver's clock for a budget test: the real one until a trial writes `STALLED` in
    `folder`, then `jump_s` later, so that the time budget ends just then, however long the
    machine took to get there (a loaded machine starts Ray's workers slowly).

    It stands in for the `time` module where the budget is read: Tune's timeout stopper and the
    runner's deadline; everything else is the real module's.
    """

    def __init__(self, folder: Path, *, jump_s: float) -> None:
        self._folder, self._jump_s, self._jumped = folder, jump_s, False

    def time(self) -> float:
        if not self._jumped:
            self._jumped = (self._folder / STALLED).exists()
        return time.time() + (self._jump_s if self._jumped else 0.0)

    def __getattr__(self, name: str):
        return getattr(time, name)


def _budget_clock(monkeypatch: pytest.MonkeyPatch, folder: Path, *, jump_s: float) -> BudgetClock:
    import ray.tune.stopper.timeout as tune_timeout

    import search.runner._run as run_module
    import search.runner._search as search_module

    clock = BudgetClock(folder, jump_s=jump_s)
    for module in (tune_timeout, run_module, search_module):
        monkeypatch.setattr(module, "time", clock)
    return clock


def test_a_trial_cut_by_the_budget_is_pruned_with_its_epochs_and_resume_continues_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_session) -> None:
    data = make_image_folder(tmp_path / "data")
    space = dict(SPACE, max_epochs=6, lr=1e-3)
    # The trial's third epoch never ends; the budget ends once it has begun (the test's clock jumps
    # past the budget then), not after a number of seconds a loaded machine may not reach it in.
    budget = 1800.0
    s = _settings(tmp_path, data, "cut", trials=2, space=space, time_budget_s=budget, max_concurrent=1,
                  warm_start=False)
    with monkeypatch.context() as m:
        clock = _budget_clock(m, s.experiment_dir / "checkpoints", jump_s=budget + 1)
        summary = run_search(s, trial_fn=slow_trial, progress=False)
    assert clock._jumped and summary.budget_reached
    cut = [t for t in _study(s).trials if t.user_attrs.get("stopped_by") == "time budget"]
    assert len(cut) == 1, [(t.state, t.user_attrs.get("error"), t.intermediate_values) for t in _study(s).trials]
    t = cut[0]
    n = t.user_attrs["epochs_run"]
    assert t.state == optuna.trial.TrialState.PRUNED and n == 2  # stopped early, not failed
    assert sorted(t.intermediate_values) == list(range(1, n + 1))  # its per-epoch values are kept
    assert [c["epoch"] for c in t.user_attrs["curve"]] == list(range(1, n + 1))
    assert not t.user_attrs.get("interrupted") and "error" not in t.user_attrs
    assert Path(t.user_attrs["checkpoint"]).read_text() == str(n)  # its checkpoint is kept
    assert finished_count(_study(s)) == 1  # it counts toward --trials
    assert not [w for w in _study(s).trials if w.state == optuna.trial.TrialState.WAITING]  # not re-enqueued

    from search.studies import leaderboard

    row = leaderboard(_study(s)).set_index("trial").loc[t.number]
    assert row["state"] == "PRUNED" and row["epochs_run"] == n

    # resume continues it from its checkpoint, as a new trial that records which one it continues.
    resume_search("cut", studies_dir=str(tmp_path / "studies"), trial_fn=slow_trial, progress=False,
                  time_budget_s=budget)  # it ends by its count: the continuation is the trial still missing
    st = _study(s)
    cont = [c for c in st.trials if c.user_attrs.get("continues") == t.number]
    assert len(cont) == 1 and cont[0].state == optuna.trial.TrialState.COMPLETE
    assert sorted(cont[0].intermediate_values) == list(range(1, 7)) and cont[0].params == t.params
    assert Path(cont[0].user_attrs["checkpoint"]).read_text() == "6"


def stalling_trial(config, index, *, report, checkpoint_path=None, resume_from=None, start_epoch=0, **kwargs):
    """`slow_trial` whose never-ending epoch is the number in `stall-at` beside the checkpoints (no
    file: none), and which notes each start there, in `starts`, as "trial-N <start epoch>".

    It reports 20 s epochs, so that a continuation's four epochs do not fit in a 30 s budget.
    """
    folder = Path(checkpoint_path).parent
    with open(folder / "starts", "a") as f:
        f.write(f"{Path(checkpoint_path).stem} {start_epoch}\n")
    stall = int((folder / "stall-at").read_text()) if (folder / "stall-at").exists() else None
    if resume_from:
        assert int(Path(resume_from).read_text()) == start_epoch
    for epoch in range(start_epoch + 1, config.epochs + 1):
        time.sleep(3600 if epoch == stall else 0.2)
        Path(checkpoint_path).write_text(str(epoch))
        report(epoch_metrics(epoch, 0.1 * epoch, seconds=20.0, lr=config.lr))


def test_a_budget_cut_trial_is_continued_from_its_checkpoint_after_a_refused_and_an_interrupted_continuation(
        tmp_path: Path, ray_session) -> None:
    data = make_image_folder(tmp_path / "data")
    s = _settings(tmp_path, data, "recut", trials=2, space=dict(SPACE, max_epochs=6), time_budget_s=30.0,
                  max_concurrent=1, warm_start=False)
    folder = s.experiment_dir / "checkpoints"
    folder.mkdir(parents=True)
    (s.experiment_dir / MARKER).write_text("")
    (folder / "stall-at").write_text("3")
    run_search(s, trial_fn=stalling_trial, progress=False)
    [cut] = [t for t in _study(s).trials if t.user_attrs.get("stopped_by") == "time budget"]
    checkpoint = Path(cut.user_attrs["checkpoint"])
    assert cut.state == optuna.trial.TrialState.PRUNED and checkpoint.read_text() == "2"

    def resume(**overrides) -> list:
        resume_search("recut", studies_dir=str(tmp_path / "studies"), trial_fn=stalling_trial, progress=False,
                      **overrides)
        return [t for t in _study(s).trials if t.user_attrs.get("continues") == cut.number]

    # 1. Its continuation needs ~80 s (four 20 s epochs), 30 s are left: it is not started, and
    #    waits for the next resume as the continuation it is (once).
    conts = resume(time_budget_s=30.0)
    [refused] = [t for t in conts if t.user_attrs.get("not_started")]
    assert checkpoint.read_text() == "2"
    assert [t.state for t in conts if t.number != refused.number] == [optuna.trial.TrialState.WAITING]
    # 2. That continuation is interrupted in its first epoch (the budget ends; not budget-aware:
    #    every trial starts, and one cut short is interrupted); no second one was added.
    conts = resume(time_budget_s=20.0, budget_aware=False)
    # the refused one, the interrupted one, and the retry of that (waiting): one line of continuations
    assert [t.state.name for t in conts] == ["FAIL", "FAIL", "WAITING"], [(t.number, t.state.name) for t in conts]
    [interrupted] = [t for t in conts if t.number != refused.number and t.state == optuna.trial.TrialState.FAIL]
    assert interrupted.user_attrs["interrupted"] and not interrupted.user_attrs.get("not_started")
    assert checkpoint.read_text() == "2"  # kept for the next try
    # 3. Its retry continues the budget-cut trial from that checkpoint, to the end.
    (folder / "stall-at").unlink()
    [retry] = [t for t in resume(time_budget_s=300.0, budget_aware=True)
               if t.user_attrs.get("retry_of") == interrupted.number]
    assert retry.state == optuna.trial.TrialState.COMPLETE, [(t.number, t.state.name, t.user_attrs.get("error"))
                                                             for t in _study(s).trials]
    assert sorted(retry.intermediate_values) == list(range(1, 7)) and retry.params == cut.params
    starts = dict(line.split() for line in (folder / "starts").read_text().splitlines())
    assert starts[f"trial-{interrupted.number}"] == "2" and starts[f"trial-{retry.number}"] == "2", starts
    assert not checkpoint.exists()  # replaced by a trial that ran to its end: gone now


# ----- Ctrl-C and resume (no Ray: the run is replaced where the test says) -------------------------


def _raised(error: BaseException, *, cause: BaseException | None = None, during: BaseException | None = None):
    """`error` as Python leaves it when raised from `cause`, or while `during` was handled."""
    try:
        try:
            if during is not None:
                raise during
        except BaseException:
            raise error from cause
        raise error from cause
    except BaseException as e:
        return e


def test_is_interruption() -> None:
    from optuna.exceptions import StorageInternalError

    from search.outputs import is_interruption

    ki = KeyboardInterrupt()
    assert is_interruption(KeyboardInterrupt())
    assert is_interruption(_raised(StorageInternalError("commit"), cause=ki))
    assert is_interruption(_raised(StorageInternalError("database is locked"), during=ki))
    deeper = _raised(RuntimeError("teardown"), cause=_raised(StorageInternalError("commit"), cause=ki))
    assert is_interruption(deeper)
    assert not is_interruption(_raised(StorageInternalError("commit"), cause=ValueError("too long")))
    assert not is_interruption(RuntimeError("boom"))


@pytest.mark.parametrize("where", ["in the run", "in the reconcile after it"])
def test_a_storage_write_cut_short_by_ctrl_c_ends_as_an_interruption(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], where: str) -> None:
    """The second Ctrl-C lands in a commit: the storage error it causes there, or in the next write
    (SQLite locked by the cut one), is an interruption: exit 130 and how to continue, no traceback."""
    from optuna.exceptions import StorageInternalError

    from search import cli
    from search.runner import _run

    stopping = []

    def tune(*args, **kwargs):
        stopping.append(True)
        if where == "in the run":
            raise _raised(StorageInternalError("An exception is raised during the commit."), cause=KeyboardInterrupt())
        raise KeyboardInterrupt

    real_reconcile = _run.reconcile

    def reconcile(study, **kw):
        if stopping and where != "in the run":
            raise StorageInternalError("An exception is raised during the commit.")  # database is locked
        return real_reconcile(study, **kw)

    monkeypatch.setattr(_run, "_tune", tune)
    monkeypatch.setattr(_run, "reconcile", reconcile)
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data")
    (tmp_path / "space.yaml").write_text("backbone: resnet18\nlr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    rc = cli.main(["run", str(data), "--study", "cc", "--space", "space.yaml", "--trials", "2",
                   "--no-pretrained", "--no-cache", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 130, err
    assert "interrupted; continue with: tlsearch resume cc" in err and "Traceback" not in err and "failed" not in err
    assert stopping  # it was stopped where the test says, not before
    study = optuna.load_study(study_name="cc", storage=f"sqlite:///{tmp_path / 'studies' / 'cc.db'}")
    assert study.user_attrs["settings"]["study"] == "cc"  # resumable: settings stored


def test_resume_keeps_the_schedule_of_a_study_stored_before_the_fine_tuning_priors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from search.runner import _run

    priors = ("backbone_lr_mult", "lr_decay", "warmup_epochs")
    data = make_image_folder(tmp_path / "data")
    space = {"backbone": "resnet18", "freeze_depth": [0, "all"], "lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    ran: list[SearchSettings] = []
    monkeypatch.setattr(_run, "run_search", lambda settings, **kw: ran.append(settings.resolve()))
    for name, stored_space in (("old", space), ("new", None)):
        s = _settings(tmp_path, data, name, space=space).resolve()
        stored = s.to_dict()
        if stored_space is not None:  # as a version before the priors stored it
            stored["space"] = dict(stored_space, max_epochs=s.space.max_epochs)
            assert not set(priors) & set(stored["space"])
        s.experiment_dir.mkdir(parents=True)
        (s.experiment_dir / MARKER).write_text("")
        study = optuna.create_study(study_name=name, storage=s.storage_url, direction="maximize")
        study.set_user_attr("settings", stored)
        resume_search(name, studies_dir=str(tmp_path / "studies"), progress=False)
    old, new = (r.space.param_dict for r in ran)
    fine_tune = {"backbone": "resnet18", "freeze_depth": 0}
    cfg = ran[0].space.to_trial_config(fine_tune)
    assert (cfg.backbone_lr_mult, cfg.lr_decay, cfg.warmup_epochs) == (1.0, 1.0, 0.0)  # one rate, as it ran
    assert all(not hasattr(old[k], "low") for k in priors)  # nothing drawn
    assert hasattr(new["lr_decay"], "low")  # a study made since keeps its priors
    assert new["backbone_lr_mult"].value == 1.0  # (the space states lr: every layer's rate)


def f1_stub(config, index, *, report, checkpoint_path=None, **kwargs):
    """A fake trial whose macro-F1 and accuracy disagree: the larger the lr, the higher the F1 and the lower val_acc."""
    from search.metrics import per_class_table

    f1 = min(0.95, 0.2 + 0.1 * math.log10(config.lr / 1e-5))
    for epoch in range(1, config.epochs + 1):
        m = epoch_metrics(epoch, 1.0 - f1, seconds=0.01, lr=config.lr)
        confusion = [[8, 0], [3, 1]] if f1 < 0.5 else [[6, 2], [1, 3]]
        m.update(val_macro_f1=f1 * (1 - 0.5**epoch), confusion_matrix=confusion,
                 per_class=per_class_table(confusion, index.classes))
        report(m)


def test_metric_choice_ranks_records_and_imbalance_joins_the_default_space(tmp_path: Path, ray_session) -> None:
    # 12 circles, 3 squares in train: the default space adds the imbalance dimensions.
    data = make_image_folder(tmp_path / "data", classes=("circle", "square"), per_class=12)
    for p in sorted((data / "train" / "square").iterdir())[3:]:
        p.unlink()
    s = _settings(tmp_path, data, "f1", trials=4, metric="val_macro_f1", seed=2, warm_start=False,
                  max_epochs=2, grace_period=2)
    assert s.mode == "max"
    summary = run_search(s, trial_fn=f1_stub, progress=False)
    st = _study(s)
    assert st.metric_names == ["val_macro_f1"] and st.user_attrs["settings"]["metric"] == "val_macro_f1"
    space = st.user_attrs["space"]
    assert space["loss_weighting"] == ["none", "inverse_sqrt", "inverse_frequency"]
    assert space["balanced_sampler"] == [False, True]
    complete = [t for t in st.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    for t in complete:
        assert {"loss_weighting", "balanced_sampler"} <= set(t.params)
        curve = t.user_attrs["curve"]
        # The objective is the intermediate values; every metric is in the curve.
        assert [t.intermediate_values[c["epoch"]] for c in curve] == pytest.approx([c["val_macro_f1"] for c in curve])
        assert all({"val_acc", "val_loss", "val_balanced_acc", "val_macro_f1"} <= set(c) for c in curve)
        assert t.value == pytest.approx(curve[-1]["val_macro_f1"])
        assert [r["class"] for r in t.user_attrs["per_class"]] == ["circle", "square"]
        assert t.user_attrs["val_macro_f1"] == pytest.approx(t.value)
    best = max(complete, key=lambda t: t.value)
    assert summary.best_trial == best.number and st.best_trial.number == best.number
    # The same study cannot go on ranking by another metric.
    with pytest.raises(TLSearchError, match="ranks trials by val_macro_f1, not val_acc"):
        run_search(s.replace(metric="val_acc", trials=5), trial_fn=f1_stub, progress=False)


def heavy_trial(config, index, *, report, checkpoint_path=None, **kwargs):
    """A fast trial that reports long epochs (40 s each): what the budget's estimates learn from."""
    for epoch in range(1, config.epochs + 1):
        time.sleep(0.05)
        report(epoch_metrics(epoch, 0.5, seconds=40.0, lr=config.lr))


def test_a_budget_run_with_no_room_for_another_trial_ends_as_a_budget_run(
        tmp_path: Path, ray_session, capsys: pytest.CaptureFixture[str]) -> None:
    from search.outputs import EXIT_OK, after_search

    data = make_image_folder(tmp_path / "data")
    space = dict(SPACE, max_epochs=3, freeze_depth=0)
    s = _settings(tmp_path, data, "room", trials=1, space=space, warm_start=False)
    run_search(s, trial_fn=heavy_trial, progress=False)  # measured: 3 epochs x 40 s
    # 60 s left and every draw needs ~120 s: nothing is started, and the run says the budget ended
    # it (long before 98% of the budget has passed), not that it was interrupted.
    summary = resume_search("room", studies_dir=s.studies_dir, trial_fn=heavy_trial, progress=False,
                            trials=4, time_budget_s=60.0)
    assert summary.budget_reached and not summary.interrupted, summary
    assert summary.wall_seconds < 50 and summary.trials_run == 0 and summary.finished == 1
    assert sum(summary.counts.values()) == 1  # the refused draws are no trials of the user's
    capsys.readouterr()
    assert after_search(summary, "room", s.storage_url) == EXIT_OK
    out = capsys.readouterr()
    assert "interrupted" not in out.err and "tlsearch export" in out.out


def test_a_cheap_trial_that_still_fits_runs_before_the_run_gives_up(tmp_path: Path) -> None:
    from search.runner._ledger import timing_key

    space = SearchSpace.from_dict({"backbone": "resnet18", "freeze_depth": ["all", 0], "augmentation": ["none", "flip"],
                                   "lr": {"low": 1e-4, "high": 1e-2, "log": True}, "image_size": 32, "max_epochs": 4})
    searcher = _searcher(tmp_path, space, deadline=time.time() + 30.0)
    fine_tune = {"freeze_depth": 0, "augmentation": "flip", "lr": 1e-3}
    probe = {"freeze_depth": "all", "augmentation": "none", "lr": 1e-3}
    searcher._ot_study.enqueue_trial(fine_tune)
    searcher._times.add_epoch(timing_key(space.to_trial_config(fine_tune).to_dict()), 20.0)  # 80 s: no
    searcher._times.add_epoch(timing_key(space.to_trial_config(probe).to_dict()), 1.0)  # 4 s: fits
    assert searcher.suggest("a") is None  # the fine-tune is refused ...
    got = searcher.suggest("b")  # ... and the same draw as a linear probe runs instead
    assert isinstance(got, dict) and {k: got[k] for k in probe} == probe
    assert not searcher.out_of_time


def test_a_refused_recipe_waits_for_a_resume_and_a_continuation_runs_past_the_count(tmp_path: Path) -> None:
    from search.runner._ledger import timing_key

    space = SearchSpace.from_dict({"backbone": "resnet18", "freeze_depth": 0, "lr": {"low": 1e-4, "high": 1e-2},
                                   "image_size": 32, "max_epochs": 4})
    searcher = _searcher(tmp_path, space, deadline=time.time() + 10.0)
    study = searcher._ot_study
    study.enqueue_trial({"lr": 1e-3}, user_attrs={"recipe": "full fine-tune", "baseline": True})
    searcher._times.add_epoch(timing_key(space.to_trial_config({}).to_dict()), 5.0)  # 20 s > 10 s left
    assert searcher.suggest("a") is None
    searcher.requeue_refused()  # as the run ends
    waiting = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].user_attrs["recipe"] == "full fine-tune"

    # A study at its count, with a budget-cut trial's continuation waiting: it still runs.
    full = _searcher(tmp_path / "f", space, deadline=None)
    full._target = 1
    st = full._ot_study
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)}
    st.add_trial(optuna.trial.create_trial(params={"lr": 1e-3}, distributions=dist, value=0.5))
    cut = optuna.trial.create_trial(params={"lr": 2e-3}, distributions=dist, state=optuna.trial.TrialState.PRUNED,
                                    intermediate_values={1: 0.4}, user_attrs={"stopped_by": "time budget"})
    st.add_trial(cut)
    st.enqueue_trial({"lr": 2e-3}, user_attrs={"continues": 1})
    got = full.suggest("c")
    assert isinstance(got, dict) and got["lr"] == 2e-3
    assert full.suggest("d") == full.FINISHED  # then the count holds again


def test_a_refused_continuation_stays_a_continuation_and_is_not_doubled(tmp_path: Path) -> None:
    from search.runner._ledger import continue_budget_cut, timing_key
    from search.space import PlanRole

    space = SearchSpace.from_dict({"backbone": "resnet18", "freeze_depth": 0, "lr": {"low": 1e-4, "high": 1e-2},
                                   "image_size": 32, "max_epochs": 4})
    searcher = _searcher(tmp_path, space, deadline=time.time() + 10.0)
    study = searcher._ot_study
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)}
    ckpt = tmp_path / "trial-0.pt"
    ckpt.write_text("1")
    role = PlanRole(recipe="full fine-tune", baseline=True, epochs=3)
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 1e-3}, distributions=dist, state=optuna.trial.TrialState.PRUNED, intermediate_values={1: 0.4},
        user_attrs={**role.to_user_attrs(), "stopped_by": "time budget", "checkpoint": str(ckpt),
                    "curve": [{"epoch": 1, "val_acc": 0.4}]}))
    assert continue_budget_cut(study) == 1
    searcher._times.add_epoch(timing_key(space.to_trial_config({"epochs": 3}).to_dict()), 20.0)  # 2 x 20 s > 10 s
    assert searcher.suggest("a") is None  # refused by the budget ...
    searcher.requeue_refused()  # ... and enqueued again as the run ends: still the continuation of trial 0
    waiting = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.WAITING]
    assert [PlanRole.from_attrs(t.user_attrs) for t in waiting] == [PlanRole(
        recipe="full fine-tune", baseline=True, epochs=3, continues=0)]
    assert continue_budget_cut(study) == 0  # a resume does not add a second continuation of it


def test_epoch_times_are_kept_apart_by_cpus_and_an_unmeasured_fine_tune_is_estimated_from_its_probe(
        tmp_path: Path) -> None:
    from search.runner._ledger import FINE_TUNE_OVER_FEATURE_PASS, EpochTimes, timing_key

    cfg = {"backbone": "resnet18", "freeze_depth": 0, "image_size": 64, "batch_size": 32, "augmentation": "none"}
    times = EpochTimes()
    times.add_epoch(timing_key(cfg, threads=2), 10.0)  # a fine-tune given both cores
    assert times.estimate(timing_key(cfg, threads=1), 1) is None  # a one-core draw is not alike
    assert times.estimate(timing_key(cfg, threads=2), 1) == pytest.approx(10.0)
    # Nothing alike at one thread: the two-thread fine-tune, at half its speed.
    assert times.cautious(timing_key(cfg, threads=1), 2) == pytest.approx(10.0 + 2 * 20.0)
    # Nothing that trains stages measured: from the backbone's probe, whose start-up was the feature pass.
    times = EpochTimes()
    probe = {**cfg, "freeze_depth": "all"}
    times.add_startup(timing_key(probe, threads=1), 30.0)
    assert times.cautious(timing_key(cfg, threads=1), 2) == pytest.approx(10.0 + 2 * FINE_TUNE_OVER_FEATURE_PASS * 30.0)
    assert times.cautious(timing_key(probe, threads=1), 2) is None  # a probe is never guessed
    assert times.cautious(timing_key({**cfg, "image_size": 128}, threads=1), 2) is None  # another size
    # The probe's feature pass timed alone (its start-up also decoded the images): that, not the start-up.
    times.add_feature_pass(timing_key(probe, threads=1), 5.0)
    assert times.cautious(timing_key(cfg, threads=1), 2) == pytest.approx(10.0 + 2 * FINE_TUNE_OVER_FEATURE_PASS * 5.0)
    # A measured trial that trains stages of the same backbone and size (another input): its epochs.
    drawn = {**cfg, "augmentation": "flip", "freeze_depth": 2}
    times.add_epoch(timing_key(drawn, threads=1), 15.0)
    assert times.cautious(timing_key(cfg, threads=1), 2) == pytest.approx(10.0 + 2 * 15.0)

    # The searcher records a trial's epochs under the CPUs it gave it.
    space = SearchSpace.from_dict({"backbone": "resnet18", "freeze_depth": 0, "lr": 1e-3, "image_size": 32,
                                   "max_epochs": 2})
    searcher = _searcher(tmp_path, space, deadline=None)
    params = searcher.suggest("a")
    searcher._configs["a"]["_cpus"] = 2
    searcher.on_trial_result("a", epoch_metrics(1, 0.5, seconds=7.0, lr=1e-3))
    key = timing_key(space.to_trial_config({}).to_dict(), threads=2)
    assert searcher._times.estimate(key, 1) == pytest.approx(7.0) and isinstance(params, dict)
    assert searcher._estimate({}, 1, cpus=1, cautious=False) is None


def test_no_fine_tune_starts_whose_cautious_first_epoch_cannot_end_in_the_time_left(tmp_path: Path) -> None:
    from search.runner._ledger import NOT_STARTED, timing_key

    space = SearchSpace.from_dict({"backbone": "resnet18", "freeze_depth": ["all", 0], "lr": 1e-3, "image_size": 32,
                                   "max_epochs": 2})
    searcher = _searcher(tmp_path, space, deadline=time.time() + 60.0)
    probe = space.to_trial_config({"freeze_depth": "all"}).to_dict()
    searcher._times.add_epoch(timing_key(probe), 0.5)
    searcher._times.add_startup(timing_key(probe), 30.0)  # its feature pass: a fine-tune's epoch is ~120 s
    searcher._ot_study.enqueue_trial({"freeze_depth": 0})
    assert searcher.suggest("a") is None
    refused = searcher._ot_study.get_trials()[0]
    assert refused.user_attrs["error"].startswith(NOT_STARTED) and refused.user_attrs["not_started"]
    got = searcher.suggest("b")  # the same draw as a probe, which fits, runs instead
    assert isinstance(got, dict) and got["freeze_depth"] == "all"


def test_a_plan_fine_tune_runs_the_epochs_its_role_gives_it(tmp_path: Path) -> None:
    from search.space import PlanRole

    space = SearchSpace.from_dict({"backbone": "resnet18", "freeze_depth": ["all", 0], "lr": 1e-3, "image_size": 32,
                                   "max_epochs": 6, "warmup_epochs": 0.6})
    searcher = _searcher(tmp_path, space, deadline=None)
    searcher._plan, searcher._fine_tune_cpus = True, 2
    searcher._ot_study.enqueue_trial({"freeze_depth": 0}, user_attrs=PlanRole(recipe="full fine-tune", epochs=3)
                                     .to_user_attrs())
    searcher._plan = False  # no probes here: only the role's effect is looked at
    params = searcher.suggest("a")
    assert params["epochs"] == 3 and params["warmup_epochs"] == pytest.approx(0.3)
    assert space.to_trial_config(params).epochs == 3


def test_no_draw_is_asked_while_a_plan_fine_tune_holds_every_cpu(tmp_path: Path) -> None:
    from search.space import PROBE_RECIPE, PlanRole

    space = SearchSpace.from_dict({"backbone": "resnet18", "freeze_depth": ["all", 0], "lr": 1e-3, "image_size": 32,
                                   "max_epochs": 2})
    searcher = _searcher(tmp_path, space, deadline=None)
    searcher._plan, searcher._fine_tune_cpus = True, 2
    study = searcher._ot_study
    dist = {"freeze_depth": optuna.distributions.CategoricalDistribution(["all", 0])}
    study.add_trial(optuna.trial.create_trial(params={"freeze_depth": "all"}, distributions=dist, value=0.9,
                                              user_attrs=PlanRole(recipe=PROBE_RECIPE).to_user_attrs()))
    fine_tune = searcher.suggest("a")  # the plan's full fine-tune, on both CPUs
    assert fine_tune["freeze_depth"] == 0 and fine_tune["_cpus"] == 2
    assert searcher.suggest("b") is None  # a draw beside it would take one of its cores
    searcher.on_trial_complete("a", epoch_metrics(2, 0.95, seconds=1.0, lr=1e-3))
    assert isinstance(searcher.suggest("c"), dict)  # it has ended: the sampler draws again
