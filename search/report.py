"""The HTML report of a study: one self-contained page that works offline.

Compute, then render, in three steps:

1. data: `collect(study)` turns the study into plain tables (`ReportData`: the leaderboard from
   `studies.leaderboard`, one row per trial with its timing, the per-epoch curves, parameter
   importances, the best trial's confusion matrix);
2. figures: one function per plot (`history_figure`, `backbone_figure`, ...) builds a plotly
   Figure from that plain data, or raises `NotEnoughData` with a short reason the page shows instead;
3. page: `render_page` draws the header, the leaderboard table and the figures into one HTML file.

The page loads nothing from outside: plotly.js is inlined once, there are no fonts, no CDN and no
fetch, and a Content-Security-Policy forbids any load (only the page's own two scripts, by hash,
may run). Every user string (study name, class names, paths, param values, errors) is escaped with
`html.escape`, inside plot labels too; JSON inside <script> has `<`, `>` and `&` escaped.

This is the only module that imports plotly.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.offline
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots
from plotly.utils import PlotlyJSONEncoder

from search.config import TLSearchError, check_study_name
from search.studies import LEADERBOARD_COLUMNS, leaderboard, load_study, objective_of, pareto_flags, score_of

if TYPE_CHECKING:
    import optuna

# One colour per trial state, used by the table badges and every plot.
STATE_COLOURS = {
    "COMPLETE": "#2b6cb0",
    "PRUNED": "#a0aec0",
    "FAIL": "#c53030",
    "RUNNING": "#d69e2e",
    "WAITING": "#718096",
}
_BEST_COLOUR = "#2f855a"
_PLOT_HEIGHT = 420
# plotly.js options: no logo link, no cloud buttons, and no MathJax typesetting (it would look for
# a MathJax script; we never load one).
_PLOTLY_CONFIG = {
    "displaylogo": False,
    "showLink": False,
    "showSendToCloud": False,
    "showEditInChartStudio": False,
    "typesetMath": False,
    "responsive": True,
}


class NotEnoughData(Exception):
    """A plot cannot be drawn from this study yet; the message says why (shown on the page)."""


@dataclass(frozen=True)
class ReportData:
    """Everything the page shows, as plain data (no plotly objects)."""

    name: str  # the study name (user string: escape before drawing)
    metric: str  # the objective's column in `board`, e.g. "val_acc"
    maximize: bool  # True: larger metric is better
    attrs: dict  # the study's user_attrs: dataset, dataset_fingerprint, class_names, split, settings
    board: pd.DataFrame  # studies.leaderboard(study): one row per trial, best first
    trials: pd.DataFrame  # per trial: trial, state, backbone, worker, start, end (unix s), score
    curves: pd.DataFrame  # per trial and epoch: trial, state, epoch, value (intermediate values)
    importances: dict[str, float] | str  # param -> importance, or why there are none
    confusion: dict | None  # best trial's {"trial", "matrix", "class_names"}; None when absent
    generated: float = field(default_factory=time.time)  # when the data was read (unix s)


# ------------------------------------------------------------------------------------------------
# 1. Data
# ------------------------------------------------------------------------------------------------


def collect(study: "optuna.Study") -> ReportData:
    """Reads a study into the plain tables the report draws.

    Args:
        study: the Optuna study.

    Returns:
        The report data.
    """
    metric, maximize = objective_of(study)
    board = leaderboard(study)
    trials = study.get_trials(deepcopy=False)
    now = time.time()
    rows, curves = [], []
    for t in trials:
        attrs = t.user_attrs
        config = attrs.get("config") if isinstance(attrs.get("config"), dict) else {}
        start = _as_float(attrs.get("started_at")) or _timestamp(t.datetime_start)
        end = _as_float(attrs.get("finished_at")) or _timestamp(t.datetime_complete)
        worker = attrs.get("worker") or attrs.get("hostname") or "unknown worker"
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "backbone": t.params.get("backbone", config.get("backbone")),
                "worker": str(worker),
                "start": start,
                "end": end,
                "score": score_of(t, maximize=maximize),
            }
        )
        for step, value in sorted(t.intermediate_values.items()):
            curves.append({"trial": t.number, "state": t.state.name, "epoch": step, "value": value})
    trials_df = pd.DataFrame(rows, columns=["trial", "state", "backbone", "worker", "start", "end", "score"])
    # A RUNNING trial's bar ends at the study's last recorded event, not at the clock: a search
    # killed long ago leaves trials RUNNING, and bars reaching "now" would flatten the timeline.
    events = pd.concat([trials_df["start"], trials_df["end"]]).dropna()
    running = (trials_df["state"] == "RUNNING") & trials_df["start"].notna() & trials_df["end"].isna()
    if running.any():
        trials_df.loc[running, "end"] = float(events.max())
    curves_df = pd.DataFrame(curves, columns=["trial", "state", "epoch", "value"])
    return ReportData(
        name=study.study_name,
        metric=metric,
        maximize=maximize,
        attrs=dict(study.user_attrs),
        board=board,
        trials=trials_df,
        curves=curves_df,
        importances=param_importances(study),
        confusion=_best_confusion(study, board),
        generated=now,
    )


def param_importances(study: "optuna.Study") -> dict[str, float] | str:
    """Parameter importances (Optuna's PED-ANOVA) over the COMPLETE trials.

    Args:
        study: the Optuna study.

    Returns:
        param -> importance (summing to 1, most important first), or a one-line reason why there
        are none (fewer than 2 COMPLETE trials, or Optuna could not compute them).
    """
    import optuna

    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.values and math.isfinite(t.values[0])
    ]
    if len(complete) < 2:
        return f"needs at least 2 complete trials, this study has {len(complete)}"
    try:
        # Optuna's default evaluator (PED-ANOVA): no scikit-learn needed (fANOVA needs it), and
        # without a `target` it reads the study's direction itself.
        with warnings.catch_warnings():  # "few trials per regime": true of small searches, not news
            warnings.simplefilter("ignore")
            if len(study.directions) == 1:
                result = optuna.importance.get_param_importances(study)
            else:  # multi-objective: the first objective; PED-ANOVA treats lower as better
                sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
                result = optuna.importance.get_param_importances(study, target=lambda t: sign * t.values[0])
    except Exception as e:  # e.g. every param constant, or conditional params with no overlap
        text = str(e).strip().splitlines()
        return f"Optuna could not compute them: {text[0] if text else type(e).__name__}"
    if not result:
        return "no parameter varies across the complete trials"
    return {str(k): float(v) for k, v in result.items()}


def _best_confusion(study: "optuna.Study", board: pd.DataFrame) -> dict | None:
    best = board[board["rank"] == 1]
    if not len(best):
        return None
    number = int(best.iloc[0]["trial"])
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    matrix = trial.user_attrs.get("confusion_matrix")
    if not matrix:
        return None
    return {"trial": number, "matrix": matrix, "class_names": study.user_attrs.get("class_names")}


def _as_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _timestamp(dt: Any) -> float | None:
    return dt.timestamp() if dt is not None else None


# ------------------------------------------------------------------------------------------------
# 2. Figures (plain data -> plotly Figure; NotEnoughData when there is nothing to draw)
# ------------------------------------------------------------------------------------------------


def _t(v: Any) -> str:
    """A user string as plotly label text: plotly reads labels as a subset of HTML, so escape."""
    return html.escape(str(v))


def _finite(s: pd.Series) -> pd.Series:
    """A boolean mask: the value is a finite number (NaN, inf, None and text are not)."""
    numbers = pd.to_numeric(s, errors="coerce").astype("float64")
    return pd.Series(np.isfinite(numbers), index=s.index, dtype=bool)


def _layout(fig: go.Figure, *, title: str, **kw: Any) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.01},
        height=_PLOT_HEIGHT,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        template="plotly_white",
        font={"family": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"},
        legend={"orientation": "h", "y": -0.18},
        **kw,
    )
    return fig


def _complete(board: pd.DataFrame, metric: str) -> pd.DataFrame:
    return board[(board["state"] == "COMPLETE") & _finite(board[metric])]


def history_figure(trials: pd.DataFrame, *, metric: str, maximize: bool) -> go.Figure:
    """Optimisation history: each trial's score at the time it finished, and the best so far.

    Args:
        trials: `ReportData.trials` (trial, state, start, end, score).
        metric: the objective's name (axis title).
        maximize: direction of the objective.

    Returns:
        The figure.
    """
    done = trials[trials["state"].isin(["COMPLETE", "PRUNED"]) & trials["end"].notna()]
    done = done[_finite(done["score"])]
    complete = done[done["state"] == "COMPLETE"].sort_values("end")
    if not len(complete):
        raise NotEnoughData("no complete trial with a finite value yet")
    t0 = trials["start"].dropna().min() if trials["start"].notna().any() else done["end"].min()
    fig = go.Figure()
    for state, symbol in (("PRUNED", "x-thin-open"), ("COMPLETE", "circle")):
        part = done[done["state"] == state]
        if len(part):
            fig.add_trace(
                go.Scatter(
                    x=(part["end"] - t0) / 60,
                    y=part["score"],
                    mode="markers",
                    name="pruned (best epoch)" if state == "PRUNED" else "complete",
                    marker={"color": STATE_COLOURS[state], "symbol": symbol, "size": 8,
                            "line": {"width": 2, "color": STATE_COLOURS[state]}},  # fmt: skip
                    customdata=part["trial"],
                    hovertemplate="trial %{customdata}<br>%{y:.4f}<extra></extra>",
                )
            )
    best = complete["score"].cummax() if maximize else complete["score"].cummin()
    fig.add_trace(
        go.Scatter(
            x=(complete["end"] - t0) / 60,
            y=best,
            mode="lines",
            line={"shape": "hv", "color": _BEST_COLOUR, "width": 3},
            name="best so far",
            hoverinfo="skip",
        )
    )
    fig.update_xaxes(title_text="minutes since the study started (trial finished)")
    fig.update_yaxes(title_text=_t(metric))
    return _layout(fig, title="Optimisation history")


def backbone_figure(board: pd.DataFrame, *, metric: str) -> go.Figure:
    """Score by backbone: a box of the complete trials per backbone, pruned trials as crosses.

    Args:
        board: the leaderboard.
        metric: the objective's column.

    Returns:
        The figure.
    """
    complete = _complete(board, metric)
    if not len(complete):
        raise NotEnoughData("no complete trial with a finite value yet")
    fig = go.Figure()
    for backbone, part in complete.groupby(complete["backbone"].astype(str), sort=True):
        fig.add_trace(
            go.Box(
                x=[_t(backbone)] * len(part),
                y=part[metric],
                name=_t(backbone),
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                customdata=part["trial"],
                hovertemplate="trial %{customdata}<br>%{y:.4f}<extra></extra>",
                showlegend=False,
                marker={"color": STATE_COLOURS["COMPLETE"]},
            )
        )
    pruned = board[(board["state"] == "PRUNED") & _finite(board[metric])]
    if len(pruned):
        fig.add_trace(
            go.Scatter(
                x=[_t(b) for b in pruned["backbone"]],
                y=pruned[metric],
                mode="markers",
                name="pruned (best epoch)",
                marker={"symbol": "x-thin-open", "size": 8, "color": STATE_COLOURS["PRUNED"],
                        "line": {"width": 2, "color": STATE_COLOURS["PRUNED"]}},  # fmt: skip
                customdata=pruned["trial"],
                hovertemplate="trial %{customdata} (pruned)<br>%{y:.4f}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="backbone", type="category")
    fig.update_yaxes(title_text=_t(metric))
    return _layout(fig, title="Score by backbone")


def parallel_figure(board: pd.DataFrame, *, metric: str, params: list[str]) -> go.Figure:
    """Parallel coordinates of the params against the score, one line per complete trial.

    Drawn with SVG lines rather than plotly's `parcoords`, which needs WebGL: the report must
    render on machines without it (remote desktops, headless browsers).

    Args:
        board: the leaderboard.
        metric: the objective's column (the last axis and the line colour).
        params: the param columns to show, in order.

    Returns:
        The figure.
    """
    complete = _complete(board, metric)
    params = [p for p in params if p in complete and complete[p].notna().any()]
    if len(complete) < 2 or not params:
        raise NotEnoughData(f"needs at least 2 complete trials with params, this study has {len(complete)}")
    axes = [*params, metric]
    positions, labels = {}, []
    for i, col in enumerate(axes):
        positions[col], ticks = _axis_positions(complete[col], log=(col == "lr"))
        labels += [(i, y, text) for y, text in ticks]
    score = complete[metric].astype(float)
    lo, hi = score.min(), score.max()
    colour_at = ((score - lo) / (hi - lo)) if hi > lo else score * 0 + 0.5
    colours = sample_colorscale("Viridis", list(colour_at))
    fig = go.Figure()
    for k, (_, row) in enumerate(complete.iterrows()):
        fig.add_trace(
            go.Scatter(
                x=list(range(len(axes))),
                y=[positions[col].loc[row.name] for col in axes],
                mode="lines",
                line={"color": colours[k], "width": 2},
                opacity=0.75,
                showlegend=False,
                hovertemplate=(
                    f"trial {int(row['trial'])}<br>"
                    + "<br>".join(f"{_t(c)} = {_t(_fmt(row[c]))}" for c in axes)
                    + "<extra></extra>"
                ),
            )
        )
    # A invisible trace whose only job is the colour bar of the score.
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="markers",
            showlegend=False,
            hoverinfo="skip",
            marker={"colorscale": "Viridis", "cmin": lo, "cmax": hi, "color": [lo],
                    "showscale": True, "colorbar": {"title": {"text": _t(metric)}}},  # fmt: skip
        )
    )
    for i in range(len(axes)):
        fig.add_shape(type="line", x0=i, x1=i, y0=0, y1=1, line={"color": "#4a5568", "width": 1})
    for i, y, text in labels:
        fig.add_annotation(x=i, y=y, text=_t(text), showarrow=False, xanchor="left", xshift=4,
                           font={"size": 10}, bgcolor="rgba(255,255,255,0.7)")  # fmt: skip
    fig.update_xaxes(tickvals=list(range(len(axes))), ticktext=[_t(a) for a in axes],
                     range=[-0.2, len(axes) - 0.4], showgrid=False, zeroline=False)  # fmt: skip
    fig.update_yaxes(visible=False, range=[-0.05, 1.05])
    return _layout(fig, title="Parallel coordinates (complete trials)")


def _axis_positions(values: pd.Series, *, log: bool) -> tuple[pd.Series, list[tuple[float, str]]]:
    """Maps one column to heights in [0, 1] and returns the tick labels of that axis."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().sum() == values.notna().sum():  # every present value is a number
        x = numeric.astype(float)
        use_log = log and (x.dropna() > 0).all()
        scaled = x.map(math.log10) if use_log else x
        lo, hi = scaled.min(), scaled.max()
        pos = (scaled - lo) / (hi - lo) if hi > lo else scaled * 0 + 0.5
        ends = [(float(pos[x.idxmin()]), _fmt(x.min())), (float(pos[x.idxmax()]), _fmt(x.max()))]
        return pos, ends if hi > lo else ends[:1]
    # Categories (e.g. freeze_depth 0, 2, "all"): numbers first in order, then names.
    cats = sorted(set(values.dropna()), key=lambda v: (isinstance(v, str), v if isinstance(v, str) else float(v)))
    step = 1 / (len(cats) - 1) if len(cats) > 1 else 0
    where = {c: (i * step if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
    return values.map(lambda v: where.get(v)), [(where[c], str(c)) for c in cats]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.2e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.4g}"
    return "-" if v is None or v is pd.NA else str(v)


def importance_figure(importances: dict[str, float]) -> go.Figure:
    """Parameter importances as horizontal bars, most important on top.

    Args:
        importances: param -> importance, from `param_importances`.

    Returns:
        The figure.
    """
    if not importances:
        raise NotEnoughData("no importances")
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig = go.Figure(
        go.Bar(
            x=[v for _, v in items],
            y=[_t(k) for k, _ in items],
            orientation="h",
            marker={"color": STATE_COLOURS["COMPLETE"]},
            hovertemplate="%{y}: %{x:.3f}<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="importance (PED-ANOVA, normalised to sum to 1)")
    fig.update_yaxes(type="category")
    return _layout(fig, title="Parameter importances")


def curves_figure(curves: pd.DataFrame, *, metric: str, best_trial: int | None) -> go.Figure:
    """Learning curves: the per-epoch score of every trial; pruned trials dashed, ending in a cross.

    Args:
        curves: `ReportData.curves` (trial, state, epoch, value).
        metric: the objective's name (axis title).
        best_trial: the number of the best trial, drawn thick; None when there is none.

    Returns:
        The figure.
    """
    if not len(curves):
        raise NotEnoughData("no trial has reported a per-epoch value yet")
    styles = {"COMPLETE": "solid", "PRUNED": "dash", "FAIL": "dot", "RUNNING": "longdash"}
    fig = go.Figure()
    shown: set[str] = set()
    for trial, part in curves.groupby("trial", sort=True):
        part = part.sort_values("epoch")
        state = str(part["state"].iloc[0])
        best = trial == best_trial
        name = "best trial" if best else state.lower()
        colour = _BEST_COLOUR if best else STATE_COLOURS.get(state, "#718096")
        stopped = state in ("PRUNED", "FAIL")
        fig.add_trace(
            go.Scatter(
                x=part["epoch"],
                y=part["value"],
                mode="lines+markers",
                name=name,
                legendgroup=name,
                showlegend=name not in shown,
                line={"color": colour, "dash": styles.get(state, "solid"), "width": 4 if best else 1.5},
                # A stopped trial ends in a cross, so it reads as cut short, not as converged.
                marker={"size": [0] * (len(part) - 1) + [11 if stopped else 0], "symbol": "x", "color": colour},
                hovertemplate=f"trial {int(trial)} ({state.lower()})<br>epoch %{{x}}: %{{y:.4f}}<extra></extra>",
            )
        )
        shown.add(name)
    fig.update_xaxes(title_text="epoch", dtick=1)
    fig.update_yaxes(title_text=_t(metric))
    return _layout(fig, title="Learning curves (per epoch)")


_COSTS = (("params", "parameters (millions)", 1e-6), ("latency_ms", "batch-1 latency (ms)", 1.0))


def cost_figure(board: pd.DataFrame, *, metric: str, maximize: bool) -> go.Figure:
    """Score against cost (parameters, latency) of the complete trials, with the Pareto front.

    Args:
        board: the leaderboard.
        metric: the objective's column.
        maximize: direction of the objective.

    Returns:
        The figure, one panel per cost that was recorded.
    """
    complete = _complete(board, metric)
    panels = [c for c in _COSTS if complete[c[0]].notna().any()]
    if not panels:
        raise NotEnoughData("no complete trial has recorded params or latency yet")
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, horizontal_spacing=0.06)
    for col_i, (col, label, scale) in enumerate(panels, start=1):
        part = complete[complete[col].notna()]
        cost = (part[col].astype(float) * scale).tolist()
        front = pareto_flags(cost, part[metric].tolist(), maximize=maximize)
        text = [f"trial {int(t)} ({_t(b)})" for t, b in zip(part["trial"], part["backbone"])]
        fig.add_trace(
            go.Scatter(x=cost, y=part[metric], mode="markers", text=text, name="complete",
                       legendgroup="complete", showlegend=col_i == 1,
                       marker={"color": STATE_COLOURS["COMPLETE"], "size": 8, "opacity": 0.6},
                       hovertemplate="%{text}<br>%{x:.3g}, %{y:.4f}<extra></extra>"),  # fmt: skip
            row=1,
            col=col_i,
        )
        on = sorted((c, s, tx) for c, s, tx, f in zip(cost, part[metric], text, front) if f)
        fig.add_trace(
            go.Scatter(x=[p[0] for p in on], y=[p[1] for p in on], text=[p[2] for p in on],
                       mode="lines+markers", name="Pareto front", legendgroup="front",
                       showlegend=col_i == 1, line={"shape": "hv", "color": _BEST_COLOUR, "width": 2},
                       marker={"size": 12, "symbol": "circle-open", "color": _BEST_COLOUR, "line": {"width": 2}},
                       hovertemplate="%{text} (Pareto)<br>%{x:.3g}, %{y:.4f}<extra></extra>"),  # fmt: skip
            row=1,
            col=col_i,
        )
        fig.update_xaxes(title_text=label, row=1, col=col_i)
    fig.update_yaxes(title_text=_t(metric), row=1, col=1)
    return _layout(fig, title="Score against cost (complete trials; Pareto front marked)")


def timeline_figure(trials: pd.DataFrame) -> go.Figure:
    """Trial timeline per worker: one bar per trial from start to finish, coloured by state.

    Gaps between bars on a worker's row are idle capacity; the title gives the busy share.

    Args:
        trials: `ReportData.trials` (trial, state, backbone, worker, start, end).

    Returns:
        The figure.
    """
    timed = trials[trials["start"].notna() & trials["end"].notna()]
    if not len(timed):
        raise NotEnoughData("no trial has recorded when it started and finished")
    t0, t1 = timed["start"].min(), timed["end"].max()
    workers = sorted(timed["worker"].unique())
    busy = float((timed["end"] - timed["start"]).clip(lower=0).sum())
    span = max(t1 - t0, 1e-9) * len(workers)
    fig = go.Figure()
    for state in [s for s in STATE_COLOURS if s in set(timed["state"])]:
        part = timed[timed["state"] == state]
        fig.add_trace(
            go.Bar(
                y=[_t(w) for w in part["worker"]],
                x=(part["end"] - part["start"]) / 60,
                base=(part["start"] - t0) / 60,
                orientation="h",
                name=state.lower(),
                marker={"color": STATE_COLOURS[state], "line": {"color": "white", "width": 1}},
                text=[f"#{int(t)}" for t in part["trial"]],
                textposition="inside",
                insidetextanchor="middle",
                customdata=[[int(t), _t(b)] for t, b in zip(part["trial"], part["backbone"])],
                hovertemplate=(
                    "trial %{customdata[0]} (%{customdata[1]})<br>from %{base:.1f} min, "
                    "%{x:.1f} min<extra>" + state.lower() + "</extra>"
                ),
            )
        )
    fig.update_xaxes(title_text="minutes since the study started")
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=[_t(w) for w in workers])
    title = f"Trial timeline per worker ({len(workers)} workers busy {busy / span:.0%} of the time)"
    return _layout(fig, title=title, barmode="overlay", bargap=0.3)


def confusion_figure(matrix: list[list[float]], *, class_names: list[str] | None, trial: int) -> go.Figure:
    """Confusion matrix of the best trial on the validation set (rows: true class).

    Args:
        matrix: square counts, rows = true class, columns = predicted class.
        class_names: names in class-index order; None or the wrong length: "class i".
        trial: the trial number (title).

    Returns:
        The figure.
    """
    try:
        z = [[float(v) for v in row] for row in matrix]
    except (TypeError, ValueError):
        raise NotEnoughData("the best trial's confusion matrix is not a table of numbers") from None
    n = len(z)
    if n == 0 or any(len(row) != n for row in z):
        raise NotEnoughData(f"the best trial's confusion matrix is not square ({n} rows)")
    names = list(class_names) if class_names and len(class_names) == n else [f"class {i}" for i in range(n)]
    labels = [_t(c) for c in names]
    totals = [sum(row) or 1.0 for row in z]
    share = [[v / totals[i] for v in row] for i, row in enumerate(z)]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=labels,
            y=labels,
            customdata=share,
            colorscale="Blues",
            texttemplate="%{z:.0f}" if n <= 30 else None,
            hovertemplate="true %{y}<br>predicted %{x}<br>%{z:.0f} (%{customdata:.0%} of the row)<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="predicted class", type="category")
    fig.update_yaxes(title_text="true class", type="category", autorange="reversed")
    return _layout(fig, title=f"Confusion matrix of the best trial (#{trial}, validation set)")


@dataclass(frozen=True)
class Plot:
    """One plot of the report: how to build it from the report data."""

    key: str  # the div id suffix and anchor
    title: str  # the section heading
    about: str  # one line under the heading: how to read it
    build: Callable[[ReportData], go.Figure]  # raises NotEnoughData when there is nothing to draw


def _best_trial(data: ReportData) -> int | None:
    best = data.board[data.board["rank"] == 1]
    return int(best.iloc[0]["trial"]) if len(best) else None


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
         lambda d: curves_figure(d.curves, metric=d.metric, best_trial=_best_trial(d))),
    Plot("cost", "Accuracy against cost", "Cheaper and better is up-left; the green line is the Pareto front.",
         lambda d: cost_figure(d.board, metric=d.metric, maximize=d.maximize)),
    Plot("timeline", "Trial timeline", "One row per worker; gaps are idle capacity.",
         lambda d: timeline_figure(d.trials)),
    Plot("confusion", "Confusion matrix", "Best trial on the validation set; rows are the true class.",
         _confusion),
)  # fmt: skip


