"""Disk bounds: which checkpoints are kept, stale temporary files, LRU trimming, `tlsearch cache`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from search import disk
from search.disk import CheckpointTrial as T

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


# ----- which checkpoints are kept (a pure rule) -----------------------------------------------------


def test_pruned_and_failed_checkpoints_go_running_and_waiting_stay() -> None:
    trials = [T(0, "PRUNED"), T(1, "FAIL"), T(2, "RUNNING"), T(3, "WAITING"), T(4, "COMPLETE", 0.5, "r18")]
    assert disk.checkpoints_to_remove(trials, maximize=True, keep=3) == [0, 1]


def test_best_k_complete_kept_per_backbone() -> None:
    trials = [
        T(0, "COMPLETE", 0.70, "r18"), T(1, "COMPLETE", 0.90, "r18"), T(2, "COMPLETE", 0.80, "r18"),
        T(3, "COMPLETE", 0.60, "lite0"), T(4, "COMPLETE", 0.95, "r18"), T(5, "COMPLETE", 0.50, "lite0"),
    ]
    # Two per backbone: r18 keeps 4 (0.95) and 1 (0.90); lite0 keeps both of its trials.
    assert disk.checkpoints_to_remove(trials, maximize=True, keep=2) == [0, 2]
    assert disk.checkpoints_to_remove(trials, maximize=True, keep=1) == [0, 1, 2, 5]
    assert disk.checkpoints_to_remove(trials, maximize=True, keep=0) == [0, 1, 2, 3, 4, 5]


def test_direction_and_ties() -> None:
    trials = [T(0, "COMPLETE", 0.3, "r18"), T(1, "COMPLETE", 0.1, "r18"), T(2, "COMPLETE", 0.1, "r18")]
    # Minimising: 0.1 is best; of the tie, the earlier trial wins.
    assert disk.checkpoints_to_remove(trials, maximize=False, keep=1) == [0, 2]
    assert disk.checkpoints_to_remove(trials, maximize=True, keep=1) == [1, 2]


def test_best_k_counts_trials_whose_checkpoint_is_gone() -> None:
    # Trial 0 is the best but its checkpoint was removed earlier (e.g. by hand): it still holds a
    # place among the best, so trial 2 is not promoted into it.
    trials = [T(0, "COMPLETE", 0.9, "r18", has_checkpoint=False), T(1, "COMPLETE", 0.8, "r18"),
              T(2, "COMPLETE", 0.7, "r18")]
    assert disk.checkpoints_to_remove(trials, maximize=True, keep=2) == [2]


def test_interrupted_kept_until_its_retry_has_ended() -> None:
    cut = T(0, "FAIL", interrupted=True)
    assert disk.checkpoints_to_remove([cut], maximize=True, keep=3) == []
    for retry_state in ("RUNNING", "WAITING"):  # the retry may resume from it
        assert disk.checkpoints_to_remove([cut, T(1, retry_state, retry_of=0)], maximize=True, keep=3) == []
    for retry_state in ("COMPLETE", "PRUNED", "FAIL"):
        retry = T(1, retry_state, 0.5 if retry_state == "COMPLETE" else None, "r18", retry_of=0)
        assert 0 in disk.checkpoints_to_remove([cut, retry], maximize=True, keep=3)


def test_a_budget_cut_trial_keeps_its_checkpoint_until_a_continuation_of_it_ran_to_an_end() -> None:
    cut = T(0, "PRUNED", budget_cut=True)
    never_ran = [
        # Not started (the time left could not take its epochs) or closed as surplus: no checkpoint.
        T(1, "FAIL", interrupted=True, continues=0, has_checkpoint=False),
        T(1, "FAIL", interrupted=True, continues=0),  # interrupted by Ctrl-C
        T(1, "RUNNING", continues=0),
        T(1, "WAITING", continues=0),
    ]
    for child in never_ran:
        assert 0 not in disk.checkpoints_to_remove([cut, child], maximize=True, keep=3), child
        assert disk.replaced_trials([cut, child]) == set()
    for state in ("COMPLETE", "PRUNED", "FAIL"):  # ran to an end: by ASHA, or failing on its own
        child = T(1, state, 0.5 if state == "COMPLETE" else None, "r18", continues=0)
        assert 0 in disk.checkpoints_to_remove([cut, child], maximize=True, keep=3), state


def test_the_retry_of_an_interrupted_continuation_replaces_the_whole_chain() -> None:
    cut = T(0, "PRUNED", budget_cut=True)
    interrupted = T(1, "FAIL", interrupted=True, continues=0)  # the continuation, stopped by Ctrl-C
    retry = T(2, "WAITING", retry_of=1, continues=0)
    assert disk.checkpoints_to_remove([cut, interrupted, retry], maximize=True, keep=3) == []
    retry_again = T(3, "FAIL", interrupted=True, retry_of=2, continues=0, has_checkpoint=False)
    refused = T(4, "FAIL", interrupted=True, retry_of=3, continues=0, has_checkpoint=False)
    trials = [cut, interrupted, T(2, "FAIL", interrupted=True, retry_of=1, continues=0), retry_again, refused]
    assert disk.checkpoints_to_remove(trials, maximize=True, keep=3) == []
    done = T(5, "COMPLETE", 0.9, "r18", retry_of=3, continues=0)
    assert disk.replaced_trials(trials + [done]) == {0, 1, 2, 3}
    assert disk.checkpoints_to_remove(trials + [done], maximize=True, keep=3) == [0, 1, 2]
    # A plain chain of interrupted retries goes when its last retry has run to an end, not before.
    chain = [T(0, "FAIL", interrupted=True), T(1, "FAIL", interrupted=True, retry_of=0)]
    assert disk.checkpoints_to_remove(chain, maximize=True, keep=3) == []
    assert disk.checkpoints_to_remove(chain + [T(2, "PRUNED", retry_of=1)], maximize=True, keep=3) == [0, 1, 2]


def test_checkpoint_trials_reads_both_links() -> None:
    study = optuna.create_study(direction="maximize")
    for attrs in ({"stopped_by": "time budget", "checkpoint": "a.pt"}, {"continues": 0, "interrupted": True},
                  {"retry_of": 1, "continues": 0}):
        state = "WAITING" if "retry_of" in attrs else ("FAIL" if attrs.get("interrupted") else "PRUNED")
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState[state], user_attrs=attrs,
            intermediate_values={1: 0.1} if state == "PRUNED" else None,
        ))
    got = disk.checkpoint_trials(study.get_trials())
    assert [(t.retry_of, t.continues) for t in got] == [(None, None), (None, 0), (1, 0)]
    assert got[0].budget_cut and got[1].interrupted


def test_nothing_recorded_nothing_removed() -> None:
    assert disk.checkpoints_to_remove([T(0, "PRUNED", has_checkpoint=False)], maximize=True, keep=3) == []
    with pytest.raises(ValueError, match="keep must be >= 0, got -1"):
        disk.checkpoints_to_remove([], maximize=True, keep=-1)


def test_a_driver_that_has_not_seen_a_trial_never_removes_one_of_the_best() -> None:
    """Several drivers decide from the study: a snapshot missing a trial keeps more, never less."""
    full = [T(i, "COMPLETE", v, "r18") for i, v in enumerate([0.5, 0.9, 0.7, 0.8, 0.6])]
    best = {1, 3}
    for missing in range(len(full)):
        seen = [t for t in full if t.number != missing]
        assert not best & set(disk.checkpoints_to_remove(seen, maximize=True, keep=2))


def test_prune_study_checkpoints_records_what_it_removed(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    paths = {}
    for i, (state, value) in enumerate([("COMPLETE", 0.9), ("COMPLETE", 0.5), ("PRUNED", None), ("FAIL", None)]):
        paths[i] = tmp_path / f"trial-{i}.pt"
        paths[i].write_bytes(b"x" * 10)
        t = optuna.trial.create_trial(
            state=optuna.trial.TrialState[state], value=value, params={"backbone": "r18"},
            distributions={"backbone": optuna.distributions.CategoricalDistribution(["r18"])},
            user_attrs={"checkpoint": str(paths[i])},
            intermediate_values={1: 0.1} if state == "PRUNED" else None,
        )
        study.add_trial(t)
    removed, _ = disk.prune_study_checkpoints(study, keep=1)
    assert removed == [1, 2, 3]
    assert paths[0].exists() and not any(paths[i].exists() for i in (1, 2, 3))
    assert disk.removed_on_study(study.user_attrs) == {1, 2, 3}
    # A second pass (the next trial's end) has nothing left to do.
    assert disk.prune_study_checkpoints(study, keep=1)[0] == []


def test_prune_study_checkpoints_keeps_a_minimising_studys_best(tmp_path: Path) -> None:
    """A val_loss study: the lowest values are the best, and their checkpoints stay."""
    study = optuna.create_study(direction="minimize")
    for i, value in enumerate([0.9, 0.2, 0.5, 0.1]):
        (tmp_path / f"trial-{i}.pt").write_bytes(b"x")
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, value=value, params={"backbone": "r18"},
            distributions={"backbone": optuna.distributions.CategoricalDistribution(["r18"])},
            user_attrs={"checkpoint": str(tmp_path / f"trial-{i}.pt")},
        ))
    removed, _ = disk.prune_study_checkpoints(study, keep=2)
    assert removed == [0, 2]
    assert [(tmp_path / f"trial-{i}.pt").exists() for i in range(4)] == [False, True, False, True]
    # The trial ending now is ranked the same way: a loss above the kept two loses its checkpoint.
    ending = T(4, "COMPLETE", 0.3, "r18")
    assert disk.prune_study_checkpoints(study, keep=2, ending=ending) == ([], True)
    assert disk.prune_study_checkpoints(study, keep=2, ending=T(5, "COMPLETE", 0.05, "r18")) == ([1], False)


# ----- temporary files ------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_is_stale_tmp_rule() -> None:
    assert disk.is_stale_tmp("a.pt.12.tmp", idle_s=120, pid_alive=False)
    assert not disk.is_stale_tmp("a.pt.12.tmp", idle_s=5, pid_alive=False)  # maybe a writer on another host
    assert not disk.is_stale_tmp("a.pt.12.tmp", idle_s=1800, pid_alive=True)
    assert disk.is_stale_tmp("a.pt.12.tmp", idle_s=disk.TMP_STALE_S, pid_alive=True)  # pid reused
    assert disk.is_stale_tmp("a.pt.tmp", idle_s=disk.TMP_STALE_S, pid_alive=None)
    assert not disk.is_stale_tmp("a.pt.tmp", idle_s=600, pid_alive=None)
    assert not disk.is_stale_tmp("a.pt", idle_s=10**6, pid_alive=False)


def test_clean_stale_tmp_removes_dead_writers_files_and_keeps_live_ones(tmp_path: Path) -> None:
    dead, old = _dead_pid(), time.time() - 120
    stale = [tmp_path / f"trial-3.pt.{dead}.tmp", tmp_path / "x.u8.tmp"]
    live = [tmp_path / f"trial-4.pt.{os.getpid()}.tmp", tmp_path / f"trial-5.pt.{dead}.tmp", tmp_path / "trial-6.pt"]
    for p in stale + live:
        p.write_bytes(b"x" * 100)
    os.utime(stale[0], (old, old))
    os.utime(stale[1], (time.time() - disk.TMP_STALE_S - 1,) * 2)  # no pid: by age only
    os.utime(live[0], (old, old))  # its writer (this process) is alive
    # live[1]: dead writer but written just now (maybe another host's writer); live[2]: not temporary
    assert disk.clean_stale_tmp([tmp_path, tmp_path / "missing"]) == (2, 200)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in live)


def test_save_checkpoint_writes_under_a_pid_named_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from search.trial import save_checkpoint

    seen = []
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (seen.append(Path(f).name), real(obj, f)))
    save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "trial-1.pt")
    # <name>.<pid>.<thread>.tmp: the clean-up reads the writer's pid from the name.
    assert len(seen) == 1 and seen[0].startswith(f"trial-1.pt.{os.getpid()}.") and seen[0].endswith(".tmp")
    assert disk.stale_tmp_files.__module__ and _writer_pid(seen[0]) == os.getpid()
    assert (tmp_path / "trial-1.pt").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "trial-1.pt"]


def _writer_pid(name: str) -> int:
    from search.disk._tmp import _TMP_PID

    return int(_TMP_PID.search(name).group(1))


# ----- LRU trimming ---------------------------------------------------------------------------------


def _aged(path: Path, size: int, age_s: float) -> Path:
    path.write_bytes(b"x" * size)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_trim_lru_oldest_first_sparing_recent_and_kept(tmp_path: Path) -> None:
    a, b, c, d = (_aged(tmp_path / f"{n}.u8", 100, age) for n, age in (("a", 900), ("b", 800), ("c", 700), ("d", 5)))
    tmp_path.joinpath("a.bad.json").write_text("{}")
    removed = disk.trim_lru(tmp_path.glob("*.u8"), 150, companions=(".bad.json",), keep=[b])
    # a (oldest) and c go; b is kept on request, d was used seconds ago.
    assert removed == [a, c] and b.exists() and d.exists() and not tmp_path.joinpath("a.bad.json").exists()


def test_trim_lru_skips_a_file_that_vanished(tmp_path: Path) -> None:
    old = _aged(tmp_path / "old.pt", 100, 900)
    ghost = tmp_path / "ghost.pt"  # listed, then removed by another process's trim
    assert disk.trim_lru([ghost, old], 0) == [old]


def test_feature_trim_survives_a_file_vanishing_under_it(tmp_path: Path) -> None:
    from search import features

    _aged(tmp_path / "old.pt", 100, 900)
    (tmp_path / "gone.pt").symlink_to(tmp_path / "nowhere")  # globbed, but stat() fails: it vanished
    features.trim(tmp_path, 0)
    assert not (tmp_path / "old.pt").exists()


# ----- tlsearch cache -------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TLSEARCH_CACHE": str(cwd / "cache"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "search", "cache", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _study_with_checkpoints(work: Path, name: str, *, running: bool) -> list[Path]:
    """A study in work/studies/<name>.db with two finished trials (and a live one when `running`)."""
    exp = work / "studies" / name
    (exp / "checkpoints").mkdir(parents=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{work / 'studies' / (name + '.db')}",
                                direction="maximize")
    paths = []
    for i in range(2):
        p = exp / "checkpoints" / f"trial-{i}.pt"
        p.write_bytes(b"c" * 1000)
        paths.append(p)
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=0.5 + i,
                                                  user_attrs={"checkpoint": str(p)}))
    if running:
        t = study.ask()
        t.set_user_attr("heartbeat", time.time())
    return paths


def test_cache_lists_and_clears(tmp_path: Path) -> None:
    images, feats = tmp_path / "cache" / "images", tmp_path / "cache" / "features"
    images.mkdir(parents=True)
    feats.mkdir()
    (images / "k-146.v1.u8").write_bytes(b"i" * 3000)
    (feats / "f.pt").write_bytes(b"f" * 200)
    stale = _aged(feats / f"f.pt.{_dead_pid()}.tmp", 50, 300)
    done = _study_with_checkpoints(tmp_path, "done", running=False)
    live = _study_with_checkpoints(tmp_path, "live", running=True)

    r = _cli("--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    usage = json.loads(r.stdout)
    assert (usage["images"]["files"], usage["images"]["bytes"]) == (1, 3000)
    assert (usage["features"]["files"], usage["features"]["bytes"]) == (1, 200)
    assert usage["temporary"] == {"files": 1, "bytes": 50}
    assert {c["study"]: (c["files"], c["bytes"]) for c in usage["checkpoints"]} == {"done": (2, 2000), "live": (2, 2000)}
    assert usage["total_bytes"] == 3000 + 200 + 50 + 4000
    text = _cli(cwd=tmp_path)
    assert text.returncode == 0 and "images" in text.stdout and "done" in text.stdout and "total 7.1 KiB" in text.stdout

    r = _cli("--clear", cwd=tmp_path)  # caches only: every checkpoint stays
    assert r.returncode == 0, r.stderr
    assert not any(images.glob("*.u8")) and not any(feats.iterdir()) and not stale.exists()
    assert all(p.exists() for p in done + live) and "add --checkpoints" in r.stdout

    r = _cli("--clear", "--checkpoints", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["cleared"]["skipped"] == ["live"] and out["cleared"]["bytes"] == 2000
    assert not any(p.exists() for p in done) and all(p.exists() for p in live)
    assert "a search is running on it" in r.stderr and "live" in r.stderr
    study = optuna.load_study(study_name="done", storage=f"sqlite:///{tmp_path / 'studies' / 'done.db'}")
    assert disk.removed_on_study(study.user_attrs) == {0, 1}


def test_the_study_of_an_experiment_folder_is_where_its_settings_say(tmp_path: Path) -> None:
    from search.config import dump_yaml
    from search.settings import SearchSettings

    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    optuna.create_study(study_name="a", storage=url)
    (tmp_path / "other").mkdir()
    optuna.create_study(study_name="b", storage=f"sqlite:///{tmp_path / 'other' / 'b.db'}")
    for settings in (SearchSettings(study="a", data=str(tmp_path), storage=url),
                     SearchSettings(study="b", data=str(tmp_path), studies_dir=str(tmp_path / "other"))):
        (tmp_path / "studies" / settings.study).mkdir(parents=True)
        dump_yaml(settings.to_dict(), tmp_path / "studies" / settings.study / "settings.yaml")  # as a run writes it
    assert disk.open_study_of(tmp_path / "studies" / "a").study_name == "a"
    assert disk.open_study_of(tmp_path / "studies" / "b").study_name == "b"
    assert disk.open_study_of(tmp_path / "studies" / "c") is None


def test_cache_usage_errors_are_one_line(tmp_path: Path) -> None:
    r = _cli("--checkpoints", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--clear" in r.stderr
    r = _cli("--clear", "--checkpoints", "--study", "../x", cwd=tmp_path)
    assert r.returncode == 2 and "study name" in r.stderr


def test_keep_checkpoints_is_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from search.cli import main
    from search.settings import SearchSettings

    assert SearchSettings(study="s", data=str(tmp_path)).keep_checkpoints == 3
    assert main(["run", str(tmp_path), "--study", "s", "--keep-checkpoints", "-1"]) == 2
    err = capsys.readouterr().err
    assert "keep_checkpoints must be between 0 and 1000000, got -1" in err and err.count("\n") == 1


def test_pruning_a_checkpoint_removes_its_validation_logits_too(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    for i, value in enumerate([0.9, 0.5]):
        (tmp_path / f"trial-{i}.pt").write_bytes(b"x" * 10)
        (tmp_path / f"trial-{i}.val-logits.pt").write_bytes(b"y" * 10)
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, value=value, params={"backbone": "r18"},
            distributions={"backbone": optuna.distributions.CategoricalDistribution(["r18"])},
            user_attrs={"checkpoint": str(tmp_path / f"trial-{i}.pt")},
        ))
    assert disk.prune_study_checkpoints(study, keep=1)[0] == [1]
    assert (tmp_path / "trial-0.pt").exists() and (tmp_path / "trial-0.val-logits.pt").exists()
    assert not (tmp_path / "trial-1.pt").exists() and not (tmp_path / "trial-1.val-logits.pt").exists()
    assert disk.remove_checkpoint(tmp_path / "trial-0.pt") == 20
