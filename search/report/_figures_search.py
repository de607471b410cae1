"""Figures of how the search went: scores over time, by backbone, across the params, and which
params matter. Each takes plain data (`ReportData` tables) and returns a plotly Figure, or raises
`NotEnoughData`.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from search.report._plotting import _BEST_COLOUR, STATE_COLOURS, NotEnoughData, _complete, _finite, _fmt, _layout, _t


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
