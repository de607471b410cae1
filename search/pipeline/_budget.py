"""How `fit` spends one time budget: what it keeps for the steps after the search, what the search
gets, whether an optional step still fits, and a clock whose phases add up to the wall clock.

Decisions are pure functions of plain numbers, tested without a search.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

from search.config import ConfigError

# Allowances for the steps after the search that do not grow with the data. Ray winds down and
# the driver reconciles the study; the report and best config are written; a model folder is
# written with its TorchScript and ONNX exports (tracing a large backbone takes seconds).
SEARCH_OVERHEAD_S = 10.0
REPORT_S = 5.0
SHIP_S = 10.0
EVALUATE_S = 2.0
# Per image, when no trial of the study has measured its latency yet: one forward pass in a batch
# (a trial's batch-1 latency, once measured, is a safe bound on it) and one decode.
FORWARD_S = {"cpu": 0.02, "gpu": 0.002}
DECODE_S = 0.003
# The ensemble procedure's passes over val and test per kept trial: the plain view and the mirror
# image (flip TTA); soups add members of their own, counted as more trials.
ENSEMBLE_PASSES = 2
ENSEMBLE_MEMBERS = 9  # kept trials at most (3 per backbone, the default space's 3 backbones)
# --refit trains one config again on train+val; it gets this share of the budget, kept from the start.
REFIT_SHARE = 0.3
# A refit's time over its trial's, scaled to train+val: set-up, and the final evaluation on val.
REFIT_MARGIN = 1.2
# A search shorter than this finds nothing worth shipping: the budget is refused instead.
MIN_SEARCH_S = 10.0
# The steps after the search never take more than this share of the budget from it; a step whose
# estimate does not fit in what is left is skipped and the summary says so.
MAX_RESERVE_SHARE = 0.5


@dataclass(frozen=True)
class Reserve:
    """Seconds kept from the search for the steps after it."""

    overhead_s: float  # the search winding down after its budget
    report_s: float  # report and best config
    ship_s: float  # the model folder (and the ensemble procedure when the preset tries it)
    evaluate_s: float  # the held-out evaluation on test/
    refit_s: float  # the refit on train+val (--refit); 0 without

    @property
    def total_s(self) -> float:
        return self.overhead_s + self.report_s + self.ship_s + self.evaluate_s + self.refit_s


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


def ensemble_seconds(*, val_images: int, test_images: int, per_image_s: float,
                     members: int = ENSEMBLE_MEMBERS) -> float:
    """The ensemble procedure's forward passes: every member over val and test, plain and mirrored."""
    return ENSEMBLE_PASSES * max(1, members) * (val_images + test_images) * per_image_s


def plan_reserve(*, budget_s: float, val_images: int, test_images: int, per_image_s: float, ensemble: bool,
                 refit: bool) -> Reserve:
    """What the steps after the search are given, from the data size and the cost per image.

    Args:
        budget_s: the whole command's budget.
        val_images: validation images (the ensemble procedure reads them).
        test_images: held-out images (the evaluation reads them; 0: no test/).
        per_image_s: seconds per image (`per_image_seconds`).
        ensemble: whether the ship step tries the ensemble procedure.
        refit: whether --refit trains the shipped config again.

    Returns:
        The reserve. The ship step's part shrinks to keep the total within `MAX_RESERVE_SHARE` of
        the budget (plus the refit's share), and the ensemble procedure is then tried only if it
        fits when its turn comes; the evaluation is never cut (a budget it leaves no search in is
        refused by `search_budget`).
    """
    evaluate = EVALUATE_S + test_images * per_image_s if test_images else 0.0
    ship = SHIP_S + (ensemble_seconds(val_images=val_images, test_images=test_images, per_image_s=per_image_s)
                     if ensemble else 0.0)
    reserve = Reserve(SEARCH_OVERHEAD_S, REPORT_S, ship, evaluate, 0.0)
    cap = MAX_RESERVE_SHARE * budget_s
    if reserve.total_s > cap:  # the ship step shrinks: the ensemble is then tried only if it fits
        reserve = Reserve(SEARCH_OVERHEAD_S, REPORT_S, max(0.0, cap - SEARCH_OVERHEAD_S - REPORT_S - evaluate),
                          evaluate, 0.0)
    return Reserve(reserve.overhead_s, reserve.report_s, reserve.ship_s, reserve.evaluate_s,
                   REFIT_SHARE * budget_s if refit else 0.0)


def search_budget(budget_s: float, *, elapsed_s: float, reserve: Reserve) -> float:
    """The search's own time budget: what is left of the command's after what has passed and the reserve.

    Args:
        budget_s: the whole command's budget (--time-budget).
        elapsed_s: seconds already spent (scanning the data, starting Ray).
        reserve: what the steps after the search keep.

    Returns:
        Seconds; a budget that leaves less than `MIN_SEARCH_S` is a `ConfigError` naming the
        smallest one that would do.
    """
    left = budget_s - elapsed_s - reserve.total_s
    if left < MIN_SEARCH_S:
        need = elapsed_s + reserve.total_s - reserve.refit_s + MIN_SEARCH_S
        if reserve.refit_s:
            need /= 1 - REFIT_SHARE
        raise ConfigError(f"--time-budget {budget_s:g}s leaves {max(left, 0):.0f}s to search after "
                          f"{elapsed_s + reserve.total_s:.0f}s for starting, shipping and evaluating; "
                          f"give at least {need:.0f}s")
    return left


def refit_seconds(*, trial_seconds: float, train_images: int, val_images: int) -> float:
    """What training a trial's config again on train+val costs: the trial's own training time,
    scaled by the images an epoch then reads, with a margin, plus writing the model folder.

    Args:
        trial_seconds: the trial's recorded training time (0: unknown, the refit is then only
            the folder's cost, so an unmeasured trial is not refused).
        train_images: images the trial trained on.
        val_images: validation images, which the refit trains on too.

    Returns:
        Seconds.
    """
    return trial_seconds * (train_images + val_images) / max(1, train_images) * REFIT_MARGIN + SHIP_S


def fits(estimate_s: float, *, left_s: float) -> bool:
    """Whether an optional step (the ensemble procedure, the refit) fits in the seconds left."""
    return estimate_s <= left_s


class PhaseClock:
    """Seconds per phase, measured back to back on one clock: they add up to the wall clock.

    Args:
        now: the clock (tests may pass a fake one).
    """

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self.start = self._last = now()
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
