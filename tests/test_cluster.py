"""Scale-out for real: a two-node Ray cluster on this machine and a study in PostgreSQL.

Nothing is mocked. PostgreSQL comes from $TLSEARCH_TEST_POSTGRES (`.ci/run` starts one) or, where
Debian's postgresql binaries are installed, from a throwaway server this module starts; without
either, the PostgreSQL tests skip. Each Ray node is a `ray start --block` process in its own
process group under a temp dir of this module. Every search driver runs in a subprocess: a process
joins one Ray cluster only, and tests/test_runner.py keeps a local one in the pytest process.
Whatever this module starts, it stops: by process group and temp dir, never with `ray stop`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import optuna
import pytest

from conftest import make_image_folder

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PG_ENV = "TLSEARCH_TEST_POSTGRES"  # a PostgreSQL URL the tests may create studies in
EPOCH_S = 2.0  # one epoch of the stub trial: long enough that the work, not starting workers, dominates
TRIALS = 4
SPACE = {"backbone": "resnet18", "lr": {"low": 1e-4, "high": 1e-2, "log": True}, "image_size": 32, "max_epochs": 2}
RAY = Path(sys.executable).with_name("ray")

optuna.logging.set_verbosity(optuna.logging.WARNING)


def stub_trial(config: Any, index: Any, *, report: Any, checkpoint_path: str | None = None, **kwargs: Any) -> None:
    """A trial that sleeps EPOCH_S per epoch (as if training) and reports a plausible curve."""
    quality = max(0.05, 1.0 - abs(math.log10(config.lr) + 3.0) / 2.0)
    for epoch in range(1, config.epochs + 1):
        time.sleep(EPOCH_S)
        acc = quality * (1 - 0.5**epoch)
        report({"epoch": epoch, "val_acc": acc, "val_loss": 1 - acc, "val_balanced_acc": acc,
                "train_loss": 1.0 / epoch, "epoch_seconds": EPOCH_S, "images_per_s": 100.0})


# ----- PostgreSQL ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    """The folder of Debian's initdb and pg_ctl (newest version), or of those on PATH."""
    found = shutil.which("pg_ctl")
    dirs = [Path(found).resolve().parent] if found else []
    dirs += [Path(d) for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))][::-1]
    return next((d for d in dirs if (d / "initdb").exists() and (d / "pg_ctl").exists()), None)


