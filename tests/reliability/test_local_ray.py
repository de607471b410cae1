"""A local search keeps its Ray to itself: a Ray of its own, listening on loopback only.

Without --address, `tlsearch run` (trials swapped for `stubs.stub_trial`, see stubcli.py) must
start a Ray of its own even when the machine points elsewhere: a `ray start --head` that was
killed leaves its address in <ray tmp>/ray_current_cluster (planted here, naming a dead port), and
RAY_ADDRESS may name another cluster. Every server of the Ray it starts (GCS, raylet and its object
manager, the agents, every worker's gRPC server, the driver's own) must listen on the loopback
address only. Each run has its own RAY_TMPDIR, so nothing here touches another session's /tmp/ray.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest

from reliability._util import env, kill_tagged, tagged, wait_untagged
from tests.conftest import make_image_folder

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.ray
STUDY = "local"
TRIALS = 2
LOOPBACK = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Listener:
    """A TCP socket in LISTEN state and the process that holds it."""

    host: str  # local address as written by `ss`: 127.0.0.1, ::1, 0.0.0.0, ::, ...
    port: int
    pid: int
    name: str  # the process's name (/proc/PID/comm: gcs_server, raylet, ray::IDLE, python, ...)

    def __str__(self) -> str:
        return f"{self.host}:{self.port} ({self.name}, pid {self.pid})"


@dataclass
class LocalRun:
    """What one local search through the CLI did."""

    rc: int | None = None
    err: str = ""
    listeners: list[Listener] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)
    trials: list = field(default_factory=list)


def listening(pids: list[int]) -> list[Listener]:
    """TCP sockets in LISTEN state held by the given processes (IPv4 and IPv6 tables)."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    link = os.readlink(fd)
                except OSError:
                    continue
                if link.startswith("socket:["):
                    owner[link[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and f[9] in owner:  # 0A = LISTEN; f[9] = the socket's inode
                hexhost, hexport = f[1].split(":")
                pid = owner[f[9]]
                found.append(Listener(_host(hexhost), int(hexport, 16), pid, _comm(pid)))
    return found


def _host(hexhost: str) -> str:
    """An address of /proc/net/tcp{,6} (hex, each 32-bit word in host byte order) as text; an
    IPv4-mapped IPv6 address (::ffff:127.0.0.1) is given as the IPv4 address it carries."""
    raw = b"".join(bytes.fromhex(hexhost[i:i + 8])[::-1] for i in range(0, len(hexhost), 8))
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _dead_address() -> str:
    """host:port where nothing listens (a port the kernel just gave out and took back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


def _local_search(work: Path, *, stale: bool = True, **extra_env: str) -> LocalRun:
    """Runs a short local search (no --address) through the CLI in its own process group and Ray
    tmp dir; lists the listening sockets of every process it started once a trial is running.

    Args:
        work: the working directory (dataset, studies/).
        stale: plant a ray_current_cluster naming a dead address first.
        **extra_env: more environment for the CLI.

    Returns:
        What the run did.
    """
    data = make_image_folder(work / "data", classes=("a", "b"), per_class=4, size=24)
    (work / "space.yaml").write_text("backbone: resnet18\nlr: 0.001\nimage_size: 32\nmax_epochs: 2\n")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))  # short: Ray's socket paths live under it
    (ray_tmp / "ray").mkdir()
    if stale:  # what `ray start --head` leaves behind when it is killed: the address of a cluster now gone
        (ray_tmp / "ray" / "ray_current_cluster").write_text(_dead_address())
    tag = uuid.uuid4().hex
    e = env(work, TLREL_TAG=tag, STUB_EPOCH_S="1.5", RAY_TMPDIR=str(ray_tmp), **extra_env)
    args = ["run", str(data), "--study", STUDY, "--space", "space.yaml", "--trials", str(TRIALS),
            "--max-concurrent", "2", "--no-pretrained", "--no-cache", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "reliability.stubcli", *args], cwd=work, env=e,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r = LocalRun()
    try:
        started = work / "studies" / STUDY / "checkpoints" / "trial-0.pt.pid"
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not started.exists():
            time.sleep(0.2)
        if started.exists():
            time.sleep(0.5)  # the trial's worker is up; so are the GCS, the raylet and the agents
            r.listeners = listening(tagged(tag))
        _, r.err = proc.communicate(timeout=240)
        r.rc = proc.returncode
    finally:
        if proc.poll() is None:
            kill_tagged(tag)
            proc.wait(timeout=30)
        r.orphans = wait_untagged(tag, 30)
        kill_tagged(tag)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    try:
        r.trials = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{work / 'studies' / (STUDY + '.db')}").get_trials()
    except Exception:  # the search never made its study
        pass
    return r


@pytest.fixture(scope="module")
def stale_cluster_file(tmp_path_factory: pytest.TempPathFactory) -> LocalRun:
    """A local search on a machine where a killed `ray start --head` left ray_current_cluster."""
    return _local_search(tmp_path_factory.mktemp("stale"))


def _finished(r: LocalRun) -> int:
    return sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in r.trials)


def test_stale_ray_current_cluster_does_not_break_a_local_search(stale_cluster_file: LocalRun) -> None:
    r = stale_cluster_file
    assert r.rc == 0, r.err[-3000:]
    assert _finished(r) == TRIALS, [(t.number, t.state.name, t.user_attrs.get("error")) for t in r.trials]
    assert r.orphans == [], r.orphans


def test_ray_listens_on_loopback_only(stale_cluster_file: LocalRun) -> None:
    """Every socket a process of the search listens on is bound to 127.0.0.1 (or ::1)."""
    r = stale_cluster_file
    print("listening:", *map(str, r.listeners), sep="\n  ")
    names = {x.name for x in r.listeners}
    # The listing saw Ray's servers, not an empty or half-started session.
    assert {"gcs_server", "raylet"} <= names, [str(x) for x in r.listeners]
    assert any(n.startswith("ray::") for n in names), [str(x) for x in r.listeners]
    wide = [str(x) for x in r.listeners if x.host not in LOOPBACK]
    assert not wide, f"listening beyond loopback: {wide}; all: {[str(x) for x in r.listeners]}"


def test_ray_address_in_the_environment_is_not_joined_without_address(tmp_path: Path) -> None:
    """RAY_ADDRESS names another cluster (here: nothing listens there); without --address the search
    still runs on a Ray of its own, on loopback only."""
    r = _local_search(tmp_path, RAY_ADDRESS=_dead_address())
    assert r.rc == 0, r.err[-3000:]
    assert _finished(r) == TRIALS, [(t.number, t.state.name, t.user_attrs.get("error")) for t in r.trials]
    assert r.listeners and all(x.host in LOOPBACK for x in r.listeners), [str(x) for x in r.listeners]
    assert r.orphans == [], r.orphans
