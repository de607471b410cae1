"""The live view while a search runs: a status line, and the report refreshed now and then.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray import tune

from search.runner._ledger import _Tally
from search.settings import SearchSettings

REPORT_EVERY_S = 30.0  # how often the live report is rewritten while trials finish


PROGRESS_EVERY_S = 5.0


class ProgressView(tune.Callback):
    """Prints one line to stderr at most every few seconds: states, best so far, time left."""

    def __init__(self, tally: _Tally, *, base: dict, budget_s: float | None, every_s: float = PROGRESS_EVERY_S) -> None:
        self.tally, self.base, self.budget_s, self.every_s = tally, base, budget_s, every_s
        self.start = time.time()
        self.last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.time()
        if now - self.last >= self.every_s:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        print(self.line(time.time()), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        t, b = self.tally, self.base
        text = (
            f"[search] done {b['complete'] + t.complete}  running {t.running}  "
            f"pruned {b['pruned'] + t.pruned}  failed {b['failed'] + t.failed}"
        )
        best, backbone = t.best, t.best_backbone
        if b.get("best") is not None and (best is None or (b["best"] > best if t.mode == "max" else b["best"] < best)):
            best, backbone = b["best"], b.get("best_backbone")
        if best is not None:
            text += f"  best {best:.4f} ({backbone})"
        if self.budget_s:
            text += f"  time left {max(0.0, self.budget_s - (now - self.start)):.0f}s"
        return text


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