def _throwaway_postgres() -> Iterator[str | None]:
    """Starts PostgreSQL on 127.0.0.1 in a temp data dir (as user postgres when root); stops it after."""
    bindir = _postgres_bin()
    if bindir is None:
        yield None
        return
    as_pg: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            yield None
            return
        as_pg = ["runuser", "-u", "postgres", "--"]
    home = Path(tempfile.mkdtemp(prefix="tlsearch-pg-", dir="/tmp"))
    if as_pg:
        shutil.chown(home, user="postgres")
    port = _free_port()
    data = home / "data"
    ctl = [*as_pg, str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run([*as_pg, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
        subprocess.run([*ctl, "-l", str(home / "log"), "-w", "-t", "60", "-o", f"-h 127.0.0.1 -p {port} -k {home} -F",
                        "start"], check=True, capture_output=True, timeout=90)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(home, ignore_errors=True)
        pytest.skip(f"could not start a throwaway PostgreSQL from {bindir}: {e}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*ctl, "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str | None]:
    """A PostgreSQL URL ($TLSEARCH_TEST_POSTGRES, else a throwaway server), or None; its studies are
    deleted afterwards."""
    url = os.environ.get(PG_ENV)
    gen = iter([url]) if url else _throwaway_postgres()
    url = next(gen)
    if url is None:
        yield None
        return
    pytest.importorskip("psycopg2", reason="PostgreSQL studies need psycopg2 (pip install psycopg2-binary)")
    from search.studies import get_storage

    get_storage(url)  # creates Optuna's tables once, before drivers race to create them
    yield url
    try:
        for s in optuna.get_all_study_summaries(url):
            if s.study_name.startswith("tlc-"):
                optuna.delete_study(study_name=s.study_name, storage=url)
    finally:
        for _ in gen:  # stops the throwaway server
            pass


@pytest.fixture()
def pg_url(postgres: str | None) -> str:
    if postgres is None:
        pytest.skip(f"no PostgreSQL: set {PG_ENV}=postgresql://... or install Debian's postgresql (initdb, pg_ctl)")
    return postgres


# ----- a Ray cluster of processes -----------------------------------------------------------------


class LoopbackCluster:
    """Ray nodes started with `ray start --block`, each in its own process group, on this machine."""

    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="tlc-ray-", dir="/tmp")  # short: Ray's socket paths must fit
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
            # Trial workers start from the node's environment: they import `search` and this module.
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]),
            # Ray enables token auth where ~/.ray/auth_token exists, but not for joining nodes:
            # one explicit mode for every process of this cluster.
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_NUM_THREADS": "1",
        }

    def add_node(self) -> None:
        """Starts the head (first call) or one more worker node, 1 CPU each; waits until it is up."""
        head = not self.nodes
        log = Path(self.temp, f"node-{len(self.nodes)}.log")
        cmd = [str(RAY), "start", "--block", "--num-cpus=1", "--num-gpus=0", f"--temp-dir={self.temp}",
               f"--dashboard-agent-listen-port={_free_port()}", "--object-store-memory=100000000"]
        cmd += ["--head", f"--port={self.port}", "--include-dashboard=false", "--disable-usage-stats"] if head else [f"--address={self.address}"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(proc)
        deadline = time.time() + 120
        while b"block forever" not in log.read_bytes():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray node did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM each node's process group, SIGKILL what is left, then anything under our temp dir."""
        for proc in self.nodes:
            with _suppress():
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 3
        for proc in self.nodes:
            with _suppress():
                proc.wait(timeout=max(0.1, deadline - time.time()))
        for proc in self.nodes:
            with _suppress():
                os.killpg(proc.pid, signal.SIGKILL)
            with _suppress():
                proc.wait(timeout=10)
        for pid_dir in Path("/proc").iterdir():  # workers that left the group still name our temp dir
            if pid_dir.name.isdigit() and int(pid_dir.name) != os.getpid():
                with _suppress():
                    if self.temp in (pid_dir / "cmdline").read_bytes().decode(errors="replace"):
                        os.kill(int(pid_dir.name), signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)


def _suppress() -> contextlib.AbstractContextManager:
    return contextlib.suppress(OSError, subprocess.TimeoutExpired)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    """A one-node Ray cluster (tests add the second node); stopped at the end of the module."""
    pytest.importorskip("ray")
    if not RAY.exists():
        pytest.skip(f"no `ray` executable beside {sys.executable}")
    c = LoopbackCluster()
    try:
        c.add_node()
        yield c
    finally:
        c.stop()


# ----- search drivers (subprocesses) --------------------------------------------------------------

_DRIVER = """
import json, sys, time
sys.path[:0] = [{root!r}, {tests!r}]
import ray
from search import runner
from search.config import TLSearchError
from search.settings import SearchSettings
from test_cluster import stub_trial
job = json.loads(sys.argv[1])
ray.init(address=job["address"], log_to_driver=False)
deadline = time.time() + 60
while sum(n["Alive"] for n in ray.nodes()) < job["nodes"]:
    assert time.time() < deadline, "the Ray nodes did not all join"
    time.sleep(0.3)
runner._run.HEARTBEAT_S = job.get("heartbeat_s", runner._run.HEARTBEAT_S)  # where the heartbeat thread reads it
out = {{}}
if job["do"] == "search":
    s = runner.run_search(SearchSettings(**job["settings"]), trial_fn=stub_trial, progress=False)
    out = {{"wall_seconds": s.wall_seconds, "finished": s.finished, "interrupted": s.interrupted, "trials_run": s.trials_run}}
elif job["do"] == "resume":
    s = runner.resume_search(job["study"], storage=job["storage"], studies_dir=job["studies_dir"],
                             trial_fn=stub_trial, progress=False, trials=job["trials"], address=job["address"])
    out = {{"finished": s.finished, "trials_run": s.trials_run}}
elif job["do"] == "check":
    import dataclasses
    from search.data import scan_dataset
    index = scan_dataset(job["data"])
    out["ok"] = sorted(runner.check_nodes_see_data(index))
    try:  # every node sees the same (missing) folder: all of them must be named
        runner.check_nodes_see_data(dataclasses.replace(index, root=job["data"] + "-elsewhere"))
    except TLSearchError as e:
        out["error"] = str(e)
print("RESULT " + json.dumps(out))
"""


def _driver(cluster: LoopbackCluster, job: dict) -> subprocess.Popen:
    code = _DRIVER.format(root=str(ROOT), tests=str(TESTS))
    return subprocess.Popen([sys.executable, "-c", code, json.dumps({"address": cluster.address, **job})],
                            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _result(proc: subprocess.Popen, timeout: float = 180) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"driver failed ({proc.returncode}): {err.decode(errors='replace')[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _settings(tmp: Path, data: Path, study: str, storage: str, address: str, **kw: Any) -> dict:
    return {"study": study, "data": str(data), "storage": storage, "address": address, "trials": TRIALS,
            "space": SPACE, "cpus_per_trial": 1.0, "pretrained": False, "cache": False,
            "studies_dir": str(tmp / "studies"), "reports_dir": str(tmp / "reports"),
            "grace_period": 2, "seed": 0, **kw}  # grace = max_epochs: every trial does the same work


def _trials(url: str, study: str) -> list:
    return optuna.load_study(study_name=study, storage=url).get_trials()


# ----- tests --------------------------------------------------------------------------------------


def test_stale_trials_only_are_reconciled(postgres: str | None, tmp_path: Path) -> None:
    """A driver must not fail the RUNNING trials of another live driver, only stale ones and its own."""
    pytest.importorskip("ray")
    from search.runner import INTERRUPTED, STALE_AFTER_S, _process_host, new_driver_id, reconcile

    url = postgres or f"sqlite:///{tmp_path / 'stale.db'}"
    study = optuna.create_study(study_name=f"tlc-stale-{uuid.uuid4().hex[:6]}", storage=url, direction="maximize")
    gone = subprocess.Popen(["true"])
    gone.wait()
    now = time.time()
    owners = {
        "live, this host": (f"{_process_host()}:{os.getppid()}:a1b2c3d4", now),
        "live, other host": ("elsewhere/1:4242:a1b2c3d4", now - STALE_AFTER_S / 2),
        "exited, this host": (f"{_process_host()}:{gone.pid}:a1b2c3d4", now),
        "silent, other host": ("elsewhere/1:4242:deadbeef", now - 2 * STALE_AFTER_S),
        "mine": (new_driver_id(), now),
    }
    numbers = {}
    for what, (owner, beat) in owners.items():
        t = study.ask()
        t.suggest_float("lr", 1e-4, 1e-2, log=True)
        t.set_user_attr("driver", owner)
        t.set_user_attr("heartbeat", beat)
        numbers[what] = t.number

    # This driver ends (or starts): its own leftovers and the stale trials go, live ones stay.
    assert reconcile(study, driver=owners["mine"][0]) == 3
    assert reconcile(study) == 0
    trials = study.get_trials()
    run = optuna.trial.TrialState.RUNNING
    assert [t.number for t in trials if t.state == run] == [numbers["live, this host"], numbers["live, other host"]]
    for what in ("exited, this host", "silent, other host", "mine"):  # each queued again with its params
        t = trials[numbers[what]]
        assert t.user_attrs["error"] == INTERRUPTED and t.user_attrs["interrupted"]
        assert [r.system_attrs["fixed_params"] for r in trials if r.user_attrs.get("retry_of") == t.number] == [t.params]


def test_a_retry_lost_between_tell_and_enqueue_is_enqueued_once(tmp_path: Path) -> None:
    """A driver stopped after telling a trial interrupted but before enqueuing its retry (a second
    Ctrl-C): the next reconcile enqueues the retry, once; crowded-out and not-started trials get none."""
    pytest.importorskip("ray")
    from search.runner import INTERRUPTED, SURPLUS, reconcile

    study = optuna.create_study(study_name="lost", storage=f"sqlite:///{tmp_path / 'lost.db'}", direction="maximize")
    kinds = {"lost": {"error": INTERRUPTED}, "surplus": {"error": SURPLUS}, "not started": {"not_started": True}}
    numbers = {}
    for what, attrs in kinds.items():
        t = study.ask()
        t.suggest_float("lr", 1e-4, 1e-2, log=True)
        for k, v in {"interrupted": True, **attrs}.items():
            t.set_user_attr(k, v)
        study.tell(t, state=optuna.trial.TrialState.FAIL)
        numbers[what] = t.number
    for _ in range(2):  # idempotent: the second reconcile adds nothing
        assert reconcile(study) == 0
    trials = study.get_trials()
    retries = [(r.user_attrs["retry_of"], r.system_attrs["fixed_params"]) for r in trials if "retry_of" in r.user_attrs]
    assert retries == [(numbers["lost"], trials[numbers["lost"]].params)]


def test_an_interrupted_continuation_is_retried_from_the_budget_cut_trial(tmp_path: Path) -> None:
    """Its retry continues the same budget-cut trial; a retry that never ran is no retry (another
    is enqueued); `continue_budget_cut` then adds no second continuation."""
    pytest.importorskip("ray")
    from search.runner import INTERRUPTED, reconcile
    from search.runner._ledger import BUDGET_CUT, NOT_STARTED, continue_budget_cut

    study = optuna.create_study(study_name="cont", storage=f"sqlite:///{tmp_path / 'cont.db'}", direction="maximize")
    checkpoint = tmp_path / "trial-0.pt"
    checkpoint.write_bytes(b"ckpt")
    lr = {"lr": 1e-3}
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}

    def add(state: str, **attrs: Any) -> int:
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState[state], params=lr, distributions=dist, user_attrs=attrs,
            intermediate_values={1: 0.5, 2: 0.6} if state == "PRUNED" else None))
        return len(study.trials) - 1

    cut = add("PRUNED", stopped_by=BUDGET_CUT, checkpoint=str(checkpoint))
    cont = add("FAIL", continues=cut, interrupted=True, error=INTERRUPTED, checkpoint=str(tmp_path / "trial-1.pt"))
    for _ in range(2):  # idempotent
        reconcile(study)
        assert continue_budget_cut(study) == 0
    waiting = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.WAITING]
    assert [(t.user_attrs.get("retry_of"), t.user_attrs.get("continues")) for t in waiting] == [(cont, cut)]

    # That retry is refused by the time budget (never started): the continuation gets another retry.
    refused = study.ask()  # the search draws the enqueued retry first
    assert refused.number == waiting[0].number
    refused.suggest_float("lr", 1e-4, 1e-2, log=True)
    for key, value in {"interrupted": True, "not_started": True, "error": NOT_STARTED}.items():
        refused.set_user_attr(key, value)
    study.tell(refused, state=optuna.trial.TrialState.FAIL)
    for _ in range(2):
        reconcile(study)
        assert continue_budget_cut(study) == 0
    waiting = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.WAITING]
    assert [(t.user_attrs.get("retry_of"), t.user_attrs.get("continues")) for t in waiting] == [(cont, cut)]
    assert waiting[0].system_attrs["fixed_params"] == lr


