"""Where the fine-tuning budget goes, as pure decisions tested without Ray.

- `PlanRole`: what a trial is to the plan (a probe, a recipe the plan chose, a draw; the retry or
  continuation of which trial; how many epochs the plan gave it), written to and read from the
  study's user_attrs in one place.
- `StudySnapshot`: the study as the plan sees it (each trial's role, state, score and the time it
  still needs; the time left).
- `next_step`: after every backbone's linear probe, fine-tunes of the best-probed backbones,
  each given the epochs that fit in the time no running or waiting plan trial already holds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from search.space._space import PROBE_RECIPE, RECIPES, SearchSpace

# The fine-tuning recipes in the order the budget takes them for one backbone: the strongest
# (every stage) first; the cheaper partial one after.
FINE_TUNE_ORDER = ("full fine-tune", "last stages")
# `next_step`'s answer while a probe still runs: the ranking is not known yet.
WAIT = "wait"
# A fine-tune given fewer epochs than this is not worth its time: the plan passes it over.
MIN_PLAN_EPOCHS = 1
# The recipe a trial becomes when a drawn fine-tune does not fit but the same draw as a probe does.
CHEAP_PROBE_RECIPE = "linear probe (fits the time left)"


@dataclass(frozen=True)
class PlanRole:
    """What a trial is to the plan; the study stores it as flat user_attrs (`to_user_attrs`).

    Every feature that makes a trial from another (a retry, a continuation, a refused trial
    enqueued again) copies the whole role with `dataclasses.replace`, so nothing is forgotten.
    """

    recipe: str | None = None  # the portfolio recipe it runs (`RECIPES`); None: a draw of the sampler
    baseline: bool = False  # enqueued by the search itself (warm start or plan), not drawn
    epochs: int | None = None  # the epochs the plan gave it; None: the space's max_epochs
    retry_of: int | None = None  # the interrupted trial whose params it runs again
    continues: int | None = None  # the budget-cut trial whose checkpoint it continues

    @property
    def is_probe(self) -> bool:
        return self.recipe == PROBE_RECIPE

    @property
    def is_plan_fine_tune(self) -> bool:
        """A fine-tune the probes chose (`next_step`), as opposed to a draw or a cheap probe."""
        return self.recipe in FINE_TUNE_ORDER

    def to_user_attrs(self) -> dict[str, Any]:
        """The role as user_attrs (what `from_attrs` reads back); unset fields are left out."""
        out: dict[str, Any] = {}
        if self.recipe is not None:
            out["recipe"] = self.recipe
        if self.baseline:
            out["baseline"] = True
        for key, value in (("plan_epochs", self.epochs), ("retry_of", self.retry_of), ("continues", self.continues)):
            if value is not None:
                out[key] = int(value)
        return out

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "PlanRole":
        """Reads a role from a trial's user_attrs (keys missing in older studies: unset)."""

        def number(key: str) -> int | None:
            v = attrs.get(key)
            return int(v) if isinstance(v, int) and not isinstance(v, bool) else None

        recipe = attrs.get("recipe")
        return cls(recipe=str(recipe) if recipe else None, baseline=bool(attrs.get("baseline")),
                   epochs=number("plan_epochs"), retry_of=number("retry_of"), continues=number("continues"))

    def retry(self, number: int) -> "PlanRole":
        """The role of the trial that runs trial `number`'s params again."""
        return dataclasses.replace(self, retry_of=number)


@dataclass(frozen=True)
class Probe:
    """A linear-probe trial of the study, as the ranking sees it."""

    backbone: str
    value: float | None  # its objective; None: it failed or reported nothing
    finished: bool  # False while it runs or waits


@dataclass(frozen=True)
class TrialView:
    """One trial of the study, as the plan sees it."""

    number: int
    role: PlanRole
    state: str  # the Optuna state's name: WAITING, RUNNING, COMPLETE, PRUNED, FAIL
    backbone: str
    value: float | None = None  # its objective (a PRUNED trial's last reported value); None: none
    never_ran: bool = False  # closed before it started (refused by the budget, crowded out)
    remaining_s: float | None = None  # seconds it still needs to its last epoch; None: unknown

    @property
    def open(self) -> bool:
        return self.state in ("WAITING", "RUNNING")


@dataclass(frozen=True)
class StudySnapshot:
    """The study at one moment, for `next_step`."""

    trials: tuple[TrialView, ...]
    maximize: bool
    time_left: float | None = None  # seconds left in the budget; None: no budget

    def probes(self) -> list[Probe]:
        """The linear probes that ran or will run (a retried probe keeps its backbone's place)."""
        return [Probe(t.backbone, t.value if t.state in ("COMPLETE", "PRUNED") else None, finished=not t.open)
                for t in self.trials if t.role.is_probe and not t.never_ran]

    def probe_waits(self) -> bool:
        return any(t.role.is_probe and t.state == "WAITING" for t in self.trials)

    def planned(self) -> set[tuple[str, str]]:
        """(recipe, backbone) of every fine-tune the plan enqueued, run or refused."""
        return {(str(t.role.recipe), t.backbone) for t in self.trials if t.role.is_plan_fine_tune}

    def free_time(self) -> float | None:
        """Time left once the plan's running and waiting fine-tunes have had theirs: they hold
        every CPU, so the next one starts after them. A trial with no estimate holds it all."""
        if self.time_left is None:
            return None
        held = [t.remaining_s for t in self.trials if t.role.is_plan_fine_tune and t.open]
        if any(r is None for r in held):
            return 0.0
        return self.time_left - sum(float(r) for r in held if r is not None)


