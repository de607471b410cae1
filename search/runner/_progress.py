"""The live view while a search runs, and the report refreshed now and then.

In a terminal (or a Jupyter notebook) the view is a rich `Live` display that updates in place:
one row per running trial, the counts, the best trial so far with its config, trials done out of
requested and the time left; each finished trial scrolls above it as one line. Anywhere else (a
pipe, a log file) it prints plain lines, and only when something changed.

What the view shows is computed first (`ProgressState`, plain data), then drawn (`plain_line`,
`render`), so tests check the data and both drawings without Ray.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ray import tune

from search.runner._ledger import _Tally
from search.settings import SearchSettings

REPORT_EVERY_S = 30.0  # how often the live report is rewritten while trials finish


PROGRESS_EVERY_S = 0.5  # how often the live display is redrawn (a pipe only gets lines on change)


@dataclass(frozen=True)
class TrialRow:
    """One running trial, as a row of the live view."""

    number: Any  # the Optuna trial number (or Tune's id before it has one)
    backbone: str  # backbone name, "(scratch)" appended when it starts from random weights
    freeze_depth: Any  # stages frozen, "all" = head only
    epoch: int  # epochs reported so far
    epochs: int | None  # epochs of a full trial (ASHA's largest rung)
    score: float | None  # the objective at the latest epoch
    elapsed_s: float  # since the view first saw it running


@dataclass(frozen=True)
class ProgressState:
    """Everything the live view shows at one moment."""

    running: tuple[TrialRow, ...]  # one row per running trial
    complete: int  # COMPLETE trials of the study (earlier runs included)
    pruned: int
    failed: int
    target: int | None  # trials the study should reach (--trials)
    best: float | None  # best objective so far
    best_config: str  # the best trial's backbone and params, in words
    time_left_s: float | None  # the time budget's rest, else an estimate from finished trials
    metric: str = "val_acc"
    finished_lines: tuple[str, ...] = field(default=())  # trials that finished since the last draw

    @property
    def done(self) -> int:
        return self.complete + self.pruned + self.failed


def describe_config(config: dict, *, keys: tuple[str, ...] = ("freeze_depth", "augmentation", "lr")) -> str:
    """A trial's config in a few words: backbone, pretrained or not, freeze depth, policy, lr."""
    backbone = str(config.get("backbone", "?"))
    if config.get("pretrained") is False:
        backbone += " (scratch)"
    parts = [backbone]
    for k in keys:
        if k in config:
            v = config[k]
            parts.append(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts)


def plain_line(state: ProgressState, *, with_time: bool = True) -> str:
    """The one-line status printed where stderr is not a terminal."""
    target = f"/{state.target}" if state.target else ""
    text = (
        f"[search] trials {state.done}{target}  complete {state.complete}  pruned {state.pruned}  "
        f"failed {state.failed}  running {len(state.running)}"
    )
    if state.best is not None:
        text += f"  best {state.best:.4f} ({state.best_config})"
    if with_time and state.time_left_s is not None:
        text += f"  time left {_duration(state.time_left_s)}"
    return text


