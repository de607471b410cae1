"""Step 2 of the report: the plots, in page order (`PLOTS`), and `build_figures`, which builds each
from the report data or puts the reason it cannot in its place.

The figure functions themselves live in `_figures_search` (history, backbones, parallel
coordinates, importances) and `_figures_trials` (curves, cost, timeline, confusion matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd
import plotly.graph_objects as go

from search.report._data import ReportData
from search.report._figures_ensemble import calibration_figure, ensemble_figure
from search.report._figures_search import backbone_figure, history_figure, importance_figure, parallel_figure
from search.report._figures_trials import confusion_figure, cost_figure, curves_figure, timeline_figure
from search.report._plotting import NotEnoughData
from search.studies import LEADERBOARD_COLUMNS


@dataclass(frozen=True)
class Plot:
    """One plot of the report: how to build it from the report data."""

    key: str  # the div id suffix and anchor
    title: str  # the section heading
    about: str  # one line under the heading: how to read it
    build: Callable[[ReportData], go.Figure]  # raises NotEnoughData when there is nothing to draw


def _param_columns(board: pd.DataFrame) -> list[str]:
    fixed = ["backbone", "freeze_depth", "augmentation", "lr", "batch_size", "image_size"]
    extra = [c for c in board.columns if c not in LEADERBOARD_COLUMNS and c != board.attrs.get("metric")]
    return fixed + extra


def _importances(data: ReportData) -> go.Figure:
    if isinstance(data.importances, str):
        raise NotEnoughData(data.importances)
    return importance_figure(data.importances)


def _confusion(data: ReportData) -> go.Figure:
    if not data.confusion:
        raise NotEnoughData("the best trial recorded no confusion matrix (or there is no best trial yet)")
    c = data.confusion
    return confusion_figure(c["matrix"], class_names=c.get("class_names"), trial=c["trial"])


# The plots, in page order.
PLOTS: tuple[Plot, ...] = (
    Plot("history", "Optimisation history", "Each trial's score when it finished; the line is the best so far.",
         lambda d: history_figure(d.trials, metric=d.metric, maximize=d.maximize)),
    Plot("backbones", "Score by backbone", "Complete trials per backbone; crosses are pruned trials at their best epoch.",
         lambda d: backbone_figure(d.board, metric=d.metric)),
    Plot("parallel", "Parallel coordinates", "One line per complete trial across its params, coloured by score.",
         lambda d: parallel_figure(d.board, metric=d.metric, params=_param_columns(d.board))),
    Plot("importances", "Parameter importances", "How much each param matters for reaching the top scores (Optuna PED-ANOVA).",
         _importances),
    Plot("curves", "Learning curves", "Per-epoch validation score; pruned trials are dashed and end in a cross.",
         lambda d: curves_figure(d.curves, metric=d.metric, best_trial=d.best_trial)),
    Plot("cost", "Accuracy against cost", "Cheaper and better is up-left; the green line is the Pareto front.",
         lambda d: cost_figure(d.board, metric=d.metric, maximize=d.maximize)),
    Plot("timeline", "Trial timeline", "One row per worker; gaps are idle capacity.",
         lambda d: timeline_figure(d.trials)),
    Plot("confusion", "Confusion matrix", "Best trial's last epoch on the validation set; rows are the true class.",
         _confusion),
)  # fmt: skip


def _ensemble(data: ReportData) -> dict:
    if data.ensemble is None:  # build_figures leaves these plots out then
        raise NotEnoughData("no ensemble summary: run `tlsearch ensemble` on this study")
    return data.ensemble


# The ensembles section: drawn only when `tlsearch ensemble` has left a summary in the study's folder.
ENSEMBLE_PLOTS: tuple[Plot, ...] = (
    Plot("ensembles", "Ensembles against latency",
         "tlsearch ensemble's candidates (soups, ensembles, flip TTA) next to the trials: filled at their validation "
         "score, where every choice was made, open at their held-out score; latency measured by tlsearch ensemble.",
         lambda d: ensemble_figure(d.board, _ensemble(d), metric=d.metric)),
    Plot("calibration", "Calibration of the shipped model",
         "Reliability diagram on held-out images, before and after temperature scaling (fitted on validation); "
         "on the diagonal, confidence is accuracy.",
         lambda d: calibration_figure(_ensemble(d))),
)  # fmt: skip


def build_figures(data: ReportData) -> list[tuple[Plot, go.Figure | str]]:
    """Builds every plot, or the note that replaces it (the ensembles section only when the study
    has an ensemble summary).

    Args:
        data: the report data.

    Returns:
        (plot, figure) pairs in page order; the figure is a str note when the plot has nothing
        to draw or failed (a bad plot never stops the report).
    """
    out: list[tuple[Plot, go.Figure | str]] = []
    for plot in PLOTS + (ENSEMBLE_PLOTS if data.ensemble is not None else ()):
        try:
            out.append((plot, plot.build(data)))
        except NotEnoughData as e:
            out.append((plot, f"Not enough data: {e}."))
        except Exception as e:  # a bug or odd data in one plot must not cost the whole report
            out.append((plot, f"Could not draw this plot: {type(e).__name__}: {e}"))
    return out