def build_figures(data: ReportData) -> list[tuple[Plot, go.Figure | str]]:
    """Builds every plot, or the note that replaces it.

    Args:
        data: the report data.

    Returns:
        (plot, figure) pairs in page order; the figure is a str note when the plot has nothing
        to draw or failed (a bad plot never stops the report).
    """
    out: list[tuple[Plot, go.Figure | str]] = []
    for plot in PLOTS:
        try:
            out.append((plot, plot.build(data)))
        except NotEnoughData as e:
            out.append((plot, f"Not enough data: {e}."))
        except Exception as e:  # a bug or odd data in one plot must not cost the whole report
            out.append((plot, f"Could not draw this plot: {type(e).__name__}: {e}"))
    return out


# ------------------------------------------------------------------------------------------------
# 3. Page
# ------------------------------------------------------------------------------------------------


def write_report(
    study_or_name: "optuna.Study | str",
    *,
    out_dir: str | Path | None = None,
    studies_dir: str | Path = "studies",
    storage: str | None = None,
    reports_dir: str | Path = "reports",
) -> Path:
    """Writes the report of a study: `index.html` (self-contained) and `leaderboard.csv`.

    Args:
        study_or_name: an Optuna study, or the name of one to open.
        out_dir: the folder to write; None: `reports_dir/<study name>/`.
        studies_dir: where default SQLite studies live (when a name is given).
        storage: the storage URL (when a name is given); None: `studies_dir/<name>.db`.
        reports_dir: the parent of the default out_dir.

    Returns:
        The path of index.html. Both files are replaced atomically, so a browser or a reader
        never sees half a page while a running search refreshes it.
    """
    if isinstance(study_or_name, str):
        study = load_study(study_or_name, storage=storage, studies_dir=studies_dir)
    else:
        study = study_or_name
    if out_dir is None:
        # The name becomes a folder: refuse names that could escape reports_dir.
        out = Path(reports_dir, check_study_name(study.study_name))
    else:
        out = Path(out_dir)
    data = collect(study)
    page = render_page(data, build_figures(data))
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "leaderboard.csv", data.board.to_csv(index=False))
        _write_atomic(out / "index.html", page)
    except OSError as e:
        raise TLSearchError(f"cannot write the report to {out}: {e.strerror or e}") from None
    return out / "index.html"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _script_json(obj: Any) -> str:
    """JSON that is safe inside <script>: no `</script>`, `<!--` or `&` can appear in it."""
    # PlotlyJSONEncoder writes NaN and inf as null (plain JSON has neither).
    text = json.dumps(obj, cls=PlotlyJSONEncoder, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _csp_hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode() + "'"


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def render_page(data: ReportData, figures: list[tuple[Plot, go.Figure | str]]) -> str:
    """Draws the page: header, leaderboard table, plots (or their notes).

    Args:
        data: the report data.
        figures: from `build_figures`.

    Returns:
        The HTML text of the self-contained page.
    """
    plotly_js = plotly.offline.get_plotlyjs().replace("</script", "<\\/script")
    specs = {}
    sections = []
    for plot, fig in figures:
        div = f"plot-{plot.key}"
        if isinstance(fig, go.Figure):
            specs[div] = _figure_json(fig)
            body = f'<div class="plot" id="{div}" data-plot="{plot.key}"></div>'
        else:
            body = f'<p class="note" data-plot-note="{plot.key}">{_e(fig)}</p>'
        sections.append(
            f'<section class="card" id="{plot.key}"><h2>{_e(plot.title)}</h2>'
            f'<p class="about">{_e(plot.about)}</p>{body}</section>'
        )
    payload = _script_json({"config": _PLOTLY_CONFIG, "figures": specs})
    # Only these two scripts may run (CSP by hash): no injected handler or script can, and no
    # request can leave the page (default-src 'none').
    csp = (
        "default-src 'none'; "
        f"script-src {_csp_hash(plotly_js)} {_csp_hash(_APP_JS)}; "
        "style-src 'unsafe-inline'; img-src data: blob:; font-src data:; "
        "base-uri 'none'; form-action 'none'"
    )
    return _PAGE.format(
        title=_e(f"tlsearch report: {data.name}"),
        csp=_e(csp),
        css=_CSS,
        header=_header_html(data),
        table=_table_html(data.board),
        sections="\n".join(sections),
        plotly_js=plotly_js,
        payload=payload,
        app_js=_APP_JS,
        n_plots=len(specs),
    )


def _figure_json(fig: go.Figure) -> dict:
    spec = fig.to_plotly_json()
    return {"data": spec.get("data", []), "layout": spec.get("layout", {})}


def _header_html(data: ReportData) -> str:
    attrs = data.attrs
    counts = data.board["state"].value_counts().to_dict()
    badges = " ".join(
        f'<span class="badge s-{s}">{counts.get(s, 0)} {s.lower()}</span>'
        for s in STATE_COLOURS
        if counts.get(s) or s in ("COMPLETE", "PRUNED", "FAIL")
    )
    classes = attrs.get("class_names") or []
    class_list = ", ".join(f"<code>{_e(c)}</code>" for c in classes) if classes else "not recorded"
    rows = [
        ("Dataset", f"<code>{_e(attrs.get('dataset', 'not recorded'))}</code>"),
        ("Classes", f"{len(classes)}: {class_list}" if classes else class_list),
        ("Objective", f"{'maximise' if data.maximize else 'minimise'} <code>{_e(data.metric)}</code>"),
        ("Trials", f"{len(data.board)} &nbsp; {badges}"),
    ]
    if attrs.get("split"):
        rows.append(("Split", _e(attrs["split"])))
    if attrs.get("dataset_fingerprint"):
        rows.append(("Fingerprint", f"<code>{_e(attrs['dataset_fingerprint'])}</code>"))
    generated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(data.generated))
    rows.append(("Generated", _e(generated)))
    meta = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (
        f'<header><h1>Study <span class="name">{_e(data.name)}</span></h1>'
        f'<table class="meta">{meta}</table>{_best_html(data)}</header>'
    )


