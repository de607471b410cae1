"""The choices, as pure functions of predictions and labels: scores, greedy ensemble selection,
temperature, calibration error, the split of validation into halves for cross-fitting, and which
candidate ships.

Nothing here knows where predictions come from; the caller passes the rows a choice may look at,
so a choice made on validation (or on half of it) cannot see held-out labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from search.metrics import confusion_scores, per_class_table

# Metrics a choice can rank by (larger is better for all of them; val_loss is negated).
METRICS = ("val_acc", "val_balanced_acc", "val_macro_f1", "val_loss")
# Bins of the expected calibration error (Guo et al. 2017 use 15).
ECE_BINS = 15


def score(probs: torch.Tensor, labels: torch.Tensor, metric: str = "val_acc") -> float:
    """A metric of predicted probabilities, oriented so that larger is better.

    Args:
        probs: N x classes probabilities.
        labels: N true classes.
        metric: one of `METRICS` (val_loss is returned negated).

    Returns:
        The score; 0.0 for no rows.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; available: {', '.join(METRICS)}")
    if len(labels) == 0:
        return 0.0
    if metric == "val_loss":
        return -F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    pred = probs.argmax(1)
    if metric == "val_acc":
        return (pred == labels).float().mean().item()
    scores = confusion_scores(confusion_matrix(pred, labels, probs.shape[1]).tolist())  # as trials score
    return scores["balanced_acc"] if metric == "val_balanced_acc" else scores["macro_f1"]


def metric_value(value: float, metric: str) -> float:
    """A `score` (larger is better) in the metric's own sign, as it is shown and stored: val_loss
    is a loss again (a difference of scores becomes the difference of losses)."""
    return -value if metric == "val_loss" else value


def rank_key(probs: torch.Tensor, labels: torch.Tensor, metric: str = "val_acc") -> tuple[float, float]:
    """What the greedy choices compare: the metric, ties broken by the lower log loss.

    On a few dozen validation images many candidates tie on accuracy; the log loss tells them apart
    by how confident they are where they are right (Caruana et al. 2004 hill-climb on any metric;
    the loss is the smooth one).
    """
    nll = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item() if len(labels) else 0.0
    return score(probs, labels, metric), -nll


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts, rows the true class, columns the predicted one."""
    return torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def classification_summary(probs: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class recall and the confusion matrix.

    Args:
        probs: N x classes probabilities.
        labels: N true classes.
        class_names: index -> name.

    Returns:
        A JSON-ready dict: images, accuracy, balanced_accuracy, macro_f1, per_class
        (`search.metrics.per_class_table`: class, precision, recall, f1, support, predicted),
        confusion_matrix (rows: true class).
    """
    cm = confusion_matrix(probs.argmax(1), labels, probs.shape[1]).tolist()
    scores = confusion_scores(cm)
    return {
        "images": len(labels),
        "accuracy": scores["acc"],
        "balanced_accuracy": scores["balanced_acc"],
        "macro_f1": scores["macro_f1"],
        "per_class": per_class_table(cm, class_names),  # the table trials and `show --json` give
        "confusion_matrix": cm,
    }


def greedy_selection(
    pool: Sequence[torch.Tensor], labels: torch.Tensor, *, max_members: int, metric: str = "val_acc",
) -> list[int]:
    """Greedy ensemble selection with replacement (Caruana et al. 2004) on averaged probabilities.

    Each step adds the pool entry whose addition scores best (`rank_key`: the metric, then the log
    loss; ties: the earlier entry; put the best single model first); the result is the
    best-scoring prefix (ties: the shorter one), so it is never worse on these rows than the best
    single entry.

    Args:
        pool: per candidate member, its N x classes probabilities on the rows chosen on.
        labels: the N true classes of those rows.
        max_members: steps of selection (members, counted with repetition), >= 1.
        metric: what to maximise (`METRICS`).

    Returns:
        Pool indices of the members, with repetition, in the order chosen.
    """
    if max_members < 1:
        raise ValueError(f"max_members must be >= 1, got {max_members}")
    if not pool:
        raise ValueError("greedy selection needs at least one model in the pool")
    chosen: list[int] = []
    total = torch.zeros_like(pool[0])
    best_prefix, best_score = 0, (-math.inf, -math.inf)
    for step in range(1, max_members + 1):
        scores = [rank_key((total + p) / step, labels, metric) for p in pool]
        pick = max(range(len(pool)), key=lambda i: (scores[i], -i))
        chosen.append(pick)
        total = total + pool[pick]
        if scores[pick] > best_score:
            best_prefix, best_score = step, scores[pick]
    return chosen[:best_prefix]


