"""Weights files: safe reading, strict loading, content identity, and fetching without hanging.

Every checkpoint, ours or downloaded, is read with `torch.load(..., weights_only=True)` (or as
safetensors): a file that needs to unpickle arbitrary objects is refused, never run.
`weights_file_id` names a file's content ("sha256:<16 hex>"), hashing each file version once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import socket
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import torch
from torch import nn

from search.backbones._types import WeightsError
from search.config import default_cache_dir

DOWNLOAD_TIMEOUT_S = 10.0  # socket timeout for weight downloads: an offline machine fails fast


def _hub_path(url: str) -> Path:
    """Where torch hub caches the file at `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


# ---------------------------------------------------------------------------------------------
# Weights identity: the content hash of the file loaded, computed once per file version

WEIGHTS_IDS_FILE = "weights-ids.json"  # under the cache dir: known hashes, shared by processes
_DIGESTS: dict[tuple[str, int, int, int, int, int], str] = {}  # this process's known hashes


def _stat_key(path: Path) -> tuple[str, int, int, int, int, int]:
    """What identifies one version of a file without reading it.

    Size and mtime alone miss a rewrite in place with the old mtime put back; the ctime cannot be
    put back, and a file swapped in by rename has a new inode.
    """
    real = path.resolve()  # the Hugging Face cache links snapshot names to blobs
    st = real.stat()
    return (str(real), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def weights_file_id(path: str | Path) -> str:
    """The content identity of a weights file, as `Backbone.weights_id` records it.

    The file is hashed once per version: the hash is remembered by (resolved path, inode, size,
    mtime, ctime) in memory and in `<cache dir>/weights-ids.json`, so later builds, in this
    process or another, do not read a large file again.

    Args:
        path: the weights file.

    Returns:
        "sha256:<first 16 hex digits of the file's sha256>".
    """
    path = Path(path)
    return _file_digest(path, _stat_key(path))


def _file_digest(path: Path, key: tuple[str, int, int, int, int, int]) -> str:
    """The content id of `path`, which must still be the version `key` was taken from (the
    caller takes `key` before loading, so the id names what was loaded)."""
    known = _DIGESTS.get(key)
    store = _digest_store()
    if known is None:
        entry = _read_digests(store).get(key[0])
        if isinstance(entry, list) and tuple(entry[:-1]) == key[1:] and str(entry[-1]).startswith("sha256:"):
            known = str(entry[-1])
    hashed = known is None
    if hashed:
        digest = hashlib.sha256()
        with open(key[0], "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        known = f"sha256:{digest.hexdigest()[:16]}"
    if _stat_key(path) != key:
        raise WeightsError(f"weights file {path} changed while it was being read; run again")
    _DIGESTS[key] = known
    if hashed:
        _remember_digest(store, key, known)
    return known


def _digest_store() -> Path:
    return default_cache_dir() / WEIGHTS_IDS_FILE


def _read_digests(store: Path) -> dict[str, Any]:
    try:
        data = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or damaged: it is only a cache
        return {}
    return data if isinstance(data, dict) else {}


def _remember_digest(store: Path, key: tuple[str, int, int, int, int, int], digest: str) -> None:
    """Adds one file's hash to the store (written atomically), dropping files that are gone."""
    entries = {p: e for p, e in _read_digests(store).items() if os.path.exists(p)}
    entries[key[0]] = [*key[1:], digest]
    tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entries, indent=0, sort_keys=True), encoding="utf-8")
        tmp.replace(store)
    except OSError:  # a read-only cache folder only costs a rehash next time
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Reading and loading


def _read_state(path: Path, name: str) -> dict[str, Any]:
    """A state_dict from a weights file, without running any code stored in it.

    torch files are read with `weights_only=True` (tensors and plain containers only: a pickled
    object that would run code on loading is refused), safetensors files as safetensors.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        if isinstance(e, pickle.UnpicklingError) and "weights only" in first.lower():
            raise WeightsError(
                f"refused weights file {path} for {name}: it holds pickled Python objects besides "
                f"tensors, and loading those could run code; save a plain state_dict instead"
            ) from None
        raise WeightsError(f"cannot read weights file {path} for {name}: {type(e).__name__}: {first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # common checkpoint wrapper
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} for {name} does not hold a state_dict")
    return state


# Old densenet checkpoints (torchvision's own among them) name layers "norm.1"; the modules are
# now "norm1". The renaming of torchvision's densenet loader (plus the BatchNorm step counter).
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _load_file(net: nn.Module, path: Path, name: str) -> None:
    """Loads a state_dict file strictly into the full network; one-line WeightsError if not."""
    state = _read_state(path, name)
    state = {(m.group(1) + m.group(2) if (m := _DENSENET_OLD_KEY.match(k)) else k): v for k, v in state.items()}
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: state_dict keys fit, sizes don't
        lines = str(e).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise WeightsError(f"weights file {path} does not fit {name}: {detail}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys {', '.join(result.missing_keys[:4])}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys {', '.join(result.unexpected_keys[:4])}")
    if problems:
        more = len(result.missing_keys) + len(result.unexpected_keys)
        raise WeightsError(
            f"weights file {path} does not fit {name}: {'; '.join(problems)} ({more} keys in all)"
        )


# ---------------------------------------------------------------------------------------------
# Fetching


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # urllib (torch.hub) opens sockets without a timeout; a default one turns a black-holed
    # network into a quick error instead of a hang.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` seconds."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False