@dataclass(frozen=True)
class PlanStep:
    """A fine-tune the plan enqueues: its recipe, params and the epochs it gets."""

    recipe: str
    params: dict[str, Any]
    epochs: int

    def role(self) -> PlanRole:
        return PlanRole(recipe=self.recipe, baseline=True, epochs=self.epochs)


# estimate(params, epochs) -> seconds to run that many epochs (start-up included); None: unknown.
Estimate = Callable[[dict[str, Any], int], "float | None"]


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


def plan_epochs(params: dict[str, Any], *, max_epochs: int, time_left: float | None,
                estimate: Estimate) -> int | None:
    """The most epochs (at most `max_epochs`, at least `MIN_PLAN_EPOCHS`) whose estimate fits.

    Returns:
        The epochs; `max_epochs` when there is no budget or no estimate; None when none fits.
    """
    if time_left is None:
        return max_epochs
    for epochs in range(max_epochs, MIN_PLAN_EPOCHS - 1, -1):
        needed = estimate(params, epochs)
        if needed is None:
            return max_epochs
        if needed <= time_left:
            return epochs
    return None


def next_step(space: SearchSpace, snapshot: StudySnapshot, *, estimate: Estimate,
              cap: int | None = None) -> PlanStep | str | None:
    """What the plan runs next: the next fine-tune the probes point to, if any is due.

    Once every probe has ended, only the better half of the backbones by probe score (at least
    one) gets fine-tunes, best first: its full fine-tune, then the next backbone's, then the
    cheaper last-stages recipes in the same order. Each gets the most epochs that fit in the
    time the plan's running and waiting fine-tunes leave (`StudySnapshot.free_time`); a recipe
    none of whose epochs fit is passed over for a cheaper one. A retried probe counts as its
    backbone's probe; while it waits or runs, the ranking is not known.

    Args:
        space: the search space (recipes are moved into its bounds).
        snapshot: the study now.
        estimate: seconds a recipe's params need for some epochs (`Estimate`).
        cap: at most this many fine-tuning recipes in all (None: as many as fit).

    Returns:
        The `PlanStep` to enqueue; `WAIT` while a probe runs and none waits to start (a waiting
        one is the queue's to start); None when nothing is due.
    """
    probes = snapshot.probes()
    if not probes:
        return None
    if any(not p.finished for p in probes):
        return None if snapshot.probe_waits() else WAIT
    planned = snapshot.planned()
    if cap is not None and len(planned) >= cap:
        return None
    ranked = rank_backbones(probes, maximize=snapshot.maximize)
    kept = ranked[: max(1, math.ceil(len(ranked) / 2))] if ranked else []
    recipes = {r.name: r for r in RECIPES}
    taken = [space._recipe_params(recipes[n], b) for n, b in planned if n in recipes]
    free = snapshot.free_time()
    for name in FINE_TUNE_ORDER:
        for backbone in kept:
            if (name, backbone) in planned:
                continue
            params = space._recipe_params(recipes[name], backbone)
            if params is None or params in taken:  # a space where two recipes are one
                continue
            epochs = plan_epochs(params, max_epochs=space.max_epochs, time_left=free, estimate=estimate)
            if epochs is not None:
                return PlanStep(name, params, epochs)
    return None


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
    """`next_step` over plain lists, for a study with no trial running (each recipe at its full
    epochs: `estimate(params)` is the time to its last epoch).

    Returns:
        (recipe name, params); `WAIT` while a probe runs; None when nothing is left.
    """
    trials = [TrialView(i, PlanRole(recipe=PROBE_RECIPE), "COMPLETE" if p.finished else "RUNNING", p.backbone,
                        p.value) for i, p in enumerate(probes)]
    trials += [TrialView(len(trials) + i, PlanRole(recipe=n), "COMPLETE", b) for i, (n, b) in enumerate(sorted(planned))]
    snap = StudySnapshot(tuple(trials), maximize=maximize, time_left=time_left)
    full = space.max_epochs
    step = next_step(space, snap, cap=cap,
                     estimate=lambda params, epochs: estimate(params) if epochs == full else math.inf)
    if isinstance(step, PlanStep):
        return step.recipe, step.params
    return step


def as_probe(space: SearchSpace, params: dict[str, Any]) -> dict[str, Any] | None:
    """A drawn trial's params as a linear probe (head alone, un-augmented: seconds on cached
    features), what a draw becomes when it does not fit the time left.

    Returns:
        The params; None when the space offers no probe, or the draw is one already.
    """
    from search.space._params import FINETUNE_CHILDREN, POLICY_CHILDREN, Choice

    drawn = {k: v for k, v in params.items() if not k.startswith("_") and k not in ("epochs", "warmup_epochs")}
    cheap = {k: v for k, v in drawn.items() if k not in FINETUNE_CHILDREN and k not in POLICY_CHILDREN}
    for name, value in (("freeze_depth", "all"), ("augmentation", "none")):
        p = space.param_dict.get(name)
        if isinstance(p, Choice) and value in p.values:
            cheap[name] = value
    if cheap.get("freeze_depth") != "all" or cheap == drawn:
        return None
    return cheap