def test_surplus_trial_of_a_race_is_closed(tmp_path: Path) -> None:
    """Two drivers asking for the last trial at once: the later trial number is closed, not run."""
    pytest.importorskip("ray")
    from search.runner import SURPLUS, HonestOptunaSearch, _Tally, finished_count, new_driver_id
    from search.space import SearchSpace
    from search.studies import get_storage

    url = f"sqlite:///{tmp_path / 'race.db'}"
    study = optuna.create_study(study_name="race", storage=url, direction="maximize")
    other = study.ask()  # another driver's live trial, asked a moment before ours
    other.set_user_attr("driver", "elsewhere/1:4242:a1b2c3d4")
    other.set_user_attr("heartbeat", time.time())

    def searcher(target: int | None) -> HonestOptunaSearch:
        return HonestOptunaSearch(
            SearchSpace.from_dict(SPACE), metric="val_acc", mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
            study_name="race", storage=get_storage(url), asha_stopped=set(), tally=_Tally(), driver=new_driver_id(),
            target=target)

    late = searcher(None)  # its count check passed before the other trial existed
    late._target = 1
    late.suggest = super(HonestOptunaSearch, late).suggest  # the ask itself, past the pre-check
    late.suggest("t")
    assert late._surplus("t")
    assert searcher(1).suggest("u") == HonestOptunaSearch.FINISHED  # the count is taken
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["RUNNING", "FAIL"] and trials[1].user_attrs["error"] == SURPLUS
    assert finished_count(study) == 0  # the closed trial does not count