def _best_html(data: ReportData) -> str:
    best = data.board[data.board["rank"] == 1]
    if not len(best):
        return '<div class="best none">No complete trial yet: no best trial.</div>'
    r = best.iloc[0]
    parts = [f'<b>{_e(data.metric)} {_e(_fmt(float(r[data.metric])))}</b>']
    for col, label in (("backbone", "backbone"), ("freeze_depth", "freeze depth"), ("augmentation", "augmentation"),
                       ("lr", "lr"), ("batch_size", "batch"), ("image_size", "image"), ("epochs_run", "epochs")):  # fmt: skip
        if _present(r[col]):
            parts.append(f"{label} <code>{_e(_fmt(r[col]))}</code>")
    if _present(r["params"]):
        parts.append(f"{float(r['params']) / 1e6:.1f}M params")
    if _present(r["latency_ms"]):
        parts.append(f"{float(r['latency_ms']):.1f} ms/image")
    return f'<div class="best">Best: trial #{int(r["trial"])} &middot; ' + " &middot; ".join(parts) + "</div>"


def _present(v: Any) -> bool:
    if v is None or v is pd.NA:
        return False
    return not (isinstance(v, float) and math.isnan(v))


# How each column is shown in the table (the CSV keeps the raw values).
def _cell(col: str, v: Any) -> tuple[str, str, str]:
    """Returns (sort key, kind "n" or "s", display text) of one table cell."""
    if not _present(v) or v == "":
        return "", "s", "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "item"):
        return str(v), "s", str(v)
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float) and not math.isfinite(v):
        return "", "s", str(v)
    if col == "params":
        text = f"{v / 1e6:.2f}M"
    elif col == "lr" or (isinstance(v, float) and v != 0 and abs(v) < 1e-3):
        text = f"{v:.2e}"
    elif col in ("latency_ms",):
        text = f"{v:.1f}"
    elif col == "seconds":
        text = f"{v:.0f}"
    elif isinstance(v, float):
        text = f"{v:.4f}" if col.startswith(("val_", "train_")) else f"{v:.4g}"
    else:
        text = str(v)
    return repr(float(v)), "n", text