def render(state: ProgressState) -> Any:
    """The live display: a table of running trials above the counts and the best so far."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in (("trial", "right"), ("backbone", "left"), ("freeze", "left"), ("epoch", "right"),
                          (state.metric, "right"), ("elapsed", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in state.running:
        epoch = f"{r.epoch}/{r.epochs}" if r.epochs else str(r.epoch)
        score = f"{r.score:.4f}" if r.score is not None else "-"
        table.add_row(str(r.number), r.backbone, str(r.freeze_depth), epoch, score, _duration(r.elapsed_s))
    target = f"/{state.target}" if state.target else ""
    counts = Text.assemble(
        ("trials ", "bold"), f"{state.done}{target} done  ",
        ("complete ", "green"), f"{state.complete}  ", ("pruned ", "yellow"), f"{state.pruned}  ",
        ("failed ", "red"), f"{state.failed}  ", "running ", f"{len(state.running)}",
    )
    if state.time_left_s is not None:
        counts.append(f"  time left {_duration(state.time_left_s)}")
    best = Text("best: -") if state.best is None else Text.assemble(
        ("best ", "bold"), (f"{state.best:.4f}", "bold green"), f"  {state.best_config}"
    )
    return Group(table, counts, best) if state.running else Group(counts, best)


def _duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class ProgressView(tune.Callback):
    """The live view of a search: rich in a terminal or notebook, plain changed lines elsewhere.

    Args:
        tally: live counts the searcher keeps.
        base: counts and best of the study before this run (`_base_tally`).
        budget_s: the time budget, or None.
        target: trials the study should reach.
        max_epochs: epochs of a full trial.
        metric: the objective's name.
        console: where to draw (tests pass a `rich.console.Console` on a StringIO); None: stderr.
        every_s: the least time between two redraws of the live display.
    """

    def __init__(self, tally: _Tally, *, base: dict, budget_s: float | None, target: int | None = None,
                 max_epochs: int | None = None, metric: str = "val_acc", console: Any = None,
                 every_s: float = PROGRESS_EVERY_S) -> None:
        from rich.console import Console

        self.tally, self.base, self.budget_s, self.every_s = tally, base, budget_s, every_s
        self.target, self.max_epochs, self.metric = target, max_epochs, metric
        self.console = console if console is not None else Console(file=sys.stderr)
        self.live_mode = bool(self.console.is_terminal or self.console.is_jupyter)
        self.start = time.time()
        self.last = 0.0
        self.seen_running: dict[str, float] = {}  # Tune trial id -> when first seen running
        self.finished: dict[str, tuple[float | None, dict]] = {}  # Tune trial id -> (final score, config)
        self.durations: list[float] = []
        self.pending_lines: list[str] = []
        self.last_plain: str | None = None
        self.live: Any = None

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment's state: a console (locks, a file) and a
        # live display are this process's, not state.
        return {k: v for k, v in self.__dict__.items() if k not in ("console", "live")}

    def __setstate__(self, state: dict) -> None:
        from rich.console import Console

        self.__dict__.update(state)
        self.console, self.live = Console(file=sys.stderr), None

    # ----- Tune's hooks ---------------------------------------------------------------------

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.time()
        for t in trials:
            if t.status == "RUNNING":
                self.seen_running.setdefault(t.trial_id, now)
        if self.live_mode and not self.pending_lines and now - self.last < self.every_s:
            return
        self.last = now
        self.draw(self.state(trials, now))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for t in trials:
            if t.status in ("TERMINATED", "ERROR") and t.trial_id not in self.finished:
                self._finish(t, error=t.status == "ERROR")
        self.draw(self.state(trials, time.time()), final=True)
        self.close()

    def close(self) -> None:
        """Stops the live display (the terminal gets its cursor back); safe to call twice."""
        if self.live is not None:
            live, self.live = self.live, None
            live.stop()

    # ----- compute --------------------------------------------------------------------------

    def _finish(self, trial: Any, *, error: bool = False) -> None:
        if trial.trial_id in self.finished:
            return
        result = dict(trial.last_result or {})
        config = {k: v for k, v in dict(trial.config or {}).items() if not str(k).startswith("_")}
        score = result.get(self.metric)
        score = float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None
        self.finished[trial.trial_id] = (score, config)
        started = self.seen_running.get(trial.trial_id)
        if started is not None:
            self.durations.append(time.time() - started)
        epoch = int(result.get("epoch") or result.get("training_iteration") or 0)
        number = (trial.config or {}).get("_trial_number", trial.trial_id)
        how = self._ending(result, score, epoch, int(config.get("epochs") or self.max_epochs or 0), error=error)
        shown = f"{self.metric} {score:.4f}" if score is not None else f"{self.metric} -"
        self.pending_lines.append(f"trial {number}  {describe_config(config)}: {shown}, {how}")

    def _ending(self, result: dict, score: float | None, epoch: int, epochs: int, *, error: bool) -> str:
        """How a trial ended, in the words of the study's states: a trial the time budget stopped
        is stopped by it, before its first epoch too, never failed."""
        by_budget = bool(self.budget_s) and time.time() - self.start >= self.budget_s - 2.0
        if error or result.get("error"):
            return f"failed: {str(result.get('error') or 'worker error')[:120]}"
        if by_budget and (score is None or epoch < epochs):
            return f"stopped by the time budget at epoch {epoch}/{epochs}" if epoch else \
                "stopped by the time budget before its first epoch"
        if score is None:
            return f"failed: {self.metric} is not a finite number"
        if epochs and epoch < epochs:
            return f"stopped early at epoch {epoch}/{epochs}"
        return f"finished {epoch} epochs"

    def state(self, trials: list, now: float) -> ProgressState:
        """What the view shows now, from Tune's trials, the tally and the study's earlier trials."""
        rows = []
        for t in trials:
            if t.status != "RUNNING":
                continue
            result = dict(t.last_result or {})
            score = result.get(self.metric)
            config = dict(t.config or {})
            backbone = str(config.get("backbone", "?")) + (" (scratch)" if config.get("pretrained") is False else "")
            rows.append(TrialRow(
                number=config.get("_trial_number", t.trial_id), backbone=backbone,
                freeze_depth=config.get("freeze_depth", "-"), epoch=int(result.get("epoch") or 0),
                epochs=self.max_epochs,
                score=float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None,
                elapsed_s=now - self.seen_running.get(t.trial_id, now),
            ))
        tl, b = self.tally, self.base
        best, best_config = self._best()
        lines, self.pending_lines = tuple(self.pending_lines), []
        return ProgressState(
            running=tuple(rows), complete=b.get("complete", 0) + tl.complete, pruned=b.get("pruned", 0) + tl.pruned,
            failed=b.get("failed", 0) + tl.failed, target=self.target, best=best, best_config=best_config,
            time_left_s=self._time_left(now, b.get("complete", 0) + tl.complete + b.get("pruned", 0) + tl.pruned
                                        + b.get("failed", 0) + tl.failed, len(rows)),
            metric=self.metric, finished_lines=lines,
        )

    def _best(self) -> tuple[float | None, str]:
        t, b = self.tally, self.base
        best, backbone = t.best, t.best_backbone
        if b.get("best") is not None and (best is None or (b["best"] > best if t.mode == "max" else b["best"] < best)):
            return b["best"], f"{b.get('best_backbone')} (earlier run)"
        if best is None:
            return None, ""
        for score, config in self.finished.values():  # this run's best: its config in words
            if score is not None and abs(score - best) < 1e-12 and config.get("backbone") == backbone:
                return best, describe_config(config)
        return best, str(backbone)

    def _time_left(self, now: float, done: int, running: int) -> float | None:
        if self.budget_s:
            return max(0.0, self.budget_s - (now - self.start))
        if not self.durations or not self.target:
            return None
        # No budget: the trials still to run, at the mean finished trial's length, side by side.
        left = max(0, self.target - done)
        return left * (sum(self.durations) / len(self.durations)) / max(1, running)

    # ----- draw -----------------------------------------------------------------------------

    def draw(self, state: ProgressState, *, final: bool = False) -> None:
        """Shows `state`: updates the live display, or prints the plain line if it changed."""
        if self.live_mode:
            self._draw_live(state, final=final)
            return
        out = self.console.file
        for line in state.finished_lines:
            print(line, file=out, flush=True)
        key = plain_line(state, with_time=False)  # the clock alone is no change
        if key != self.last_plain:
            self.last_plain = key
            print(plain_line(state), file=out, flush=True)

    def _draw_live(self, state: ProgressState, *, final: bool) -> None:
        from rich.live import Live

        if self.live is None and not final:
            self.live = Live(render(state), console=self.console, refresh_per_second=4, transient=True)
            self.live.start()
        for line in state.finished_lines:  # finished trials scroll above the live rows
            self.console.print(line, markup=False, highlight=False)
        if final:
            self.close()
            self.console.print(render(state))
        elif self.live is not None:
            self.live.update(render(state), refresh=True)


class ReportRefresher(tune.Callback):
    """Rewrites reports/<study>/index.html while the search runs, when trials have finished."""

    def __init__(self, settings: SearchSettings, *, every_s: float = REPORT_EVERY_S) -> None:
        self.settings, self.every_s = settings, every_s
        self.last, self.seen, self.warned = time.time(), 0, False

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.time()
        finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        if finished == self.seen or now - self.last < self.every_s:
            return
        self.seen, self.last = finished, now
        try:
            from search.report import write_report

            s = self.settings
            write_report(s.study, storage=s.storage_url, studies_dir=s.studies_dir, reports_dir=s.reports_dir)
        except Exception as e:  # a report is a view; it never stops the search
            if not self.warned:
                self.warned = True
                print(f"warning: report not refreshed: {e}", file=sys.stderr)
