"""The selection procedure over one set of validation rows: best single trial, a greedy soup per
backbone, a greedy ensemble across backbones, each with and without flip TTA, a temperature each,
and the candidate to ship. It reads the labels of `rows` only: run on all of validation it makes
the shipped model; run on one half it is scored on the other (cross-fitting).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from search.ensemble._predict import Predictions
from search.ensemble._select import (
    Choice,
    fit_temperature,
    greedy_selection,
    greedy_soup,
    halves,
    pick_shipped,
    rank_key,
    score,
)

# Order of the kinds when scores tie: the simpler one ships.
KIND_ORDER = {"single": 0, "soup": 1, "ensemble": 2}


@dataclass(frozen=True)
class Candidate:
    """A model the procedure may ship: members with weights, TTA or not, a temperature."""

    name: str  # "best single", "soup resnet18", "ensemble", each maybe "+ flip TTA"
    kind: str  # single | soup | ensemble
    members: tuple[tuple[str, float], ...]  # (member key, weight); weights count repeated picks
    tta: bool = False  # average over the image and its mirror image
    temperature: float = 1.0  # fitted on the rows the choices were made on
    val_score: float = 0.0  # the metric on those rows
    val_loss: float = 0.0  # the log loss on those rows, after the temperature (breaks ties)

    @property
    def order(self) -> int:
        return 2 * KIND_ORDER[self.kind] + int(self.tta)


def choose(preds: Predictions, rows: torch.Tensor, *, metric: str, max_members: int,
           trials: Sequence[int] | None = None) -> list[Candidate]:
    """Every candidate, its members, TTA and temperature chosen on the val `rows` only.

    Args:
        preds: the members' predictions.
        rows: indices of the validation images the choices may look at.
        metric: what the choices maximise (`search.ensemble.METRICS`).
        max_members: greedy ensemble selection steps.
        trials: the trials the candidates may hold (None: the whole pool).

    Returns:
        The candidates, simplest first.
    """
    y = preds.labels["val"][rows]

    def member_score(key: str) -> tuple[float, float]:
        return rank_key(preds.probs(key, "val")[rows], y, metric)

    allowed = list(preds.trials) if trials is None else list(trials)
    ranked = {n: member_score(preds.trial_key(n)) for n in allowed}
    numbers = sorted(allowed, key=lambda n: (-ranked[n][0], -ranked[n][1], n))
    singles = [preds.trial_key(n) for n in numbers]
    out = [Candidate("best single", "single", ((singles[0], 1.0),))]
    soups = []
    for backbone in dict.fromkeys(preds.trials[n].config.backbone for n in numbers):
        ingredients = [n for n in numbers if preds.trials[n].config.backbone == backbone]
        if len(ingredients) < 2:
            continue  # a soup of one is that trial
        soup = greedy_soup(ingredients, lambda ts: member_score(preds.soup_key(ts)))
        key = preds.soup_key(soup)
        out.append(Candidate(f"soup {backbone}", "soup", ((key, 1.0),)))
        soups.append(key)
    pool = singles + [k for k in soups if k not in singles]
    picked = greedy_selection([preds.probs(k, "val")[rows] for k in pool], y, max_members=max_members,
                              metric=metric)
    counts: dict[str, float] = {}
    for i in picked:
        counts[pool[i]] = counts.get(pool[i], 0.0) + 1.0
    out.append(Candidate("ensemble", "ensemble", tuple(counts.items())))
    out += [dataclasses.replace(c, name=f"{c.name} + flip TTA", tta=True) for c in out]
    return [_calibrated(preds, c, rows, metric) for c in out]


def _calibrated(preds: Predictions, c: Candidate, rows: torch.Tensor, metric: str) -> Candidate:
    y = preds.labels["val"][rows]
    out = preds.output(c.members, "val", tta=c.tta)[rows]
    t = fit_temperature(out, y)
    metric_value, neg_loss = rank_key((out / t).softmax(1), y, metric)
    return dataclasses.replace(c, temperature=t, val_score=metric_value, val_loss=-neg_loss)


def shipped(candidates: Sequence[Candidate], latency: Callable[[Candidate], float], *,
            max_latency_ms: float | None) -> Candidate:
    """The candidate to ship: best val score within the latency budget (`pick_shipped`)."""
    from search.config import TLSearchError

    by_name = {c.name: c for c in candidates}
    try:
        choice = pick_shipped([Choice(c.name, c.val_score, latency(c), c.order, c.val_loss) for c in candidates],
                              max_latency_ms=max_latency_ms)
    except ValueError as e:  # nothing fits the user's budget: bad input, one line
        raise TLSearchError(str(e)) from None
    return by_name[choice.name]


def trials_within(preds: Predictions, latency: Callable[[Candidate], float],
                  max_latency_ms: float | None) -> list[int]:
    """The pool's trials that run within the latency budget on their own.

    A candidate holding a slower trial is no faster (a soup runs as one of its ingredients, an
    ensemble runs every member), so the others are left out of every choice, on all of
    validation and on its halves alike: the out-of-sample check then never meets a best single
    trial that could not ship.

    Raises:
        TLSearchError: no trial fits (then no candidate does); the message names the fastest.
    """
    from search.config import TLSearchError

    if max_latency_ms is None:
        return list(preds.trials)
    alone = {n: latency(Candidate(f"trial {n}", "single", ((preds.trial_key(n), 1.0),))) for n in preds.trials}
    fits = [n for n in preds.trials if alone[n] <= max_latency_ms]
    if not fits:
        fastest = min(alone, key=lambda n: (alone[n], n))
        raise TLSearchError(f"no candidate runs within --max-latency-ms {max_latency_ms:g}; the fastest, "
                            f"trial {fastest} alone, takes {alone[fastest]:.1f} ms")
    return fits


def decide(preds: Predictions, rows: torch.Tensor, *, metric: str, max_members: int,
           latency: Callable[[Candidate], float], max_latency_ms: float | None) -> tuple[list[Candidate], Candidate, dict]:
    """The whole procedure on the val `rows`: the candidates (`choose`) and the one to ship.

    The best on `rows` (the metric, ties: the lower log loss, then the simpler) ships only if it
    also beats the best single trial out of sample: the procedure is run on each half of `rows` and
    scored on the other, and the combination ships when its pooled score there is higher than that
    of the best single trial chosen the same way (equal scores: when its log loss there is lower).
    On a few dozen images the best of several candidates often wins by chance (it was picked
    because it scored high on those images); the simpler model is then the safer one to ship.

    With a latency budget, only the trials that fit it alone (`trials_within`) make candidates,
    here and in the out-of-sample check; a candidate over the budget is never shipped.

    Returns:
        (candidates, the shipped one, the guard: {"val_best", "gain" (the metric's improvement
        over the best single, larger is better: for val_loss, its loss minus the best's),
        "loss_gain" (log loss of the best single minus that of the best), "images", "shipped_single",
        "over_latency" (trials left out, slower alone than the budget)}).
    """
    allowed = trials_within(preds, latency, max_latency_ms)
    cands = choose(preds, rows, metric=metric, max_members=max_members, trials=allowed)
    best = shipped(cands, latency, max_latency_ms=max_latency_ms)
    single = cands[0]
    guard = {"val_best": best.name, "gain": None, "images": len(rows), "shipped_single": False,
             "over_latency": sorted(set(preds.trials) - set(allowed))}
    if best.name == single.name:
        return cands, best, guard
    y = preds.labels["val"]
    n, classes = len(y), len(preds.index.classes)
    pooled = {"single": torch.zeros(n, classes), "best": torch.zeros(n, classes)}
    a, b = halves(y[rows])
    for fit, held in ((rows[a], rows[b]), (rows[b], rows[a])):
        if len(fit) == 0 or len(held) == 0:
            continue
        inner = choose(preds, fit, metric=metric, max_members=max_members, trials=allowed)
        pooled["single"][held] = heldout_probs(preds, inner[0], "val")[held]
        pooled["best"][held] = heldout_probs(preds, shipped(inner, latency, max_latency_ms=max_latency_ms), "val")[held]
    best_key, single_key = (rank_key(pooled[k][rows], y[rows], metric) for k in ("best", "single"))
    better = best_key > single_key  # the metric, then the log loss, out of sample
    guard.update(gain=best_key[0] - single_key[0], loss_gain=best_key[1] - single_key[1], shipped_single=not better)
    return cands, (best if better else single), guard


def heldout_probs(preds: Predictions, c: Candidate, split: str, *, calibrated: bool = True) -> torch.Tensor:
    """A candidate's probabilities on every image of `split`, with its temperature (or without)."""
    out = preds.output(c.members, split, tta=c.tta)
    return (out / (c.temperature if calibrated else 1.0)).softmax(1)