def _table_html(board: pd.DataFrame) -> str:
    cols = list(board.columns)
    head = "".join(f'<th data-col="{_e(c)}" tabindex="0" scope="col">{_e(c)}</th>' for c in cols)
    body = []
    for r in board.to_dict("records"):
        cells = []
        for c in cols:
            key, kind, text = _cell(c, r[c])
            cls = f' class="badge s-{_e(text)}"' if c == "state" else ""
            if c == "error" and text != "–":
                shown = text if len(text) <= 80 else text[:77] + "..."
                cells.append(f'<td data-v="{_e(key)}" data-t="s" title="{_e(text)}" class="err">{_e(shown)}</td>')
            else:
                cells.append(f'<td data-v="{_e(key)}" data-t="{kind}"><span{cls}>{_e(text)}</span></td>')
        body.append(f'<tr data-trial="{_e(r["trial"])}" data-state="{_e(r["state"])}">' + "".join(cells) + "</tr>")
    return (
        '<div class="controls"><label>Filter <input id="filter" type="search" '
        'placeholder="e.g. resnet, pruned, trivialaugment" autocomplete="off"></label>'
        f'<span id="shown">{len(board)} of {len(board)} trials</span>'
        '<span class="hint">Click a column header to sort.</span></div>'
        f'<div class="tablewrap"><table id="leaderboard"><thead><tr>{head}</tr></thead>'
        f'<tbody>{"".join(body)}</tbody></table></div>'
    )


