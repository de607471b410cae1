"""Ray itself: starting a local Ray on loopback or joining a cluster, concurrency, and checking that
every node sees the dataset.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import ray

from search.config import TLSearchError
from search.settings import SearchSettings

if TYPE_CHECKING:
    from search.data import DatasetIndex

NODE_CHECK_FILES = 1000  # dataset files each Ray node stats before a cluster search


NODE_CHECK_TIMEOUT_S = 120.0


def default_concurrency(*, cpus: float, gpus: float, cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials run at once on a machine: as many as its CPUs (and GPUs) hold.

    Args:
        cpus: CPUs Ray can use.
        gpus: GPUs Ray can use.
        cpus_per_trial: CPUs each trial reserves.
        gpus_per_trial: GPUs (or a fraction) each trial reserves.

    Returns:
        The number of concurrent trials, >= 1.
    """
    n = math.floor(cpus / cpus_per_trial) if cpus_per_trial > 0 else int(cpus) or 1
    if gpus_per_trial > 0:
        n = min(n, math.floor(gpus / gpus_per_trial + 1e-9))
    return max(1, n)


RUN_LOG = "tlsearch.log"  # under studies/<study>/: what Ray and Optuna said during the run

# Loggers whose start-up warnings and info lines (Ray's token authentication, "Started a local Ray
# instance", Optuna's notes) go to the run's log file instead of the terminal, unless --verbose.
QUIET_LOGGERS = ("ray", "optuna", "py.warnings")


@contextlib.contextmanager
def console_log(experiment_dir: Path, *, verbose: bool = False) -> Iterator[Path]:
    """Sends Ray's and Optuna's own log lines and Python warnings to studies/<study>/tlsearch.log.

    The live view and our one-line errors stay on the terminal; with `verbose` nothing is moved.
    Ray's and Optuna's handlers are put back afterwards.

    Args:
        experiment_dir: studies/<study>/ (settings.experiment_dir).
        verbose: leave every message on the terminal.

    Yields:
        The log file's path (recorded with `search.outputs.note_run_log`, so a failed run's error
        line can name it).
    """
    from search.outputs import note_run_log

    path = Path(experiment_dir) / RUN_LOG
    note_run_log(path)
    if verbose:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    names = [*QUIET_LOGGERS, *(n for n, lg in logging.root.manager.loggerDict.items()
                               if n.startswith("ray.") and isinstance(lg, logging.Logger) and lg.handlers)]
    saved = {}
    for name in names:
        logger = logging.getLogger(name)
        saved[name] = (list(logger.handlers), logger.propagate)
        logger.handlers[:] = [handler]
        logger.propagate = False
    logging.captureWarnings(True)  # library warnings (deprecations, experimental APIs) go there too
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield path
    finally:
        logging.captureWarnings(False)
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate
        handler.close()


def _ensure_ray(settings: SearchSettings, *, verbose: bool = False) -> None:
    """Starts Ray once per process (or joins --address); reuses a running session.

    Without --address the Ray is this search's own and listens on loopback only. Its workers'
    output reaches the terminal only with `verbose`; it stays in Ray's session logs otherwise.
    """
    if ray.is_initialized():
        return
    # Workers must import `search` even when it is not installed (a checkout on PYTHONPATH).
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the search package
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if settings.address:
        ray.init(address=settings.address, log_to_driver=verbose)
        return
    # address="local": a Ray of this search's own, never the cluster RAY_ADDRESS names or the one
    # a `ray start` left in /tmp/ray/ray_current_cluster (perhaps killed since).
    with _single_machine_ray():
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=verbose)
    node_ip = ray.util.get_node_ip_address()
    if node_ip not in LOOPBACK:
        print(f"warning: Ray's servers listen on every interface (node IP {node_ip}), not on loopback only",
              file=sys.stderr)


def start_ray(settings: SearchSettings, *, verbose: bool = False) -> bool:
    """`_ensure_ray`, saying whether this call started Ray (one already running is not the caller's).

    Returns:
        True when Ray was started here, so that its caller also shuts it down (`stop_ray`).
    """
    if ray.is_initialized():
        return False
    _ensure_ray(settings, verbose=verbose)
    return True


def stop_ray() -> None:
    """Shuts down the Ray that `start_ray` started (a command ends with it, inside its own time)."""
    if ray.is_initialized():
        ray.shutdown()