def greedy_soup(
    ingredients: Sequence[int], score_of: Callable[[tuple[int, ...]], Any],
) -> tuple[int, ...]:
    """Greedy soup (Wortsman et al. 2022): ingredients in order, best first; each is kept only if
    the soup with it scores at least as well as without it.

    Args:
        ingredients: trial numbers sorted best first by their own validation score.
        score_of: the validation score of the soup of a tuple of trials (weights averaged); any
            comparable value (e.g. `rank_key`'s pair).

    Returns:
        The trials in the soup (the first one always).
    """
    if not ingredients:
        raise ValueError("a soup needs at least one ingredient")
    soup = (ingredients[0],)
    current = score_of(soup)
    for t in ingredients[1:]:
        trial = soup + (t,)
        s = score_of(trial)
        if s >= current:
            soup, current = trial, s
    return soup


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, steps: int = 50) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising NLL of softmax(logits / T).

    Args:
        logits: N x classes (log-probabilities work too: scaling them is the same family).
        labels: N true classes.
        steps: LBFGS iterations.

    Returns:
        T (1.0 when there are no rows or the fit does not give a finite value).
    """
    if len(labels) == 0:
        return 1.0
    logits = logits.detach().double()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.exp().item())
    return t if math.isfinite(t) and t > 0 else 1.0


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, *, bins: int = ECE_BINS) -> float:
    """ECE: the confidence-weighted gap between confidence and accuracy over equal-width bins."""
    if len(labels) == 0:
        return 0.0
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean().item() * abs(conf[inside].mean().item() - correct[inside].mean().item())
    return ece


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, *, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin: its range, images, mean confidence and accuracy (the reliability diagram's data)."""
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    out = []
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        inside = (conf > lo) & (conf <= hi)
        n = int(inside.sum().item())
        out.append({"low": lo, "high": hi, "images": n,
                    "confidence": conf[inside].mean().item() if n else None,
                    "accuracy": correct[inside].mean().item() if n else None})
    return out


def halves(labels: torch.Tensor, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Splits rows into two stratified halves (per class, shuffled with `seed`, dealt alternately).

    Returns:
        (row indices of half A, of half B), each sorted.
    """
    g = torch.Generator().manual_seed(seed)
    a, b = [], []
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        a += rows[0::2].tolist()
        b += rows[1::2].tolist()
    return torch.tensor(sorted(a), dtype=torch.long), torch.tensor(sorted(b), dtype=torch.long)


@dataclass(frozen=True)
class Choice:
    """A candidate as the shipping rule sees it."""

    name: str
    val_score: float  # on the rows the choices were made on
    latency_ms: float  # batch-1 inference time
    order: int  # simpler first: single < soup < ensemble; without TTA before with
    val_loss: float = 0.0  # log loss on those rows (after the temperature): breaks ties of val_score


def pick_shipped(choices: Sequence[Choice], *, max_latency_ms: float | None = None) -> Choice:
    """The candidate to ship: the best validation score within the latency budget (ties: the
    lower log loss, then the simpler one, then the faster one).

    Args:
        choices: the candidates.
        max_latency_ms: the budget; None: no budget.

    Returns:
        The chosen candidate.

    Raises:
        ValueError: no candidate fits the budget (the message names the fastest).
    """
    if not choices:
        raise ValueError("no candidate to ship")
    fits = [c for c in choices if max_latency_ms is None or c.latency_ms <= max_latency_ms]
    if not fits:
        fastest = min(choices, key=lambda c: c.latency_ms)
        raise ValueError(f"no candidate runs within --max-latency-ms {max_latency_ms:g}; the fastest, "
                         f"{fastest.name}, takes {fastest.latency_ms:.1f} ms")
    return max(fits, key=lambda c: (c.val_score, -c.val_loss, -c.order, -c.latency_ms))