_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f7fafc;color:#1a202c;
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1280px;margin:0 auto;padding:20px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:0 0 2px}
.name{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;
  background:#edf2f7;padding:1px 4px;border-radius:3px;word-break:break-all}
header{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:16px 18px;margin-bottom:16px}
table.meta th{text-align:left;color:#4a5568;font-weight:600;padding:2px 14px 2px 0;vertical-align:top}
.best{margin-top:10px;padding:8px 12px;background:#f0fff4;border-left:4px solid #2f855a;border-radius:4px}
.best.none{background:#fffaf0;border-color:#d69e2e}
.card{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:14px 16px;margin-bottom:16px}
.about{color:#4a5568;margin:0 0 6px}
.note{color:#744210;background:#fffaf0;border:1px dashed #d69e2e;padding:10px;border-radius:4px}
.plot{width:100%;min-height:420px}
.controls{display:flex;gap:16px;align-items:center;margin:6px 0 8px;flex-wrap:wrap}
.controls input{padding:4px 8px;border:1px solid #cbd5e0;border-radius:4px;width:280px}
.hint,#shown{color:#4a5568}
.tablewrap{overflow-x:auto;max-height:560px;overflow-y:auto;border:1px solid #e2e8f0;border-radius:4px}
#leaderboard{border-collapse:collapse;width:100%;font-size:12.5px;white-space:nowrap}
#leaderboard th{position:sticky;top:0;background:#edf2f7;cursor:pointer;user-select:none;
  padding:6px 8px;text-align:left;border-bottom:1px solid #cbd5e0}
#leaderboard th[aria-sort=ascending]::after{content:" \\25B2"}
#leaderboard th[aria-sort=descending]::after{content:" \\25BC"}
#leaderboard td{padding:4px 8px;border-bottom:1px solid #edf2f7}
#leaderboard td[data-t=n]{text-align:right;font-variant-numeric:tabular-nums}
#leaderboard tr:hover td{background:#f7fafc}
td.err{color:#9b2c2c;max-width:420px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.badge{display:inline-block;padding:0 6px;border-radius:9px;font-size:11.5px;color:#fff;background:#718096}
.s-COMPLETE{background:#2b6cb0}.s-PRUNED{background:#a0aec0;color:#1a202c}.s-FAIL{background:#c53030}
.s-RUNNING{background:#d69e2e}.s-WAITING{background:#718096}
footer{color:#718096;font-size:12px;text-align:center;padding:10px}
"""

# The page's own script: draws the figures from the JSON block, then makes the table sortable
# and filterable. State lives in location.hash (#sort=COL&dir=asc|desc&filter=TEXT), so a view
# can be linked; tests use it to drive the page. #tl-status records what rendered and any
# blocked load (CSP violation) for those tests.
_APP_JS = r"""
(function () {
  "use strict";
  var status = document.getElementById("tl-status");
  var violations = [], errors = [];
  document.addEventListener("securitypolicyviolation", function (e) {
    violations.push(e.violatedDirective + " " + e.blockedURI);
    status.setAttribute("data-violations", violations.join(" | "));
  });

  // ---- leaderboard: sort and filter --------------------------------------------------------
  var table = document.getElementById("leaderboard");
  var tbody = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var filterBox = document.getElementById("filter");
  var state = {sort: null, dir: "desc", filter: ""};

  function readHash() {
    var h = location.hash.replace(/^#/, "");
    h.split("&").forEach(function (part) {
      var kv = part.split("=");
      if (kv.length !== 2) return;
      var v = decodeURIComponent(kv[1].replace(/\+/g, " "));
      if (kv[0] === "sort") state.sort = v;
      if (kv[0] === "dir" && (v === "asc" || v === "desc")) state.dir = v;
      if (kv[0] === "filter") state.filter = v;
    });
  }
  function writeHash() {
    var parts = [];
    if (state.sort) parts.push("sort=" + encodeURIComponent(state.sort), "dir=" + state.dir);
    if (state.filter) parts.push("filter=" + encodeURIComponent(state.filter));
    try { history.replaceState(null, "", "#" + parts.join("&")); } catch (e) { /* file: quirks */ }
  }
  function compare(a, b, numeric) {
    if (numeric) return parseFloat(a) - parseFloat(b);
    return a.localeCompare(b, undefined, {numeric: true, sensitivity: "base"});
  }
  function sortRows() {
    var i = heads.findIndex(function (th) { return th.getAttribute("data-col") === state.sort; });
    heads.forEach(function (th) { th.removeAttribute("aria-sort"); });
    if (i < 0) return;
    heads[i].setAttribute("aria-sort", state.dir === "asc" ? "ascending" : "descending");
    var sign = state.dir === "asc" ? 1 : -1;
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (ra, rb) {
      var a = ra.cells[i], b = rb.cells[i];
      var va = a.getAttribute("data-v"), vb = b.getAttribute("data-v");
      // Missing values always go last, whichever the direction.
      if (va === "" || vb === "") return (va === "") - (vb === "");
      var numeric = a.getAttribute("data-t") === "n" && b.getAttribute("data-t") === "n";
      return sign * compare(va, vb, numeric);
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
  }
  function filterRows() {
    var terms = state.filter.toLowerCase().split(/\s+/).filter(Boolean);
    var shown = 0;
    Array.prototype.forEach.call(tbody.rows, function (r) {
      var text = r.textContent.toLowerCase();
      var ok = terms.every(function (t) { return text.indexOf(t) >= 0; });
      r.hidden = !ok;
      if (ok) shown++;
    });
    document.getElementById("shown").textContent = shown + " of " + tbody.rows.length + " trials";
  }
  heads.forEach(function (th) {
    function activate() {
      var col = th.getAttribute("data-col");
      if (state.sort === col) state.dir = state.dir === "asc" ? "desc" : "asc";
      else { state.sort = col; state.dir = (col === "rank" || col === "trial") ? "asc" : "desc"; }
      sortRows(); writeHash();
    }
    th.addEventListener("click", activate);
    th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); activate(); } });
  });
  filterBox.addEventListener("input", function () { state.filter = filterBox.value; filterRows(); writeHash(); });
  window.addEventListener("hashchange", function () { readHash(); filterBox.value = state.filter; sortRows(); filterRows(); });
  readHash();
  filterBox.value = state.filter;
  sortRows();
  filterRows();
  window.tlsearch = {sortTable: function (col, dir) { state.sort = col; state.dir = dir || "desc"; sortRows(); writeHash(); }};

  // ---- figures -----------------------------------------------------------------------------
  var payload = JSON.parse(document.getElementById("tl-figures").textContent);
  var ids = Object.keys(payload.figures);
  var pending = ids.map(function (id) {
    var spec = payload.figures[id];
    try {
      return Plotly.newPlot(id, spec.data, spec.layout, payload.config).catch(function (e) {
        errors.push(id + ": " + e); });
    } catch (e) { errors.push(id + ": " + e); return Promise.resolve(); }
  });
  Promise.all(pending).then(function () {
    var drawn = ids.filter(function (id) { return document.querySelector("#" + id + " .main-svg"); });
    status.setAttribute("data-rendered", String(drawn.length));
    status.setAttribute("data-errors", errors.join(" | "));
    status.setAttribute("data-done", "1");
  });
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<main>
{header}
<section class="card" id="leaderboard-section"><h2>Leaderboard</h2>
<p class="about">Complete trials ranked by score; pruned trials (stopped early, listed by their best
epoch) and failed trials with their reasons follow. Also in <code>leaderboard.csv</code> beside this page.</p>
{table}
</section>
{sections}
<div id="tl-status" hidden data-expected="{n_plots}" data-rendered="0" data-errors="" data-violations=""></div>
<footer>Made by tlsearch. This page is self-contained and loads nothing from the network.</footer>
</main>
<script>{plotly_js}</script>
<script type="application/json" id="tl-figures">{payload}</script>
<script>{app_js}</script>
</body>
</html>
"""
