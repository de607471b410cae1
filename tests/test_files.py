"""The package's atomic writes and file lock (`search/_files.py`, imported from `search.config`)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from search import _files
from search.config import atomic_save, atomic_write_bytes, atomic_write_text, file_lock
from search.model_io import load_checkpoint, save_checkpoint


def test_atomic_writes_replace_the_file_and_leave_nothing_else(tmp_path: Path) -> None:
    text = tmp_path / "new" / "folder" / "a.txt"
    assert atomic_write_text(text, "first ü") == text  # the folder is created
    atomic_write_text(text, "second ü")
    assert text.read_text(encoding="utf-8") == "second ü"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_save(tmp_path / "c.pt", {"w": torch.ones(2)})
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.txt", "b.bin", "c.pt"]


def test_a_crash_mid_save_keeps_the_old_checkpoint_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "trial-0.pt"
    model = torch.nn.Linear(2, 2)
    save_checkpoint(model, path)

    def crash(obj: object, f: str | Path, *args: object, **kwargs: object) -> None:
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(torch.nn.Linear(2, 2), path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["weight"], model.state_dict()["weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["trial-0.pt"]  # the half-written temp file is gone


_HOLD = """
import sys, time
from pathlib import Path
from search.config import file_lock
with file_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(1.0)
    Path(sys.argv[2]).write_text("done")
"""


def test_file_lock_makes_another_process_wait(tmp_path: Path) -> None:
    lock, done = tmp_path / "x.lock", tmp_path / "done"
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock), str(done)], cwd=root,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with file_lock(lock):
            assert done.exists(), "the lock was taken while another process held it"
    finally:
        child.wait(timeout=60)
    assert child.returncode == 0


def test_file_lock_makes_another_thread_wait(tmp_path: Path) -> None:
    lock, order = tmp_path / "x.lock", []
    held = threading.Event()

    def hold() -> None:
        with file_lock(lock):
            held.set()
            time.sleep(0.5)
            order.append("first")

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    with file_lock(lock):
        order.append("second")
    t.join()
    assert order == ["first", "second"]


def test_file_lock_on_windows_uses_msvcrt_and_waits_past_its_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """msvcrt.locking(LK_LOCK) gives up after about 10 s with OSError; file_lock keeps waiting."""
    calls = []
    busy = iter([True, True, False])  # held by someone else for two rounds of retries

    def locking(fd: int, mode: int, nbytes: int) -> None:
        calls.append((mode, nbytes))
        if mode == 1 and next(busy):
            raise OSError(36, "Resource deadlock avoided")

    monkeypatch.setitem(sys.modules, "msvcrt", types.SimpleNamespace(LK_LOCK=1, LK_UNLCK=0, locking=locking))
    monkeypatch.setitem(sys.modules, "fcntl", None)  # any use of fcntl would fail
    monkeypatch.setattr(_files, "_WINDOWS", True)
    with file_lock(tmp_path / "x.lock"):
        assert calls == [(1, 1)] * 3
    assert calls[-1] == (0, 1)
