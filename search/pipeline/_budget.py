"""How `fit` spends one time budget: what it keeps for the steps after the search, what the search
gets, whether an optional step still fits, and a clock whose phases add up to the wall clock.

Decisions are pure functions of plain numbers, tested without a search.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from search.config import ConfigError

# Allowances for the steps after the search that do not grow with the data. Ray winds down and
# the driver reconciles the study; the report and best config are written; a model folder is
# written with its TorchScript and ONNX exports (tracing a large backbone takes seconds).
SEARCH_OVERHEAD_S = 10.0
REPORT_S = 5.0
# After the summary: printing it and the interpreter's exit (its threads and atexit handlers), which
# no phase can time: 3.4 s from outside the process on a loaded 2-core machine.
EXIT_S = 4.0
SHIP_S = 10.0
EVALUATE_S = 2.0
# Per image, when no trial of the study has measured its latency yet: one forward pass in a batch
# (a trial's batch-1 latency, once measured, is a safe bound on it) and one decode.
FORWARD_S = {"cpu": 0.02, "gpu": 0.002}
DECODE_S = 0.003
# The ensemble procedure's passes over val and test per member: the plain view and the mirror
# image (flip TTA). Its members are the kept trials, and one soup per backbone with 2+ kept.
ENSEMBLE_PASSES = 2
# A trained image costs its forward pass and a backward pass of about twice that, when nothing
# better is measured (a trial that trained on cached features measured the head's cost only).
BACKWARD_FACTOR = 3.0
# --refit trains one config again on train+val; before the search (no trial measured yet) it is
# given this share of the budget; once a trial is chosen, its own estimate (`refit_seconds`) decides.
REFIT_SHARE = 0.3
# A refit's time over its estimate: set-up, loaders, the slower epochs of a loaded machine.
REFIT_MARGIN = 1.2
# Starting a local Ray (its processes, the driver's connection): allowed for when a budget is
# checked before Ray starts, so that the smallest budget named then still holds once it has.
RAY_START_S = 5.0
HINT_SPARE_S = 3.0
# A search shorter than this finds nothing worth shipping: the budget is refused instead.
MIN_SEARCH_S = 10.0
# The ensemble procedure never takes more than this share of the budget from the search; when its
# estimate does not fit in what is left when its turn comes, it is skipped and the summary says so.
MAX_RESERVE_SHARE = 0.5

_IMPORTED_AT = time.monotonic()


@dataclass(frozen=True)
class Reserve:
    """Seconds kept from the search for the steps after it."""

    overhead_s: float  # the search winding down after its budget
    report_s: float  # report and best config
    ship_s: float  # writing the model folder (never cut)
    evaluate_s: float  # the held-out evaluation on test/ (never cut)
    refit_s: float  # the refit on train+val (--refit); 0 without
    ensemble_s: float = 0.0  # the ensemble procedure (its share is cut first, to 0 where need be)
    exit_s: float = EXIT_S  # the process's end, after the summary

    @property
    def total_s(self) -> float:
        return self.fixed_s + self.refit_s + self.ensemble_s

    @property
    def fixed_s(self) -> float:
        """What no budget cuts: all but the ensemble and the refit."""
        return self.overhead_s + self.report_s + self.ship_s + self.evaluate_s + self.exit_s


def per_image_seconds(latencies_ms: Iterable[float | None], *, gpu: bool) -> float:
    """Seconds one image costs a forward pass: the slowest measured batch-1 latency of the study's
    trials, or the allowance (`FORWARD_S`) before any was measured.

    Args:
        latencies_ms: the trials' recorded latencies (None: not recorded).
        gpu: whether forward passes run on a GPU.

    Returns:
        Seconds per image, decode included.
    """
    measured = [v for v in latencies_ms if isinstance(v, (int, float)) and v > 0]
    forward = max(measured) / 1000.0 if measured else FORWARD_S["gpu" if gpu else "cpu"]
    return forward + DECODE_S


def ensemble_members(kept: Sequence[tuple[str, float | None]]) -> list[float | None]:
    """The members the ensemble procedure runs over val and test, each as its batch-1 latency.

    Args:
        kept: (backbone, latency_ms or None) of each trial it keeps (`search.ensemble.kept_trials`;
            before the search: each backbone of the space as many times as checkpoints are kept).

    Returns:
        One latency per member: every kept trial, and a soup per backbone with two or more kept
        trials, at the slowest of them.
    """
    members: list[float | None] = [lat for _, lat in kept]
    by_backbone: dict[str, list[float | None]] = {}
    for backbone, lat in kept:
        by_backbone.setdefault(backbone, []).append(lat)
    for lats in by_backbone.values():
        if len(lats) > 1:
            measured = [v for v in lats if isinstance(v, (int, float)) and v > 0]
            members.append(max(measured) if measured else None)
    return members


def ensemble_seconds(*, val_images: int, test_images: int, members: Sequence[float | None], gpu: bool) -> float:
    """The ensemble procedure's forward passes: each member at its own latency, over val and test,
    plain and mirrored.

    Args:
        val_images: validation images.
        test_images: held-out images (0: none; the procedure then cross-fits on val).
        members: each member's batch-1 latency in ms (`ensemble_members`; None: not measured).
        gpu: whether forward passes run on a GPU (the allowance for an unmeasured member).

    Returns:
        Seconds.
    """
    per_member = sum(per_image_seconds([m], gpu=gpu) for m in members) if members else 0.0
    return ENSEMBLE_PASSES * (val_images + test_images) * per_member


def evaluate_seconds(*, test_images: int, per_image_s: float) -> float:
    """The held-out evaluation: one pass over test/ (0 without test/)."""
    return EVALUATE_S + test_images * per_image_s if test_images else 0.0


def plan_reserve(*, budget_s: float, test_images: int, per_image_s: float, ensemble_s: float = 0.0,
                 refit: bool = False) -> Reserve:
    """What the steps after the search are given (the one place the reserve is computed).

    Args:
        budget_s: the whole command's budget.
        test_images: held-out images (the evaluation reads them; 0: no test/).
        per_image_s: seconds per image of the shipped model (`per_image_seconds`).
        ensemble_s: the ensemble procedure's estimate (`ensemble_seconds`); 0: not tried.
        refit: whether --refit trains the shipped config again.

    Returns:
        The reserve. The ensemble's part is cut to keep the reserve within `MAX_RESERVE_SHARE` of
        the budget (plus the refit's share), and the procedure is then tried only if it fits when
        its turn comes; the model folder and the evaluation are never cut (a budget they leave no
        search in is refused by `search_budget`).
    """
    fixed = Reserve(SEARCH_OVERHEAD_S, REPORT_S, SHIP_S, evaluate_seconds(test_images=test_images,
                                                                         per_image_s=per_image_s), 0.0)
    ensemble = min(ensemble_s, max(0.0, MAX_RESERVE_SHARE * budget_s - fixed.total_s))
    return Reserve(fixed.overhead_s, fixed.report_s, fixed.ship_s, fixed.evaluate_s,
                   REFIT_SHARE * budget_s if refit else 0.0, ensemble)


def search_budget(budget_s: float, *, elapsed_s: float, reserve: Reserve) -> float:
    """The search's own time budget: what is left of the command's after what has passed and the reserve.

    Args:
        budget_s: the whole command's budget (--time-budget).
        elapsed_s: seconds already spent (the process's start, scanning the data, downloads, Ray).
        reserve: what the steps after the search keep.

    Returns:
        Seconds. Where the search would get less than `MIN_SEARCH_S`, the ensemble's share is given
        back to it first (the procedure then runs only if it still fits); a budget that leaves too
        little even so is a `ConfigError` naming the smallest one that would do.
    """
    left = budget_s - elapsed_s - reserve.total_s
    if left < MIN_SEARCH_S:
        left += reserve.ensemble_s
    if left < MIN_SEARCH_S:
        need = elapsed_s + reserve.fixed_s + MIN_SEARCH_S
        if reserve.refit_s:
            need /= 1 - REFIT_SHARE
        # Rounded up, with a few seconds to spare: the start takes a little longer on one run than another.
        need = math.ceil((need + HINT_SPARE_S) / 5) * 5
        raise ConfigError(f"--time-budget {budget_s:g}s leaves {max(left, 0):.0f}s to search after "
                          f"{elapsed_s + reserve.fixed_s + reserve.refit_s:.0f}s for starting, shipping and "
                          f"evaluating; give at least {need}s")
    return left


def refit_seconds(*, train_images: int, val_images: int, epochs: int, probe_epochs: int = 0,
                  train_s_per_image: float | None, forward_s_per_image: float, cached: bool) -> float:
    """What training a trial's config again on train+val costs, from what the trial measured.

    A refit trains on train+val with no feature cache (its input includes val, which no cache
    holds as training data): every epoch runs the whole backbone over every image, then scores val.

    Args:
        train_images: images the trial trained on.
        val_images: validation images, which the refit trains on too.
        epochs: the config's epochs.
        probe_epochs: the epochs of an LP-FT config's linear probe (on train+val too).
        train_s_per_image: the trial's measured seconds per trained image (1 / its images/s);
            None: not measured (`BACKWARD_FACTOR` forward passes are assumed).
        forward_s_per_image: the backbone's forward pass per image (the trial's batch-1 latency).
        cached: the trial trained on cached features: its images/s timed the layers after the
            cache only, so the backbone's forward pass is added to it.

    Returns:
        Seconds, writing the model folder included.
    """
    forward = forward_s_per_image + DECODE_S
    if train_s_per_image is None:
        trained = BACKWARD_FACTOR * forward
    else:
        trained = train_s_per_image + (forward if cached else 0.0)
    images = train_images + val_images
    epoch = images * trained + val_images * forward
    probe = probe_epochs * (images + val_images) * forward
    return (epochs * epoch + probe) * REFIT_MARGIN + SHIP_S


def process_start() -> float:
    """When this process started, on `time.monotonic`'s clock (the interpreter's own start-up
    included), from /proc/self/stat; where that cannot be read, when this module was imported."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(after_name[19])  # field 22, starttime, in clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT
    return time.monotonic() - max(0.0, age)


def fits(estimate_s: float, *, left_s: float) -> bool:
    """Whether an optional step (the ensemble procedure, the refit) fits in the seconds left."""
    return estimate_s <= left_s


class PhaseClock:
    """Seconds per phase, measured back to back on one clock: they add up to the wall clock.

    Args:
        now: the clock (tests may pass a fake one).
        start: when the first phase began, on that clock (the process's start); None: now.
    """

    def __init__(self, now: Callable[[], float] = time.monotonic, *, start: float | None = None) -> None:
        self._now = now
        self.start = self._last = now() if start is None else start
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> float:
        """Ends `phase` now (its seconds add to any earlier lap of the same name); returns them."""
        t = self._now()
        spent = t - self._last
        self.phases[phase] = self.phases.get(phase, 0.0) + spent
        self._last = t
        return spent

    @property
    def elapsed_s(self) -> float:
        """Seconds since the clock started."""
        return self._now() - self.start

    @property
    def total_s(self) -> float:
        """Seconds up to the last lap (the sum of the phases)."""
        return self._last - self.start

    def left_s(self, budget_s: float) -> float:
        """Seconds of `budget_s` not spent yet."""
        return budget_s - self.elapsed_s