# Ray's servers (GCS, raylet, object manager, agents, each worker's gRPC server) bind loopback only
# when the node's IP is loopback; any other node IP (even 127.0.0.2) means every interface. On Linux,
# ray.init rewrites a loopback `_node_ip_address` to the routable one (so does `ray start
# --node-ip-address 127.0.0.1`), and Ray 2.60 has no bind option. Only Ray's single-machine mode (its
# default on macOS and Windows) keeps a loopback node IP: env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
# read once, when `ray` is imported (here with this module, before the search knows it is local),
# into ray._private.ray_constants.ENABLE_RAY_CLUSTER. So that value is set around the driver's
# ray.init, the only reader that matters: Ray's processes get the node IP on their command line.
# Token authentication is not touched.
LOOPBACK = ("127.0.0.1", "::1")


@contextlib.contextmanager
def _single_machine_ray() -> Iterator[None]:
    """Ray's single-machine mode for the ray.init inside (set back after: --address runs later in
    this process resolve addresses as usual)."""
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # another Ray: _ensure_ray warns if it binds wide
        yield
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def check_nodes_see_data(index: DatasetIndex, *, experiment_dir: Path | None = None,
                         timeout_s: float = NODE_CHECK_TIMEOUT_S) -> dict[str, dict]:
    """Checks, on every alive Ray node, that the dataset is there at the same path.

    A tiny task pinned to each node stats up to NODE_CHECK_FILES of the dataset's images (evenly
    spread) and compares their sizes with the driver's; a node that cannot run it (tlsearch not
    installed there) fails too. A node that does not see the experiment folder only gets a
    warning: its trials keep their checkpoints on that node.

    Args:
        index: the scanned dataset (`search.data.DatasetIndex`).
        experiment_dir: studies/<study>/, checked for the warning; None: not checked.
        timeout_s: how long to wait for every node's answer.

    Returns:
        {node id: {"address", "missing", "checked", "experiment_dir"}} for every alive node.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    samples = [path for path, _ in (*index.train, *index.val)]
    step = max(1, math.ceil(len(samples) / NODE_CHECK_FILES))
    probe = [(path, os.path.getsize(path)) for path in samples[::step]]
    exp = str(experiment_dir) if experiment_dir is not None else None
    task = ray.remote(num_cpus=0, max_retries=0)(_node_sees)
    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
    refs = {
        node: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(index.root, probe, exp)
        for node in nodes
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    found: dict[str, dict] = {}
    problems: list[str] = []
    for node, ref in refs.items():
        where = f"{nodes[node]} (node {node[:8]})"
        if ref not in ready:
            ray.cancel(ref, force=True)
            problems.append(f"{where}: no answer within {timeout_s:.0f}s")
            continue
        try:
            found[node] = {"address": nodes[node], **ray.get(ref)}
        except Exception as e:  # e.g. tlsearch not installed on that node
            problems.append(f"{where}: {str(getattr(e, 'cause', None) or e).strip().splitlines()[-1]}")
            continue
        r = found[node]
        if not r["root"]:
            problems.append(f"{where}: no folder {index.root}")
        elif r["missing"]:
            problems.append(f"{where}: {r['missing']} of {r['checked']} checked images missing or of another size")
    if problems:
        raise TLSearchError(
            f"dataset {index.root} is not the same on every Ray node ({len(problems)} of {len(refs)}): "
            + "; ".join(problems)
            + "; put it on storage every node mounts at the same path (or copy it there) and retry"
        )
    blind = [f"{r['address']} (node {n[:8]})" for n, r in found.items() if exp and not r["experiment_dir"]]
    if blind:
        print(f"warning: {exp} is not visible on {', '.join(blind)}: checkpoints of trials there stay on "
              "those nodes; run from a folder on shared storage to keep them together", file=sys.stderr)
    return found


def _node_sees(root: str, probe: list[tuple[str, int]], experiment_dir: str | None) -> dict:
    """Runs on one node: is the dataset folder there, and are the probed files the same size?"""
    if not os.path.isdir(root):
        return {"root": False, "missing": len(probe), "checked": len(probe), "experiment_dir": False}
    missing = 0
    for path, size in probe:
        try:
            missing += os.path.getsize(path) != size
        except OSError:
            missing += 1
    seen = bool(experiment_dir) and os.path.isdir(experiment_dir)
    return {"root": True, "missing": missing, "checked": len(probe), "experiment_dir": seen}
