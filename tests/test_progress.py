"""The live view (search/runner/_progress.py): rich in a terminal, plain changed lines in a pipe."""

from __future__ import annotations

import io
import pickle
import re
from types import SimpleNamespace

from rich.console import Console

from search.runner._ledger import _Tally
from search.runner._progress import ProgressView, plain_line


def _trial(tid: str, number: int, status: str, *, epoch: int = 0, acc: float | None = None, **config) -> SimpleNamespace:
    cfg = {"backbone": "timm/tf_efficientnet_lite0", "pretrained": True, "freeze_depth": "all",
           "augmentation": "none", "lr": 0.01, "_trial_number": number, **config}
    result = {"epoch": epoch, "val_acc": acc} if epoch else {}
    return SimpleNamespace(trial_id=tid, status=status, config=cfg, last_result=result)


def _view(console: Console, tally: _Tally | None = None) -> ProgressView:
    return ProgressView(tally or _Tally(), base={"complete": 0, "pruned": 0, "failed": 0}, budget_s=None,
                        target=10, max_epochs=4, metric="val_acc", console=console, every_s=0.0)


def _run_three_steps(view: ProgressView, tally: _Tally) -> None:
    a = _trial("a", 0, "RUNNING", epoch=2, acc=0.91)
    b = _trial("b", 1, "RUNNING", epoch=1, acc=0.31, pretrained=False, backbone="timm/tf_efficientnet_lite1",
               freeze_depth=3)
    tally.running = 2
    view.on_step_end(1, [a, b])
    view.on_step_end(2, [a, b])  # nothing changed
    a_done = _trial("a", 0, "TERMINATED", epoch=4, acc=0.98)
    tally.running, tally.complete = 1, 1
    tally.offer(0.98, "timm/tf_efficientnet_lite0")
    view.on_trial_complete(3, [a_done, b], a_done)
    view.on_step_end(3, [a_done, b])
    b_done = _trial("b", 1, "TERMINATED", epoch=1, acc=0.31, pretrained=False, backbone="timm/tf_efficientnet_lite1")
    tally.running, tally.pruned = 0, 1
    view.on_trial_complete(4, [a_done, b_done], b_done)
    view.on_experiment_end([a_done, b_done])


def test_terminal_gets_a_live_display_with_a_row_per_running_trial() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=140, color_system="standard")
    tally = _Tally()
    view = _view(console, tally)
    assert view.live_mode
    _run_three_steps(view, tally)
    raw = out.getvalue()
    assert "\x1b[" in raw  # drawn in place, by rich
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    # The running rows: backbone (scratch marked), freeze depth, epoch k/n, latest score.
    assert "tf_efficientnet_lite1 (scratch)" in text and "1/4" in text and "0.3100" in text and "2/4" in text
    # A finished trial scrolls above as a line; the counts, best with its config, done out of requested.
    assert "trial 0  timm/tf_efficientnet_lite0, freeze_depth all, augmentation none, lr 1.0e-02: val_acc 0.9800" in text
    assert "stopped early at epoch 1/4" in text
    assert "2/10 done" in text and "best 0.9800" in text
    assert view.live is None  # stopped: the terminal has its cursor back


def test_pipe_gets_plain_lines_only_when_something_changed() -> None:
    out = io.StringIO()
    tally = _Tally()
    view = _view(Console(file=out, width=140), tally)
    assert not view.live_mode
    _run_three_steps(view, tally)
    text = out.getvalue()
    assert "\x1b" not in text
    lines = text.splitlines()
    status = [line for line in lines if line.startswith("[search]")]
    assert len(status) == len(set(status))  # a line repeats only when something changed
    assert status[0] == "[search] trials 0/10  complete 0  pruned 0  failed 0  running 2"
    assert any(line.startswith("trial 0  timm/tf_efficientnet_lite0") and "finished 4 epochs" in line for line in lines)
    assert "best 0.9800 (timm/tf_efficientnet_lite0, freeze_depth all, augmentation none, lr 1.0e-02)" in status[-1]
    assert status[-1].startswith("[search] trials 2/10  complete 1  pruned 1")


def test_time_left_is_not_a_change() -> None:
    view = _view(Console(file=io.StringIO()))
    state = view.state([], 0.0)
    assert plain_line(state, with_time=False) == plain_line(state.__class__(**{**state.__dict__, "time_left_s": 5.0}),
                                                            with_time=False)


def test_view_pickles_without_its_console() -> None:
    # Tune pickles callbacks with the experiment state; a console holds locks.
    view = _view(Console(file=io.StringIO(), force_terminal=True))
    view.on_step_end(1, [_trial("a", 0, "RUNNING", epoch=1, acc=0.5)])
    copy = pickle.loads(pickle.dumps(view))
    assert copy.live is None and copy.tally.mode == "max"
    view.close()