def test_two_nodes_against_one(cluster: LoopbackCluster, pg_url: str, tmp_path: Path, capsys: Any,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The same search on one node, then on two: trials land on both; the study is whole in PostgreSQL."""
    data = make_image_folder(tmp_path / "data", per_class=4, size=32)
    tag = uuid.uuid4().hex[:6]
    walls, spans, per_node = {}, {}, {}
    for n_nodes in (1, 2):
        while len(cluster.nodes) < n_nodes:
            cluster.add_node()
        study = f"tlc-{n_nodes}node-{tag}"
        job = {"do": "search", "nodes": n_nodes,
               "settings": _settings(tmp_path, data, study, pg_url, cluster.address)}
        out = _result(_driver(cluster, job))
        assert out["finished"] == TRIALS and not out["interrupted"], out
        trials = _trials(pg_url, study)
        assert len(trials) == TRIALS
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.state for t in trials]
        nodes = [t.user_attrs["node_id"] for t in trials]
        per_node[n_nodes] = sorted((nodes.count(n) for n in set(nodes)), reverse=True)
        walls[n_nodes] = out["wall_seconds"]  # the whole run_search call, Ray and checks included
        spans[n_nodes] = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
        assert len(set(nodes)) == n_nodes, per_node
    with capsys.disabled():
        print(f"\n[cluster] {TRIALS} trials of {2 * EPOCH_S:.0f}s work: one node {walls[1]:.1f}s "
              f"(first trial start to last end {spans[1]:.1f}s, trials per node {per_node[1]}); two nodes "
              f"{walls[2]:.1f}s ({spans[2]:.1f}s, {per_node[2]})")

    # show, report, export and resume work against the PostgreSQL study.
    from search.cli import main

    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # `report` writes reports/<study>/ under the working folder
    assert main(["show", study, "--storage", pg_url, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["n_trials"] == TRIALS and shown["states"]["COMPLETE"] == TRIALS
    assert main(["report", study, "--storage", pg_url]) == 0
    assert main(["export", study, "--storage", pg_url, "--out", str(tmp_path / "best.yaml")]) == 0
    assert (tmp_path / "best.yaml").is_file()
    out = _result(_driver(cluster, {"do": "resume", "nodes": 2, "study": study, "storage": pg_url,
                                    "studies_dir": str(tmp_path / "studies"), "trials": TRIALS + 1}))
    assert out == {"finished": TRIALS + 1, "trials_run": 1}
    assert len(_trials(pg_url, study)) == TRIALS + 1


def test_two_drivers_one_study(cluster: LoopbackCluster, pg_url: str, tmp_path: Path, capsys: Any) -> None:
    """Two drivers on one study at once (Optuna's distributed mode): no trial lost, doubled or left RUNNING."""
    from search.runner import SURPLUS, finished_count

    while len(cluster.nodes) < 2:
        cluster.add_node()
    data = make_image_folder(tmp_path / "data", per_class=4, size=32)
    study, want = f"tlc-drivers-{uuid.uuid4().hex[:6]}", 6
    job = {"do": "search", "nodes": 2, "heartbeat_s": 0.5,
           "settings": _settings(tmp_path, data, study, pg_url, cluster.address, trials=want)}
    drivers = [_driver(cluster, job) for _ in range(2)]
    outs = [_result(d) for d in drivers]
    trials = _trials(pg_url, study)
    states = [t.state.name for t in trials]
    surplus = [t.number for t in trials if t.user_attrs.get("error") == SURPLUS]
    # A driver ends when every trial is done or taken; the one ending last sees them all done.
    assert not any(o["interrupted"] for o in outs) and max(o["finished"] for o in outs) == want, outs
    assert finished_count(optuna.load_study(study_name=study, storage=pg_url)) == want
    assert "RUNNING" not in states and "WAITING" not in states, states
    assert len(trials) == want + len(surplus) and len(surplus) <= 1, (states, surplus)
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none doubled
    counted = [t for t in trials if t.number not in surplus]
    assert all(t.state.name == "COMPLETE" for t in counted), states
    assert len({t.params["lr"] for t in counted}) == want  # the drivers did not sample alike
    owners = {t.user_attrs["driver"] for t in counted}
    for t in counted:  # the drivers kept stamping their trials while they ran
        assert t.user_attrs["heartbeat"] > t.datetime_start.timestamp() + EPOCH_S, t.number
    assert len(owners) == 2 and sum(o["trials_run"] for o in outs) == want  # a closed surplus trial never ran
    with capsys.disabled():
        print(f"\n[cluster] two drivers, one study: trials per driver "
              f"{sorted(sum(t.user_attrs['driver'] == o for t in counted) for o in owners)}, surplus {len(surplus)}")


def test_dataset_checked_on_every_node(cluster: LoopbackCluster, tmp_path: Path) -> None:
    """Before a cluster search, every node must see the dataset; else one line names the nodes."""
    while len(cluster.nodes) < 2:
        cluster.add_node()
    data = make_image_folder(tmp_path / "data", per_class=4, size=32)
    out = _result(_driver(cluster, {"do": "check", "nodes": 2, "data": str(data)}))
    assert len(out["ok"]) == 2
    error = out["error"]
    assert "(2 of 2)" in error and error.count(": no folder ") == 2 and "\n" not in error, error

    # What each node runs: the folder, then every probed file's size against the driver's.
    from search.runner import _node_sees

    files = sorted(str(f) for f in data.rglob("*.png"))
    probe = [(f, os.path.getsize(f)) for f in files]
    assert _node_sees(str(data), probe, str(tmp_path))["missing"] == 0
    probe[0] = (probe[0][0], probe[0][1] + 1)
    probe[1] = (probe[1][0] + ".gone", probe[1][1])
    assert _node_sees(str(data), probe, None) == {"root": True, "missing": 2, "checked": len(files), "experiment_dir": False}


def test_processes_opening_a_fresh_study_file_at_once_all_succeed(tmp_path: Path) -> None:
    """Two drivers (or a driver and a reader) creating one new SQLite file's tables at the same
    moment: the loser of the race opens the tables the winner made, instead of failing."""
    code = "import sys; from search.studies import get_storage; get_storage(sys.argv[1]); print('ok')"
    root = Path(__file__).resolve().parents[1]
    for k in range(3):
        url = f"sqlite:///{tmp_path / f'fresh{k}.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", code, url], cwd=root, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(out.strip() == "ok" for out, _ in outs), [err.strip().splitlines()[-1:] for _, err in outs]
