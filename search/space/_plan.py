"""Where the fine-tuning budget goes: after every backbone's linear probe, fine-tunes of the
best-probed backbones first (`next_fine_tune`), a pure decision tested without Ray."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from search.space._space import RECIPES, SearchSpace

# The fine-tuning recipes in the order the budget takes them for one backbone: the strongest
# (every stage) first; the cheaper partial one after.
FINE_TUNE_ORDER = ("full fine-tune", "last stages")
# `next_fine_tune`'s answer while a probe still runs: the ranking is not known yet.
WAIT = "wait"


@dataclass(frozen=True)
class Probe:
    """A linear-probe trial of the study, as the plan sees it."""

    backbone: str
    value: float | None  # its objective; None: it failed or reported nothing
    finished: bool  # False while it runs or waits


def rank_backbones(probes: Iterable[Probe], *, maximize: bool) -> list[str]:
    """Backbones by their probe's score, best first; those without a score are left out.

    Args:
        probes: the study's linear probes (several per backbone: its best counts).
        maximize: whether a higher value is better.

    Returns:
        Backbone names, best probe first (ties: the order given).
    """
    best: dict[str, float] = {}
    for p in probes:
        if p.value is None or not math.isfinite(p.value):
            continue
        v = p.value if maximize else -p.value
        best[p.backbone] = max(best.get(p.backbone, -math.inf), v)
    return sorted(best, key=lambda b: -best[b])


def next_fine_tune(
    space: SearchSpace,
    probes: list[Probe],
    planned: set[tuple[str, str]],
    *,
    maximize: bool,
    time_left: float | None = None,
    estimate: Callable[[dict[str, Any]], float | None] = lambda params: None,
    cap: int | None = None,
) -> tuple[str, dict[str, Any]] | str | None:
    """The next fine-tuning recipe to run, chosen by the probes (successive halving across backbones).

    Once every probe has ended, only the better half of the backbones by probe score (at least
    one) gets fine-tunes, best first: its full fine-tune, then the next backbone's, then the
    cheaper last-stages recipes in the same order. A recipe whose measured estimate does not fit
    the time left is passed over for a cheaper one that does; with little time, the one strong
    fine-tune of the best backbone runs rather than several cut short.

    Args:
        space: the search space (recipes are moved into its bounds).
        probes: the study's linear-probe trials.
        planned: (recipe name, backbone) pairs already enqueued or run.
        maximize: the objective's direction.
        time_left: seconds left in the budget; None: no budget.
        estimate: seconds a recipe's params need to their last epoch; None: never measured
            (then it is tried).
        cap: at most this many fine-tuning recipes in all (None: as many as fit).

    Returns:
        (recipe name, params) to enqueue; `WAIT` while a probe still runs; None when nothing is left.
    """
    if not probes or any(not p.finished for p in probes):
        return WAIT if probes else None
    ranked = rank_backbones(probes, maximize=maximize)
    kept = ranked[: max(1, math.ceil(len(ranked) / 2))] if ranked else []
    if cap is not None and len(planned) >= cap:
        return None
    recipes = {r.name: r for r in RECIPES}
    taken = [space._recipe_params(recipes[n], b) for n, b in planned if n in recipes]
    for name in FINE_TUNE_ORDER:
        for backbone in kept:
            if (name, backbone) in planned:
                continue
            params = space._recipe_params(recipes[name], backbone)
            if params is None or params in taken:  # a space where two recipes are one
                continue
            needed = estimate(params)
            if time_left is not None and needed is not None and needed > time_left:
                continue
            return name, params
    return None
